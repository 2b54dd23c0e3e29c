"""`run.h5`: config, status, one row per finished episode, one row per log interval.

Layout (DESIGN.md §4): root attributes `hpcrl_version`, `algo`, `env_id`, `world_size`,
`config` (JSON), `status`; `/episodes/{return,length,env_steps,wall_time,rank}`;
`/metrics/<name>`; `/trajectories/<field>` virtual datasets over `traj/rank-<k>.h5`.
Only rank 0 writes it. It is flushed at every log interval, so a killed job leaves a file
that opens with plain h5py and holds everything up to the last flush.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from hpcrl import __version__
from hpcrl.errors import UserError

RUN_FILE = "run.h5"
STATUSES = ("running", "completed", "interrupted", "failed")
EPISODE_FIELDS = {
    "return": np.float64,
    "length": np.int64,
    "env_steps": np.int64,  # global env steps when the episode ended
    "wall_time": np.float64,  # seconds since the run started
    "rank": np.int32,  # the acting rank that ran the episode
}
CHUNK_ROWS = 4096


def read_status(run_dir: str | Path) -> str | None:
    """The `status` attribute of `run_dir/run.h5`, "unreadable", or None when there is none."""
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs.get("status", "unknown"))
    except OSError:
        return "unreadable"


def prepare_run_dir(run_dir: str | Path, overwrite: bool) -> None:
    """Make `run_dir` ready for a new run, refusing to touch an existing one.

    A directory that holds a run (`run.h5`) or files in `traj/` or `checkpoints/` is
    refused unless `overwrite`; then only those (run.h5, traj/, checkpoints/) are removed
    and other files in the directory are left alone.

    Raises:
        UserError: `run_dir` holds a run and `overwrite` is False, is not a directory, or
            cannot be created.
    """
    run_dir = Path(run_dir)
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"--run-dir {str(run_dir)!r} exists and is not a directory")
        status = read_status(run_dir)
        leftovers = [
            sub
            for sub in ("traj", "checkpoints")
            if (run_dir / sub).is_dir() and any((run_dir / sub).iterdir())
        ]
        if status is not None or leftovers:
            if not overwrite:
                what = f"a run (status {status})" if status else f"files in {leftovers[0]}/"
                raise UserError(
                    f"--run-dir {str(run_dir)!r} already holds {what}; "
                    "choose a new --run-dir or pass --overwrite to replace it"
                )
            (run_dir / RUN_FILE).unlink(missing_ok=True)
            for sub in ("traj", "checkpoints"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
        (run_dir / "traj").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints").mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"--run-dir {str(run_dir)!r} cannot be used: {exc.strerror}") from None


class RunFile:
    """Writer of `run.h5` (rank 0 only)."""

    def __init__(self, path: str | Path, attrs: dict):
        self.path = Path(path)
        self.file = h5py.File(self.path, "x")  # never over another run
        self.file.attrs["hpcrl_version"] = __version__
        for key, value in attrs.items():
            self.file.attrs[key] = value
        self.file.attrs["status"] = "running"
        episodes = self.file.create_group("episodes")
        for name, dtype in EPISODE_FIELDS.items():
            episodes.create_dataset(
                name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(CHUNK_ROWS,)
            )
        self.file.create_group("metrics")
        self.file.flush()

    def append_episodes(self, **columns: np.ndarray) -> None:
        """Append rows to `/episodes`; `columns` must be exactly `EPISODE_FIELDS`, equal lengths."""
        if set(columns) != set(EPISODE_FIELDS):
            raise ValueError(f"episode columns {sorted(columns)} != {sorted(EPISODE_FIELDS)}")
        n = len(columns["return"])
        if n == 0:
            return
        for name, values in columns.items():
            _append(self.file["episodes"][name], np.asarray(values))

    def append_metrics(self, row: dict[str, float | int]) -> None:
        """Append one row to `/metrics` (one dataset per key, created on first use)."""
        group = self.file["metrics"]
        for name, value in row.items():
            if name not in group:
                dtype = np.int64 if isinstance(value, (int, np.integer)) else np.float64
                group.create_dataset(
                    name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,)
                )
            _append(group[name], np.asarray([value]))

    def set_attrs(self, **attrs) -> None:
        for key, value in attrs.items():
            self.file.attrs[key] = value

    def set_status(self, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"status {status!r} not in {STATUSES}")
        self.file.attrs["status"] = status
        self.flush()

    def link_trajectories(self, rows_per_rank: dict[int, int], fields: dict[str, tuple]) -> None:
        """Write `/trajectories/<field>` as virtual datasets concatenating every
        `traj/rank-<k>.h5` in rank order (relative paths, so the run directory can move).

        Args:
            rows_per_rank: {rank: rows written} for every rank that wrote trajectories.
            fields: {field: (row_shape, dtype)} of the trajectory datasets.
        """
        group = self.file.require_group("trajectories")
        ranks = sorted(r for r, n in rows_per_rank.items() if n > 0)
        total = sum(rows_per_rank[r] for r in ranks)
        for name, (row_shape, dtype) in fields.items():
            layout = h5py.VirtualLayout(shape=(total, *row_shape), dtype=dtype)
            start = 0
            for rank in ranks:
                n = rows_per_rank[rank]
                source = h5py.VirtualSource(f"traj/rank-{rank}.h5", name, shape=(n, *row_shape))
                layout[start : start + n] = source
                start += n
            if name in group:
                del group[name]
            group.create_virtual_dataset(name, layout)
        for key in ("ranks", "rows"):
            if key in group:
                del group[key]
        group["ranks"] = np.asarray(ranks, dtype=np.int32)
        group["rows"] = np.asarray([rows_per_rank[r] for r in ranks], dtype=np.int64)
        self.flush()

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def _append(dataset: h5py.Dataset, values: np.ndarray) -> None:
    n = dataset.shape[0]
    dataset.resize((n + len(values),) + dataset.shape[1:])
    dataset[n:] = values


def open_run(run_dir: str | Path) -> h5py.File:
    """Open `run_dir/run.h5` read-only.

    Raises:
        UserError: no run file there, or it cannot be read.
    """
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        raise UserError(f"{str(run_dir)!r} holds no {RUN_FILE}: not a run directory")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{str(path)!r} cannot be read: {exc}") from None


def default_run_dir(algo: str, env_id: str, stamp: str) -> str:
    """`runs/<algo>-<env_id>-<stamp>` with path separators in the env id replaced."""
    safe_env = env_id.replace("/", "_").replace(os.sep, "_")
    return str(Path("runs") / f"{algo}-{safe_env}-{stamp}")
