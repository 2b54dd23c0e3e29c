"""Asynchronous actor-learner loop for deep learners (IMPALA, A3C, asynchronous one-step
and n-step Q-learning): ranks 0..k-1 learn (`learner_ranks` k, a learner group), every
other rank acts; no actor ever waits for a learner. The algorithms plug in through the
interface of `hpcrl.algos.async_learner`: IMPALA's actors send their unrolls (MESSAGE
"unroll"); A3C's and Q-learning's send the gradient they computed on the unroll with their
own copy of the parameters (MESSAGE "gradient", `protocol.gradient_schema`), which makes
the learner a parameter server.

Actor (rank a >= k, served by learner (a - k) mod k): steps its vector env with the last
parameters it received, fills an unroll of T vector steps (`hpcrl.comm.protocol.
unroll_schema`, stamped with the parameter version its first step used) and sends it with
`Isend` from one of two preallocated buffers (double buffering: it fills one while the other
is in flight; it waits only when both are still in flight, which it counts as send wait).
New parameters are picked up between vector steps when the posted `Irecv` has completed
(`Test`), never by waiting, except for the very first ones.

Learner: keeps two receives posted per actor (so both of an actor's buffers can be in
flight), serves whichever complete (`Testsome`), and queues full unrolls; one older than
`max_policy_lag` updates is dropped and counted. With a batch of `batch_size / k` unrolls
it joins a *round* of the learner group: one small `Iallreduce` of flags (has a batch, is
done, stop, env steps, log and checkpoint votes), during which it keeps serving its
actors. Every learner then takes the same decisions: if any had a batch, all take one
optimizer step on the gradient summed over the group and divided by the learners that had a
batch (`FlatGradients.average`), so the learners' parameters stay bit-identical (IMPALA
§5.3.1); every `publish_interval` updates each learner sends the new versioned parameters
to each of its actors whose previous parameters have been delivered. With k = 1 a round
costs nothing.

Budget: the run's env steps are split over the actors. An actor's last unroll (shorter, or
with copies past the budget) is counted, not learned from. Shutdown: an actor's last
unroll says `final`; its learner answers with final parameters, so every send has a
matching receive and nothing is cancelled. A learner is done when all its actors are.

Preemption: a stop vote in a round makes every learner tell its actors to stop; each actor
ends with its current unroll marked final. The unrolls queued but not learned then, and any
received after, are dropped and counted (`unrolls_dropped`), and rank 0 checkpoints the
parameters, optimizer state and counters. A resume starts a new segment (fresh actor seeds,
episodes restarted), as for the tabular parameter server: an asynchronous run is not
bit-reproducible anyway.

One process: the same actor and learner alternate in place, one unroll at a time.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from mpi4py import MPI

from hpcrl.algos.async_learner import AsyncLearner
from hpcrl.comm import protocol as P
from hpcrl.comm.gradients import FlatGradients, broadcast_parameters, parameters_digest
from hpcrl.comm.protocol import Message, Tag
from hpcrl.comm.waits import Backoff, WatchdogTimeout, allreduce_sum, gather_rows, wait_all
from hpcrl.config import ALGOS
from hpcrl.models import select_device
from hpcrl.topologies.context import (
    EpisodeRows,
    LoopResult,
    Reporter,
    RunContext,
    TrajectoryRecorder,
    link_trajectories,
    save_checkpoint,
)

# Round flags summed over the learner group.
_HAS_BATCH, _DONE, _STOP, _ENV_STEPS, _LOG, _CHECKPOINT = range(6)
_FIELDS = (
    "obs",
    "actions",
    "behaviour_log_probs",
    "rewards",
    "terminated",
    "truncated",
    "truncation_values",
)


def _schema(ctx: RunContext, observation_space, action_space) -> P.Schema:
    """The unroll an actor fills (and, for MESSAGE "unroll" learners, sends)."""
    act_dtype = np.int64 if action_space.shape == () else np.float32
    return P.unroll_schema(
        ctx.cfg.algo.unroll_length,
        ctx.cfg.run.num_envs,
        observation_space.shape,
        observation_space.dtype,
        action_space.shape,
        act_dtype,
    )


class UnrollActor:
    """Steps a vector env with the behaviour policy and fills unroll messages."""

    def __init__(self, ctx: RunContext, policy: AsyncLearner, budget: int):
        self.ctx = ctx
        self.policy = policy
        self.stepper = ctx.make_stepper()
        self.recorder = TrajectoryRecorder(ctx)
        self.budget = budget
        self.env_steps = 0  # in this segment
        self.stop = False
        self.timing = np.zeros(5, dtype=np.float64)  # protocol TIMING_* seconds
        self.start = time.perf_counter()
        debug = ctx.cfg.run.debug
        self.delay_s = debug.slow_step_s if ctx.rank == debug.slow_rank else 0.0

    @property
    def done(self) -> bool:
        """Its last unroll is (being) sent: budget spent or told to stop."""
        return self.env_steps >= self.budget or self.stop

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
            self.timing[P.TIMING_INFERENCE] += (t1 - t0) + (t3 - t2)
            self.timing[P.TIMING_ENV] += t2 - t1
            n = min(B, self.budget - self.env_steps)
            self.recorder.record(batch, n)
            self.env_steps += n
            rows += n
            steps += 1
            episodes = P.write_episodes(
                msg, episodes, batch, n, self.env_steps, self.ctx.elapsed_s()
            )
        msg["obs"][steps] = self.stepper.obs
        header = msg["header"]
        header[P.UNROLL_STEPS] = steps
        header[P.UNROLL_ROWS] = rows
        header[P.UNROLL_POLICY_VERSION] = max(version, 0)
        header[P.UNROLL_FINAL] = int(self.done)
        header[P.UNROLL_EPISODES] = episodes
        header[P.UNROLL_ACTOR_ENV_STEPS] = self.env_steps
        header[P.UNROLL_STOP] = int(self.ctx.stop_requested())
        self.timing[P.TIMING_WALL] = time.perf_counter() - self.start
        msg["timing"][:] = self.timing

    def close(self) -> int:
        self.stepper.close()
        return self.recorder.close()


@dataclass
class _Stats:
    """What a learner counts between two log rows."""

    lags: list[int] = field(default_factory=list)
    dropped_stale: int = 0
    wait_s: float = 0.0  # waiting for a batch
    updates: int = 0
    timing: dict[int, np.ndarray] = field(default_factory=dict)  # actor rank -> TIMING_*


class UnrollLearner:
    """One learner rank: its actors' unrolls, the batch queue, counters and statistics."""

    def __init__(self, ctx: RunContext, learner: AsyncLearner, batch_unrolls: int):
        self.ctx = ctx
        self.learner = learner
        self.fields = _FIELDS if learner.MESSAGE == "unroll" else ("gradient",)
        self.batch_unrolls = batch_unrolls
        self.queue: list[dict[str, np.ndarray]] = []
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

    def consume(self, msg: Message, rank: int) -> None:
        """Count one actor message; queue it for learning if it is a full unroll that is
        not too stale (and the run is not stopping)."""
        header = msg["header"]
        rows = int(header[P.UNROLL_ROWS])
        T, B = self.ctx.cfg.algo.unroll_length, self.ctx.cfg.run.num_envs
        before = self.env_steps + self.in_round + self.local_steps
        self.local_steps += rows
        if self.ctx.cfg.run.record_trajectories:
            self.traj_rows[rank] += rows
        self.episodes.add_message(
            msg,
            int(header[P.UNROLL_EPISODES]),
            rows,
            int(header[P.UNROLL_ACTOR_ENV_STEPS]),
            before,
            rank,
        )
        self.stats.timing[rank] = msg["timing"].copy()
        lag = self.policy_version - int(header[P.UNROLL_POLICY_VERSION])
        if rows < T * B:
            return  # an actor's last, partial unroll: counted, not learned from
        if self.stopping:
            self.unrolls_dropped += 1
            return
        if lag > self.ctx.cfg.algo.max_policy_lag:
            self.stats.dropped_stale += 1
            return
        self.stats.lags.append(lag)
        self.queue.append({name: msg[name].copy() for name in self.fields})

    def ready(self) -> bool:
        return len(self.queue) >= self.batch_unrolls and not self.stopping

    def take_batch(self) -> dict[str, np.ndarray]:
        """The oldest `batch_unrolls` unrolls side by side: (T(+1), N, ...) arrays."""
        unrolls = self.queue[: self.batch_unrolls]
        del self.queue[: self.batch_unrolls]
        return {name: np.concatenate([u[name] for u in unrolls], axis=1) for name in self.fields}

    def drop_queue(self) -> None:
        self.unrolls_dropped += len(self.queue)
        self.queue.clear()

    def log_row(self) -> np.ndarray:
        """This learner's statistics since the last row, for one `gather_rows`: [lag sum,
        lag count, lag max, dropped stale, wait s, updates, then per actor seen: rank and
        the TIMING_* differences]."""
        s = self.stats
        head = [
            float(sum(s.lags)),
            float(len(s.lags)),
            float(max(s.lags, default=0)),
            float(s.dropped_stale),
            s.wait_s,
            float(s.updates),
        ]
        actors = []
        for rank, timing in sorted(s.timing.items()):
            delta = timing - self.last_timing.get(rank, np.zeros(5))
            actors += [float(rank), *delta.tolist()]
            self.last_timing[rank] = timing
        self.stats = _Stats()
        return np.array(head + actors, dtype=np.float64)


def _metrics(rows: np.ndarray, learner_count: int, elapsed: float, updates_s: float) -> dict:
    """Rank 0: one `/metrics` row from the gathered `log_row`s of every learner."""
    out: dict[str, float | int] = {}
    lag_sum = lag_n = lag_max = stale = wait = updates = 0.0
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
        for rank, *t in row[6:].reshape(-1, 6):
            wall = max(t[P.TIMING_WALL], 1e-9)
            per_actor[int(rank)] = {
                "env_frac": t[P.TIMING_ENV] / wall,
                "inference_frac": t[P.TIMING_INFERENCE] / wall,
                "send_wait_frac": t[P.TIMING_SEND_WAIT] / wall,
                "param_wait_frac": t[P.TIMING_PARAM_WAIT] / wall,
            }
    out["policy_lag_mean"] = lag_sum / lag_n if lag_n else 0.0
    out["policy_lag_max"] = int(lag_max)
    out["unrolls_dropped_stale"] = int(stale)
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
        self.comm = comm
        self.watchdog_s = watchdog_s
        self.gradients = FlatGradients(list(model.parameters()))
        self.contributors = 1

    def average_gradients(self) -> None:
        self.gradients.average(self.comm, self.watchdog_s, self.contributors)


def run_async_actor_learner(ctx: RunContext) -> LoopResult:
    """Run the whole actor-learner layout; every rank returns the final parameters in
    `LoopResult.learner` (broadcast from rank 0 at the end, for the evaluation)."""
    cfg = ctx.cfg
    torch.set_num_threads(cfg.run.torch_threads)
    observation_space, action_space = ctx.probe_spaces()
    k = cfg.algo.learner_ranks
    world = ctx.world_size
    acting = range(1) if world == 1 else range(k, world)
    ctx.start_segment(len(acting), acting)
    rng, _ = ctx.rank_seeds()
    torch.manual_seed(int(rng.integers(2**62)))
    module = importlib.import_module(ALGOS[cfg.run.algo])
    policy = getattr(module, module.LEARNER)(
        cfg.algo, observation_space, action_space, cfg.run.num_envs, world, int(rng.integers(2**62))
    )
    schema = _schema(ctx, observation_space, action_space)
    if world == 1:
        interrupted = _run_embedded(ctx, policy, schema)
    else:
        is_learner = ctx.rank < k
        group = ctx.comm.Split(0 if is_learner else 1, ctx.rank)
        local = ctx.comm.Split_type(MPI.COMM_TYPE_SHARED)  # collective: every rank
        local_rank = local.Get_rank()
        local.Free()
        if is_learner:  # actors stay on the CPU
            policy.to(select_device(cfg.run.device, local_rank))
            interrupted = _run_learner(ctx, group, policy, schema)
        else:
            interrupted = _run_actor(ctx, policy, schema)
        group.Free()
        flag = np.array([float(interrupted)])
        allreduce_sum(ctx.comm, flag, ctx.watchdog_s)
        interrupted = bool(flag[0] > 0)
        policy.to(torch.device("cpu"))
        broadcast_parameters(ctx.comm, policy.model, ctx.watchdog_s)
    return LoopResult(None, interrupted, policy)


def _actors_of(ctx: RunContext, learner_rank: int) -> list[int]:
    k = ctx.cfg.algo.learner_ranks
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


def _checkpoint(ctx, server: UnrollLearner, group, in_flight: int) -> None:
    """Collective over the learner group: rank 0 writes parameters, optimizer state and
    counters (`in_flight`: unrolls queued but not learned from, lost on a resume)."""
    rows = server.traj_rows.copy()
    counts = np.array([in_flight, server.unrolls_dropped], dtype=np.int64)
    allreduce_sum(group, rows, ctx.watchdog_s)
    allreduce_sum(group, counts, ctx.watchdog_s)
    if ctx.rank != 0:
        return
    save_checkpoint(
        ctx,
        server.learner.shared_arrays(),
        server.env_steps,
        server.learner.learner_updates,
        server.policy_version,
        {r: int(n) for r, n in enumerate(rows) if r in ctx.recording_ranks},
        counters={"unrolls_in_flight": int(counts[0]), "unrolls_dropped": int(counts[1])},
    )


def _log(ctx, server: UnrollLearner, group, reporter, metrics: dict, since: float) -> None:
    """Collective over the learner group: episodes and one metrics row to rank 0."""
    rows = gather_rows(group, server.episodes.take().reshape(-1), 0, ctx.watchdog_s)
    row = server.log_row()
    stats = gather_rows(group, np.concatenate([[row.size], row]), 0, ctx.watchdog_s)
    if reporter is None:
        return
    elapsed = max(time.perf_counter() - since, 1e-9)
    rows = rows.reshape(-1, 5)
    reporter.add_episodes(rows[np.argsort(rows[:, 2], kind="stable")])
    extra = {"learner_updates": int(server.learner.learner_updates)}
    learners = group.Get_size()
    extra |= _metrics(stats, learners, elapsed, row[5] / elapsed)
    extra |= {k: float(v) for k, v in metrics.items()}
    extra["unrolls_dropped"] = int(server.unrolls_dropped)
    reporter.log(server.env_steps, extra)


def _message_schema(ctx: RunContext, learner: AsyncLearner, unroll: P.Schema) -> P.Schema:
    """What actors send: the unroll itself, or the gradient computed on it."""
    if learner.MESSAGE == "unroll":
        return unroll
    rows = ctx.cfg.algo.unroll_length * ctx.cfg.run.num_envs
    return P.gradient_schema(sum(p.numel() for p in learner.model.parameters()), rows)


def _to_gradient_message(policy: AsyncLearner, unroll: Message, out: Message, actor) -> None:
    """Fill `out` (`gradient_schema`) from a filled unroll: the actor's gradient on it (for
    a full unroll; an actor's last, partial one is only counted) and its header, timing and
    episodes. The gradient's time counts as inference."""
    t0 = time.perf_counter()
    header = unroll["header"]
    full = header[P.UNROLL_ROWS] == unroll["rewards"].size
    out["gradient"][:, 0] = policy.gradient({k: unroll[k] for k in _FIELDS}) if full else 0.0
    actor.timing[P.TIMING_INFERENCE] += time.perf_counter() - t0
    for name in ("header", *(f for f in out.schema.fields if f.startswith("episode_"))):
        out[name][...] = unroll[name]
    out["timing"][:] = actor.timing


def _run_learner(ctx: RunContext, group, learner: AsyncLearner, schema: P.Schema) -> bool:
    comm, cfg, watchdog = ctx.comm, ctx.cfg, ctx.watchdog_s
    k = group.Get_size()
    server = UnrollLearner(ctx, learner, cfg.algo.batch_size // k)
    if ctx.resume is not None:
        _resume(ctx, learner, server)
    broadcast_parameters(group, learner.model, watchdog)
    total = ctx.segment.total_env_steps
    actors = _actors_of(ctx, ctx.rank)
    n = len(actors)
    schema = _message_schema(ctx, learner, schema)
    inbox = [[schema.allocate(), schema.allocate()] for _ in actors]
    receives = [
        comm.Irecv(inbox[i][s].buffer, source=a, tag=Tag.EXPERIENCE)
        for i, a in enumerate(actors)
        for s in range(2)
    ]
    outbox = [P.parameters_schema(learner.published().size).allocate() for _ in actors]
    sends: list[MPI.Request | None] = [None] * n
    finished: set[int] = set()
    told: set[int] = set()  # told to stop
    stale_publish: set[int] = set()  # actors whose latest parameters are not sent yet
    stop_seen = [False]
    # Completed receives not yet consumed, and each actor's slot whose message comes next:
    # an actor's messages match its two receives alternately, but may complete in the same
    # `Testsome` (or out of order); they are consumed in the order they were sent.
    arrived: set[int] = set()
    next_slot = [0] * n

    def publish(i: int, final: bool = False) -> None:
        outbox[i]["parameters"][:] = learner.published()
        header = outbox[i]["header"]
        header[P.PARAMS_VERSION] = server.policy_version
        header[P.PARAMS_FINAL] = int(final)
        header[P.PARAMS_STOP] = int(server.stopping)
        sends[i] = comm.Isend(outbox[i].buffer, dest=actors[i], tag=Tag.PARAMS)
        stale_publish.discard(i)
        if server.stopping:
            told.add(i)

    def serve() -> bool:
        """Take what has arrived and answer it; True if anything did."""
        for i in list(stale_publish):
            if i not in finished and sends[i].Test():
                publish(i)
        ready = MPI.Request.Testsome(receives) or []
        arrived.update(ready)
        for j in _in_send_order(arrived, next_slot):
            i, slot = divmod(j, 2)
            msg = inbox[i][slot]
            server.consume(msg, actors[i])
            if msg["header"][P.UNROLL_STOP]:
                stop_seen[0] = True  # a preemption signal reached the actor: vote stop
            if msg["header"][P.UNROLL_FINAL]:
                finished.add(i)
                other = receives[2 * i + (1 - slot)]  # nothing follows a final unroll
                other.Cancel()
                other.Wait()
                wait_all([sends[i]], comm, f"actor {actors[i]} to take parameters", watchdog)
                publish(i, final=True)
            else:
                receives[j] = comm.Irecv(msg.buffer, source=actors[i], tag=Tag.EXPERIENCE)
        return bool(ready)

    for i in range(n):
        publish(i)
    reporter = Reporter(ctx) if ctx.rank == 0 else None
    interval = cfg.run.checkpoint_interval_env_steps
    next_checkpoint = (server.env_steps // interval + 1) * interval if interval > 0 else None
    metrics: dict = {}
    log_since = time.perf_counter()
    flags = np.zeros(6, dtype=np.float64)
    group_ops = _Group(group, learner.model, watchdog)
    backoff = Backoff()
    while True:
        # Wait, serving, until this learner has something for a round.
        wait_start = time.perf_counter()
        while True:
            stop = stop_seen[0] or ctx.stop_requested()
            done = len(finished) == n and (server.stopping or not server.ready())
            if server.ready() or done or (stop and not server.stopping):
                break
            if serve():
                backoff.reset()
                continue
            if backoff.waited_s > watchdog:
                raise WatchdogTimeout(
                    f"rank {ctx.rank} (learner) received no unroll for {watchdog:g} s "
                    f"(watchdog_s); {n - len(finished)} actors have not finished; aborting"
                )
            backoff.pause()
        server.stats.wait_s += time.perf_counter() - wait_start
        batch = server.take_batch() if server.ready() else None
        flags[:] = 0
        flags[_HAS_BATCH] = batch is not None
        flags[_DONE] = done and batch is None
        flags[_STOP] = stop
        flags[_ENV_STEPS] = server.in_round = server.local_steps
        server.local_steps = 0
        if reporter is not None:
            flags[_LOG] = reporter.due()
            flags[_CHECKPOINT] = ctx.checkpoint_due_by_time()
        request = group.Iallreduce(MPI.IN_PLACE, flags, op=MPI.SUM) if k > 1 else None
        backoff.reset()
        while request is not None and not request.Test():
            if not serve():
                if backoff.waited_s > watchdog:
                    raise WatchdogTimeout(
                        f"rank {ctx.rank} (learner) waited more than {watchdog:g} s for the "
                        "learner group's round (watchdog_s); aborting the job"
                    )
                backoff.pause()
        backoff.reset()
        server.env_steps += int(flags[_ENV_STEPS])
        server.in_round = 0
        if flags[_STOP] > 0 and not server.stopping:
            server.stopping = True
            if batch is not None:
                server.unrolls_dropped += server.batch_unrolls
                batch = None
            server.drop_queue()
            for i in range(n):
                if i not in finished and i not in told:
                    stale_publish.add(i)
        elif flags[_HAS_BATCH] > 0:
            group_ops.contributors = int(flags[_HAS_BATCH])
            metrics = learner.update(batch, group_ops, min(1.0, server.env_steps / total))
            server.stats.updates += 1
            if learner.learner_updates % cfg.algo.publish_interval == 0:
                stale_publish.update(i for i in range(n) if i not in finished)
        all_done = flags[_DONE] >= k
        if flags[_LOG] > 0 or all_done:
            _log(ctx, server, group, reporter, metrics, log_since)
            log_since = time.perf_counter()
        by_steps = next_checkpoint is not None and server.env_steps >= next_checkpoint
        if all_done or by_steps or flags[_CHECKPOINT] > 0:
            if all_done:
                server.drop_queue()
            _checkpoint(ctx, server, group, len(server.queue))
            if interval > 0:
                next_checkpoint = (server.env_steps // interval + 1) * interval
        if all_done:
            break
    wait_all([r for r in sends if r is not None], comm, "actors to take parameters", watchdog)
    digests = gather_rows(
        group, np.array([parameters_digest(learner.model)], dtype=np.int64), 0, watchdog
    )
    if reporter is not None:
        ctx.run_file.set_attrs(parameter_digests=digests)
        reporter.close()
    link_trajectories(ctx, 0)
    return server.stopping and server.env_steps < total


def _in_send_order(arrived: set[int], next_slot: list[int]):
    """Yield (and remove from `arrived`) the completed receive indices 2i + slot that are
    next in actor i's send order, advancing `next_slot[i]`; a message whose predecessor
    has not completed yet waits in `arrived`."""
    for i in sorted({j // 2 for j in arrived}):
        while 2 * i + next_slot[i] in arrived:
            j = 2 * i + next_slot[i]
            arrived.discard(j)
            next_slot[i] ^= 1
            yield j


def _run_actor(ctx: RunContext, policy: AsyncLearner, schema: P.Schema) -> bool:
    comm, watchdog = ctx.comm, ctx.watchdog_s
    k = ctx.cfg.algo.learner_ranks
    learner_rank = (ctx.rank - k) % k
    actor = UnrollActor(ctx, policy, ctx.segment.budgets()[ctx.rank - k])
    snapshot = P.parameters_schema(policy.published().size).allocate()
    state = {"version": 0}

    def load() -> None:
        policy.load_published(snapshot["parameters"])
        state["version"] = int(snapshot["header"][P.PARAMS_VERSION])
        actor.stop = actor.stop or bool(snapshot["header"][P.PARAMS_STOP])

    t0 = time.perf_counter()
    recv = comm.Irecv(snapshot.buffer, source=learner_rank, tag=Tag.PARAMS)
    wait_all([recv], comm, f"the first parameters from rank {learner_rank}", watchdog)
    actor.timing[P.TIMING_PARAM_WAIT] += time.perf_counter() - t0
    load()
    recv = comm.Irecv(snapshot.buffer, source=learner_rank, tag=Tag.PARAMS)

    def poll() -> int:
        nonlocal recv
        if recv.Test():
            load()
            recv = comm.Irecv(snapshot.buffer, source=learner_rank, tag=Tag.PARAMS)
        actor.stop = actor.stop or ctx.stop_requested()
        return state["version"]

    unroll = schema.allocate()
    gradients = policy.MESSAGE == "gradient"
    message = _message_schema(ctx, policy, schema)
    buffers = [message.allocate(), message.allocate()]
    sends: list[MPI.Request | None] = [None, None]
    slot = 0
    while True:
        if sends[slot] is not None:
            t0 = time.perf_counter()
            wait_all([sends[slot]], comm, f"rank {learner_rank} to take an unroll", watchdog)
            actor.timing[P.TIMING_SEND_WAIT] += time.perf_counter() - t0
        if gradients:
            actor.fill(unroll, poll)
            _to_gradient_message(policy, unroll, buffers[slot], actor)
        else:
            actor.fill(buffers[slot], poll)
        actor.recorder.flush()  # on disk before the learner can count it in a checkpoint
        sends[slot] = comm.Isend(buffers[slot].buffer, dest=learner_rank, tag=Tag.EXPERIENCE)
        slot ^= 1
        if actor.done:
            break
    wait_all([r for r in sends if r is not None], comm, "the last unrolls to go", watchdog)
    while True:  # the learner answers the final unroll with final parameters
        wait_all([recv], comm, f"the final parameters from rank {learner_rank}", watchdog)
        if snapshot["header"][P.PARAMS_FINAL]:
            break
        recv = comm.Irecv(snapshot.buffer, source=learner_rank, tag=Tag.PARAMS)
    link_trajectories(ctx, actor.close())
    return False  # the learners know whether the run was interrupted


def _run_embedded(ctx: RunContext, learner: AsyncLearner, schema: P.Schema) -> bool:
    """One process: the actor acts on the learner's live parameters, one unroll at a
    time, and the learner learns from each batch as it fills (no policy lag)."""
    cfg = ctx.cfg
    server = UnrollLearner(ctx, learner, cfg.algo.batch_size)
    if ctx.resume is not None:
        _resume(ctx, learner, server)
    actor = UnrollActor(ctx, learner, ctx.segment.budgets()[0])
    group = _Group(ctx.comm, learner.model, ctx.watchdog_s)
    reporter = Reporter(ctx)
    total = ctx.segment.total_env_steps
    interval = cfg.run.checkpoint_interval_env_steps
    next_checkpoint = (server.env_steps // interval + 1) * interval if interval > 0 else None
    unroll = schema.allocate()
    msg = _message_schema(ctx, learner, schema).allocate()
    metrics: dict = {}
    log_since = time.perf_counter()
    while True:
        if learner.MESSAGE == "gradient":
            actor.fill(unroll, lambda: server.policy_version)
            _to_gradient_message(learner, unroll, msg, actor)
        else:
            actor.fill(msg, lambda: server.policy_version)
        server.consume(msg, 0)
        server.env_steps += server.local_steps
        server.local_steps = 0
        if ctx.stop_requested() and not actor.done:
            actor.stop = True
        if actor.done:
            server.stopping = server.stopping or actor.stop
            server.drop_queue()
        while server.ready():
            metrics = learner.update(server.take_batch(), group, server.env_steps / total)
            server.stats.updates += 1
        if reporter.due() or actor.done:
            _log(ctx, server, ctx.comm, reporter, metrics, log_since)
            log_since = time.perf_counter()
        by_steps = next_checkpoint is not None and server.env_steps >= next_checkpoint
        if actor.done or by_steps or ctx.checkpoint_due_by_time():
            _checkpoint(ctx, server, ctx.comm, len(server.queue))
            if interval > 0:
                next_checkpoint = (server.env_steps // interval + 1) * interval
        if actor.done:
            break
    ctx.run_file.set_attrs(
        parameter_digests=np.array([parameters_digest(learner.model)], dtype=np.int64)
    )
    reporter.close()
    link_trajectories(ctx, actor.close())
    return actor.stop and server.env_steps < total
