"""The `ps` layout: tabular Q-learning with rank 0 as parameter server.

Rank 0 owns the Q-table; ranks 1..N-1 are actors. An actor steps its vector env on its
latest snapshot of the table and sends every `sync_interval` vector steps a batch of
transitions; rank 0 applies each batch one vector step at a time and answers that actor
with a fresh, versioned snapshot as soon as its previous snapshot has been delivered. The
exchange (double-buffered sends, posted receives served by `Testsome`, versioned
snapshots, the final handshake) is `hpcrl.topologies.serving`'s, shared with the
`actor_learner` layout. Policy lag = learner updates now - version the batch was collected
with.

Preemption: a rank that received `SIGUSR1`/`SIGTERM` says so in its next message (an
actor's batch header, rank 0's snapshot header); rank 0 then stamps `stop` on every
snapshot, and each actor ends with its current batch marked final, as at the end of its
budget. Once every final batch is in, rank 0 writes the checkpoint and all ranks agree
(one small allreduce) that the run was interrupted. Rank 0 checkpoints while actors run,
so its checkpoints hold the table and counters, not the actors' env and RNG state: a
multi-rank `ps` run resumes in a new segment (fresh actor seeds, in-progress episodes
restarted; `ps` applies batches in arrival order and is not deterministic anyway). With
one process the checkpoint holds the actor's state too and resumes bit-exactly.

With one process the same actor and learner alternate in place, one vector step at a time
(`serving.alternate`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hpcrl.algos import make_learner
from hpcrl.comm import protocol as P
from hpcrl.comm.protocol import ActorHeader, Message, ParamsHeader
from hpcrl.comm.waits import Backoff, WatchdogTimeout, allreduce_sum
from hpcrl.contracts import LoopResult, TabularLearner
from hpcrl.topologies.checkpointing import rank_state, restore_rank_state, save_checkpoint
from hpcrl.topologies.collective_eval import TableGreedy
from hpcrl.topologies.recording import link_trajectories
from hpcrl.topologies.reporting import EpisodeRows, Reporter
from hpcrl.topologies.run_context import RunContext
from hpcrl.topologies.serving import Actor, ActorPool, LearnerLink, alternate, run_actor
from hpcrl.topologies.tabular import TabularConfig, TabularTopology


@dataclass
class PSConfig(TabularConfig):
    """Settings of the `ps` layout: `sync_interval` is the vector steps of one actor batch
    (one message to rank 0)."""


class ParameterServer(TabularTopology):
    """Rank 0 parameter server, ranks 1..N-1 actors; one process: both in turn."""

    name = "ps"
    Config = PSConfig
    ROLES = "rank 0 parameter server, ranks 1-{last} actors"

    def acting_ranks(self, world_size: int) -> range:
        return range(1) if world_size == 1 else range(1, world_size)

    def run(self, ctx: RunContext) -> LoopResult:
        """The whole layout; the final Q-table on rank 0 and whether a preemption signal
        stopped the run (agreed by every rank)."""
        if ctx.world_size == 1:
            q_table, interrupted = _run_embedded(ctx)
            return LoopResult(interrupted, TableGreedy(q_table))
        if ctx.rank == 0:
            q_table, interrupted = _run_learner(ctx)
        else:
            q_table, interrupted = np.zeros((ctx.n_states, ctx.n_actions)), _run_actor(ctx)
        flag = np.array([float(interrupted)])
        allreduce_sum(ctx.comm, flag, ctx.watchdog_s)
        return LoopResult(bool(flag[0] > 0), TableGreedy(q_table))


TOPOLOGY = ParameterServer


def _learner(ctx: RunContext):
    return make_learner(ctx.cfg, ctx.observation_space, ctx.action_space, ctx.world_size)


class TabularActor(Actor):
    """Steps a vector env with the behaviour policy and fills experience messages."""

    def __init__(self, ctx: RunContext, learner: TabularLearner, budget: int, vector_steps: int):
        super().__init__(ctx, budget)
        self.vector_steps = vector_steps  # per message
        self.learner = learner  # its table: the live one (one process) or a snapshot
        self.rng, env_seed = ctx.rank_seeds()
        self.policy = learner.behaviour_policy(self.rng)
        self.num_envs = ctx.cfg.run.num_envs
        if ctx.resume is not None:
            state = ctx.resume.rank_state(ctx.rank)
            if state:
                self.env_steps, _ = restore_rank_state(state, self.rng, self.stepper, env_seed + 1)

    def state(self, learner_updates: int) -> dict[str, np.ndarray]:
        """This actor's `rank_state` (for a checkpoint that holds it)."""
        self.recorder.flush()
        return rank_state(
            self.rng, self.stepper, self.env_steps, learner_updates, self.recorder.rows
        )

    def produce(self, msg: Message, poll: Callable[[], int]) -> None:
        """Take up to `vector_steps` vector steps on the learner's table and write them
        into `msg`.

        `poll()` runs before every vector step: it may refresh the table in place and
        returns the policy version now in it. The batch is stamped with the version its
        first step used, the oldest policy in it. The last vector step of the budget
        counts only as many env copies as the budget has left, so the run ends exactly
        at its env-step budget.
        """
        rows = episodes = vector_steps = 0
        policy_version = -1
        segment = self.ctx.segment
        q_table = self.learner.q_table
        for _ in range(self.vector_steps):
            version = poll()
            if self.done:
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
            vector_steps += 1
            self.env_steps += n
            episodes = P.write_episodes(
                msg, episodes, batch, n, self.env_steps, self.ctx.elapsed_s()
            )
        self.stamp(msg, rows, policy_version, episodes, vector_steps)


class TabularParameterServer:
    """Rank 0's side: the Q-table, batch application, episodes, lag, metrics, checkpoints."""

    def __init__(self, ctx: RunContext, learner: TabularLearner):
        self.ctx = ctx
        self.learner = learner
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
        self.checkpointed_env_steps = -1
        self.rank_states = None  # () -> {rank: state} when the checkpoint can hold them
        self.stop = False  # a preemption signal reached rank 0 or an actor

    @property
    def policy_version(self) -> int:
        return self.learner.learner_updates

    def consume(self, msg: Message, rank: int) -> None:
        """Apply one actor batch, one vector step (`num_envs` rows) at a time."""
        header = msg["header"]
        rows = int(header[ActorHeader.ROWS])
        self.lags.append(self.policy_version - int(header[ActorHeader.POLICY_VERSION]))
        self.stop = self.stop or bool(header[ActorHeader.STOP])
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
        self.episodes.add_message(msg, before, rank)

    def after(self, last: bool, stopped: bool) -> None:
        """One process: after each message, log and checkpoint when due (`finish` ends)."""
        if not last:
            self.tick()

    def tick(self) -> None:
        """Log and checkpoint when due (by env steps or wall time)."""
        clock = self.ctx.clock
        if self.reporter.due():
            self.log()
        if clock.due_by_env_steps(self.env_steps) or clock.due_by_time():
            self.checkpoint()
        if clock.due_by_env_steps(self.env_steps):
            clock.advance(self.env_steps)

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
        save_checkpoint(
            self.ctx,
            {"q_table": self.learner.q_table},
            self.env_steps,
            self.learner.learner_updates,
            self.policy_version,
            self.traj_rows,
            self.rank_states() if self.rank_states is not None else None,
        )
        self.ctx.clock.written(self.env_steps)

    def finish(self) -> np.ndarray:
        self.log()
        self.checkpoint()
        self.reporter.close()
        return self.learner.q_table


def _experience_schema(ctx: RunContext) -> P.Schema:
    return P.tabular_experience_schema(ctx.cfg.topology.sync_interval * ctx.cfg.run.num_envs)


def _run_embedded(ctx: RunContext) -> tuple[np.ndarray, bool]:
    # One process: nothing to transfer, so the actor acts on the live table and hands the
    # learner every vector step at once (no policy lag), as Watkins' online algorithm does.
    server = TabularParameterServer(ctx, _learner(ctx))
    actor = TabularActor(ctx, server.learner, ctx.segment.budgets()[0], vector_steps=1)
    server.rank_states = lambda: {0: actor.state(server.learner.learner_updates)}
    msg = P.tabular_experience_schema(ctx.cfg.run.num_envs).allocate()
    interrupted = alternate(ctx, actor, server, msg)
    q_table = server.finish()  # the checkpoint holds the actor's state: before close
    link_trajectories(ctx, actor.close())
    return q_table, interrupted


def _run_actor(ctx: RunContext) -> bool:
    learner = _learner(ctx)  # its table: the latest snapshot from rank 0
    budget = ctx.segment.budgets()[ctx.rank - 1]
    actor = TabularActor(ctx, learner, budget, ctx.cfg.topology.sync_interval)

    def load(snapshot: Message) -> None:
        learner.q_table[:] = snapshot["q_table"]

    snapshots = P.q_table_schema(ctx.n_states, ctx.n_actions)
    link = LearnerLink(ctx.comm, 0, _experience_schema(ctx), snapshots, load, ctx.watchdog_s)
    run_actor(ctx, actor, link)
    return False  # rank 0 knows whether the run as a whole was interrupted


def _run_learner(ctx: RunContext) -> tuple[np.ndarray, bool]:
    watchdog = ctx.watchdog_s
    server = TabularParameterServer(ctx, _learner(ctx))
    actors = list(range(1, ctx.world_size))

    def write(snapshot: Message) -> None:
        snapshot["q_table"][:] = server.learner.q_table
        snapshot["header"][ParamsHeader.VERSION] = server.policy_version

    pool = ActorPool(
        ctx.comm,
        actors,
        _experience_schema(ctx),
        P.q_table_schema(ctx.n_states, ctx.n_actions),
        write,
        watchdog,
        reply=True,
    )
    pool.publish_all()
    backoff = Backoff()

    def consume(msg: Message, rank: int) -> bool:
        ctx.maybe_fail(server.env_steps)
        server.consume(msg, rank)
        if server.stop and not pool.stopping:
            pool.stop()  # the reply to this message already says stop
        return True  # applied: retired at once

    while pool.finished < len(actors):
        server.stop = server.stop or ctx.stop_requested()
        if server.stop and not pool.stopping:
            pool.stop()  # every actor is told with its next snapshot
        if not pool.serve(consume):
            if backoff.waited_s > watchdog:
                raise WatchdogTimeout(
                    f"rank 0 received no experience for {watchdog:g} s "
                    f"(watchdog_s); {len(actors) - pool.finished} actors "
                    "have not finished; aborting the job"
                )
            server.tick()
            backoff.pause()
            continue
        backoff.reset()
        server.tick()
    pool.close()
    link_trajectories(ctx, 0)
    interrupted = server.stop and server.env_steps < ctx.cfg.run.total_env_steps
    return server.finish(), interrupted
