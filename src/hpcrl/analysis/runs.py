"""Finding run directories, reading their `run.h5` (also while a job writes it) and grouping
runs into experiments.

An *experiment* is a set of runs whose configs are equal except for `seed` and the keys a
resume may change (`hpcrl.config.RESUMABLE_KEYS`: run_dir, log and checkpoint intervals,
...), at one `world_size`; `by=[keys]` groups by those config keys instead (still per
world size). Experiments are named by the keys whose values differ between them.
"""

from __future__ import annotations

import difflib
import glob
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hpcrl.config import RESUMABLE_KEYS, flatten
from hpcrl.errors import UserError
from hpcrl.storage.runfile import EPISODE_FIELDS, RUN_FILE, open_run, read_metrics

# Config keys that never separate experiments (besides RESUMABLE_KEYS).
SEED_KEYS = frozenset({"seed"})
# Keys shown first in experiment names, in this order; world_size always last.
NAME_ORDER = ("env_id", "algo", "layout")


@dataclass
class Run:
    """One run directory's `run.h5`, read whole (up to its writer's last flush).

    Attributes:
        episodes: `/episodes` columns, each (n_episodes,), dtypes of `EPISODE_FIELDS`;
            `wall_time` in training seconds since the run started.
        metrics: `/metrics` columns, each (n_rows,), all of one length; float64 NaN where
            a value was not yet defined.
        metrics_left_out: format-1 columns that could not be matched to their rows.
    """

    path: Path
    attrs: dict
    config: dict  # flat (dotted keys), as in config files
    episodes: dict[str, np.ndarray]
    metrics: dict[str, np.ndarray]
    metrics_left_out: list[str] = field(default_factory=list)
    modified_s_ago: float = 0.0  # since run.h5 was last written (a live run: its last flush)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def status(self) -> str:
        return str(self.attrs.get("status", "unknown"))

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def world_size(self) -> int:
        return int(self.attrs.get("world_size", 1))

    @property
    def env_id(self) -> str:
        return str(self.attrs.get("env_id", self.config.get("env_id", "")))

    @property
    def algo(self) -> str:
        return str(self.attrs.get("algo", self.config.get("algo", "")))

    @property
    def eval_mean_return(self) -> float:
        return float(self.attrs.get("eval_mean_return", np.nan))

    @property
    def env_steps(self) -> int:
        """Global env steps at the last logged row (0 before the first)."""
        steps = self.metrics.get("env_steps")
        return int(steps[-1]) if steps is not None and len(steps) else 0

    @property
    def wall_time_s(self) -> float:
        """Training seconds: the final `wall_time_s` attribute, else the last logged row's."""
        if "wall_time_s" in self.attrs and not self.running:
            return float(self.attrs["wall_time_s"])
        wall = self.metrics.get("wall_time")
        return float(wall[-1]) if wall is not None and len(wall) else 0.0

    @property
    def env_steps_per_s(self) -> float:
        """Mean global env-step rate over the training time (NaN before the first row)."""
        return self.env_steps / self.wall_time_s if self.wall_time_s > 0 else np.nan


class RunTables(NamedTuple):
    """What `load_runs` returns: three pandas DataFrames.

    runs: one row per run (run, experiment, status, world_size, env_steps, wall_time_s,
        env_steps_per_s, eval_mean_return, episodes, then every config key).
    episodes: one row per finished episode (run, experiment, return, length, env_steps,
        wall_time [s since the run started], rank, then world_size and every config key).
    metrics: one row per (log row, metric) (run, experiment, row, env_steps, wall_time,
        metric, value, then world_size and every config key); NaN values dropped.
    """

    runs: object
    episodes: object
    metrics: object


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """The run directories named by `paths`: run directories, their `run.h5`, folders that
    hold run directories at any depth (a sweep's parent), and glob patterns of those.

    Raises:
        UserError: a path that does not exist, matches nothing, is another file, or is a
            folder without any run.h5 below it.
    """
    found: list[Path] = []
    for raw in paths:
        text = str(raw)
        candidates = [Path(text)]
        if not Path(text).exists() and glob.has_magic(text):
            candidates = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
            if not candidates:
                raise UserError(f"{text!r} matches no file or directory")
        for path in candidates:
            found.extend(_run_dirs_at(path))
    unique: dict[Path, Path] = {}  # one run named by several spellings is read once
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _run_dirs_at(path: Path) -> list[Path]:
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist: expected a run directory")
    if path.is_file():
        if path.name == RUN_FILE:
            return [path.parent]
        raise UserError(
            f"{str(path)!r} is a file, not a run directory (a folder holding {RUN_FILE})"
        )
    if (path / RUN_FILE).exists():
        return [path]
    below = sorted(p.parent for p in path.rglob(RUN_FILE))
    if not below:
        raise UserError(
            f"{str(path)!r} is not a run directory: it holds no {RUN_FILE}, "
            "nor any folder that does"
        )
    return below


def read_run(run_dir: str | Path) -> Run:
    """Read one run directory, also while its job is still writing it.

    The file is opened without HDF5's lock (`open_run(live=True)`), so a training job is
    never disturbed; the rows read are those of the writer's last flush, cut to whole rows.

    Raises:
        UserError: no run.h5, or one that is unreadable, truncated or not an hpcrl run file.
    """
    path = Path(run_dir)
    for attempt in range(3):
        f = open_run(path, live=True)
        try:
            run = _read_open(path, f)
            run.modified_s_ago = max(0.0, time.time() - (path / RUN_FILE).stat().st_mtime)
            return run
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            # A flush landing while the file is read can give a torn view: read again.
            if attempt == 2:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise UserError(f"{str(path / RUN_FILE)!r} cannot be read: {reason}") from None
            time.sleep(0.2)
        finally:
            f.close()
    raise AssertionError("unreachable")


def _read_open(path: Path, f) -> Run:
    if "config" not in f.attrs or "episodes" not in f:
        raise UserError(
            f"{str(path / RUN_FILE)!r} is not an hpcrl run file (no config attribute or "
            "/episodes group)"
        )
    attrs = {k: _plain(v) for k, v in f.attrs.items()}
    try:
        config = flatten(json.loads(attrs["config"]))
    except (TypeError, json.JSONDecodeError):
        raise UserError(f"{str(path / RUN_FILE)!r}: its config attribute is not JSON") from None
    group = f["episodes"]
    rows = min(group[name].shape[0] for name in EPISODE_FIELDS)
    episodes = {name: group[name][:rows] for name in EPISODE_FIELDS}
    metrics, left_out = read_metrics(f)
    return Run(path, attrs, config, episodes, metrics, left_out)


def _plain(value):
    """An HDF5 attribute as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class Experiment:
    """Runs that differ only in seed (and resumable keys), at one world size."""

    key: tuple  # ((config key, value), ...) that define it, world_size excluded
    world_size: int
    runs: list[Run]
    label: str = ""

    @property
    def env_id(self) -> str:
        return self.runs[0].env_id

    @property
    def algo(self) -> str:
        return self.runs[0].algo


def group_runs(runs: list[Run], by: list[str] | None = None) -> list[Experiment]:
    """Group runs into experiments (see the module docstring), named by what differs.

    Args:
        by: config keys to group by instead of "all keys but seed and resumable ones";
            `world_size` may be among them and is always a dimension anyway.

    Raises:
        UserError: a `by` key no run's config has (the nearest key is suggested).
    """
    if by:
        known = set().union(*(r.config for r in runs)) | {"world_size"}
        for key in by:
            if key not in known:
                hint = difflib.get_close_matches(key, sorted(known), n=1)
                near = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise UserError(f"--by {key!r} is not a config key of these runs{near}")
    groups: dict[tuple, Experiment] = {}
    for run in runs:
        key = _experiment_key(run.config, by)
        groups.setdefault((key, run.world_size), Experiment(key, run.world_size, [])).runs.append(
            run
        )
    experiments = sorted(groups.values(), key=lambda e: (_sortable(e.key), e.world_size))
    name_experiments(experiments)
    return experiments


def _experiment_key(config: dict, by: list[str] | None) -> tuple:
    if by:
        keys = [k for k in by if k != "world_size"]
    else:
        keys = [k for k in config if k not in SEED_KEYS and k not in RESUMABLE_KEYS]
    return tuple(sorted((k, _hashable(config.get(k))) for k in keys))


def _hashable(value):
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def _sortable(key: tuple) -> tuple:
    return tuple((k, str(v)) for k, v in key)


def name_experiments(experiments: list[Experiment]) -> None:
    """Set each experiment's `label` from the keys whose values differ between them, e.g.
    `algo=ppo, world_size=2` (see `differing_labels`); one experiment is named `<algo> on
    <env_id>`."""
    for exp, label in zip(experiments, differing_labels(experiments), strict=True):
        exp.label = label


def differing_labels(experiments: list[Experiment], world_size: bool = True) -> list[str]:
    """The names `name_experiments` gives, without setting them.

    Keys whose values differ between the experiments name them; keys only some
    experiments have (another algorithm's hyperparameters) are added, shown as `-` where
    absent, only when the shared keys leave two experiments with one name.

    Args:
        world_size: whether `world_size` may be part of a name (False: name scaling
            families, which span world sizes).
    """
    if not experiments:
        return []
    configs = [
        dict(e.key) | ({"world_size": e.world_size} if world_size else {}) for e in experiments
    ]
    shared = set.intersection(*(set(c) for c in configs))
    some = set.union(*(set(c) for c in configs)) - shared
    order = {k: i for i, k in enumerate(NAME_ORDER)}

    def ordered(keys) -> list[str]:
        differing = [k for k in keys if len({repr(c.get(k, _ABSENT)) for c in configs}) > 1]
        return sorted(differing, key=lambda k: (k == "world_size", order.get(k, len(order)), k))

    def named(keys: list[str]) -> list[str]:
        labels = []
        for exp, config in zip(experiments, configs, strict=True):
            parts = [f"{k}={_shown(config.get(k, _ABSENT))}" for k in keys]
            labels.append(", ".join(parts) if parts else f"{exp.algo} on {exp.env_id}")
        return labels

    labels = named(ordered(shared))
    if len(set(labels)) < len(labels):
        labels = named(ordered(shared) + ordered(some))
    return labels


_ABSENT = "-"


def _shown(value) -> str:
    """A value as a name shows it: floats short (`0.0003`) unless that would hide a digit."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def read_runs(paths: list[str | Path]) -> list[Run]:
    """`read_run` of every run directory `find_run_dirs(paths)` names."""
    return [read_run(p) for p in find_run_dirs(paths)]


def load_runs(paths, by: list[str] | None = None) -> RunTables:
    """Run directories as pandas DataFrames in long format, for notebooks.

    Args:
        paths: run directories, their run.h5, folders holding run directories, or globs
            (one path or a list).
        by: config keys to group experiments by (see `group_runs`).

    Returns:
        `RunTables(runs, episodes, metrics)`; each row carries `run` (the directory),
        `experiment` (its name), `world_size` and every config key as columns.

    Raises:
        UserError: a path that is not a run directory, an unreadable run file, an unknown
            `by` key.
    """
    import pandas as pd

    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs = read_runs(list(paths))
    experiments = group_runs(runs, by)
    names = {id(r): e.label for e in experiments for r in e.runs}
    run_rows, episode_frames, metric_frames = [], [], []
    for run in runs:
        ident = {"run": str(run.path), "experiment": names[id(run)]}
        run_rows.append(
            ident
            | {
                "status": run.status,
                "world_size": run.world_size,
                "env_steps": run.env_steps,
                "wall_time_s": run.wall_time_s,
                "env_steps_per_s": run.env_steps_per_s,
                "eval_mean_return": run.eval_mean_return,
                "episodes": len(run.episodes["return"]),
            }
            | {k: _hashable(v) for k, v in run.config.items() if k != "world_size"}
        )
        episode_frames.append(pd.DataFrame(run.episodes).assign(**ident))
        if run.metrics:
            wide = pd.DataFrame(run.metrics)
            wide.insert(0, "row", np.arange(len(wide)))
            long = wide.melt(
                id_vars=["row", "env_steps", "wall_time"], var_name="metric", value_name="value"
            ).dropna(subset=["value"])
            metric_frames.append(long.assign(**ident))
    run_table = pd.DataFrame(run_rows)
    config_columns = run_table.drop(
        columns=["experiment", "status", "env_steps", "wall_time_s", "env_steps_per_s"]
        + ["eval_mean_return", "episodes"]
    )
    episodes = _with_config(pd, episode_frames, config_columns, list(EPISODE_FIELDS))
    metrics = _with_config(
        pd, metric_frames, config_columns, ["row", "env_steps", "wall_time", "metric", "value"]
    )
    return RunTables(run_table, episodes, metrics)


def _with_config(pd, frames: list, config_columns, columns: list[str]):
    """Concatenate per-run frames and join each run's world_size and config keys."""
    base = ["run", "experiment", *columns]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=base)
    return table[base].merge(config_columns, on="run", how="left")
