"""Finished episodes and metric rows: collected on every acting rank as float64 rows,
gathered to rank 0 (at each log, and between logs whenever the ranks hold
`EPISODE_FLUSH_ROWS` together) and written to `run.h5` (and TensorBoard event files) by
the `Reporter`, which also prints progress."""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from hpcrl.analysis.stats import SOLVED_WINDOW, threshold_crossing
from hpcrl.comm.protocol import ActorHeader
from hpcrl.comm.waits import gather_rows
from hpcrl.envs import StepBatch
from hpcrl.progress import Progress
from hpcrl.storage.runfile import EPISODE_FIELDS
from hpcrl.topologies.sync_points import Vote

if TYPE_CHECKING:
    from hpcrl.topologies.run_context import RunContext

# Episodes travel as float64 rows of these columns: lengths, env steps and ranks are
# integers below 2**53, so exact.
EPISODE_COLUMNS = tuple(EPISODE_FIELDS)


class EpisodeRows:
    """Finished episodes not yet written, as rows of `EPISODE_COLUMNS` (float64);
    `pending` counts them."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []
        self.pending = 0

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
        self.add_rows(rows)

    def add_rows(self, rows: np.ndarray) -> None:
        """(n, 5) float64 rows of `EPISODE_COLUMNS`, kept as they are (not copied)."""
        if len(rows):
            self.chunks.append(rows)
            self.pending += len(rows)

    def add_message(self, msg, before: int, rank: int) -> None:
        """The episodes of an actor message (`protocol.write_episodes`; how many: its
        `ActorHeader.EPISODES`), stamped with the run's env steps: `before` (the count
        before the message's rows) plus how far into the message each ended (from the
        actor's count after it, `ActorHeader.ACTOR_ENV_STEPS`)."""
        header = msg["header"]
        episodes = int(header[ActorHeader.EPISODES])
        if episodes:
            actor_start = int(header[ActorHeader.ACTOR_ENV_STEPS]) - int(header[ActorHeader.ROWS])
            self.add(
                msg["episode_return"][:episodes],
                msg["episode_length"][:episodes],
                before + msg["episode_actor_env_steps"][:episodes] - actor_start,
                msg["episode_wall_time"][:episodes],
                rank,
            )

    def add_finished(
        self, batch: StepBatch, n: int, env_steps: int, wall_time: float, rank: int
    ) -> None:
        """The episodes that ended in `batch` among its first `n` (counted) env copies."""
        counted = batch.done_envs < n
        if counted.any():
            self.add(
                batch.episode_returns[counted],
                batch.episode_lengths[counted],
                env_steps,
                wall_time,
                rank,
            )

    def take(self) -> np.ndarray:
        """All pending rows, (n, 5) float64, and forget them."""
        rows = (
            np.concatenate(self.chunks)
            if self.chunks
            else np.zeros((0, len(EPISODE_COLUMNS)), dtype=np.float64)
        )
        self.chunks, self.pending = [], 0
        return rows

    def gather(self, comm, root: int, watchdog_s: float) -> np.ndarray | None:
        """Collective: every rank's pending rows, concatenated in rank order on `root`
        ((n, 5) float64; None elsewhere), and forget them. The chunks go to `gather_rows`
        as they are, so the root copies its own once, into their place in the result."""
        width = len(EPISODE_COLUMNS)
        chunks = [chunk.reshape(-1) for chunk in self.chunks] or [np.zeros(0)]
        self.chunks, self.pending = [], 0
        rows = gather_rows(comm, chunks, root, watchdog_s)
        return None if rows is None else rows.reshape(-1, width)


def gather_and_log(
    ctx: RunContext,
    reporter: Reporter | None,
    episodes: EpisodeRows,
    global_steps: int,
    extra: dict,
) -> None:
    """Collective: every rank's finished episodes to rank 0, which writes them (stably
    sorted by env steps: rank order, then env copy, within one step) and a metrics row."""
    gather_episodes(ctx, reporter, episodes)
    if reporter is not None:
        reporter.log(global_steps, extra)


def gather_episodes(ctx: RunContext, reporter: Reporter | None, episodes: EpisodeRows) -> None:
    """Collective: `gather_and_log` without the metrics row."""
    rows = episodes.gather(ctx.comm, 0, ctx.watchdog_s)
    if reporter is not None:
        reporter.add_episodes(rows)


# Finished episodes the ranks may hold together between two logs: 2^18 rows, about 10 MiB
# of float64 rows and 9 MiB of columns on rank 0. From there on they go to rank 0 at the
# sync point (`flush_episodes`), in pieces that reuse memory already touched. All at the
# final log, 440,000 episodes (FrozenLake 8x8, 24M env steps) took rank 0 30-50 ms and
# 5.7M (a 1000 x 1000 map, 40M steps) 0.44 s, much of it first touches of fresh pages (1.5
# us a 4 KiB page on the 2-core VM), while the other ranks waited; in 22 pieces, 0.24 s.
# And a long log interval held them all in memory.
EPISODE_FLUSH_ROWS = 1 << 18


def flush_episodes(
    ctx: RunContext, reporter: Reporter | None, episodes: EpisodeRows, votes: np.ndarray
) -> None:
    """Collective, at a sync point that does not log: every rank's finished episodes to
    rank 0, written there, when the ranks hold `EPISODE_FLUSH_ROWS` or more together
    (`votes[Vote.EPISODES]`, summed over the ranks, so every rank decides alike). The run
    file is the same whenever they go (sorted by env steps, whole steps at a time)."""
    if votes[Vote.EPISODES] >= EPISODE_FLUSH_ROWS:
        gather_episodes(ctx, reporter, episodes)


def episode_columns(rows: np.ndarray) -> dict[str, np.ndarray]:
    """(n, 5) float64 rows of `EPISODE_COLUMNS`, in any order -> the `/episodes` columns
    with their dtypes, stably sorted by env steps (column 2): rows of one env step keep
    their order (as gathered: rank order, then env copy). One pass per column, which
    also casts it (its values are exact in float64); rows already in order (one rank's,
    or one actor's) are not sorted."""
    steps = rows[:, 2]
    order = None
    if len(rows) > 1 and not (steps[1:] >= steps[:-1]).all():
        order = np.argsort(steps, kind="stable")
    columns = {}
    for i, (name, dtype) in enumerate(EPISODE_FIELDS.items()):
        column = np.empty(len(rows), dtype=dtype)
        if order is None:
            column[:] = rows[:, i]
        else:
            np.take(rows[:, i], order, out=column)
        columns[name] = column
    return columns


class Reporter:
    """Rank 0: writes episodes and metric rows to `run.h5` (and, with `tensorboard: true`,
    to TensorBoard event files in `RUN_DIR/tb/`), flushes, prints progress, and says when
    the run reached `stop_at_return` (`solved`, which `RunContext.stop_requested` asks)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        ctx.reporter = self
        # The mean of the last SOLVED_WINDOW training episodes first >= stop_at_return:
        # (env steps, mean), or None.
        self.solved_at: tuple[int, float] | None = None
        self.run_file = ctx.run_file
        self.events = None
        if ctx.cfg.run.tensorboard:
            from hpcrl.storage.events import EventWriter

            self.events = EventWriter(ctx.run_dir / "tb")
        self.progress = Progress(ctx.cfg.run.total_env_steps)
        self.recent_returns: deque[float] = deque(maxlen=100)
        self.episodes = 0
        self.last_time = time.perf_counter()
        self.last_env_steps = 0
        if ctx.resume is not None:
            self.episodes = self.run_file.episode_rows
            returns = self.run_file.file["episodes"]["return"]
            self.recent_returns.extend(returns[max(0, self.episodes - 100) :].tolist())
            self.last_env_steps = int(ctx.resume.meta["env_steps"])

    def due(self) -> bool:
        return time.perf_counter() - self.last_time >= self.ctx.cfg.run.log_interval_s

    def recent_mean(self, n: int) -> float:
        """The mean return of the last `n` training episodes logged, -inf before n."""
        if len(self.recent_returns) < n:
            return -float("inf")
        return float(np.mean(list(self.recent_returns)[-n:]))

    @property
    def solved(self) -> bool:
        return self.solved_at is not None

    def add_episodes(self, rows: np.ndarray) -> None:
        """Write finished episodes, (n, 5) float64 rows of `EPISODE_COLUMNS` in any order
        (written in env-step order, `episode_columns`); with `stop_at_return` set, the
        first episode at which the mean return of the last `SOLVED_WINDOW` episodes
        reaches it marks the run solved."""
        if len(rows):
            columns = episode_columns(rows)
            self.run_file.append_episodes(**columns)
            returns, steps = columns["return"], columns["env_steps"]
            target = self.ctx.cfg.run.stop_at_return
            if target is not None and not self.solved:
                before = list(self.recent_returns)[-(SOLVED_WINDOW - 1) :]
                window = np.concatenate([before, returns])
                end = threshold_crossing(window, target)
                if end is not None:
                    mean = float(np.mean(window[end - SOLVED_WINDOW + 1 : end + 1]))
                    self.solved_at = (int(steps[end - len(before)]), mean)
            self.recent_returns.extend(returns[-self.recent_returns.maxlen :].tolist())
            self.episodes += len(rows)
            if self.events is not None:
                self.events.episodes(returns, steps, columns["wall_time"])

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
        if self.events is not None:
            self.events.metrics_row(row)
            self.events.flush()
        shown = ", ".join(
            f"{k} {v:.3g}"
            for k, v in (extra or {}).items()
            if isinstance(v, float) and not k.startswith("actor_")  # per-actor: in run.h5
        )
        self.progress.update(env_steps, rate, self.episodes, mean_return, shown)
        self.last_time, self.last_env_steps = now, env_steps

    def close(self) -> None:
        self.progress.close()
        if self.events is not None:
            self.events.close()
