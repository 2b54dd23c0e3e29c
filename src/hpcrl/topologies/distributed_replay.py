"""The `distributed_replay` layout: actors, replay ranks and a learner, as Ape-X DQN runs
(Horgan et al. 2018, "Distributed Prioritized Experience Replay", Algorithms 1 and 2),
with the prioritized replay memory distributed over replay ranks.

Ranks: rank 0 learns, ranks 1..R hold one replay shard each (`replay_ranks` R), every
other rank acts. Actor i (rank R + 1 + i) sends its m-th message to replay rank
1 + (i + m) mod R, so every shard gets data even from one actor. One process runs every
role in turn.

Actor (`ReplayActor`): steps `num_envs` copies ε-greedily with ε_i = ε^(1 + i α/(N − 1))
(`replay.actor_epsilons`), builds n-step transitions (`replay.NStepTransitions`: bootstraps
past `truncated`, not past `terminated`), computes their initial priorities with the
parameters it holds (the policy's `initial_priorities`), and every `send_interval` vector steps
sends them to a shard with a non-blocking send (double-buffered: it waits only when both
buffers are still in flight). New parameters are picked up between vector steps when the
posted receive has completed; an actor never waits for the learner, except under the flow
control `env_steps_per_update` (below) and at the very end.

Replay rank (`ReplayServer`): a `replay.PrioritizedReplay` of `buffer_size / R`
transitions (FIFO at capacity, p^α leaves). It inserts what its actors send, and answers
each learner request in order: it first applies the priorities the request carries (those
of a batch it served earlier; a transition evicted since keeps its replacement's
priority), writes its checkpoint file when asked, then samples a batch with importance
weights (β from the learner) and replies with it, its counters, the episodes its actors
finished and their timing.

Learner (`ReplayLearner`): keeps `requests_in_flight` requests posted at every shard, so a
batch is usually waiting when an update ends. It trains on the oldest batch that has
arrived (each batch from one shard: the importance weights are normalized within it), and
its next request to that shard carries the batch's new priorities |δ| + ε. Until the
shards hold `learning_starts` transitions it only polls their status (every 10 ms).
Every `publish_interval` updates it sends versioned parameters (online and target
networks) to each actor whose previous ones have been delivered; the target network is
copied every `target_update_interval` updates.

Flow control (`env_steps_per_update`, not in the paper): once learning has started, each
parameters message says how many env steps each actor may have taken
(`ParamsHeader.ALLOWED`): its share of the env steps when learning started plus
`env_steps_per_update` per update since (and two publications of slack); an actor that
reaches it waits for newer parameters. Null: actors never wait (the paper's Ape-X, where
the hardware sets the replay ratio).

End: an actor marks its last message to each shard `ActorHeader.FINAL` (the last with
data, the others empty) when its budget is spent; once
every shard reports all its actors done, the learner checkpoints (each shard writes
`step-<N>.shard-<k>.h5`, then rank 0 the step file), sends final parameters to every actor
and a final request to every shard. Preemption: a signal on any rank stops the actors
(they end with the current message marked final, or the learner stamps `STOP` on their
next parameters); then the same checkpoint and end. A resume starts a new segment (not
bit-exact: the layout is asynchronous) with the replay contents restored, redistributed
when `replay_ranks` changed.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from mpi4py import MPI

from hpcrl.algos import make_learner
from hpcrl.analysis.stats import SOLVED_WINDOW
from hpcrl.comm import protocol as P
from hpcrl.comm.protocol import (
    ActorHeader,
    Message,
    ParamsHeader,
    ReplyHeader,
    RequestHeader,
    Tag,
    Timing,
)
from hpcrl.comm.waits import Backoff, WatchdogTimeout, allreduce_sum, bcast, wait_all
from hpcrl.contracts import LayoutError, LoopResult
from hpcrl.errors import ConfigError, check_integers_at_least
from hpcrl.replay import NStepTransitions, PrioritizedReplay, actor_epsilons
from hpcrl.storage.checkpoints import shard_path, write_shard
from hpcrl.topologies.checkpointing import save_checkpoint
from hpcrl.topologies.collective_eval import LearnerGreedy
from hpcrl.topologies.deep import DeepTopology
from hpcrl.topologies.periodic_eval import PeriodicEval
from hpcrl.topologies.recording import link_trajectories
from hpcrl.topologies.reporting import EpisodeRows, Reporter
from hpcrl.topologies.run_context import RunContext
from hpcrl.topologies.serving import _POLITE, Actor, _in_send_order

STATUS_POLL_S = 0.01  # the learner's status requests before learning starts, per shard
EPISODES_PER_REPLY = 64  # finished episodes a reply carries (more wait for the next)


@dataclass
class DistributedReplayConfig:
    """Settings of the `distributed_replay` layout."""

    replay_ranks: int = 1  # R: ranks 1..R hold one replay shard each
    requests_in_flight: int = 2  # sample requests the learner keeps posted per shard
    publish_interval: int = 10  # learner updates between parameter publications
    # Added to actor processes' niceness (as `actor_learner`'s): with more ranks than
    # cores the learner and the replay ranks run first. 0: unchanged.
    actor_nice: int = 10

    def validate(self) -> None:
        check_integers_at_least(
            (
                ("replay_ranks", self.replay_ranks, 1),
                ("requests_in_flight", self.requests_in_flight, 1),
                ("publish_interval", self.publish_interval, 1),
                ("actor_nice", self.actor_nice, 0),
            )
        )


class DistributedReplay(DeepTopology):
    """Rank 0 learns, ranks 1..R hold replay shards, the others act."""

    name = "distributed_replay"
    Config = DistributedReplayConfig
    periodic_eval = True

    def check_world(self, world_size: int) -> None:
        """Raises:
        LayoutError: `replay_ranks` not below the world size, or no rank left to act (or,
            in one process, `replay_ranks` other than 1)."""
        r = self.settings.replay_ranks
        if world_size == 1:
            if r != 1:
                raise LayoutError(
                    f"config key 'replay_ranks': got {r} in a one-process run, expected 1 "
                    f"(layout 'distributed_replay' with {r} replay ranks needs at least "
                    f"{r + 2} ranks)"
                )
            return
        if r >= world_size:
            raise LayoutError(
                f"config key 'replay_ranks': got {r}, expected fewer than the world size "
                f"{world_size} (rank 0 learns, ranks 1-{r} hold replay, the others act)"
            )
        if world_size < r + 2:
            raise LayoutError(
                f"layout 'distributed_replay' with replay_ranks {r} needs at least {r + 2} "
                f"ranks (rank 0 learner, {r} replay, 1 actor), got a world of {world_size}"
            )

    def check_env(self, env, world_size: int, shapes: dict) -> None:
        """Also raises ConfigError when a shard could never hold `learning_starts`
        transitions' share, or the budget ends before learning starts."""
        super().check_env(env, world_size, shapes)
        algo, run = self.cfg.algo, self.cfg.run
        r = self.settings.replay_ranks
        if algo.buffer_size < r:
            raise ConfigError(
                f"config key 'buffer_size': got {algo.buffer_size}, expected at least "
                f"replay_ranks ({r}): each replay rank holds buffer_size / replay_ranks"
            )
        if algo.learning_starts > algo.buffer_size:
            raise ConfigError(
                f"config key 'learning_starts': got {algo.learning_starts}, expected at most "
                f"buffer_size ({algo.buffer_size}): replay would never hold that many"
            )
        if run.total_env_steps <= algo.learning_starts:
            raise ConfigError(
                f"config key 'total_env_steps': got {run.total_env_steps}, expected more than "
                f"learning_starts ({algo.learning_starts}): a smaller budget trains nothing"
            )

    def rank_roles(self, world_size: int) -> str:
        r = self.settings.replay_ranks
        replay = "rank 1 replay" if r == 1 else f"ranks 1-{r} replay"
        return f"rank 0 learner, {replay}, ranks {r + 1}-{world_size - 1} actors"

    def acting_ranks(self, world_size: int) -> range:
        return range(1) if world_size == 1 else range(self.settings.replay_ranks + 1, world_size)

    def run(self, ctx: RunContext) -> LoopResult:
        """Every rank returns the final parameters (rank 0's, for the evaluation)."""
        policy, interrupted = _run(ctx)
        return LoopResult(interrupted, LearnerGreedy(policy))


TOPOLOGY = DistributedReplay


# --------------------------------------------------------------------------------------
# Roles and messages.


@dataclass(frozen=True)
class Roles:
    """Who does what in a world of `world` ranks with `replay` replay ranks."""

    world: int
    replay: int

    @property
    def actors(self) -> list[int]:
        return list(range(self.replay + 1, self.world))

    @property
    def shards(self) -> list[int]:
        return list(range(1, self.replay + 1))

    def shard_of(self, actor: int, message: int) -> int:
        """The replay rank that actor rank `actor`'s `message`-th message goes to."""
        return 1 + (actor - self.replay - 1 + message) % self.replay


def _obs(ctx: RunContext) -> tuple[tuple[int, ...], np.dtype]:
    space = ctx.observation_space
    return tuple(space.shape), space.dtype


def _message_rows(ctx: RunContext) -> tuple[int, int]:
    """(transitions, episodes) one actor message holds at most: T vector steps of B copies
    start T·B transitions, and up to B·(n − 1) more started in earlier messages end in it."""
    algo, b = ctx.cfg.algo, ctx.cfg.run.num_envs
    steps = algo.send_interval * b
    return steps + b * (algo.n_step - 1), steps


def _experience_schema(ctx: RunContext) -> P.Schema:
    rows, episodes = _message_rows(ctx)
    return P.replay_experience_schema(rows, episodes, *_obs(ctx))


def _reply_schema(ctx: RunContext, actors: int) -> P.Schema:
    return P.sample_reply_schema(
        ctx.cfg.algo.minibatch_size, EPISODES_PER_REPLY, max(actors, 1), *_obs(ctx)
    )


def _replay_fields(ctx: RunContext) -> dict:
    shape, dtype = _obs(ctx)
    return {
        "obs": (shape, dtype),
        "action": ((), np.int64),
        "reward": ((), np.float32),
        "next_obs": (shape, dtype),
        "discount": ((), np.float32),
    }


TRANSITION_KEYS = ("obs", "action", "reward", "next_obs", "discount")


def _rss_bytes() -> int:
    """This process's resident memory (Linux `/proc/self/statm`), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# --------------------------------------------------------------------------------------
# Actor.


class ReplayActor(Actor):
    """Steps its envs ε-greedily and fills messages of n-step transitions with their
    initial priorities (`produce`)."""

    def __init__(self, ctx: RunContext, policy, budget: int, epsilon: float):
        super().__init__(ctx, budget)
        self.policy, self.epsilon = policy, epsilon
        algo = ctx.cfg.algo
        self.nstep = NStepTransitions(algo.n_step, algo.gamma, ctx.cfg.run.num_envs)
        self.timing = np.zeros(len(Timing), dtype=np.float64)
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.delay_s = ctx.slow_step_s()

    def produce(self, msg: Message, poll) -> None:
        """Up to `send_interval` vector steps into `msg` (`poll()` before each returns the
        parameters' version now loaded)."""
        T, B = self.ctx.cfg.algo.send_interval, self.ctx.cfg.run.num_envs
        parts: list[dict[str, np.ndarray]] = []
        rows = episodes = steps = 0
        version = -1
        for _ in range(T):
            v = poll()
            if self.done:
                break
            version = v if version < 0 else version
            self.ctx.maybe_fail(self.env_steps)
            if self.delay_s:
                time.sleep(self.delay_s)  # test-only slow actor (`debug.slow_rank`)
            t0 = time.perf_counter()
            obs = self.stepper.obs
            actions = self.policy.act(obs, self.epsilon)
            t1 = time.perf_counter()
            batch = self.stepper.step(actions)
            self.timing[Timing.ENV] += time.perf_counter() - t1
            self.timing[Timing.INFERENCE] += t1 - t0
            parts.append(
                self.nstep.push(
                    obs, actions, batch.rewards, batch.terminated, batch.truncated, batch.next_obs
                )
            )
            n = min(B, self.budget - self.env_steps)
            self.recorder.record(batch, n)
            self.env_steps += n
            rows += n
            steps += 1
            episodes = P.write_episodes(
                msg, episodes, batch, n, self.env_steps, self.ctx.elapsed_s()
            )
        k = 0
        if parts:
            t0 = time.perf_counter()
            transitions = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
            k = len(transitions["action"])
            if k:
                for key in TRANSITION_KEYS:
                    msg[key][:k] = transitions[key]
                msg["priority"][:k] = self.policy.initial_priorities(transitions)
            self.timing[Timing.INFERENCE] += time.perf_counter() - t0
        self.stamp(msg, rows, version, episodes, steps)
        msg["header"][ActorHeader.TRANSITIONS] = k
        self.timing[Timing.WALL] = time.perf_counter() - self.start
        self.timing[Timing.CPU] = time.process_time() - self.cpu_start
        msg["timing"][:] = self.timing


class ShardLink:
    """An actor's side: messages to the replay ranks (double-buffered `Isend`s), parameters
    from the learner (a posted `Irecv`, tested between vector steps), and the flow control
    (`ParamsHeader.ALLOWED`)."""

    def __init__(self, ctx: RunContext, policy, timing: np.ndarray, n_params: int):
        self.ctx, self.comm = ctx, ctx.comm
        self.policy, self.timing = policy, timing
        schema = _experience_schema(ctx)
        self.buffers = [schema.allocate(), schema.allocate()]
        self.sends: list[MPI.Request | None] = [None, None]
        self.slot = 0
        self.params = P.parameters_schema(n_params).allocate()
        self.recv: MPI.Request | None = None
        self.version = 0
        self.allowed = np.iinfo(np.int64).max
        self.stop = False
        self.final = False

    def _post(self) -> None:
        self.recv = self.comm.Irecv(self.params.buffer, source=0, tag=Tag.PARAMS)

    def _loaded(self) -> None:
        header = self.params["header"]
        self.policy.load_published(self.params["parameters"])
        self.version = int(header[ParamsHeader.VERSION])
        self.allowed = int(header[ParamsHeader.ALLOWED])
        self.stop = self.stop or bool(header[ParamsHeader.STOP])
        self.final = bool(header[ParamsHeader.FINAL])
        if not self.final:
            self._post()

    def _wait_params(self, what: str) -> None:
        wait_all([self.recv], self.comm, what, self.ctx.watchdog_s, **_POLITE)
        self._loaded()

    def start(self) -> None:
        t0 = time.perf_counter()
        self._post()
        self._wait_params("the first parameters from rank 0")
        self.timing[Timing.PARAM_WAIT] += time.perf_counter() - t0

    def poll(self, env_steps: int) -> int:
        """Load new parameters if they arrived; at the flow-control limit, wait for them
        (send wait). Returns the version loaded."""
        if self.recv.Test():
            self._loaded()
        if env_steps >= self.allowed and not self.stop:
            t0 = time.perf_counter()
            while env_steps >= self.allowed and not self.stop:
                self._wait_params("rank 0 to learn (env_steps_per_update flow control)")
            self.timing[Timing.SEND_WAIT] += time.perf_counter() - t0
        return self.version

    def buffer(self) -> Message:
        send = self.sends[self.slot]
        if send is not None:
            t0 = time.perf_counter()
            what = "a replay rank to take a message"
            wait_all([send], self.comm, what, self.ctx.watchdog_s)
            self.timing[Timing.SEND_WAIT] += time.perf_counter() - t0
        return self.buffers[self.slot]

    def send(self, shard: int) -> None:
        msg = self.buffers[self.slot]
        self.sends[self.slot] = self.comm.Isend(msg.buffer, dest=shard, tag=Tag.EXPERIENCE)
        self.slot ^= 1

    def finish(self) -> None:
        """After the final message: wait until it is sent and the final parameters came."""
        sends = [r for r in self.sends if r is not None]
        wait_all(sends, self.comm, "the last messages to go", self.ctx.watchdog_s)
        while not self.final:
            self._wait_params("the final parameters from rank 0")


def _run_actor(ctx: RunContext, roles: Roles, policy) -> None:
    if ctx.cfg.topology.actor_nice:
        os.nice(ctx.cfg.topology.actor_nice)
    algo = ctx.cfg.algo
    index = ctx.rank - roles.replay - 1
    epsilon = actor_epsilons(len(roles.actors), algo.actor_epsilon, algo.actor_epsilon_alpha)
    actor = ReplayActor(ctx, policy, ctx.segment.budgets()[index], float(epsilon[index]))
    link = ShardLink(ctx, policy, actor.timing, policy.published().size)
    link.start()

    def poll() -> int:
        # a finished actor sends its last messages without waiting on the flow control
        version = link.poll(-1 if actor.finished else actor.env_steps)
        actor.stop = actor.stop or link.stop or ctx.stop_requested()
        return version

    sent = 0
    while True:
        actor.produce(link.buffer(), poll)
        actor.recorder.flush()  # on disk before a checkpoint can count these rows
        link.send(roles.shard_of(ctx.rank, sent))
        sent += 1
        if actor.done:
            break
    for _ in range(roles.replay - 1):  # the other shards' last (empty) messages
        actor.produce(link.buffer(), poll)
        link.send(roles.shard_of(ctx.rank, sent))
        sent += 1
    link.finish()
    link_trajectories(ctx, actor.close())


# --------------------------------------------------------------------------------------
# Replay shard.


class ReplayShard:
    """One shard's buffer and what it tells the learner (no MPI: one process uses it
    directly). `insert` takes actor messages; `serve` answers a request."""

    def __init__(self, ctx: RunContext, index: int, capacity: int, actors: list[int], seed):
        self.ctx, self.index, self.actors = ctx, index, actors
        algo = ctx.cfg.algo
        # Resident memory before the buffer exists: what the buffer adds, once full, is
        # RSS - this (benchmarks/apex.py compares it with `nbytes`).
        self.rss_start = self.rss = _rss_bytes()
        self.rss_at = time.monotonic()
        self.replay = PrioritizedReplay(capacity, _replay_fields(ctx), algo.priority_alpha)
        self.rng = np.random.default_rng(seed)
        self.row = {a: i for i, a in enumerate(actors)}
        # per actor: rank, env steps received, trajectory rows, Timing
        self.actor_rows = np.zeros((max(len(actors), 1), 3 + len(Timing)), dtype=np.float64)
        self.actor_rows[: len(actors), 0] = actors
        self.episodes: deque[np.ndarray] = deque()
        self.env_steps = 0
        self.sampled = 0
        self.done: set[int] = set()
        self.stop = False
        self.version_rows = np.zeros(2, dtype=np.float64)  # Σ version × k, Σ k since reply
        if ctx.resume is not None:
            _restore_shard(ctx, self)

    def insert(self, msg: Message, rank: int) -> None:
        header = msg["header"]
        k = int(header[ActorHeader.TRANSITIONS])
        if k:
            self.replay.add(
                {key: msg[key][:k] for key in TRANSITION_KEYS}, msg["priority"][:k].copy()
            )
            self.version_rows += (int(header[ActorHeader.POLICY_VERSION]) * k, k)
        rows = int(header[ActorHeader.ROWS])
        self.env_steps += rows
        r = self.row[rank]
        self.actor_rows[r, 1] += rows
        if self.ctx.cfg.run.record_trajectories:
            self.actor_rows[r, 2] += rows
        self.actor_rows[r, 3:] = msg["timing"]
        n = int(header[ActorHeader.EPISODES])
        if n:
            block = np.zeros((n, P.REPLAY_EPISODE_COLUMNS), dtype=np.float64)
            block[:, 0] = msg["episode_return"][:n]
            block[:, 1] = msg["episode_length"][:n]
            block[:, 3] = msg["episode_wall_time"][:n]
            block[:, 4] = rank
            self.episodes.extend(block)
        self.stop = self.stop or bool(header[ActorHeader.STOP])
        if header[ActorHeader.FINAL]:
            self.done.add(rank)

    def serve(self, request: Message, reply: Message) -> bool:
        """Answer one learner request into `reply`; returns whether it was the final one."""
        header = request["header"]
        n = int(header[RequestHeader.PRIORITIES])
        if n:
            self.replay.update_priorities(
                request["slots"][:n], request["priorities"][:n], request["ids"][:n]
            )
        out = reply["header"]
        out[ReplyHeader.CHECKPOINTED] = -1
        at = int(header[RequestHeader.CHECKPOINT])
        if at >= 0:
            self.checkpoint(at)
            out[ReplyHeader.CHECKPOINTED] = at
        k = int(header[RequestHeader.BATCH]) if self.replay.size else 0
        if k:
            slots, weights, batch = self.replay.sample(k, float(request["beta"][0]), self.rng)
            reply["slots"][:k] = slots
            reply["ids"][:k] = self.replay.ids[slots]
            reply["weights"][:k] = weights
            for key in TRANSITION_KEYS:
                reply[key][:k] = batch[key]
            self.sampled += k
        out[ReplyHeader.ROWS] = k
        self.status(reply)
        return bool(header[RequestHeader.FINAL])

    def status(self, reply: Message) -> None:
        out = reply["header"]
        out[ReplyHeader.SIZE] = self.replay.size
        out[ReplyHeader.ADDED] = self.replay.added
        out[ReplyHeader.SAMPLED] = self.sampled
        out[ReplyHeader.ENV_STEPS] = self.env_steps
        out[ReplyHeader.ACTORS_DONE] = len(self.done)
        out[ReplyHeader.STOP] = int(self.stop)
        e = min(len(self.episodes), EPISODES_PER_REPLY)
        for i in range(e):
            reply["episodes"][i] = self.episodes.popleft()
        out[ReplyHeader.EPISODES] = e
        out[ReplyHeader.ACTORS] = len(self.actors)
        reply["actors"][...] = self.actor_rows
        now = time.monotonic()
        if now - self.rss_at >= 1.0:  # /proc read at most once a second
            self.rss, self.rss_at = _rss_bytes(), now
        out[ReplyHeader.RSS] = self.rss
        out[ReplyHeader.NBYTES] = self.replay.nbytes
        out[ReplyHeader.RSS_START] = self.rss_start
        reply["inserted"][:] = self.version_rows
        self.version_rows[:] = 0

    def checkpoint(self, env_steps: int) -> None:
        """Write `step-<env_steps>.shard-<index>.h5`: the buffer and its counters."""
        arrays = self.replay.state_dict()
        arrays["actor_rows"] = self.actor_rows.copy()
        meta = {"replay_size": int(self.replay.size), "replay_added": int(self.replay.added)}
        write_shard(self.ctx.run_dir / "checkpoints", env_steps, self.index, arrays, meta)


def _restore_shard(ctx: RunContext, shard: ReplayShard) -> None:
    """Load the checkpoint's replay contents into this shard: shard k of the old run if
    `replay_ranks` is unchanged, else every old shard i with i mod R = k, the newest
    `capacity` transitions kept."""
    meta = ctx.resume.meta
    old = int(meta.get("replay_ranks", 0))
    r = ctx.cfg.topology.replay_ranks
    states = []
    for i in range(old):
        if i % r != shard.index:
            continue
        with h5py.File(shard_path(ctx.resume.path, i), "r") as f:
            states.append({name: f[name][()] for name in _datasets(f)})
    if not states:
        return
    replay = shard.replay
    names = [key for key in states[0] if key.startswith("data/")]
    joined = {key: np.concatenate([s[key] for s in states]) for key in [*names, "priorities"]}
    size = min(len(joined["priorities"]), replay.capacity)
    state = {key: value[-size:] for key, value in joined.items()}
    state["ids"] = np.arange(size)
    state["counters"] = np.array([size, size % replay.capacity, size], dtype=np.int64)
    replay.load_state_dict(state)


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def restored_replay_size(path: Path, meta: dict) -> int:
    """Transitions held by the shard files of the checkpoint at `path`."""
    total = 0
    for i in range(int(meta.get("replay_ranks", 0))):
        with h5py.File(shard_path(path, i), "r") as f:
            total += int(json.loads(str(f.attrs["meta"])).get("replay_size", 0))
    return total


def _run_replay(ctx: RunContext, roles: Roles) -> None:
    """A replay rank's loop: insert what its actors send, answer the learner's requests in
    order, until the learner's final request."""
    comm, watchdog = ctx.comm, ctx.watchdog_s
    actors = roles.actors
    capacity = ctx.cfg.algo.buffer_size // roles.replay
    rng, _ = ctx.rank_seeds()
    shard = ReplayShard(ctx, ctx.rank - 1, capacity, actors, rng)
    schema = _experience_schema(ctx)
    inbox = [[schema.allocate(), schema.allocate()] for _ in actors]
    receives = [
        comm.Irecv(inbox[i][s].buffer, source=a, tag=Tag.EXPERIENCE)
        for i, a in enumerate(actors)
        for s in range(2)
    ]
    arrived: set[int] = set()
    next_slot = [0] * len(actors)
    request = P.sample_request_schema(ctx.cfg.algo.minibatch_size).allocate()
    posted = comm.Irecv(request.buffer, source=0, tag=Tag.SAMPLE_REQUEST)
    q = ctx.cfg.topology.requests_in_flight
    replies = [_reply_schema(ctx, len(actors)).allocate() for _ in range(q)]
    reply_sends: list[MPI.Request | None] = [None] * q
    turn = 0
    backoff = Backoff()
    while True:
        busy = False
        arrived.update(MPI.Request.Testsome(receives) or [])
        for j in _in_send_order(arrived, next_slot):
            i, slot = divmod(j, 2)
            msg = inbox[i][slot]
            shard.insert(msg, actors[i])
            busy = True
            if msg["header"][ActorHeader.FINAL]:
                other = receives[2 * i + (1 - slot)]  # nothing follows a final message
                other.Cancel()
                other.Wait()
            else:
                receives[j] = comm.Irecv(msg.buffer, source=actors[i], tag=Tag.EXPERIENCE)
        if posted.Test():
            busy = True
            if reply_sends[turn] is not None:
                what = "rank 0 to take a sample"
                wait_all([reply_sends[turn]], comm, what, watchdog)
            final = shard.serve(request, replies[turn])
            reply_sends[turn] = comm.Isend(replies[turn].buffer, dest=0, tag=Tag.SAMPLE)
            turn = (turn + 1) % q
            if final:
                break
            posted = comm.Irecv(request.buffer, source=0, tag=Tag.SAMPLE_REQUEST)
        if busy:
            backoff.reset()
            continue
        if backoff.waited_s > watchdog:
            raise WatchdogTimeout(
                f"rank {ctx.rank} (replay) heard from neither its actors nor rank 0 for "
                f"{watchdog:g} s (watchdog_s); aborting"
            )
        backoff.pause()
    wait_all([r for r in reply_sends if r is not None], comm, "rank 0 to take", watchdog)
    link_trajectories(ctx, 0)


# --------------------------------------------------------------------------------------
# Learner.


class LearnerStats:
    """What the learner counts between two `/metrics` rows, and the shards' last status."""

    def __init__(self, shards: int, segment_start: int):
        self.segment_start = segment_start
        self.status = np.zeros((shards, len(ReplyHeader)), dtype=np.int64)
        self.actor_rows: dict[tuple[int, int], np.ndarray] = {}  # (shard, actor) -> row
        self.last_status = self.status.copy()
        self.last_timing: dict[int, np.ndarray] = {}
        self.episodes = EpisodeRows()
        self.since = time.perf_counter()
        self.reset()

    def reset(self) -> None:
        self.wait_s = 0.0
        self.learning_s = 0.0  # wall time with learning started, since the last row
        self.updates = 0
        self.priorities: list[float] = []
        self.weights: list[float] = []
        self.lag_rows = np.zeros(2)  # Σ lag × transitions, Σ transitions

    @property
    def env_steps(self) -> int:
        """The run's env steps as the shards last reported them."""
        return self.segment_start + int(self.status[:, ReplyHeader.ENV_STEPS].sum())

    @property
    def replay_size(self) -> int:
        return int(self.status[:, ReplyHeader.SIZE].sum())

    def take_reply(self, i: int, reply: Message, policy_version: int) -> None:
        """Shard i's status from a reply, its episodes (stamped with the run's env steps
        as now known), and the policy lag of what it inserted since its previous reply
        (`policy_version`: the learner's now)."""
        header = reply["header"]
        self.status[i] = header
        env_steps = self.env_steps
        e = int(header[ReplyHeader.EPISODES])
        if e:
            rows = reply["episodes"][:e].copy()
            rows[:, 2] = env_steps
            self.episodes.add_rows(rows)
        for row in reply["actors"][: int(header[ReplyHeader.ACTORS])]:
            self.actor_rows[(i, int(row[0]))] = row.copy()
        version_sum, k = reply["inserted"]
        if k:
            self.lag_rows += (policy_version * k - version_sum, k)

    def traj_rows(self) -> dict[int, int]:
        """Each actor's trajectory rows the shards have received (summed over shards)."""
        rows: dict[int, int] = {}
        for (_, rank), row in self.actor_rows.items():
            rows[rank] = rows.get(rank, 0) + int(row[2])
        return rows

    def actor_timing(self) -> dict[int, np.ndarray]:
        """Each actor's latest `Timing` any shard has (the one with the most wall time)."""
        latest: dict[int, np.ndarray] = {}
        for (_, rank), row in self.actor_rows.items():
            if rank not in latest or row[3 + Timing.WALL] > latest[rank][Timing.WALL]:
                latest[rank] = row[3:].copy()
        return latest

    def metrics(self) -> dict[str, float]:
        """One `/metrics` row's Ape-X columns (rates over the time since the last row)."""
        now = time.perf_counter()
        elapsed = max(now - self.since, 1e-9)
        out: dict[str, float] = {}
        delta = self.status - self.last_status
        for i, row in enumerate(self.status):
            name = f"replay/shard_{i}"
            out[f"{name}/size"] = float(row[ReplyHeader.SIZE])
            out[f"{name}/insert_per_s"] = delta[i, ReplyHeader.ADDED] / elapsed
            out[f"{name}/sample_per_s"] = delta[i, ReplyHeader.SAMPLED] / elapsed
            out[f"{name}/inserted"] = float(row[ReplyHeader.ADDED])
            out[f"{name}/sampled"] = float(row[ReplyHeader.SAMPLED])
            out[f"{name}/rss_bytes"] = float(row[ReplyHeader.RSS])
            out[f"{name}/rss_start_bytes"] = float(row[ReplyHeader.RSS_START])
            out[f"{name}/buffer_bytes"] = float(row[ReplyHeader.NBYTES])
        out["replay/size"] = float(self.replay_size)
        out["learner_wait_frac"] = self.wait_s / self.learning_s if self.learning_s else 0.0
        out["learner_updates_per_s"] = self.updates / elapsed
        if self.lag_rows[1]:
            out["policy_lag_mean"] = float(self.lag_rows[0] / self.lag_rows[1])
        if self.priorities:
            out["priority_mean"] = float(np.mean(self.priorities))
            out["importance_weight_mean"] = float(np.mean(self.weights))
        efficiency = []
        timing = self.actor_timing()
        for rank, row in sorted(timing.items()):
            t = row - self.last_timing.get(rank, np.zeros_like(row))
            wall = t[Timing.WALL]
            if wall > 0:
                efficiency.append((t[Timing.ENV] + t[Timing.INFERENCE]) / wall)
                out[f"actor_{rank}/send_wait_frac"] = float(t[Timing.SEND_WAIT] / wall)
        if efficiency:
            out["actor_efficiency"] = float(np.mean(efficiency))
        self.last_status = self.status.copy()
        self.last_timing = timing
        self.since = now
        self.reset()
        return out


class ReplayLearner:
    """The learner's side shared by the MPI loop and one process: updates, the flow
    control's allowance, logging, evaluation and checkpoints."""

    def __init__(self, ctx: RunContext, learner, shards: int, actors: int):
        self.ctx, self.learner = ctx, learner
        self.algo = ctx.cfg.algo
        self.actors = actors
        self.stats = LearnerStats(shards, ctx.segment.start_env_steps)
        self.reporter = Reporter(ctx)
        self.peval = PeriodicEval(ctx, ctx.segment.start_env_steps)
        self.metrics: dict = {}
        self.learning_from: int | None = None  # segment env steps when learning started
        self.updates_from = 0  # learner updates then
        if ctx.resume is not None:
            learner.load_shared(ctx.resume.shared())
            learner.learner_updates = int(ctx.resume.meta["learner_updates"])
            if ctx.rank == 0:
                size = restored_replay_size(ctx.resume.path, ctx.resume.meta)
                print(
                    f"[hpcrl] replay restored: {size} transitions from "
                    f"{int(ctx.resume.meta.get('replay_ranks', 0))} shard files",
                    flush=True,
                )

    @property
    def env_steps(self) -> int:
        return self.stats.env_steps

    def learning(self) -> bool:
        if self.learning_from is None and self.stats.replay_size >= self.algo.learning_starts:
            self.learning_from = self.env_steps - self.ctx.segment.start_env_steps
            self.updates_from = self.learner.learner_updates
        return self.learning_from is not None

    def progress(self) -> float:
        return min(1.0, self.env_steps / self.ctx.segment.total_env_steps)

    def beta(self) -> float:
        return self.algo.beta(self.progress())

    def train(self, reply: Message) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One update on a sampled reply; returns (slots, ids, new priorities)."""
        k = int(reply["header"][ReplyHeader.ROWS])
        batch = {key: reply[key][:k] for key in TRANSITION_KEYS}
        weights = reply["weights"][:k]
        priorities, self.metrics = self.learner.update(batch, weights, self.progress())
        self.stats.updates += 1
        self.stats.priorities.append(float(priorities.mean()))
        self.stats.weights.append(float(weights.mean()))
        self.maybe_evaluate()
        return reply["slots"][:k].copy(), reply["ids"][:k].copy(), priorities

    def allowed(self) -> int:
        """Env steps each actor may have taken in this segment (`ParamsHeader.ALLOWED`)."""
        ratio = self.algo.env_steps_per_update
        if ratio is None or self.learning_from is None:
            return np.iinfo(np.int64).max
        slack = 2 * self.ctx.cfg.topology.publish_interval
        updates = self.learner.learner_updates - self.updates_from + slack
        return int((self.learning_from + updates * ratio) // self.actors) + 1

    def maybe_evaluate(self, final: bool = False) -> None:
        peval, learner = self.peval, self.learner
        if peval.due(self.env_steps, final):
            peval.run(
                self.env_steps,
                learner.greedy_actions,
                learner.shared_arrays,
                learner.learner_updates,
                self.reporter.recent_mean(SOLVED_WINDOW),
            )

    def log(self, force: bool = False) -> None:
        if not (force or self.reporter.due() or self.peval.pending):
            return
        self.reporter.add_episodes(self.stats.episodes.take())
        extra = {"learner_updates": int(self.learner.learner_updates)}
        extra |= self.stats.metrics()
        extra |= {k: float(v) for k, v in self.metrics.items()} | self.peval.take()
        self.reporter.log(self.env_steps, extra)

    def checkpoint(self, env_steps: int, shards: int) -> None:
        """Rank 0's step file, after every shard wrote its own (`meta["shards"]`)."""
        save_checkpoint(
            self.ctx,
            self.learner.shared_arrays(),
            env_steps,
            self.learner.learner_updates,
            self.learner.learner_updates,
            {r: n for r, n in self.stats.traj_rows().items() if r in self.ctx.recording_ranks},
            counters={
                "shards": shards,
                "replay_ranks": shards,
                "replay_size": self.stats.replay_size,
                "solved_evaluations": self.peval.solved,
            },
        )
        self.ctx.clock.written(env_steps)


class _ShardRequests:
    """The learner's requests to one replay rank: `requests_in_flight` request and reply
    buffers; a reply is matched to its request by order (one source, one tag)."""

    def __init__(self, ctx: RunContext, shard: int, actors: int):
        self.comm, self.shard = ctx.comm, shard
        q = ctx.cfg.topology.requests_in_flight
        batch = ctx.cfg.algo.minibatch_size
        self.requests = [P.sample_request_schema(batch).allocate() for _ in range(q)]
        self.replies = [_reply_schema(ctx, actors).allocate() for _ in range(q)]
        self.sends: list[MPI.Request | None] = [None] * q
        self.recvs: list[MPI.Request | None] = [None] * q
        self.free = deque(range(q))
        self.in_flight: deque[int] = deque()  # slots, oldest first
        self.priorities: deque[tuple] = deque()  # (slots, ids, priorities) to send
        self.checkpoint_at = -1  # to ask for with the next request
        self.last_post = 0.0

    def post(self, batch: int, beta: float, final: bool = False) -> None:
        j = self.free.popleft()
        if self.sends[j] is not None:
            self.sends[j].Wait()  # long complete: its reply came
        msg = self.requests[j]
        header = msg["header"]
        header[RequestHeader.BATCH] = batch
        header[RequestHeader.FINAL] = int(final)
        header[RequestHeader.CHECKPOINT] = self.checkpoint_at
        self.checkpoint_at = -1
        msg["beta"][0] = beta
        n = 0
        if self.priorities:
            slots, ids, priorities = self.priorities.popleft()
            n = len(slots)
            msg["slots"][:n], msg["ids"][:n], msg["priorities"][:n] = slots, ids, priorities
        header[RequestHeader.PRIORITIES] = n
        self.recvs[j] = self.comm.Irecv(self.replies[j].buffer, source=self.shard, tag=Tag.SAMPLE)
        self.sends[j] = self.comm.Isend(msg.buffer, dest=self.shard, tag=Tag.SAMPLE_REQUEST)
        self.in_flight.append(j)
        self.last_post = time.perf_counter()

    def arrived(self) -> int | None:
        """The oldest reply's slot if it has arrived (it leaves `in_flight`)."""
        if self.in_flight and self.recvs[self.in_flight[0]].Test():
            return self.in_flight.popleft()
        return None


def _run_learner(ctx: RunContext, roles: Roles, learner) -> bool:
    """Rank 0's loop; returns whether a preemption signal stopped the run early."""
    comm, cfg, watchdog = ctx.comm, ctx.cfg, ctx.watchdog_s
    topo, algo = cfg.topology, cfg.algo
    shards = [_ShardRequests(ctx, shard, len(roles.actors)) for shard in roles.shards]
    side = ReplayLearner(ctx, learner, roles.replay, len(roles.actors))
    params = [P.parameters_schema(learner.published().size).allocate() for _ in roles.actors]
    param_sends: list[MPI.Request | None] = [None] * len(roles.actors)
    pending = set(range(len(roles.actors)))  # actors owed the current parameters
    stopping = False

    def publish(final: bool = False) -> None:
        flat = None  # copied once, for the first actor ready to take it
        for i in sorted(pending):
            send = param_sends[i]
            if final and send is not None:
                wait_all([send], comm, f"actor {roles.actors[i]} to take parameters", watchdog)
            elif send is not None and not send.Test():
                continue
            if flat is None:
                flat = learner.published()
            msg = params[i]
            msg["parameters"][:] = flat
            header = msg["header"]
            header[ParamsHeader.VERSION] = learner.learner_updates
            header[ParamsHeader.ALLOWED] = side.allowed()
            header[ParamsHeader.STOP] = int(stopping)
            header[ParamsHeader.FINAL] = int(final)
            param_sends[i] = comm.Isend(msg.buffer, dest=roles.actors[i], tag=Tag.PARAMS)
            pending.discard(i)

    publish()
    ready: deque[tuple[int, int]] = deque()  # (shard, slot) holding a batch
    backoff = Backoff()
    t_last = time.perf_counter()
    checkpoint_at = -1  # env steps of the checkpoint under way
    acked: set[int] = set()  # shards that wrote their file for it
    # The learner trains on from the replay whatever the actors do: a run whose actors
    # stopped sending (SIGSTOP, a hung env) would spin forever without this.
    progress = (side.env_steps, time.perf_counter())
    while True:
        busy = trained = False
        iteration_start = time.perf_counter()
        for i, s in enumerate(shards):
            while (j := s.arrived()) is not None:
                side.stats.take_reply(i, s.replies[j], learner.learner_updates)
                busy = True
                if checkpoint_at >= 0 and (
                    s.replies[j]["header"][ReplyHeader.CHECKPOINTED] == checkpoint_at
                ):
                    acked.add(i)
                if s.replies[j]["header"][ReplyHeader.ROWS] > 0 and not stopping:
                    ready.append((i, j))
                else:
                    s.free.append(j)
        learning = side.learning()
        now = time.perf_counter()
        if learning:
            side.stats.learning_s += now - t_last
        t_last = now
        if ready:
            trained = True
            i, j = ready.popleft()
            s = shards[i]
            s.priorities.append(side.train(s.replies[j]))
            s.free.append(j)
            if learner.learner_updates % topo.publish_interval == 0:
                pending.update(range(len(roles.actors)))
            busy = True
        done = bool((side.stats.status[:, ReplyHeader.ACTORS_DONE] >= len(roles.actors)).all())
        stop = ctx.stop_requested() or bool(side.stats.status[:, ReplyHeader.STOP].any())
        if (stop and not stopping) or done:
            stopping = stopping or stop
            pending.update(range(len(roles.actors)))
            for i, j in ready:
                shards[i].free.append(j)
            ready.clear()
        if done:
            break
        if side.env_steps > progress[0] or stopping:
            progress = (side.env_steps, now)
        elif now - progress[1] > watchdog:
            raise WatchdogTimeout(
                f"rank 0 (learner) received no env steps from the actors for {watchdog:g} s "
                f"(watchdog_s) at {side.env_steps:,}; aborting"
            )
        if pending:
            publish()
        # Checkpoints: ask every shard, then write the step file once all have answered.
        if checkpoint_at < 0:
            if ctx.clock.due_by_time() or ctx.clock.due_by_env_steps(side.env_steps):
                checkpoint_at = side.env_steps
                acked.clear()
                for s in shards:
                    s.checkpoint_at = checkpoint_at
        if checkpoint_at >= 0 and len(acked) == len(shards):
            side.checkpoint(checkpoint_at, len(shards))
            checkpoint_at = -1
        # Keep requests posted at every shard (status only until learning starts).
        for s in shards:
            while s.free:
                if not learning or stopping:
                    if s.in_flight or now - s.last_post < STATUS_POLL_S:
                        break
                    s.post(0, side.beta())
                else:
                    s.post(algo.minibatch_size, side.beta())
                busy = True
        side.log()
        if not busy:
            backoff.pause()
        if learning and not trained and not stopping:
            # an iteration without a batch to learn from: waiting for the shards
            side.stats.wait_s += time.perf_counter() - iteration_start
        if busy:
            backoff.reset()
            continue
        if backoff.waited_s > watchdog:
            raise WatchdogTimeout(
                f"rank 0 (learner) heard from no replay rank for {watchdog:g} s "
                "(watchdog_s); aborting"
            )
    # Every actor is done: drain, the final checkpoint, final parameters, final requests.
    _finish_shards(ctx, side, shards)
    if not stopping:  # a preempted run ends now; its resume evaluates
        side.maybe_evaluate(final=True)
    side.log(force=True)
    pending.update(range(len(roles.actors)))
    publish(final=True)
    wait_all([r for r in param_sends if r is not None], comm, "actors to take parameters", watchdog)
    from hpcrl.comm.gradients import parameters_digest

    ctx.run_file.set_attrs(
        parameter_digests=np.array([parameters_digest(learner.model)], dtype=np.int64)
    )
    side.reporter.close()
    link_trajectories(ctx, 0)
    return stopping and side.env_steps < ctx.segment.total_env_steps


def _finish_shards(ctx: RunContext, side: ReplayLearner, shards: list[_ShardRequests]) -> None:
    """Collect every reply in flight, then one request per shard with the final
    checkpoint, then the final request; wait for all their replies."""
    watchdog = ctx.watchdog_s

    def drain() -> None:
        for i, s in enumerate(shards):
            while s.in_flight:
                j = s.in_flight[0]
                wait_all([s.recvs[j]], ctx.comm, f"replay rank {s.shard} to answer", watchdog)
                s.in_flight.popleft()
                side.stats.take_reply(i, s.replies[j], side.learner.learner_updates)
                s.free.append(j)

    drain()
    at = side.env_steps
    for s in shards:
        s.checkpoint_at = at
        s.post(0, side.beta())
    drain()
    side.checkpoint(at, len(shards))
    for s in shards:
        s.post(0, side.beta(), final=True)
    drain()


# --------------------------------------------------------------------------------------
# The whole layout.


def _make_policy(ctx: RunContext, seed: int):
    import torch

    torch.set_num_threads(ctx.cfg.run.torch_threads)
    torch.manual_seed(seed)
    return make_learner(ctx.cfg, ctx.observation_space, ctx.action_space, ctx.world_size, seed)


def _run(ctx: RunContext):
    """Every role; returns (a learner holding rank 0's final parameters, interrupted)."""
    rng, _ = ctx.rank_seeds()
    seed = int(rng.integers(2**62))
    if ctx.world_size == 1:
        learner = _make_policy(ctx, seed)
        learner.make_optimizer()
        return learner, _run_one_process(ctx, learner)
    roles = Roles(ctx.world_size, ctx.cfg.topology.replay_ranks)
    wait_all([ctx.comm.Ibarrier()], ctx.comm, "every rank to start", ctx.watchdog_s)
    policy = None
    interrupted = False
    if ctx.rank == 0:
        policy = _make_policy(ctx, seed)
        from hpcrl.comm.gradients import broadcast_parameters  # noqa: F401 (torch loaded)
        from hpcrl.models import select_device

        policy.to(select_device(ctx.cfg.run.device))
        policy.make_optimizer()  # before the first update, not in it (~1.5 s at first)
        interrupted = _run_learner(ctx, roles, policy)
        policy.to(select_device("cpu"))
    elif ctx.rank <= roles.replay:
        _run_replay(ctx, roles)
    else:
        policy = _make_policy(ctx, seed)
        _run_actor(ctx, roles, policy)
    flag = np.array([float(interrupted)])
    allreduce_sum(ctx.comm, flag, ctx.watchdog_s)
    if policy is None:  # a replay rank: torch only now, for the final evaluation
        policy = _make_policy(ctx, seed)
    final = policy.published()
    bcast(ctx.comm, final, 0, ctx.watchdog_s)
    policy.load_published(final)
    return policy, bool(flag[0] > 0)


def _run_one_process(ctx: RunContext, learner) -> bool:
    """One process: the actor fills a message, the shard inserts it, the learner trains
    on as many batches as the flow control allows (`env_steps_per_update`; null: one
    update per vector step), in turn."""
    algo = ctx.cfg.algo
    rng, _ = ctx.rank_seeds()
    shard = ReplayShard(ctx, 0, algo.buffer_size, [0], rng)
    side = ReplayLearner(ctx, learner, 1, 1)
    actor = ReplayActor(ctx, learner, ctx.segment.budgets()[0], algo.actor_epsilon)
    msg = _experience_schema(ctx).allocate()
    request = P.sample_request_schema(algo.minibatch_size).allocate()
    reply = _reply_schema(ctx, 1).allocate()
    ratio = algo.env_steps_per_update or ctx.cfg.run.num_envs
    while True:
        actor.produce(msg, lambda: learner.learner_updates)
        if ctx.stop_requested() and not actor.done:
            actor.stop = True
            msg["header"][ActorHeader.STOP] = msg["header"][ActorHeader.FINAL] = 1
        shard.insert(msg, 0)
        actor.recorder.flush()

        def ask(batch: int, checkpoint: int = -1) -> None:
            header = request["header"]
            header[RequestHeader.BATCH] = batch
            header[RequestHeader.CHECKPOINT] = checkpoint
            header[RequestHeader.FINAL] = 0
            request["beta"][0] = side.beta()
            shard.serve(request, reply)
            request["header"][RequestHeader.PRIORITIES] = 0
            side.stats.take_reply(0, reply, learner.learner_updates)

        ask(0)
        while side.learning() and not actor.stop:
            due = side.learning_from + (learner.learner_updates - side.updates_from) * ratio
            if due > actor.env_steps:
                break
            ask(algo.minibatch_size)
            slots, ids, priorities = side.train(reply)
            n = len(slots)
            request["slots"][:n], request["ids"][:n] = slots, ids
            request["priorities"][:n] = priorities
            request["header"][RequestHeader.PRIORITIES] = n
        if request["header"][RequestHeader.PRIORITIES]:
            ask(0)
        side.log(force=actor.done)
        steps = side.env_steps
        if actor.done or ctx.clock.due_by_time() or ctx.clock.due_by_env_steps(steps):
            if actor.done:
                if not actor.stop:
                    side.maybe_evaluate(final=True)
                side.log(force=True)
            ask(0, checkpoint=steps)
            side.checkpoint(steps, 1)
        if actor.done:
            break
    from hpcrl.comm.gradients import parameters_digest

    ctx.run_file.set_attrs(
        parameter_digests=np.array([parameters_digest(learner.model)], dtype=np.int64)
    )
    side.reporter.close()
    link_trajectories(ctx, actor.close())
    return actor.stop and side.env_steps < ctx.segment.total_env_steps
