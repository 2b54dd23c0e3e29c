"""Parameter-server (actor-learner) loop for tabular Q-learning.

Rank 0 owns the Q-table; ranks 1..N-1 are actors. An actor steps its vector env on its
latest snapshot of the table and sends every `sync_interval` vector steps a batch of
transitions with `Isend` from one of two preallocated buffers (double buffering: it fills
one while the other is in flight). Rank 0 keeps a receive posted for every actor, serves
whichever completes first (`Testsome`), applies the batch one vector step at a time, and
answers that actor with a fresh, versioned snapshot as soon as its previous snapshot has
been delivered. Actors pick snapshots up when their non-blocking receive has completed and
never wait on rank 0 per step. Policy lag = learner updates now - version the batch was
collected with.

Shutdown: an actor's last batch carries `final=1`; rank 0 answers it with a final
snapshot, so every send has a matching receive and nothing is cancelled.

Preemption: a rank that received `SIGUSR1`/`SIGTERM` says so in its next message (an
actor's batch header, rank 0's snapshot header); rank 0 then stamps `stop` on every
snapshot, and each actor ends with its current batch marked final, as at the end of its
budget. Once every final batch is in, rank 0 writes the checkpoint and all ranks agree
(one small allreduce) that the run was interrupted. Rank 0 checkpoints while actors run,
so its checkpoints hold the table and counters, not the actors' env and RNG state: a
multi-rank `ps` run resumes in a new segment (fresh actor seeds, in-progress episodes
restarted; `ps` applies batches in arrival order and is not deterministic anyway). With
one process the checkpoint holds the actor's state too and resumes bit-exactly.

With one process the same actor and learner alternate in place, one vector step at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from mpi4py import MPI

from hpcrl.algos.qlearning import QLearningLearner, QLearningPolicy
from hpcrl.comm import protocol as P
from hpcrl.comm.protocol import Message, Tag
from hpcrl.comm.waits import Backoff, WatchdogTimeout, allreduce_sum, wait_all
from hpcrl.topologies.context import (
    EpisodeRows,
    LoopResult,
    Reporter,
    RunContext,
    TrajectoryRecorder,
    link_trajectories,
    rank_state,
    restore_rank_state,
    save_q_table,
)


class TabularActor:
    """Steps a vector env with the behaviour policy and fills experience messages."""

    def __init__(self, ctx: RunContext, budget: int):
        self.ctx = ctx
        self.rng, env_seed = ctx.rank_seeds()
        self.policy = QLearningPolicy(ctx.cfg.algo, self.rng)
        self.stepper = ctx.make_stepper()
        self.budget = budget
        self.env_steps = 0  # in this segment
        self.num_envs = ctx.cfg.run.num_envs
        self.stop = False  # end with the current batch (preemption)
        if ctx.resume is not None:
            state = ctx.resume.rank_state(ctx.rank)
            if state:
                self.env_steps, _ = restore_rank_state(state, self.rng, self.stepper, env_seed + 1)
        self.recorder = TrajectoryRecorder(ctx)

    @property
    def finished(self) -> bool:
        return self.env_steps >= self.budget

    @property
    def done(self) -> bool:
        """Its last batch is (being) sent: budget spent or told to stop."""
        return self.finished or self.stop

    def state(self, learner_updates: int) -> dict[str, np.ndarray]:
        """This actor's `rank_state` (for a checkpoint that holds it)."""
        self.recorder.flush()
        return rank_state(
            self.rng, self.stepper, self.env_steps, learner_updates, self.recorder.rows
        )

    def fill(
        self,
        msg: Message,
        q_table: np.ndarray,
        poll: Callable[[], int],
        vector_steps: int | None = None,
    ) -> None:
        """Take up to `vector_steps` (default `sync_interval`) vector steps on `q_table` and
        write them into `msg`.

        `poll()` runs before every vector step: it may refresh `q_table` in place and
        returns the policy version now in `q_table`. The batch is stamped with the version
        its first step used, the oldest policy in it. The last vector step of the budget
        counts only as many env copies as the budget has left, so the run ends exactly
        at its env-step budget.
        """
        rows = episodes = 0
        policy_version = -1
        segment = self.ctx.segment
        for _ in range(vector_steps or self.ctx.cfg.algo.sync_interval):
            version = poll()
            if self.finished or self.stop:
                break
            if policy_version < 0:
                policy_version = version
            self.ctx.maybe_fail(self.env_steps)
            actions = self.policy.select_actions(
                q_table, self.stepper.obs, segment.progress(self.env_steps, self.budget)
            )
            batch = self.stepper.step(actions)
            n = min(self.num_envs, self.budget - self.env_steps)
            end = rows + n
            msg["obs"][rows:end] = batch.obs[:n]
            msg["action"][rows:end] = batch.actions[:n]
            msg["reward"][rows:end] = batch.rewards[:n]
            msg["next_obs"][rows:end] = batch.next_obs[:n]
            msg["terminated"][rows:end] = batch.terminated[:n]
            self.recorder.record(batch, n)
            rows = end
            self.env_steps += n
            episodes = P.write_episodes(
                msg, episodes, batch, n, self.env_steps, self.ctx.elapsed_s()
            )
        header = msg["header"]
        header[P.EXP_ROWS] = rows
        header[P.EXP_POLICY_VERSION] = max(policy_version, 0)
        header[P.EXP_FINAL] = int(self.done)
        header[P.EXP_EPISODES] = episodes
        header[P.EXP_ACTOR_ENV_STEPS] = self.env_steps
        header[P.EXP_STOP] = int(self.ctx.stop_requested())

    def close(self) -> int:
        self.stepper.close()
        return self.recorder.close()


class TabularParameterServer:
    """Rank 0's side: the Q-table, batch application, episodes, lag, metrics, checkpoints."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.learner = QLearningLearner(ctx.cfg.algo, ctx.n_states, ctx.n_actions)
        self.episodes = EpisodeRows()
        self.env_steps = 0  # global
        # Rows of each traj/rank-<k>.h5 that hold consumed transitions.
        self.traj_rows: dict[int, int] = {}
        if ctx.resume is not None:
            meta = ctx.resume.meta
            self.learner.q_table[:] = ctx.resume.shared()["q_table"]
            self.learner.learner_updates = int(meta["learner_updates"])
            self.env_steps = int(meta["env_steps"])
            rows = meta.get("traj_rows", [])
            self.traj_rows = {k: int(n) for k, n in enumerate(rows) if k in ctx.recording_ranks}
        self.reporter = Reporter(ctx)
        self.lags: list[int] = []
        interval = ctx.cfg.run.checkpoint_interval_env_steps
        self.next_checkpoint = (self.env_steps // interval + 1) * interval if interval else None
        self.checkpointed_env_steps = -1
        self.rank_states = None  # () -> {rank: state} when the checkpoint can hold them
        self.stop = False  # a preemption signal reached rank 0 or an actor

    @property
    def policy_version(self) -> int:
        return self.learner.learner_updates

    def consume(self, msg: Message, rank: int) -> None:
        """Apply one actor batch, one vector step (`num_envs` rows) at a time."""
        header = msg["header"]
        rows = int(header[P.EXP_ROWS])
        self.lags.append(self.policy_version - int(header[P.EXP_POLICY_VERSION]))
        self.stop = self.stop or bool(header[P.EXP_STOP])
        before = self.env_steps
        total = self.ctx.cfg.run.total_env_steps
        rows_per_update = self.ctx.cfg.run.num_envs  # one vector step
        for start in range(0, rows, rows_per_update):
            s = slice(start, min(start + rows_per_update, rows))
            self.learner.update(
                msg["obs"][s],
                msg["action"][s],
                msg["reward"][s],
                msg["next_obs"][s],
                msg["terminated"][s],
                self.env_steps / total,
            )
            self.env_steps += s.stop - s.start
        if self.ctx.cfg.run.record_trajectories:
            self.traj_rows[rank] = self.traj_rows.get(rank, 0) + rows
        self.episodes.add_message(
            msg,
            int(header[P.EXP_EPISODES]),
            rows,
            int(header[P.EXP_ACTOR_ENV_STEPS]),
            before,
            rank,
        )

    def tick(self, force: bool = False) -> None:
        """Log and checkpoint when due (by env steps or wall time)."""
        if force or self.reporter.due():
            self.log()
        by_steps = self.next_checkpoint is not None and self.env_steps >= self.next_checkpoint
        if by_steps or self.ctx.checkpoint_due_by_time():
            self.checkpoint()
        if self.next_checkpoint is not None and self.env_steps >= self.next_checkpoint:
            interval = self.ctx.cfg.run.checkpoint_interval_env_steps
            self.next_checkpoint = (self.env_steps // interval + 1) * interval

    def log(self) -> None:
        self.reporter.add_episodes(self.episodes.take())
        lags = self.lags or [0]
        self.reporter.log(
            self.env_steps,
            {
                "learner_updates": int(self.learner.learner_updates),
                "policy_lag_mean": float(np.mean(lags)),
                "policy_lag_max": int(np.max(lags)),
            },
        )
        self.lags = []

    def checkpoint(self) -> None:
        """Write every finished episode, then the checkpoint (once per env-step count)."""
        if self.env_steps == self.checkpointed_env_steps:
            return
        self.checkpointed_env_steps = self.env_steps
        self.reporter.add_episodes(self.episodes.take())
        save_q_table(
            self.ctx,
            self.learner.q_table,
            self.env_steps,
            self.learner.learner_updates,
            self.policy_version,
            self.traj_rows,
            self.rank_states() if self.rank_states is not None else None,
        )

    def finish(self) -> np.ndarray:
        self.log()
        self.checkpoint()
        self.reporter.close()
        return self.learner.q_table


def run_parameter_server(ctx: RunContext) -> LoopResult:
    """Run the whole `ps` layout; returns the final Q-table on rank 0 (None elsewhere) and
    whether a preemption signal stopped the run (agreed by every rank)."""
    if ctx.world_size == 1:
        ctx.start_segment(1, range(1))
        return _run_embedded(ctx)
    ctx.start_segment(ctx.world_size - 1, range(1, ctx.world_size))
    if ctx.rank == 0:
        q_table, interrupted = _run_learner(ctx)
    else:
        q_table, interrupted = None, _run_actor(ctx)
    flag = np.array([float(interrupted)])
    allreduce_sum(ctx.comm, flag, ctx.watchdog_s)
    return LoopResult(q_table, bool(flag[0] > 0))


def _experience_schema(ctx: RunContext) -> P.Schema:
    return P.tabular_experience_schema(ctx.cfg.algo.sync_interval * ctx.cfg.run.num_envs)


def _run_embedded(ctx: RunContext) -> LoopResult:
    # One process: nothing to transfer, so the actor acts on the live table and hands the
    # learner every vector step at once (no policy lag), as Watkins' online algorithm does.
    server = TabularParameterServer(ctx)
    actor = TabularActor(ctx, ctx.segment.budgets()[0])
    server.rank_states = lambda: {0: actor.state(server.learner.learner_updates)}
    msg = P.tabular_experience_schema(ctx.cfg.run.num_envs).allocate()
    while True:
        actor.fill(msg, server.learner.q_table, lambda: server.policy_version, vector_steps=1)
        server.consume(msg, 0)
        if actor.finished:
            break
        if ctx.stop_requested():
            actor.stop = True
            break
        server.tick()
    q_table = server.finish()  # the checkpoint holds the actor's state: before close
    link_trajectories(ctx, actor.close())
    return LoopResult(q_table, actor.stop)


def _run_actor(ctx: RunContext) -> bool:
    comm, watchdog = ctx.comm, ctx.watchdog_s
    actor = TabularActor(ctx, ctx.segment.budgets()[ctx.rank - 1])
    snapshot_msg = P.q_table_schema(ctx.n_states, ctx.n_actions).allocate()
    q_table = np.empty((ctx.n_states, ctx.n_actions))
    state = {"version": 0}
    recv = comm.Irecv(snapshot_msg.buffer, source=0, tag=Tag.PARAMS)
    wait_all([recv], comm, "the first Q-table snapshot from rank 0", watchdog)
    q_table[:] = snapshot_msg["q_table"]
    state["version"] = int(snapshot_msg["header"][P.PARAMS_VERSION])
    recv = comm.Irecv(snapshot_msg.buffer, source=0, tag=Tag.PARAMS)

    def poll() -> int:
        nonlocal recv
        if recv.Test():
            q_table[:] = snapshot_msg["q_table"]
            state["version"] = int(snapshot_msg["header"][P.PARAMS_VERSION])
            actor.stop = actor.stop or bool(snapshot_msg["header"][P.PARAMS_STOP])
            recv = comm.Irecv(snapshot_msg.buffer, source=0, tag=Tag.PARAMS)
        actor.stop = actor.stop or ctx.stop_requested()
        return state["version"]

    schema = _experience_schema(ctx)
    buffers = [schema.allocate(), schema.allocate()]
    sends: list[MPI.Request | None] = [None, None]
    slot = 0
    while True:
        if sends[slot] is not None:
            wait_all([sends[slot]], comm, "rank 0 to take an experience batch", watchdog)
        actor.fill(buffers[slot], q_table, poll)
        # On disk before rank 0 can count these rows in a checkpoint, so a resume after
        # kill -9 finds every trajectory row the checkpoint accounts for.
        actor.recorder.flush()
        sends[slot] = comm.Isend(buffers[slot].buffer, dest=0, tag=Tag.EXPERIENCE)
        slot ^= 1
        if actor.done:
            break
    wait_all([r for r in sends if r is not None], comm, "rank 0 to take the last batches", watchdog)
    # Rank 0 answers the final batch with a final snapshot; drain until it arrives.
    while True:
        wait_all([recv], comm, "the final snapshot from rank 0", watchdog)
        if snapshot_msg["header"][P.PARAMS_FINAL]:
            break
        recv = comm.Irecv(snapshot_msg.buffer, source=0, tag=Tag.PARAMS)
    link_trajectories(ctx, actor.close())
    return False  # rank 0 knows whether the run as a whole was interrupted


def _run_learner(ctx: RunContext) -> tuple[np.ndarray, bool]:
    comm, watchdog = ctx.comm, ctx.watchdog_s
    server = TabularParameterServer(ctx)
    actors = list(range(1, ctx.world_size))
    schema = _experience_schema(ctx)
    inbox = [schema.allocate() for _ in actors]
    receives = [
        comm.Irecv(inbox[i].buffer, source=k, tag=Tag.EXPERIENCE) for i, k in enumerate(actors)
    ]
    snap_schema = P.q_table_schema(ctx.n_states, ctx.n_actions)
    outbox = [snap_schema.allocate() for _ in actors]
    sends: list[MPI.Request | None] = [None] * len(actors)

    def publish(i: int, final: bool = False) -> None:
        outbox[i]["q_table"][:] = server.learner.q_table
        outbox[i]["header"][P.PARAMS_VERSION] = server.policy_version
        outbox[i]["header"][P.PARAMS_FINAL] = int(final)
        outbox[i]["header"][P.PARAMS_STOP] = int(server.stop)
        sends[i] = comm.Isend(outbox[i].buffer, dest=actors[i], tag=Tag.PARAMS)
        if server.stop:
            told.add(i)

    told: set[int] = set()  # actors sent a snapshot that says stop
    done: set[int] = set()
    for i in range(len(actors)):
        publish(i)
    finished = 0
    backoff = Backoff()
    while finished < len(actors):
        server.stop = server.stop or ctx.stop_requested()
        if server.stop:  # tell every actor as soon as its previous snapshot is delivered
            for i in range(len(actors)):
                if i not in told and i not in done and sends[i].Test():
                    publish(i)
        ready = MPI.Request.Testsome(receives)
        if not ready:
            if backoff.waited_s > watchdog:
                raise WatchdogTimeout(
                    f"rank 0 received no experience for {watchdog:g} s "
                    f"(watchdog_s); {len(actors) - finished} actors "
                    "have not finished; aborting the job"
                )
            server.tick()
            backoff.pause()
            continue
        backoff.reset()
        ctx.maybe_fail(server.env_steps)
        for i in ready:
            server.consume(inbox[i], actors[i])
            final = bool(inbox[i]["header"][P.EXP_FINAL])
            if final:
                finished += 1
                done.add(i)
                wait_all([sends[i]], comm, f"actor {actors[i]} to take a snapshot", watchdog)
                publish(i, final=True)
            else:
                receives[i] = comm.Irecv(inbox[i].buffer, source=actors[i], tag=Tag.EXPERIENCE)
                if sends[i].Test():
                    publish(i)
        server.tick()
    wait_all(
        [r for r in sends if r is not None], comm, "actors to take the final snapshot", watchdog
    )
    link_trajectories(ctx, 0)
    interrupted = server.stop and server.env_steps < ctx.cfg.run.total_env_steps
    return server.finish(), interrupted
