"""The `actor_learner` layout for deep learners (IMPALA, A3C, asynchronous one-step and
n-step Q-learning): ranks 0..k-1 learn (`learner_ranks` k, a learner group), every other
rank acts; an actor waits for its learner only when flow control says so. The algorithms
plug in through `hpcrl.contracts.AsyncLearner`: what an actor sends is the learner's
`message_schema` and `pack` (IMPALA's actors send their unrolls; A3C's and Q-learning's
the gradient they computed on the unroll with their own copy of the parameters, which
makes the learner a parameter server).

Actor (rank a >= k, served by learner (a - k) mod k): steps its vector env with the last
parameters it received, fills an unroll of T vector steps (`hpcrl.comm.protocol.
unroll_schema`, stamped with the parameter version its first step used) and sends it;
the exchange with its learner (double-buffered sends, send wait, parameters picked up
between vector steps) is `hpcrl.topologies.serving`'s, shared with the `ps` layout.

Learner: serves its actors (`serving.ActorPool`) and queues full unrolls. Flow control keeps
the queue bounded: each actor has at most `max_unrolls_in_flight` unrolls its learner has
not learned from (or dropped), and waits for credit beyond that (`serving`), so a learner
that falls behind slows its actors down instead of discarding their env steps. An unroll
older than `max_policy_lag` updates is still dropped and counted, as the exception. With at
least `unrolls_per_update / k` unrolls queued, a learner takes everything queued up to
`max_unrolls_per_update / k` (larger batches when it is behind; by default the same) and
joins a *round* of the learner group: one small `Iallreduce` of flags (has a batch, is
done, stop, env steps, log and checkpoint votes, rank 0's count of solved periodic
evaluations for `solved_lr_decay`), during which it keeps serving its
actors. Every learner then takes the same decisions: if any had a batch, all take one
optimizer step on the gradient summed over the group and divided by the learners that had a
batch (`FlatGradients.average`), so the learners' parameters stay bit-identical (IMPALA
§5.3.1); every `publish_interval` updates each learner sends the new versioned parameters
to each of its actors whose previous parameters have been delivered. With k = 1 a round
costs nothing.

Budget: the run's env steps are split over the actors. An actor's last unroll (shorter, or
with copies past the budget) is counted, not learned from. When every actor still running
waits for credit and the queue holds less than a batch (near the end, when too few actors
are left to fill one), the learner learns from what is queued (`ActorPool.all_waiting`). A
learner is done when all its actors have sent their final unroll (`serving`) and nothing
queued is left to learn from.

Preemption: a stop vote in a round makes every learner tell its actors to stop; each actor
ends with its current unroll marked final. The unrolls queued but not learned then, and any
received after, are dropped and counted (`unrolls_dropped`), and rank 0 checkpoints the
parameters, optimizer state and counters. A resume starts a new segment (fresh actor seeds,
episodes restarted), as for the tabular parameter server: an asynchronous run is not
bit-reproducible anyway.

One process: the same actor and learner alternate in place, one unroll at a time
(`serving.alternate`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np
from mpi4py import MPI

from hpcrl.algos import algorithm, make_learner
from hpcrl.analysis.stats import SOLVED_WINDOW
from hpcrl.comm import protocol as P
from hpcrl.comm.protocol import ActorHeader, Message, ParamsHeader, Timing
from hpcrl.comm.waits import (
    Backoff,
    WatchdogTimeout,
    allreduce_sum,
    bcast,
    gather_rows,
    wait_all,
)
from hpcrl.contracts import AsyncActor, AsyncLearner, LayoutError, LoopResult
from hpcrl.errors import ConfigError, check_integers_at_least
from hpcrl.topologies.checkpointing import save_checkpoint
from hpcrl.topologies.collective_eval import LearnerGreedy
from hpcrl.topologies.deep import DeepTopology
from hpcrl.topologies.periodic_eval import PeriodicEval, reward_threshold
from hpcrl.topologies.recording import link_trajectories
from hpcrl.topologies.reporting import EpisodeRows, Reporter
from hpcrl.topologies.run_context import RunContext
from hpcrl.topologies.serving import Actor, ActorPool, LearnerLink, alternate, run_actor

if TYPE_CHECKING:
    import torch


@dataclass
class ActorLearnerConfig:
    """Settings of the `actor_learner` layout."""

    learner_ranks: int = 1  # learner group size k (IMPALA §5.3.1): ranks 0..k-1
    max_policy_lag: int = 20  # actor messages older than this many updates are dropped
    publish_interval: int = 1  # learner updates between parameter publications
    max_unrolls_in_flight: int = 2  # per actor, sent but not yet learned from (flow control)
    # Added to actor processes' niceness, so a node with more ranks than cores runs the
    # learner first (it is the bottleneck); no effect with a core per rank. 0: unchanged.
    actor_nice: int = 10

    def validate(self) -> None:
        check_integers_at_least(
            (
                ("learner_ranks", self.learner_ranks, 1),
                ("max_policy_lag", self.max_policy_lag, 0),
                ("publish_interval", self.publish_interval, 1),
                ("max_unrolls_in_flight", self.max_unrolls_in_flight, 1),
                ("actor_nice", self.actor_nice, 0),
            )
        )


class ActorLearner(DeepTopology):
    """Ranks 0..k-1 learn, the others act; one process: both in turn."""

    name = "actor_learner"
    Config = ActorLearnerConfig
    periodic_eval = True

    def min_world_size(self) -> int:
        k = self.settings.learner_ranks
        return 1 if k == 1 else k + 1

    def check_world(self, world_size: int) -> None:
        """Raises:
        LayoutError: `learner_ranks` leaves no actor (or is not 1 in a one-process run)."""
        k = self.settings.learner_ranks
        if world_size == 1 and k != 1:
            raise LayoutError(
                f"config key 'learner_ranks': got {k} in a one-process run, expected 1 "
                f"(layout 'actor_learner' with {k} learner ranks needs at least {k + 1} ranks)"
            )
        if world_size > 1 and k >= world_size:
            raise LayoutError(
                f"config key 'learner_ranks': got {k}, expected fewer than the world size "
                f"{world_size} (ranks 0-{k - 1} learn, the others act): layout "
                f"'actor_learner' needs at least {k + 1} ranks"
            )

    def check_env(self, env, world_size: int, shapes: dict) -> None:
        """Also raises ConfigError when `unrolls_per_update` does not split over the
        learner ranks, or `solved_lr_decay` has no periodic evaluation or no reward
        threshold to act on."""
        super().check_env(env, world_size, shapes)
        k, per_update = self.settings.learner_ranks, self.cfg.algo.unrolls_per_update
        if per_update % k:
            raise ConfigError(
                f"unrolls_per_update {per_update} must split over {k} learner ranks "
                f"(learner_ranks): {per_update} % {k} = {per_update % k}"
            )
        run = self.cfg.run
        batch = per_update * self.cfg.algo.unroll_length * run.num_envs
        if run.total_env_steps < batch:
            raise ConfigError(
                f"config key 'total_env_steps': got {run.total_env_steps}, expected at least "
                f"{batch}, one update's batch (unrolls_per_update {per_update} x "
                f"unroll_length {self.cfg.algo.unroll_length} x num_envs {run.num_envs} env "
                "steps): a smaller budget trains nothing"
            )
        decay = self.cfg.algo.solved_lr_decay  # AsyncConfig's, as every algorithm here
        if decay != 1.0 and not self.cfg.run.eval_interval:
            raise ConfigError(
                f"config key 'solved_lr_decay': got {decay!r} with eval_interval 0, expected "
                "1 (it acts on periodic evaluations: set eval_interval)"
            )
        if decay != 1.0 and reward_threshold(self.cfg.run.env_id) is None:
            raise ConfigError(
                f"config key 'solved_lr_decay': got {decay!r}, expected 1: "
                f"{self.cfg.run.env_id} has no reward threshold to reach"
            )

    def rank_roles(self, world_size: int) -> str:
        k = self.settings.learner_ranks
        learners = "rank 0 learner" if k == 1 else f"ranks 0-{k - 1} learners"
        return f"{learners}, ranks {k}-{world_size - 1} actors"

    def acting_ranks(self, world_size: int) -> range:
        return range(1) if world_size == 1 else range(self.settings.learner_ranks, world_size)

    def run(self, ctx: RunContext) -> LoopResult:
        """Every rank returns the final parameters (broadcast from rank 0 at the end, for
        the evaluation)."""
        learner, interrupted = _run(ctx)
        return LoopResult(interrupted, LearnerGreedy(learner))


TOPOLOGY = ActorLearner


class Round(IntEnum):
    """Slots of a learner-group round's flags (summed over the learner group)."""

    HAS_BATCH = 0  # learners with a batch for this update
    DONE = 1  # learners all of whose actors are done
    STOP = 2  # a preemption signal reached a learner or one of its actors
    ENV_STEPS = 3  # env steps the learners' actors took since the last round
    LOG = 4  # rank 0's log clock (or a periodic evaluation to log)
    CHECKPOINT = 5  # rank 0's wall-time checkpoint clock
    SOLVED = 6  # rank 0's periodic evaluations that reached the threshold (lr scale)


def _unroll_schema(ctx: RunContext) -> P.Schema:
    """The unroll an actor fills (`pack` makes the message it sends from it)."""
    observation_space, action_space = ctx.observation_space, ctx.action_space
    act_dtype = np.int64 if action_space.shape == () else np.float32
    return P.unroll_schema(
        ctx.cfg.algo.unroll_length,
        ctx.cfg.run.num_envs,
        observation_space.shape,
        observation_space.dtype,
        action_space.shape,
        act_dtype,
    )


class UnrollActor(Actor):
    """Steps a vector env with the behaviour policy and fills unroll messages."""

    def __init__(self, ctx: RunContext, policy: AsyncActor, budget: int):
        super().__init__(ctx, budget)
        self.policy = policy
        self.unroll = _unroll_schema(ctx).allocate()
        self.timing = np.zeros(len(Timing), dtype=np.float64)  # seconds
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.delay_s = ctx.slow_step_s()

    def produce(self, msg: Message, poll) -> None:
        """Fill an unroll (`fill`) and make the message to send from it: the learner's
        `pack` (its time counts as inference), then header, episodes and timing."""
        self.fill(self.unroll, poll)
        t0 = time.perf_counter()
        self.policy.pack(self.unroll, msg)
        self.timing[Timing.INFERENCE] += time.perf_counter() - t0
        for name in ("header", *(f for f in msg.schema.fields if f.startswith("episode_"))):
            msg[name][...] = self.unroll[name]
        msg["timing"][:] = self.timing

    def fill(self, msg: Message, poll) -> None:
        """Take up to T vector steps and write them into `msg`. `poll()` runs before every
        vector step; it may load new parameters into the policy and returns their version."""
        T, B = self.ctx.cfg.algo.unroll_length, self.ctx.cfg.run.num_envs
        steps = rows = episodes = 0
        version = -1
        for t in range(T):
            v = poll()
            if self.done:
                break
            version = v if version < 0 else version
            self.ctx.maybe_fail(self.env_steps)
            if self.delay_s:
                time.sleep(self.delay_s)  # test-only slow actor (`debug.slow_rank`)
            t0 = time.perf_counter()
            progress = self.ctx.segment.progress(self.env_steps, self.budget)
            actions, log_probs = self.policy.act(self.stepper.obs, progress)
            t1 = time.perf_counter()
            batch = self.stepper.step(actions)
            t2 = time.perf_counter()
            msg["obs"][t] = batch.obs
            msg["actions"][t] = batch.actions
            msg["behaviour_log_probs"][t] = log_probs
            msg["rewards"][t] = batch.rewards
            msg["terminated"][t] = batch.terminated
            msg["truncated"][t] = batch.truncated
            cut = np.flatnonzero(batch.truncated & ~batch.terminated)
            msg["truncation_values"][t] = 0.0
            if cut.size:
                msg["truncation_values"][t, cut] = self.policy.values(batch.next_obs[cut])
            t3 = time.perf_counter()
            self.timing[Timing.INFERENCE] += (t1 - t0) + (t3 - t2)
            self.timing[Timing.ENV] += t2 - t1
            n = min(B, self.budget - self.env_steps)
            self.recorder.record(batch, n)
            self.env_steps += n
            rows += n
            steps += 1
            episodes = P.write_episodes(
                msg, episodes, batch, n, self.env_steps, self.ctx.elapsed_s()
            )
        msg["obs"][steps] = self.stepper.obs
        self.stamp(msg, rows, version, episodes, steps)
        self.timing[Timing.WALL] = time.perf_counter() - self.start
        self.timing[Timing.CPU] = time.process_time() - self.cpu_start
        msg["timing"][:] = self.timing


@dataclass
class _Stats:
    """What a learner counts between two log rows."""

    lags: list[int] = field(default_factory=list)
    dropped_stale: int = 0
    dropped_steps: int = 0  # env steps in the stale unrolls
    batch_unrolls: list[int] = field(default_factory=list)  # per update
    wait_s: float = 0.0  # waiting for a batch
    updates: int = 0
    timing: dict[int, np.ndarray] = field(default_factory=dict)  # actor rank -> `Timing`


class UnrollLearner:
    """One learner rank: its actors' unrolls, the batch queue, counters and statistics."""

    def __init__(
        self, ctx: RunContext, learner: AsyncLearner, batch_unrolls: int, max_unrolls: int
    ):
        self.ctx = ctx
        self.learner = learner
        self.fields = learner.payload
        self.batch_unrolls = batch_unrolls  # the fewest per update
        self.max_unrolls = max(max_unrolls, batch_unrolls)  # the most, when more are queued
        self.queue: list[tuple[int, dict[str, np.ndarray]]] = []  # (actor rank, unroll)
        # Called with (actor rank, count) when unrolls are learned from or dropped (the
        # flow-control credit, `serving.ActorPool.retire`).
        self.retire: Callable[[int, int], None] = lambda rank, count: None
        self.episodes = EpisodeRows()
        self.env_steps = 0  # global, as of the last round
        self.local_steps = 0  # this learner's since the last round
        self.in_round = 0  # this learner's steps in the round under way (not yet in env_steps)
        self.unrolls_dropped = 0  # received but never learned from (stop, end, checkpoint)
        self.traj_rows = np.zeros(ctx.world_size, dtype=np.int64)
        self.stats = _Stats()
        self.last_timing: dict[int, np.ndarray] = {}
        self.stopping = False

    @property
    def policy_version(self) -> int:
        return self.learner.learner_updates

    def consume(self, msg: Message, rank: int) -> bool:
        """Count one actor message; queue it for learning if it is a full unroll that is
        not too stale (and the run is not stopping). Returns whether it is done with it
        (not queued)."""
        header = msg["header"]
        rows = int(header[ActorHeader.ROWS])
        T, B = self.ctx.cfg.algo.unroll_length, self.ctx.cfg.run.num_envs
        before = self.env_steps + self.in_round + self.local_steps
        self.local_steps += rows
        if self.ctx.cfg.run.record_trajectories:
            self.traj_rows[rank] += rows
        self.episodes.add_message(msg, before, rank)
        self.stats.timing[rank] = msg["timing"].copy()
        lag = self.policy_version - int(header[ActorHeader.POLICY_VERSION])
        if rows < T * B:
            return True  # an actor's last, partial unroll: counted, not learned from
        if self.stopping:
            self.unrolls_dropped += 1
            return True
        if lag > self.ctx.cfg.topology.max_policy_lag:
            self.stats.dropped_stale += 1
            self.stats.dropped_steps += rows
            return True
        self.stats.lags.append(lag)
        self.queue.append((rank, {name: msg[name].copy() for name in self.fields}))
        return False

    def ready(self) -> bool:
        return len(self.queue) >= self.batch_unrolls and not self.stopping

    def take_batch(self) -> tuple[dict[str, np.ndarray], int]:
        """The oldest queued unrolls, at most `max_unrolls` (at least `batch_unrolls`
        unless every actor waits on this learner), side by side: (T(+1), N, ...) arrays;
        and how many unrolls that is. Their actors get the credit back (`retire`)."""
        taken = self.queue[: self.max_unrolls]
        del self.queue[: self.max_unrolls]
        for rank, _ in taken:
            self.retire(rank, 1)
        unrolls = [u for _, u in taken]
        batch = {name: np.concatenate([u[name] for u in unrolls], axis=1) for name in self.fields}
        return batch, len(unrolls)

    def drop_queue(self) -> None:
        self.unrolls_dropped += len(self.queue)
        for rank, _ in self.queue:
            self.retire(rank, 1)
        self.queue.clear()

    def log_row(self) -> np.ndarray:
        """This learner's statistics since the last row, for one `gather_rows`: [lag sum,
        lag count, lag max, dropped stale, wait s, updates, env steps dropped stale,
        unrolls learned from, then per actor seen: rank and the `Timing` differences]."""
        s = self.stats
        head = [
            float(sum(s.lags)),
            float(len(s.lags)),
            float(max(s.lags, default=0)),
            float(s.dropped_stale),
            s.wait_s,
            float(s.updates),
            float(s.dropped_steps),
            float(sum(s.batch_unrolls)),
        ]
        actors = []
        for rank, timing in sorted(s.timing.items()):
            delta = timing - self.last_timing.get(rank, np.zeros(len(Timing)))
            actors += [float(rank), *delta.tolist()]
            self.last_timing[rank] = timing
        self.stats = _Stats()
        return np.array(head + actors, dtype=np.float64)


def _metrics(rows: np.ndarray, learner_count: int, elapsed: float, updates_s: float) -> dict:
    """Rank 0: one `/metrics` row from the gathered `log_row`s of every learner."""
    out: dict[str, float | int] = {}
    lag_sum = lag_n = lag_max = stale = wait = updates = stale_steps = learned = 0.0
    fractions: dict[str, list[float]] = {"env": [], "inference": [], "send_wait": []}
    per_actor = {}
    i = 0
    for _ in range(learner_count):
        n = int(rows[i])  # the length of this learner's row
        row = rows[i + 1 : i + 1 + n]
        i += 1 + n
        lag_sum += row[0]
        lag_n += row[1]
        lag_max = max(lag_max, row[2])
        stale += row[3]
        wait += row[4]
        updates += row[5]
        stale_steps += row[6]
        learned += row[7]
        for rank, *t in row[8:].reshape(-1, 1 + len(Timing)):
            wall = max(t[Timing.WALL], 1e-9)
            per_actor[int(rank)] = {
                "env_frac": t[Timing.ENV] / wall,
                "inference_frac": t[Timing.INFERENCE] / wall,
                "send_wait_frac": t[Timing.SEND_WAIT] / wall,
                "param_wait_frac": t[Timing.PARAM_WAIT] / wall,
                "cpu_frac": t[Timing.CPU] / wall,
            }
    out["policy_lag_mean"] = lag_sum / lag_n if lag_n else 0.0
    out["policy_lag_max"] = int(lag_max)
    out["unrolls_dropped_stale"] = int(stale)
    out["env_steps_dropped_stale"] = int(stale_steps)
    # Every learner counts each group update: unrolls per group update = learned / updates
    # per learner.
    out["unrolls_per_update"] = learned * learner_count / updates if updates else 0.0
    out["learner_wait_frac"] = wait / max(learner_count * elapsed, 1e-9)
    out["learner_updates_per_s"] = updates_s
    for rank, f in sorted(per_actor.items()):
        for name, value in f.items():
            out[f"actor_{rank}/{name}"] = float(value)
            if name in ("env_frac", "inference_frac", "send_wait_frac"):
                fractions[name.removesuffix("_frac")].append(float(value))
    if per_actor:
        eff = [e + n for e, n in zip(fractions["env"], fractions["inference"], strict=True)]
        out["actor_efficiency"] = float(np.mean(eff))
    return out


class _Group:
    """The learner group's collectives (`comm` holds only learner ranks)."""

    def __init__(self, comm, model: torch.nn.Module, watchdog_s: float):
        from hpcrl.comm.gradients import FlatGradients  # torch: learner ranks only

        self.comm = comm
        self.watchdog_s = watchdog_s
        self.gradients = FlatGradients(list(model.parameters()))
        self.contributors = 1

    def average_gradients(self) -> None:
        self.gradients.average(self.comm, self.watchdog_s, self.contributors)

    def clip_gradients(self, max_norm: float) -> None:
        self.gradients.clip(max_norm)


def _run(ctx: RunContext) -> tuple[AsyncActor, bool]:
    """The whole layout on every rank; returns this rank's policy (its learner, or an
    actor's `AsyncActor`) holding rank 0's final parameters, and whether a preemption
    signal stopped the run (agreed). Actors of an algorithm with a torch-free policy
    (`Algorithm.make_actor`) never import torch."""
    cfg = ctx.cfg
    k = cfg.topology.learner_ranks
    world = ctx.world_size
    rng, _ = ctx.rank_seeds()
    torch_seed, seed = int(rng.integers(2**62)), int(rng.integers(2**62))
    is_learner = world == 1 or ctx.rank < k
    if world > 1:
        # The blocking collectives first, once every rank is here (a sleeping wait): MPICH
        # busy-polls in them, which starved rank 0 building its learner (importing torch)
        # for ~30 s with 63 actors on 2 cores.
        wait_all([ctx.comm.Ibarrier()], ctx.comm, "every rank to start", ctx.watchdog_s)
        group = ctx.comm.Split(0 if is_learner else 1, ctx.rank)
        local = ctx.comm.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank = local.Get_rank()
        local.Free()
    make_actor = algorithm(cfg.run.algo).make_actor
    policy = None
    if not is_learner and make_actor is not None:
        policy = make_actor(cfg.algo, ctx.observation_space, ctx.action_space, seed)
    if policy is None:
        policy = _torch_learner(ctx, torch_seed, seed)
    if world == 1:
        policy.make_optimizer()  # before the first update, not in it (~1.5 s at first)
        return policy, _run_embedded(ctx, policy)
    if is_learner:  # actors stay on the CPU
        from hpcrl.models import select_device

        policy.to(select_device(cfg.run.device, local_rank))
        policy.make_optimizer()
        interrupted = _run_learner(ctx, group, policy)
        policy.to(select_device("cpu"))
    else:
        interrupted = _run_actor(ctx, policy)
    group.Free()
    flag = np.array([float(interrupted)])
    allreduce_sum(ctx.comm, flag, ctx.watchdog_s)
    final = policy.published()  # rank 0's, on every rank, for the evaluation
    bcast(ctx.comm, final, 0, ctx.watchdog_s)
    policy.load_published(final)
    return policy, bool(flag[0] > 0)


def _torch_learner(ctx: RunContext, torch_seed: int, seed: int) -> AsyncLearner:
    """The algorithm's torch learner, with torch's threads and seed set."""
    import torch

    torch.set_num_threads(ctx.cfg.run.torch_threads)
    torch.manual_seed(torch_seed)
    return make_learner(ctx.cfg, ctx.observation_space, ctx.action_space, ctx.world_size, seed)


def _actors_of(ctx: RunContext, learner_rank: int) -> list[int]:
    k = ctx.cfg.topology.learner_ranks
    return [a for a in range(k, ctx.world_size) if (a - k) % k == learner_rank]


def _resume(ctx: RunContext, learner: AsyncLearner, server: UnrollLearner) -> None:
    meta = ctx.resume.meta
    learner.load_shared(ctx.resume.shared())
    learner.learner_updates = int(meta["learner_updates"])
    server.env_steps = int(meta["env_steps"])
    server.unrolls_dropped = int(meta.get("unrolls_dropped", 0))
    if ctx.rank == 0:
        print(
            f"[hpcrl] {int(meta.get('unrolls_in_flight', 0))} unrolls received but not yet "
            "learned from at the checkpoint were dropped",
            flush=True,
        )


def _checkpoint(ctx, server: UnrollLearner, group, in_flight: int, solved: int) -> None:
    """Collective over the learner group: rank 0 writes parameters, optimizer state and
    counters (`in_flight`: unrolls queued but not learned from, lost on a resume;
    `solved`: `PeriodicEval.solved`)."""
    rows = server.traj_rows.copy()
    counts = np.array([in_flight, server.unrolls_dropped], dtype=np.int64)
    allreduce_sum(group, rows, ctx.watchdog_s)
    allreduce_sum(group, counts, ctx.watchdog_s)
    if ctx.rank == 0:
        save_checkpoint(
            ctx,
            server.learner.shared_arrays(),
            server.env_steps,
            server.learner.learner_updates,
            server.policy_version,
            {r: int(n) for r, n in enumerate(rows) if r in ctx.recording_ranks},
            counters={
                "unrolls_in_flight": int(counts[0]),
                "unrolls_dropped": int(counts[1]),
                "solved_evaluations": solved,
            },
        )
    ctx.clock.written(server.env_steps)


def _log(ctx, server: UnrollLearner, group, reporter, metrics: dict, since: float) -> None:
    """Collective over the learner group: episodes and one metrics row to rank 0."""
    rows = gather_rows(group, server.episodes.take().reshape(-1), 0, ctx.watchdog_s)
    row = server.log_row()
    stats = gather_rows(group, np.concatenate([[row.size], row]), 0, ctx.watchdog_s)
    if reporter is None:
        return
    elapsed = max(time.perf_counter() - since, 1e-9)
    reporter.add_episodes(rows.reshape(-1, 5))
    extra = {"learner_updates": int(server.learner.learner_updates)}
    learners = group.Get_size()
    extra |= _metrics(stats, learners, elapsed, row[5] / elapsed)
    extra |= {k: float(v) for k, v in metrics.items()}
    extra["unrolls_dropped"] = int(server.unrolls_dropped)
    reporter.log(server.env_steps, extra)


def _lr_scale(ctx: RunContext, solved: int) -> float:
    """The learning rate's factor after `solved` periodic evaluations reached the env's
    reward threshold (`AsyncConfig.solved_lr_decay`)."""
    return ctx.cfg.algo.solved_lr_decay**solved


def _maybe_evaluate(
    peval: PeriodicEval | None, server: UnrollLearner, reporter, final: bool = False
) -> None:
    """Rank 0: the periodic greedy evaluation, when due (`periodic_eval`); `final`: the
    end of training. The training episodes' mean over `SOLVED_WINDOW` goes with it."""
    if peval is not None and peval.due(server.env_steps, final) and not server.stopping:
        learner = server.learner
        peval.run(
            server.env_steps,
            learner.greedy_actions,
            learner.shared_arrays,
            learner.learner_updates,
            reporter.recent_mean(SOLVED_WINDOW),
        )


def _evaluated(peval: PeriodicEval | None) -> dict:
    return peval.take() if peval is not None else {}


def _message_schema(ctx: RunContext, learner: AsyncLearner) -> P.Schema:
    """What this run's actors send (`AsyncLearner.message_schema`)."""
    return learner.message_schema(_unroll_schema(ctx))


def _params_schema(learner: AsyncLearner) -> P.Schema:
    return P.parameters_schema(learner.published().size)


def _run_learner(ctx: RunContext, group, learner: AsyncLearner) -> bool:
    comm, cfg, watchdog = ctx.comm, ctx.cfg, ctx.watchdog_s
    k = group.Get_size()
    fewest = cfg.algo.unrolls_per_update
    most = cfg.algo.max_unrolls_per_update or fewest
    server = UnrollLearner(ctx, learner, fewest // k, most // k)
    if ctx.resume is not None:
        _resume(ctx, learner, server)
    from hpcrl.comm.gradients import broadcast_parameters, parameters_digest

    broadcast_parameters(group, learner.model, watchdog)
    total = ctx.segment.total_env_steps
    actors = _actors_of(ctx, ctx.rank)
    n = len(actors)

    def write(params: Message) -> None:
        params["parameters"][:] = learner.published()
        params["header"][ParamsHeader.VERSION] = server.policy_version

    pool = ActorPool(
        comm,
        actors,
        _message_schema(ctx, learner),
        _params_schema(learner),
        write,
        watchdog,
        max_in_flight=cfg.topology.max_unrolls_in_flight,
    )
    server.retire = pool.retire
    stop_seen = [False]

    def consume(msg: Message, rank: int) -> bool:
        if msg["header"][ActorHeader.STOP]:
            stop_seen[0] = True  # a preemption signal reached the actor: vote stop
        return server.consume(msg, rank)

    pool.publish_all()
    reporter = Reporter(ctx) if ctx.rank == 0 else None
    peval = PeriodicEval(ctx, server.env_steps) if ctx.rank == 0 else None
    metrics: dict = {}
    log_since = time.perf_counter()
    flags = np.zeros(len(Round), dtype=np.float64)
    group_ops = _Group(group, learner.model, watchdog)
    backoff = Backoff()
    while True:
        # Wait, serving, until this learner has something for a round.
        wait_start = time.perf_counter()
        while True:
            stop = stop_seen[0] or ctx.stop_requested()
            # Every running actor waits for credit from us (near the end, when the others
            # are done): learn from what is queued, even less than a batch.
            starved = bool(server.queue) and not server.stopping and pool.all_waiting()
            ready = server.ready() or starved
            done = pool.finished == n and (server.stopping or not ready)
            if ready or done or (stop and not server.stopping):
                break
            if pool.serve(consume):
                backoff.reset()
                continue
            if backoff.waited_s > watchdog:
                raise WatchdogTimeout(
                    f"rank {ctx.rank} (learner) received no unroll for {watchdog:g} s "
                    f"(watchdog_s); {n - pool.finished} actors have not finished; aborting"
                )
            backoff.pause()
        server.stats.wait_s += time.perf_counter() - wait_start
        batch, taken = server.take_batch() if ready else (None, 0)
        if taken:
            pool.publish_pending()  # the credit out now: actors step during the update
        flags[:] = 0
        flags[Round.HAS_BATCH] = batch is not None
        flags[Round.DONE] = done and batch is None
        flags[Round.STOP] = stop
        flags[Round.ENV_STEPS] = server.in_round = server.local_steps
        server.local_steps = 0
        if reporter is not None:
            # An evaluation's result is logged in the round after it.
            flags[Round.LOG] = reporter.due() or bool(peval.pending)
            flags[Round.CHECKPOINT] = ctx.clock.due_by_time()
            flags[Round.SOLVED] = peval.solved
        request = group.Iallreduce(MPI.IN_PLACE, flags, op=MPI.SUM) if k > 1 else None
        backoff.reset()
        while request is not None and not request.Test():
            if not pool.serve(consume):
                if backoff.waited_s > watchdog:
                    raise WatchdogTimeout(
                        f"rank {ctx.rank} (learner) waited more than {watchdog:g} s for the "
                        "learner group's round (watchdog_s); aborting the job"
                    )
                backoff.pause()
        backoff.reset()
        server.env_steps += int(flags[Round.ENV_STEPS])
        server.in_round = 0
        if flags[Round.STOP] > 0 and not server.stopping:
            server.stopping = True
            if batch is not None:
                server.unrolls_dropped += taken
                batch = None
            server.drop_queue()
            pool.stop()
        elif flags[Round.HAS_BATCH] > 0:
            group_ops.contributors = int(flags[Round.HAS_BATCH])
            learner.lr_scale = _lr_scale(ctx, int(flags[Round.SOLVED]))
            metrics = learner.update(batch, group_ops, min(1.0, server.env_steps / total))
            server.stats.updates += 1
            server.stats.batch_unrolls.append(taken)
            if learner.learner_updates % cfg.topology.publish_interval == 0:
                pool.refresh()
            _maybe_evaluate(peval, server, reporter)
        all_done = flags[Round.DONE] >= k
        if all_done:
            _maybe_evaluate(peval, server, reporter, final=True)
        if flags[Round.LOG] > 0 or all_done:
            _log(ctx, server, group, reporter, metrics | _evaluated(peval), log_since)
            log_since = time.perf_counter()
        by_steps = ctx.clock.due_by_env_steps(server.env_steps)
        if all_done or by_steps or flags[Round.CHECKPOINT] > 0:
            if all_done:
                server.drop_queue()
            _checkpoint(ctx, server, group, len(server.queue), peval.solved if peval else 0)
        if all_done:
            break
    pool.close()
    digests = gather_rows(
        group, np.array([parameters_digest(learner.model)], dtype=np.int64), 0, watchdog
    )
    if reporter is not None:
        ctx.run_file.set_attrs(parameter_digests=digests)
        reporter.close()
    link_trajectories(ctx, 0)
    return server.stopping and server.env_steps < total


def _run_actor(ctx: RunContext, policy: AsyncActor) -> bool:
    if ctx.cfg.topology.actor_nice:
        # 64 ranks on 2 cores: 30-50k env steps/s with it, ~20k without (the learner
        # waited for the CPU while it had a batch).
        os.nice(ctx.cfg.topology.actor_nice)
    k = ctx.cfg.topology.learner_ranks
    actor = UnrollActor(ctx, policy, ctx.segment.budgets()[ctx.rank - k])
    link = LearnerLink(
        ctx.comm,
        (ctx.rank - k) % k,
        _message_schema(ctx, policy),
        _params_schema(policy),
        lambda params: policy.load_published(params["parameters"]),
        ctx.watchdog_s,
        timing=actor.timing,
        max_in_flight=ctx.cfg.topology.max_unrolls_in_flight,
    )
    run_actor(ctx, actor, link)
    return False  # the learners know whether the run was interrupted


class _EmbeddedLearner:
    """One process: the learner's side of `serving.alternate` (it learns from each batch as
    it fills, logs and checkpoints)."""

    def __init__(self, ctx: RunContext, learner: AsyncLearner):
        self.ctx, self.learner = ctx, learner
        per_update = ctx.cfg.algo.unrolls_per_update
        self.server = UnrollLearner(ctx, learner, per_update, per_update)
        if ctx.resume is not None:
            _resume(ctx, learner, self.server)
        self.group = _Group(ctx.comm, learner.model, ctx.watchdog_s)
        self.reporter = Reporter(ctx)
        self.peval = PeriodicEval(ctx, self.server.env_steps)
        self.metrics: dict = {}
        self.log_since = time.perf_counter()

    @property
    def policy_version(self) -> int:
        return self.server.policy_version

    def consume(self, msg: Message, rank: int) -> None:
        server = self.server
        server.consume(msg, rank)
        server.env_steps += server.local_steps
        server.local_steps = 0

    def after(self, last: bool, stopped: bool) -> None:
        ctx, server = self.ctx, self.server
        if last:
            server.stopping = server.stopping or stopped
            server.drop_queue()
        total = ctx.segment.total_env_steps
        while server.ready():
            batch, taken = server.take_batch()
            self.learner.lr_scale = _lr_scale(ctx, self.peval.solved)
            self.metrics = self.learner.update(batch, self.group, server.env_steps / total)
            server.stats.updates += 1
            server.stats.batch_unrolls.append(taken)
            _maybe_evaluate(self.peval, server, self.reporter)
        if last:
            _maybe_evaluate(self.peval, server, self.reporter, final=True)
        if self.reporter.due() or last or self.peval.pending:
            metrics = self.metrics | _evaluated(self.peval)
            _log(ctx, server, ctx.comm, self.reporter, metrics, self.log_since)
            self.log_since = time.perf_counter()
        if last or ctx.clock.due_by_env_steps(server.env_steps) or ctx.clock.due_by_time():
            _checkpoint(ctx, server, ctx.comm, len(server.queue), self.peval.solved)


def _run_embedded(ctx: RunContext, learner: AsyncLearner) -> bool:
    """One process: the actor acts on the learner's live parameters, one unroll at a
    time, and the learner learns from each batch as it fills (no policy lag)."""
    from hpcrl.comm.gradients import parameters_digest

    embedded = _EmbeddedLearner(ctx, learner)
    actor = UnrollActor(ctx, learner, ctx.segment.budgets()[0])
    stopped = alternate(ctx, actor, embedded, _message_schema(ctx, learner).allocate())
    ctx.run_file.set_attrs(
        parameter_digests=np.array([parameters_digest(learner.model)], dtype=np.int64)
    )
    embedded.reporter.close()
    link_trajectories(ctx, actor.close())
    return stopped and embedded.server.env_steps < ctx.segment.total_env_steps
