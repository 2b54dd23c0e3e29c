"""`run.h5`: config, status, one row per finished episode, one row per log interval.

Layout (DESIGN.md §4): root attributes `hpcrl_version`, `algo`, `env_id`, `world_size`,
`config` (JSON), `status`; `/episodes/{return,length,env_steps,wall_time,rank}`;
`/metrics/<name>`; `/resumes/<field>` (one row per resume, `RESUME_FIELDS`);
`/trajectories/<field>` virtual datasets over `traj/rank-<k>.h5`. Only rank 0 writes it.
A resumed run reopens the file and appends: rows written after the checkpoint it resumes
from (their env steps are taken again) are cut first, and `/resumes` counts them. It is
flushed at every log interval, so a killed job leaves a file that opens with plain h5py
and holds everything up to the last flush.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
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
RESUME_FIELDS = {
    "wall_time": np.float64,  # Unix time of the resume, seconds
    "env_steps": np.int64,  # global env steps of the checkpoint resumed from
    "world_size": np.int32,  # ranks of the resumed job
    "from_world_size": np.int32,  # ranks that wrote the checkpoint
    "slurm_restart_count": np.int64,  # SLURM_RESTART_COUNT (-1: not under SLURM)
    "slurm_job_id": np.int64,  # SLURM_JOB_ID (-1: not under SLURM)
    "episodes_dropped": np.int64,  # /episodes rows after the checkpoint, cut
    "exact": np.int8,  # 1: every rank's RNG and env state restored (bitwise continuation)
}
CHUNK_ROWS = 4096


def read_status(run_dir: str | Path) -> str | None:
    """The `status` attribute of `run_dir/run.h5`; "in-use" when another process holds it
    open for writing (HDF5's file lock), "unreadable" when it is damaged, None when there
    is none."""
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs.get("status", "unknown"))
    except BlockingIOError:
        return "in-use"
    except OSError:
        return "unreadable"


_held_locks: dict[str, int] = {}


def lock_run_dir(run_dir: str | Path) -> None:
    """Hold an exclusive advisory lock (`flock`) on `run_dir` until this process exits (a
    kill releases it too), so a second job cannot resume or overwrite a live run. A
    directory that does not exist yet, or a file system without `flock`, is not locked
    (HDF5's own lock on run.h5 is then the only guard).

    Raises:
        UserError: another process holds the lock.
    """
    path = Path(run_dir)
    key = str(path.resolve())
    if key in _held_locks or not path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(
            f"run directory {str(path)!r} is in use by another running hpcrl job; wait for "
            "it to end or stop it (SIGUSR1, scancel) first"
        ) from None
    except OSError:
        os.close(fd)
        return
    _held_locks[key] = fd


def refuse_in_use(run_dir: str | Path, status: str | None) -> None:
    """Raises UserError when `status` (from `read_status`) says a live job writes there."""
    if status == "in-use":
        raise UserError(
            f"{str(Path(run_dir) / RUN_FILE)!r} is open for writing by another running job; "
            "wait for it to end or stop it (SIGUSR1, scancel) first"
        )


def prepare_run_dir(run_dir: str | Path, overwrite: bool, dry_run: bool = False) -> None:
    """Make `run_dir` ready for a new run, refusing to touch an existing one.

    A directory that holds a run (`run.h5`) or files in `traj/` or `checkpoints/` is
    refused unless `overwrite`; then only those (run.h5, traj/, checkpoints/) are removed
    and other files in the directory are left alone. `dry_run`: only the checks, nothing
    removed or created (so later checks can still fail without touching the directory).

    Raises:
        UserError: `run_dir` holds a run and `overwrite` is False, is not a directory, or
            cannot be created.
    """
    run_dir = Path(run_dir)
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"--run-dir {str(run_dir)!r} exists and is not a directory")
        lock_run_dir(run_dir)
        status = read_status(run_dir)
        refuse_in_use(run_dir, status)
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
            if dry_run:
                probe_writable(run_dir)
                return
            (run_dir / RUN_FILE).unlink(missing_ok=True)
            for sub in ("traj", "checkpoints"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
        if dry_run:
            _probe_creatable(run_dir)
            return
        (run_dir / "traj").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        lock_run_dir(run_dir)
    except OSError as exc:
        raise UserError(f"--run-dir {str(run_dir)!r} cannot be used: {exc.strerror}") from None
    probe_writable(run_dir)


def _probe_creatable(run_dir: Path) -> None:
    """The nearest existing ancestor of `run_dir` is a writable directory."""
    parent = run_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--run-dir {str(run_dir)!r} cannot be created: {str(parent)!r} is a file")
    if run_dir.exists():
        probe_writable(run_dir)
        return
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".hpcrl-probe-"):
            pass
    except OSError as exc:
        raise UserError(f"--run-dir {str(run_dir)!r} cannot be created: {exc.strerror}") from None


def probe_writable(run_dir: str | Path) -> None:
    """Create and remove a file in `run_dir`, `traj/` and `checkpoints/` (where they exist),
    so an unwritable directory fails now, with one line, rather than at the first
    checkpoint. Permission bits alone do not tell (root ignores them; read-only mounts).

    Raises:
        UserError: a directory cannot be written.
    """
    run_dir = Path(run_dir)
    for directory in (run_dir, run_dir / "traj", run_dir / "checkpoints"):
        if not directory.is_dir():
            continue
        try:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".hpcrl-probe-"):
                pass
        except OSError as exc:
            raise UserError(
                f"run directory {str(directory)!r} is not writable: {exc.strerror}"
            ) from None


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
        _require_resumes(self.file)
        self.file.flush()

    @classmethod
    def reopen(cls, path: str | Path, episodes_rows: int, metrics_rows: int) -> RunFile:
        """Open an existing `run.h5` to continue it: cut `/episodes` and `/metrics` back to
        the rows the checkpoint accounts for and set `status` to running.

        Returns:
            The writer; `episodes_dropped` holds how many episode rows were cut.

        Raises:
            UserError: the file cannot be opened for writing, or holds fewer rows than the
                checkpoint says were written before it.
        """
        self = cls.__new__(cls)
        self.path = Path(path)
        try:
            self.file = h5py.File(self.path, "r+")
        except OSError as exc:
            raise UserError(f"{str(self.path)!r} cannot be opened for writing: {exc}") from None
        episodes = self.file["episodes"]
        have = len(episodes["return"])
        if have < episodes_rows:
            self.file.close()
            raise UserError(
                f"{str(self.path)!r} holds {have} episode rows, fewer than the {episodes_rows} "
                "its checkpoint accounts for: the run file does not belong to this checkpoint"
            )
        self.episodes_dropped = have - episodes_rows
        for name in EPISODE_FIELDS:
            episodes[name].resize((episodes_rows,))
        for dataset in _datasets(self.file["metrics"]):
            if dataset.shape[0] > metrics_rows:
                dataset.resize((metrics_rows,))
        _require_resumes(self.file)
        self.file.attrs["status"] = "running"
        self.flush()
        return self

    @property
    def episode_rows(self) -> int:
        return int(self.file["episodes"]["return"].shape[0])

    @property
    def metric_rows(self) -> int:
        lengths = [d.shape[0] for d in _datasets(self.file["metrics"])]
        return int(max(lengths)) if lengths else 0

    def append_resume(self, **row) -> None:
        """Append one row to `/resumes`; `row` must hold exactly `RESUME_FIELDS`."""
        if set(row) != set(RESUME_FIELDS):
            raise ValueError(f"resume fields {sorted(row)} != {sorted(RESUME_FIELDS)}")
        for name, value in row.items():
            _append(self.file["resumes"][name], np.asarray([value]))
        self.flush()

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
        """Append one row to `/metrics` (one dataset per key, created on first use; a key
        like `losses/value` makes a group)."""
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


def _datasets(group: h5py.Group) -> list[h5py.Dataset]:
    """Every dataset under `group`, at any depth (`/metrics/losses/value` is nested)."""
    found: list[h5py.Dataset] = []
    group.visititems(lambda _, obj: found.append(obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def _require_resumes(f: h5py.File) -> None:
    group = f.require_group("resumes")
    for name, dtype in RESUME_FIELDS.items():
        if name not in group:
            group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(64,))


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
