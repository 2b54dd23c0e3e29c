"""Reading run directories into tables, figures and reports (`python -m hpcrl analyse`).

Never imported by a training rank: pandas, scipy and matplotlib are imported inside this
package only. `load_runs` is the notebook entry point:

    from hpcrl.analysis import load_runs
    runs, episodes, metrics = load_runs(["runs/study"])
"""

from __future__ import annotations


def load_runs(paths, by=None):
    """Run directories as pandas DataFrames; see `hpcrl.analysis.runs.load_runs`."""
    from hpcrl.analysis.runs import load_runs as _load_runs

    return _load_runs(paths, by=by)


__all__ = ["load_runs"]
