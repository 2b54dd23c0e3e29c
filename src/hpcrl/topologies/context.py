"""What every topology loop shares: the run context, budgets, episode rows, reporting,
trajectory recording, checkpoints and the distributed greedy evaluation."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hpcrl.comm.waits import bcast, gather_rows
from hpcrl.config import Config
from hpcrl.envs import EnvStepper, StepBatch, make_vector_env
from hpcrl.evaluation import greedy_episode_returns
from hpcrl.progress import Progress
from hpcrl.storage.checkpoints import write_checkpoint
from hpcrl.storage.runfile import EPISODE_FIELDS, RunFile
from hpcrl.storage.trajectories import TrajectoryWriter, tabular_fields

# /episodes columns, in order, packed as float64 rows for one Gatherv (ints stay exact
# below 2**53).
EPISODE_COLUMNS = tuple(EPISODE_FIELDS)


@dataclass
class RunContext:
    """Everything a topology loop needs besides its algorithm."""

    comm: MPI.Comm
    cfg: Config
    run_dir: Path
    n_states: int
    n_actions: int
    run_file: RunFile | None = None  # rank 0 only
    start_time: float = field(default_factory=time.perf_counter)

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def world_size(self) -> int:
        return self.comm.Get_size()

    @property
    def watchdog_s(self) -> float:
        return self.cfg.run.watchdog_s

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start_time

    def rank_seeds(self) -> tuple[np.random.Generator, int]:
        """This rank's numpy generator and env seed. Each rank gets its own child of one
        `SeedSequence(seed)`, so actors explore with independent streams while the whole
        run still follows from the single base seed."""
        child = np.random.SeedSequence(self.cfg.run.seed).spawn(self.world_size)[self.rank]
        policy_seq, env_seq = child.spawn(2)
        return np.random.default_rng(policy_seq), int(env_seq.generate_state(1)[0] >> 1)

    def make_stepper(self) -> EnvStepper:
        run = self.cfg.run
        _, env_seed = self.rank_seeds()
        return EnvStepper(make_vector_env(run.env_id, run.env_kwargs, run.num_envs), env_seed)

    def maybe_fail(self, env_steps: int) -> None:
        """Test-only fault injection (`debug.fail_rank`, `debug.fail_after_env_steps`)."""
        debug = self.cfg.run.debug
        if self.rank == debug.fail_rank and env_steps >= debug.fail_after_env_steps:
            raise RuntimeError(
                f"debug.fail_rank={debug.fail_rank}: injected failure after {env_steps} env steps"
            )


def split_budget(total: int, parts: int) -> list[int]:
    """Split `total` env steps over `parts` acting ranks; the first `total % parts` get one more."""
    base, extra = divmod(total, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]


class EpisodeRows:
    """Finished episodes not yet written, as rows of `EPISODE_COLUMNS` (float64)."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []

    def add(self, returns, lengths, env_steps, wall_time: float, rank: int) -> None:
        n = len(returns)
        if n == 0:
            return
        rows = np.empty((n, len(EPISODE_COLUMNS)), dtype=np.float64)
        rows[:, 0] = returns
        rows[:, 1] = lengths
        rows[:, 2] = env_steps
        rows[:, 3] = wall_time
        rows[:, 4] = rank
        self.chunks.append(rows)

    def take(self) -> np.ndarray:
        """All pending rows, (n, 5) float64, and forget them."""
        rows = (
            np.concatenate(self.chunks)
            if self.chunks
            else np.zeros((0, len(EPISODE_COLUMNS)), dtype=np.float64)
        )
        self.chunks = []
        return rows


def episode_columns(rows: np.ndarray) -> dict[str, np.ndarray]:
    """(n, 5) float64 rows -> the `/episodes` columns with their dtypes."""
    fields = EPISODE_FIELDS.items()
    return {name: rows[:, i].astype(dtype) for i, (name, dtype) in enumerate(fields)}


class Reporter:
    """Rank 0: writes episodes and metric rows to `run.h5`, flushes, prints progress."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.run_file = ctx.run_file
        self.progress = Progress(ctx.cfg.run.total_env_steps)
        self.recent_returns: deque[float] = deque(maxlen=100)
        self.episodes = 0
        self.last_time = time.perf_counter()
        self.last_env_steps = 0

    def due(self) -> bool:
        return time.perf_counter() - self.last_time >= self.ctx.cfg.run.log_interval_s

    def add_episodes(self, rows: np.ndarray) -> None:
        if len(rows):
            self.run_file.append_episodes(**episode_columns(rows))
            self.recent_returns.extend(rows[:, 0].tolist())
            self.episodes += len(rows)

    def log(self, env_steps: int, extra: dict | None = None) -> None:
        now = time.perf_counter()
        rate = (env_steps - self.last_env_steps) / max(now - self.last_time, 1e-9)
        mean_return = float(np.mean(self.recent_returns)) if self.recent_returns else float("nan")
        row = {
            "env_steps": int(env_steps),
            "wall_time": self.ctx.elapsed_s(),
            "env_steps_per_s": rate,
            "episodes": int(self.episodes),
            "mean_return_100": mean_return,
        }
        row.update(extra or {})
        self.run_file.append_metrics(row)
        self.run_file.flush()
        shown = ", ".join(f"{k} {v:.3g}" for k, v in (extra or {}).items() if isinstance(v, float))
        self.progress.update(env_steps, rate, self.episodes, mean_return, shown)
        self.last_time, self.last_env_steps = now, env_steps

    def close(self) -> None:
        self.progress.close()


class TrajectoryRecorder:
    """An acting rank's `traj/rank-<k>.h5`, flushed every log interval (None-safe)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.writer = None
        if ctx.cfg.run.record_trajectories:
            path = ctx.run_dir / "traj" / f"rank-{ctx.rank}.h5"
            self.writer = TrajectoryWriter(path, tabular_fields())
        self.env_index = np.arange(ctx.cfg.run.num_envs, dtype=np.int32)
        self.last_flush = time.perf_counter()

    def record(self, batch: StepBatch, n: int) -> None:
        """Record the first `n` env copies' transitions of one vector step."""
        if self.writer is None:
            return
        self.writer.append(
            obs=batch.obs[:n],
            action=batch.actions[:n],
            reward=batch.rewards[:n],
            next_obs=batch.next_obs[:n],
            terminated=batch.terminated[:n],
            truncated=batch.truncated[:n],
            env=self.env_index[:n],
        )
        if time.perf_counter() - self.last_flush >= self.ctx.cfg.run.log_interval_s:
            self.writer.flush()
            self.last_flush = time.perf_counter()

    def close(self) -> int:
        """Close the file; returns the rows written (0 when not recording)."""
        if self.writer is None:
            return 0
        self.writer.close()
        return self.writer.rows


def link_trajectories(ctx: RunContext, rows_written: int) -> None:
    """Collective: rank 0 joins every rank's trajectory file into `/trajectories`."""
    rows = gather_rows(ctx.comm, np.array([rows_written], dtype=np.int64), 0, ctx.watchdog_s)
    if ctx.rank == 0 and ctx.cfg.run.record_trajectories:
        per_rank = {k: int(n) for k, n in enumerate(rows)}
        ctx.run_file.link_trajectories(per_rank, tabular_fields())


def save_q_table(
    ctx: RunContext, q_table: np.ndarray, env_steps: int, learner_updates: int, policy_version: int
) -> Path:
    """Rank 0: write a tabular checkpoint (`q_table` plus counters and identity)."""
    cfg = ctx.cfg
    meta = {
        "algo": cfg.run.algo,
        "env_id": cfg.run.env_id,
        "env_kwargs": cfg.run.env_kwargs,
        "layout": cfg.algo.layout,
        "world_size": ctx.world_size,
        "env_steps": int(env_steps),
        "learner_updates": int(learner_updates),
        "policy_version": int(policy_version),
        "config": cfg.to_dict(),
    }
    return write_checkpoint(
        ctx.run_dir / "checkpoints",
        int(env_steps),
        {"q_table": q_table},
        meta,
        cfg.run.keep_checkpoints,
    )


def evaluate_greedy(
    comm: MPI.Comm,
    env_id: str,
    env_kwargs: dict,
    q_table: np.ndarray,
    episodes: int,
    seed: int,
    watchdog_s: float,
) -> dict | None:
    """Collective: every rank runs a share of `episodes` greedy episodes of rank 0's table.

    Args:
        q_table: (n_states, n_actions) float64; rank 0's values are used (broadcast).

    Returns:
        On rank 0 `{"mean_return", "std_return", "episodes"}`; None elsewhere.
    """
    q_table = np.ascontiguousarray(q_table, dtype=np.float64)
    bcast(comm, q_table, 0, watchdog_s)
    # Contiguous blocks, so the gathered returns are in episode-id order and the statistics
    # are bitwise the same for every world size.
    ids = np.array_split(np.arange(episodes, dtype=np.int64), comm.Get_size())[comm.Get_rank()]
    returns = greedy_episode_returns(env_id, env_kwargs, q_table, ids, seed)
    all_returns = gather_rows(comm, returns, 0, watchdog_s)
    if comm.Get_rank() != 0:
        return None
    return {
        "mean_return": float(np.mean(all_returns)) if episodes else float("nan"),
        "std_return": float(np.std(all_returns)) if episodes else float("nan"),
        "episodes": int(episodes),
    }
