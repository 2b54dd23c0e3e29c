"""Reading run directories into tables, figures and reports (`python -m hpcrl analyse`).

pandas, scipy and matplotlib are imported inside this package only, and only when a report
or `load_runs` needs them, so the `analyse` parser and `stats.threshold_crossing`, which
training ranks import, stay light. `load_runs` is the notebook entry point:

    from hpcrl.analysis import load_runs
    runs, episodes, metrics = load_runs(["runs/study"])
"""

from __future__ import annotations


def load_runs(paths, by=None):
    """Run directories as pandas DataFrames; see `hpcrl.analysis.runs.load_runs`."""
    from hpcrl.analysis.runs import load_runs as _load_runs

    return _load_runs(paths, by=by)


__all__ = ["load_runs"]
