"""What every topology loop shares: the run context, budgets and resume segments, episode
rows, reporting, trajectory recording, full-state checkpoints and the distributed greedy
evaluation.

Checkpoint layout (every layout, `storage/checkpoints.py` writes it atomically):

    q_table                      (n_states, n_actions) float64, the learner's table
    ranks/<k>/<name>             rank k's own state when the checkpoint was collective:
                                 policy_rng (6,) uint64, counters (3,) int64 [env_steps,
                                 learner_updates, traj_rows], torch_rng (n,) uint8 (when the
                                 rank imported torch), and the `EnvStepper.state_dict()`
    meta (JSON attribute)        identity (algo, env_id, layout, world_size, config),
                                 counters (env_steps, learner_updates, policy_version,
                                 vector_step, syncs), the segment, the rows of run.h5 and of
                                 every traj/rank-<k>.h5 the checkpoint accounts for, elapsed_s

A resume continues bit-exactly when the checkpoint holds every rank's state and the world
size is unchanged; otherwise (a different world size, or a parameter-server checkpoint,
which only rank 0 writes while actors run) it starts a new *segment*: the remaining
budget is split over the new acting ranks, they draw fresh seeds, and in-progress
episodes restart. The env-step total stays exact either way.
"""

from __future__ import annotations

import io
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hpcrl.comm.waits import bcast, gather_rows
from hpcrl.config import Config
from hpcrl.envs import EnvStepper, StepBatch, make_env, make_vector_env
from hpcrl.evaluation import greedy_episode_returns, policy_episode_returns
from hpcrl.progress import Progress
from hpcrl.state import generator_state, set_generator_state, set_torch_rng_state, torch_rng_state
from hpcrl.storage.checkpoints import read_group, read_shared, write_checkpoint
from hpcrl.storage.runfile import EPISODE_FIELDS, RunFile
from hpcrl.storage.trajectories import TrajectoryWriter, space_fields, tabular_fields


@dataclass(frozen=True)
class Segment:
    """A stretch of a run over which the acting ranks and their budgets are fixed.

    The original run is segment 0. A resume that cannot continue bit-exactly starts the
    next segment at the checkpoint's env steps and splits what is left over the acting
    ranks it has now.
    """

    index: int
    start_env_steps: int  # global env steps done before this segment
    total_env_steps: int  # the run's whole budget
    acting_ranks: int

    def budgets(self) -> list[int]:
        """Env steps of each acting rank in this segment."""
        return split_budget(self.total_env_steps - self.start_env_steps, self.acting_ranks)

    def progress(self, env_steps: int, budget: int) -> float:
        """Fraction of the whole run done when an acting rank has taken `env_steps` of its
        `budget` in this segment (what the schedules run on)."""
        if self.start_env_steps == 0:
            return env_steps / budget
        left = self.total_env_steps - self.start_env_steps
        return (self.start_env_steps + left * env_steps / budget) / self.total_env_steps

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "start_env_steps": self.start_env_steps,
            "acting_ranks": self.acting_ranks,
        }


@dataclass
class LoopResult:
    """What a topology loop hands back to the runner."""

    q_table: np.ndarray | None  # the final table (rank 0 at least; tabular layouts)
    interrupted: bool  # stopped by a preemption signal after a checkpoint, on every rank
    learner: object = None  # the deep learner (data-parallel layout), on every rank


@dataclass
class ResumePoint:
    """The checkpoint a run resumes from (the same on every rank)."""

    path: Path
    meta: dict
    exact: bool  # every rank's state is in it and the world size is unchanged

    def shared(self) -> dict[str, np.ndarray]:
        """The checkpoint's datasets outside `ranks/` (`q_table`, `params/...`, ...)."""
        return read_shared(self.path)

    def rank_state(self, rank: int) -> dict[str, np.ndarray]:
        """`ranks/<rank>` of the checkpoint ({} when it holds no rank states)."""
        return read_group(self.path, f"ranks/{rank}") if self.exact else {}


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
    segment: Segment | None = None  # set by the topology (it knows its acting ranks)
    resume: ResumePoint | None = None
    stop_requested: object = None  # () -> bool: a preemption signal reached this rank
    last_checkpoint_time: float = field(default_factory=time.perf_counter)
    recording_ranks: range | tuple = ()  # ranks that write traj/rank-<k>.h5 in this world
    traj_fields: dict = field(default_factory=tabular_fields)  # {name: (row shape, dtype)}
    orphan_traj: dict[int, int] = field(default_factory=dict)  # rank 0: see start_segment

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

    def start_segment(self, acting_ranks: int, recording_ranks: range | tuple) -> Segment:
        """The segment this run (or resume) acts in, given the layout's acting ranks and
        the ranks that write trajectories. On a resume, rank 0 also cuts the trajectory
        files no rank of this world writes (a smaller world, or rank 0 of `ps`) back to
        the checkpoint and keeps linking them (`orphan_traj`)."""
        self.recording_ranks = recording_ranks
        if self.rank == 0:
            trim_orphan_trajectories(self)
        total = self.cfg.run.total_env_steps
        if self.resume is None:
            self.segment = Segment(0, 0, total, acting_ranks)
        elif self.resume.exact:
            self.segment = Segment(total_env_steps=total, **self.resume.meta["segment"])
        else:
            previous = self.resume.meta["segment"]["index"]
            env_steps = int(self.resume.meta["env_steps"])
            self.segment = Segment(previous + 1, env_steps, total, acting_ranks)
        return self.segment

    def rank_seeds(self) -> tuple[np.random.Generator, int]:
        """This rank's numpy generator and env seed. Each rank gets its own child of one
        `SeedSequence(seed)`, so actors explore with independent streams while the whole
        run still follows from the single base seed. A new segment (a resume that is not
        exact) draws from `SeedSequence([seed, segment])` instead."""
        index = self.segment.index if self.segment is not None else 0
        entropy = self.cfg.run.seed if index == 0 else [self.cfg.run.seed, index]
        child = np.random.SeedSequence(entropy).spawn(self.world_size)[self.rank]
        policy_seq, env_seq = child.spawn(2)
        return np.random.default_rng(policy_seq), int(env_seq.generate_state(1)[0] >> 1)

    def sync_flags(self, reporter: Reporter | None) -> tuple[float, float, float]:
        """This rank's votes for (log, checkpoint, stop) at a sync point, to be summed over
        the ranks: rank 0 alone keeps the log and wall-time checkpoint clocks; any rank
        that received a preemption signal votes stop."""
        log = 1.0 if reporter is not None and reporter.due() else 0.0
        checkpoint = 1.0 if self.rank == 0 and self.checkpoint_due_by_time() else 0.0
        return log, checkpoint, 1.0 if self.stop_requested() else 0.0

    def checkpoint_due_by_time(self) -> bool:
        interval = self.cfg.run.checkpoint_interval_s
        return interval > 0 and time.perf_counter() - self.last_checkpoint_time >= interval

    def probe_spaces(self) -> tuple:
        """The env's (observation_space, action_space), from one probe env; also sets
        `traj_fields` to the trajectory datasets those spaces give (deep learners)."""
        run = self.cfg.run
        probe = make_env(run.env_id, run.env_kwargs, **run.env_options())
        spaces = probe.observation_space, probe.action_space
        probe.close()
        self.traj_fields = space_fields(*spaces)
        return spaces

    def make_stepper(self) -> EnvStepper:
        run = self.cfg.run
        _, env_seed = self.rank_seeds()
        envs = make_vector_env(
            run.env_id,
            run.env_kwargs,
            run.num_envs,
            vector_env=run.vector_env,
            **run.env_options(),
        )
        return EnvStepper(envs, env_seed)

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

    def add_message(
        self, msg, episodes: int, rows: int, actor_env_steps: int, before: int, rank: int
    ) -> None:
        """The first `episodes` episodes of an actor message (`protocol.write_episodes`),
        stamped with the run's env steps: `before` (the count before the message's `rows`
        env steps) plus how far into the message each ended (`actor_env_steps`: the actor's
        count after it)."""
        if episodes:
            actor_start = actor_env_steps - rows
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
        self.chunks = []
        return rows


def gather_and_log(
    ctx: RunContext,
    reporter: Reporter | None,
    episodes: EpisodeRows,
    global_steps: int,
    extra: dict,
) -> None:
    """Collective: every rank's finished episodes to rank 0, which writes them (stably
    sorted by env steps: rank order, then env copy, within one step) and a metrics row."""
    rows = gather_rows(ctx.comm, episodes.take().reshape(-1), 0, ctx.watchdog_s)
    if reporter is not None:
        rows = rows.reshape(-1, len(EPISODE_COLUMNS))
        reporter.add_episodes(rows[np.argsort(rows[:, 2], kind="stable")])
        reporter.log(global_steps, extra)


def episode_columns(rows: np.ndarray) -> dict[str, np.ndarray]:
    """(n, 5) float64 rows -> the `/episodes` columns with their dtypes."""
    fields = EPISODE_FIELDS.items()
    return {name: rows[:, i].astype(dtype) for i, (name, dtype) in enumerate(fields)}


class Reporter:
    """Rank 0: writes episodes and metric rows to `run.h5` (and, with `tensorboard: true`,
    to TensorBoard event files in `RUN_DIR/tb/`), flushes, prints progress."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
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

    def add_episodes(self, rows: np.ndarray) -> None:
        if len(rows):
            self.run_file.append_episodes(**episode_columns(rows))
            self.recent_returns.extend(rows[:, 0].tolist())
            self.episodes += len(rows)
            if self.events is not None:
                self.events.episodes(rows[:, 0], rows[:, 2], rows[:, 3])

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


class TrajectoryRecorder:
    """An acting rank's `traj/rank-<k>.h5`, flushed every log interval (None-safe)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.writer = None
        if ctx.cfg.run.record_trajectories:
            path = ctx.run_dir / "traj" / f"rank-{ctx.rank}.h5"
            self.writer = TrajectoryWriter(path, ctx.traj_fields, resume_traj_rows(ctx, ctx.rank))
            if self.writer.set_aside is not None:
                print(
                    f"[hpcrl] warning (rank {ctx.rank}): {path} was unreadable after a kill; "
                    f"set aside as {self.writer.set_aside.name} with "
                    f"{self.writer.missing_rows} rows; a new file continues the trajectories",
                    flush=True,
                )
            elif self.writer.missing_rows:
                print(
                    f"[hpcrl] warning (rank {ctx.rank}): {path} lost its last "
                    f"{self.writer.missing_rows} rows before the checkpoint (killed before a "
                    "flush); its trajectories have a gap there",
                    flush=True,
                )
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

    @property
    def rows(self) -> int:
        return 0 if self.writer is None else self.writer.rows

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.last_flush = time.perf_counter()

    def close(self) -> int:
        """Close the file; returns the rows written (0 when not recording)."""
        if self.writer is None:
            return 0
        self.writer.close()
        return self.writer.rows


def resume_traj_rows(ctx: RunContext, rank: int) -> int | None:
    """Rows of `traj/rank-<rank>.h5` the resumed checkpoint accounts for (None: new file)."""
    if ctx.resume is None:
        return None
    rows = ctx.resume.meta.get("traj_rows", [])
    return int(rows[rank]) if rank < len(rows) else None


def orphan_traj_rows(ctx: RunContext) -> dict[int, int]:
    """Rank 0: trajectory files no rank of this world writes, and the rows they hold."""
    return dict(ctx.orphan_traj)


def trim_orphan_trajectories(ctx: RunContext) -> None:
    """Rank 0, on a resume: cut each trajectory file the checkpoint accounts for but no
    rank of this world writes back to the checkpoint's rows, and record the rows it
    really holds (fewer, with a warning, when a kill lost some or left it unreadable)."""
    ctx.orphan_traj = {}
    if ctx.resume is None or not ctx.cfg.run.record_trajectories:
        return
    for rank, rows in enumerate(ctx.resume.meta.get("traj_rows", [])):
        if rank in ctx.recording_ranks or rows == 0:
            continue
        path = ctx.run_dir / "traj" / f"rank-{rank}.h5"
        if not path.exists():
            print(f"[hpcrl] warning: {path} is missing; {rows} trajectory rows lost", flush=True)
            continue
        writer = TrajectoryWriter(path, ctx.traj_fields, int(rows))
        writer.close()
        if writer.missing_rows:
            aside = writer.set_aside
            aside = f" (unreadable: set aside as {aside.name})" if aside else ""
            print(
                f"[hpcrl] warning: {path} holds {writer.rows} of the {rows} rows the "
                f"checkpoint accounts for{aside}",
                flush=True,
            )
        if writer.rows:
            ctx.orphan_traj[rank] = writer.rows


def link_trajectories(ctx: RunContext, rows_written: int) -> None:
    """Collective: rank 0 joins every rank's trajectory file into `/trajectories`."""
    rows = gather_rows(ctx.comm, np.array([rows_written], dtype=np.int64), 0, ctx.watchdog_s)
    if ctx.rank == 0 and ctx.cfg.run.record_trajectories:
        per_rank = {k: int(n) for k, n in enumerate(rows)}
        per_rank.update(orphan_traj_rows(ctx))
        ctx.run_file.link_trajectories(per_rank, ctx.traj_fields)


def rank_state(
    policy_rng: np.random.Generator,
    stepper: EnvStepper,
    env_steps: int,
    learner_updates: int,
    traj_rows: int,
) -> dict[str, np.ndarray]:
    """What one acting rank needs to continue exactly (see the module doc for the names)."""
    state = stepper.state_dict()
    state["policy_rng"] = generator_state(policy_rng)
    state["counters"] = np.array([env_steps, learner_updates, traj_rows], dtype=np.int64)
    torch_state = torch_rng_state()
    if torch_state is not None:
        state["torch_rng"] = torch_state
    return state


def restore_rank_state(
    state: dict[str, np.ndarray],
    policy_rng: np.random.Generator,
    stepper: EnvStepper,
    fallback_seed: int,
) -> tuple[int, int]:
    """Put `rank_state` output back; returns (env_steps, learner_updates)."""
    set_generator_state(policy_rng, state["policy_rng"])
    set_torch_rng_state(state.get("torch_rng"))
    stepper.load_state_dict(state, fallback_seed)
    return int(state["counters"][0]), int(state["counters"][1])


def gather_rank_states(
    ctx: RunContext, state: dict[str, np.ndarray] | None
) -> dict[int, dict[str, np.ndarray]] | None:
    """Collective: every rank's state dict on rank 0 (None elsewhere). Each dict travels
    as one `.npz` byte buffer (numpy's format, no pickles) in one `Gatherv`."""
    blob = np.zeros(0, dtype=np.uint8)
    if state is not None:
        out = io.BytesIO()
        np.savez(out, **state)
        blob = np.frombuffer(out.getvalue(), dtype=np.uint8)
    sizes = gather_rows(ctx.comm, np.array([blob.size], dtype=np.int64), 0, ctx.watchdog_s)
    data = gather_rows(ctx.comm, blob, 0, ctx.watchdog_s)
    if ctx.rank != 0:
        return None
    states, start = {}, 0
    for rank, size in enumerate(sizes):
        if size:
            with np.load(io.BytesIO(data[start : start + size].tobytes())) as npz:
                states[rank] = {name: npz[name] for name in npz.files}
        start += int(size)
    return states


def save_q_table(ctx: RunContext, q_table: np.ndarray, *args, **kwargs) -> Path:
    """Rank 0: a tabular checkpoint (`save_checkpoint` with `{"q_table": q_table}`)."""
    return save_checkpoint(ctx, {"q_table": q_table}, *args, **kwargs)


def save_checkpoint(
    ctx: RunContext,
    shared: dict[str, np.ndarray],
    env_steps: int,
    learner_updates: int,
    policy_version: int,
    traj_rows: dict[int, int],
    rank_states: dict[int, dict[str, np.ndarray]] | None = None,
    counters: dict | None = None,
) -> Path:
    """Rank 0: write a full checkpoint (see the module doc) after flushing run.h5, so the
    rows it accounts for are on disk before it is.

    Args:
        shared: the learner's arrays, the same for every rank (`q_table`, or a model's
            `params/...` and `optimizer/...`).
        traj_rows: {rank: rows of traj/rank-<k>.h5 up to this checkpoint} for the ranks
            of this world; orphan files of a larger earlier world are added here.
        rank_states: every rank's `rank_state` (collective checkpoints), or None.
        counters: more loop counters for `meta` (e.g. vector_step, syncs).
    """
    cfg = ctx.cfg
    run_file = ctx.run_file
    run_file.flush()
    rows = dict(orphan_traj_rows(ctx))
    rows.update(traj_rows)
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
        "segment": ctx.segment.to_dict(),
        "episodes_rows": run_file.episode_rows,
        "metrics_rows": run_file.metric_rows,
        "traj_rows": [int(rows.get(k, 0)) for k in range(max(rows, default=-1) + 1)],
        "elapsed_s": ctx.elapsed_s(),
        "rank_states": rank_states is not None,
        **(counters or {}),
    }
    arrays = dict(shared)
    for rank, state in (rank_states or {}).items():
        for name, array in state.items():
            arrays[f"ranks/{rank}/{name}"] = array
    path = write_checkpoint(
        ctx.run_dir / "checkpoints", int(env_steps), arrays, meta, cfg.run.keep_checkpoints
    )
    ctx.last_checkpoint_time = time.perf_counter()
    return path


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
    return _return_stats(comm, returns, episodes, watchdog_s)


def evaluate_policy(
    comm: MPI.Comm,
    env_id: str,
    env_kwargs: dict,
    greedy_actions,
    episodes: int,
    seed: int,
    watchdog_s: float,
    env_options: dict | None = None,
) -> dict | None:
    """Collective: like `evaluate_greedy` for a learner every rank holds identically.

    Args:
        greedy_actions: (N, *obs_shape) observations -> (N, ...) deterministic actions.
        env_options: the run's `make_env` options (`RunConfig.env_options()`).
    """
    ids = np.array_split(np.arange(episodes, dtype=np.int64), comm.Get_size())[comm.Get_rank()]
    returns = policy_episode_returns(
        env_id,
        env_kwargs,
        lambda obs: greedy_actions(np.asarray(obs)[None])[0],
        ids,
        seed,
        env_options=env_options,
    )
    return _return_stats(comm, returns, episodes, watchdog_s)


def _return_stats(comm, returns, episodes, watchdog_s) -> dict | None:
    all_returns = gather_rows(comm, returns, 0, watchdog_s)
    if comm.Get_rank() != 0:
        return None
    return {
        "mean_return": float(np.mean(all_returns)) if episodes else float("nan"),
        "std_return": float(np.std(all_returns)) if episodes else float("nan"),
        "episodes": int(episodes),
    }
