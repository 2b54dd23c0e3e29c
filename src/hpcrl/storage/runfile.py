"""`run.h5`: config, status, one row per finished episode, one row per log interval.

Layout (format `RUN_FILE_FORMAT`, root attribute `format_version`; README "The run
directory" has the whole schema): root attributes `hpcrl_version`, `algo`, `env_id`,
`world_size`, `config` (JSON), `status`; `/episodes/{return,length,env_steps,wall_time,
rank}`; `/metrics/<name>`, one row per log interval in *every* column (`METRIC_FIELDS` in
each row, any other key float64 with NaN in the rows logged before it was defined);
`/resumes/<field>` (one row per resume, `RESUME_FIELDS`); `/trajectories/<field>` virtual
datasets over `traj/rank-<k>.h5`. Every dataset carries `units` and `description`
attributes. Only rank 0 writes it.

A resumed run reopens the file and appends: rows written after the checkpoint it resumes
from (their env steps are taken again) are cut first, and `/resumes` counts them. It is
flushed at every log interval, so a killed job leaves a file that opens with plain h5py
and holds everything up to the last flush.

Format 1 (files without `format_version`, hpcrl before 2026-12) created each `/metrics`
column the first time its key appeared and wrote nothing in rows without it, so a shorter
column cannot be matched to its rows. `read_metrics` leaves such columns out (and names
them); `RunFile.reopen` moves them to `/metrics_unaligned/` and continues in format 2.
"""

from __future__ import annotations

import fcntl
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from hpcrl import __version__
from hpcrl.errors import UserError
from hpcrl.storage import space

RUN_FILE = "run.h5"
RUN_FILE_FORMAT = 2  # root attribute `format_version`; a file without it is format 1
# "trained": the budget is done and checkpointed, the final evaluation was stopped by a
# preemption signal; a resume runs only the evaluation.
STATUSES = ("running", "completed", "interrupted", "trained", "failed")
RUN_CLOCK = (
    "training seconds since the run started; a resume continues from its checkpoint's "
    "count, so time while the job was stopped is not counted"
)
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
# /metrics columns with their own dtype (Reporter.log writes all five in every row);
# any other key is float64.
METRIC_FIELDS = {
    "env_steps": np.int64,
    "wall_time": np.float64,
    "env_steps_per_s": np.float64,
    "episodes": np.int64,
    "mean_return_100": np.float64,
}
# (units, description) of the datasets, written as their attributes. Metric keys not
# named here get units "" and a description saying where they come from.
SCHEMA: dict[str, tuple[str, str]] = {
    "episodes/return": ("", "undiscounted sum of the episode's rewards"),
    "episodes/length": ("env steps", "env steps in the episode"),
    "episodes/env_steps": ("env steps", "global env steps (all acting ranks) when it ended"),
    "episodes/wall_time": ("s", RUN_CLOCK),
    "episodes/rank": ("", "the acting rank that ran the episode"),
    "metrics/env_steps": ("env steps", "global env steps (all acting ranks) at this row"),
    "metrics/wall_time": ("s", RUN_CLOCK),
    "metrics/env_steps_per_s": ("env steps/s", "global env-step rate since the previous row"),
    "metrics/episodes": ("episodes", "finished episodes so far"),
    "metrics/mean_return_100": ("", "mean return of the last 100 finished episodes"),
    "metrics/learner_updates": ("updates", "learner updates (optimizer steps) so far"),
    "metrics/learner_updates_per_s": ("updates/s", "learner updates per second"),
    "metrics/learning_rate": ("", "the optimizer's learning rate"),
    "metrics/policy_lag_mean": ("updates", "learner version minus behaviour version, mean"),
    "metrics/policy_lag_max": ("updates", "learner version minus behaviour version, max"),
    "metrics/learner_wait_frac": ("fraction", "of the learners' time spent waiting for data"),
    "metrics/actor_efficiency": ("fraction", "actors' time in env steps or inference, mean"),
    "metrics/unrolls_dropped_stale": ("unrolls", "dropped for a lag over max_policy_lag"),
    "metrics/unrolls_dropped": ("unrolls", "received but never learned from, so far"),
    "metrics/cut_rollouts": ("rollouts", "straggler rollouts cut short since the last row"),
    "metrics/exploration": ("", "DQN's ε of ε-greedy"),
    "metrics/rho_mean": ("", "V-trace importance weight π/μ, mean over the batch"),
    "metrics/rho_clipped_frac": ("fraction", "of importance weights clipped at rho_bar"),
    "metrics/q_mean": ("", "mean Q-value of the batch"),
    "resumes/wall_time": ("s", "Unix time of the resume (seconds since 1970-01-01 UTC)"),
    "resumes/env_steps": ("env steps", "global env steps of the checkpoint resumed from"),
    "resumes/world_size": ("ranks", "ranks of the resumed job"),
    "resumes/from_world_size": ("ranks", "ranks that wrote the checkpoint"),
    "resumes/slurm_restart_count": ("", "SLURM_RESTART_COUNT (-1: not under SLURM)"),
    "resumes/slurm_job_id": ("", "SLURM_JOB_ID (-1: not under SLURM)"),
    "resumes/episodes_dropped": ("episodes", "/episodes rows after the checkpoint, cut"),
    "resumes/exact": ("", "1: every rank's RNG and env state restored (bitwise continuation)"),
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


def run_dir_held(run_dir: str | Path) -> bool | None:
    """Whether a live process holds `run_dir`'s lock (`lock_run_dir`): True, False, or
    None when that cannot be told (no directory, or a file system without `flock`). A run
    whose status says `running` while nobody holds its lock was killed (stale)."""
    path = Path(run_dir)
    if str(path.resolve()) in _held_locks:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


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
    refused unless `overwrite`; then only those (run.h5, traj/, checkpoints/, and the
    TensorBoard view tb/) are removed and other files in the directory are left alone.
    `dry_run`: only the checks, nothing removed or created (so later checks can still fail
    without touching the directory).

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
            for sub in ("traj", "checkpoints", "tb"):
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
        self.file.attrs["format_version"] = RUN_FILE_FORMAT
        for key, value in attrs.items():
            self.file.attrs[key] = value
        self.file.attrs["status"] = "running"
        episodes = self.file.create_group("episodes")
        for name, dtype in EPISODE_FIELDS.items():
            _describe(
                episodes.create_dataset(
                    name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(CHUNK_ROWS,)
                )
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
        self = cls.open_as_is(path)
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
        if int(self.file.attrs.get("format_version", 1)) < RUN_FILE_FORMAT:
            _upgrade_metrics(self.file)
        for dataset in _datasets(self.file["metrics"]):
            if dataset.shape[0] > metrics_rows:
                dataset.resize((metrics_rows,))
        _require_resumes(self.file)
        self.file.attrs["status"] = "running"
        self.flush()
        return self

    @classmethod
    def open_as_is(cls, path: str | Path) -> RunFile:
        """Open an existing `run.h5` for its attributes only, changing nothing (a resume
        that runs only the final evaluation).

        Raises:
            UserError: the file cannot be opened for writing.
        """
        self = cls.__new__(cls)
        self.path = Path(path)
        try:
            self.file = h5py.File(self.path, "r+")
        except OSError as exc:
            raise UserError(f"{str(self.path)!r} cannot be opened for writing: {exc}") from None
        return self

    @property
    def episode_rows(self) -> int:
        return int(self.file["episodes"]["return"].shape[0])

    @property
    def metric_rows(self) -> int:
        metrics = self.file["metrics"]
        return int(metrics["env_steps"].shape[0]) if "env_steps" in metrics else 0

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
        """Append one row to `/metrics`: one value in every column, so all columns keep
        the length of `/metrics/env_steps`. A key seen for the first time makes a column
        (float64, or the dtype `METRIC_FIELDS` gives it) holding NaN in the earlier rows
        (a key like `losses/value` makes a group); a float column the row does not mention
        gets NaN.

        Raises:
            ValueError: the row lacks `env_steps` or an integer column's key.
        """
        group = self.file["metrics"]
        rows = self.metric_rows
        columns = _datasets_by_name(group)
        missing = [n for n, d in columns.items() if d.dtype.kind in "iu" and n not in row]
        if "env_steps" not in row or missing:
            raise ValueError(f"metrics row lacks {sorted(missing) or ['env_steps']}")
        for name in row:
            if name not in columns:
                dtype = METRIC_FIELDS.get(name, np.float64)
                if rows and dtype != np.float64:
                    raise ValueError(f"integer metric {name!r} must be in every row")
                columns[name] = _describe(
                    group.create_dataset(
                        name,
                        data=np.full(rows, np.nan, dtype=dtype) if rows else np.zeros(0, dtype),
                        maxshape=(None,),
                        chunks=(1024,),
                    )
                )
        for name, dataset in columns.items():
            _append(dataset, np.asarray([row.get(name, math.nan)]))

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
        """Write HDF5's caches to the file.

        Raises:
            DiskFullError: the file system is full (`hpcrl.storage.space`).
        """
        with space.guard(self.path):
            self.file.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def _datasets(group: h5py.Group) -> list[h5py.Dataset]:
    """Every dataset under `group`, at any depth (`/metrics/losses/value` is nested)."""
    return list(_datasets_by_name(group).values())


def _datasets_by_name(group: h5py.Group) -> dict[str, h5py.Dataset]:
    """{path relative to `group`: dataset} for every dataset under it, at any depth."""
    found: dict[str, h5py.Dataset] = {}
    group.visititems(
        lambda name, obj: found.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None
    )
    return found


ACTOR_FRACTIONS = {
    "env_frac": "stepping envs",
    "inference_frac": "in policy inference",
    "send_wait_frac": "waiting to send unrolls",
    "param_wait_frac": "waiting for parameters",
    "cpu_frac": "on a CPU (process time)",
}


def _describe(dataset: h5py.Dataset) -> h5py.Dataset:
    """Set the dataset's `units` and `description` attributes from `SCHEMA` (metrics/
    `losses/<term>` and `actor_<rank>/<fraction>` by their pattern)."""
    key = dataset.name.lstrip("/")
    name = key.split("/", 1)[-1]
    units, description = SCHEMA.get(key, ("", f"the {name!r} value logged"))
    if key.startswith("metrics/losses/"):
        description = f"the {name.split('/')[-1]} loss term of the last update"
    elif key.startswith("metrics/actor_") and name.split("/")[-1] in ACTOR_FRACTIONS:
        actor, fraction = name.split("/")
        units = "fraction"
        description = f"of {actor.replace('_', ' ')}'s time {ACTOR_FRACTIONS[fraction]}"
    dataset.attrs["units"] = units
    dataset.attrs["description"] = description
    return dataset


def _require_resumes(f: h5py.File) -> None:
    group = f.require_group("resumes")
    for name, dtype in RESUME_FIELDS.items():
        if name not in group:
            _describe(
                group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(64,))
            )


def _upgrade_metrics(f: h5py.File) -> None:
    """Format 1 -> 2 in place (a resume): columns shorter than `/metrics/env_steps`, whose
    rows cannot be told, move to `/metrics_unaligned/`; every dataset gets its schema
    attributes."""
    metrics = f["metrics"]
    rows = int(metrics["env_steps"].shape[0]) if "env_steps" in metrics else 0
    for name, dataset in _datasets_by_name(metrics).items():
        if dataset.shape[0] != rows:
            target = f"metrics_unaligned/{name}"
            f.require_group(target.rsplit("/", 1)[0])
            f.move(dataset.name, target)
        else:
            _describe(dataset)
    empty: list[str] = []
    metrics.visititems(lambda n, o: empty.append(n) if isinstance(o, h5py.Group) else None)
    for name in sorted(empty, reverse=True):  # deepest first
        if not len(metrics[name]):
            del metrics[name]
    for group in ("episodes", "resumes"):
        for dataset in _datasets(f[group]):
            _describe(dataset)
    f.attrs["format_version"] = RUN_FILE_FORMAT


def _append(dataset: h5py.Dataset, values: np.ndarray) -> None:
    n = dataset.shape[0]
    dataset.resize((n + len(values),) + dataset.shape[1:])
    dataset[n:] = values


def open_run(run_dir: str | Path, live: bool = False) -> h5py.File:
    """Open `run_dir/run.h5` read-only.

    Args:
        live: open without HDF5's file lock, so a run that is still training (its writer
            holds the file open) can be read: the reader sees the file as of the writer's
            last flush (every log interval) and takes no lock the writer needs. A flush
            that lands while the file is opened can make the open fail once; it is tried
            again a few times.

    Raises:
        UserError: no run file there, or it cannot be read.
    """
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        raise UserError(f"{str(run_dir)!r} holds no {RUN_FILE}: not a run directory")
    tries = 5 if live else 1
    for attempt in range(tries):
        try:
            return h5py.File(path, "r", locking=False) if live else h5py.File(path, "r")
        except OSError as exc:
            if attempt == tries - 1:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise UserError(f"{str(path)!r} cannot be read: {reason}") from None
            time.sleep(0.2)
    raise AssertionError("unreachable")


def read_metrics(f: h5py.File) -> tuple[dict[str, np.ndarray], list[str]]:
    """The `/metrics` table of an open run file, as aligned columns.

    Rows are cut to the shortest column, so a file read while its writer appends (or
    killed between two columns' writes) gives only whole rows. A format-1 file's columns
    shorter than `env_steps` cannot be matched to their rows and are left out.

    Returns:
        ({column name: (rows,) array}, [names of left-out format-1 columns]); names are
        paths relative to `/metrics` (`losses/td`).
    """
    if "metrics" not in f:
        return {}, []
    columns = {name: d for name, d in _datasets_by_name(f["metrics"]).items() if d.ndim == 1}
    if not columns:
        return {}, []
    left_out: list[str] = []
    if int(f.attrs.get("format_version", 1)) < RUN_FILE_FORMAT and "env_steps" in columns:
        rows = columns["env_steps"].shape[0]
        left_out = sorted(name for name, d in columns.items() if d.shape[0] != rows)
        columns = {name: d for name, d in columns.items() if name not in left_out}
    rows = min(d.shape[0] for d in columns.values())
    return {name: d[:rows] for name, d in columns.items()}, left_out


def default_run_dir(algo: str, env_id: str, stamp: str) -> str:
    """`runs/<algo>-<env_id>-<stamp>` with path separators in the env id replaced."""
    safe_env = env_id.replace("/", "_").replace(os.sep, "_")
    return str(Path("runs") / f"{algo}-{safe_env}-{stamp}")
