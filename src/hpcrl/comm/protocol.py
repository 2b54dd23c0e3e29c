"""The wire protocol in one place: message tags and the fixed schemas of every buffer.

A message is one contiguous, preallocated byte buffer holding named numpy fields at fixed
offsets, sent with the upper-case (buffer) mpi4py calls. Pickles are for rare control
messages only.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Tag(IntEnum):
    """Every point-to-point tag hpcrl uses."""

    EXPERIENCE = 11  # actor -> learner: a batch of transitions and finished episodes
    PARAMS = 12  # learner -> actor: a versioned parameter snapshot (e.g. the Q-table)
    SAMPLE_REQUEST = 13  # Ape-X learner -> replay rank: sample, new priorities, checkpoint
    SAMPLE = 14  # Ape-X replay rank -> learner: a prioritized batch and the shard's status


class Schema:
    """Named fields (name -> shape, dtype) packed into one byte buffer, 8-byte aligned.

    >>> s = Schema([("header", (4,), np.int64), ("q", (3, 2), np.float64)])
    >>> m = s.allocate(); m["q"][:] = 1.0; m.buffer.nbytes
    80
    """

    def __init__(self, fields: list[tuple[str, tuple[int, ...], type]]):
        self.fields: dict[str, tuple[int, tuple[int, ...], np.dtype]] = {}
        offset = 0
        for name, shape, dtype in fields:
            dtype = np.dtype(dtype)
            self.fields[name] = (offset, tuple(shape), dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            offset += -(-nbytes // 8) * 8
        self.nbytes = offset

    def allocate(self) -> Message:
        return Message(self, np.zeros(self.nbytes, dtype=np.uint8))


class Message:
    """A buffer and numpy views of its fields (`msg["obs"]`)."""

    def __init__(self, schema: Schema, buffer: np.ndarray):
        self.schema = schema
        self.buffer = buffer
        self.views = {
            name: buffer[off : off + int(np.prod(shape, dtype=np.int64)) * dt.itemsize]
            .view(dt)
            .reshape(shape)
            for name, (off, shape, dt) in schema.fields.items()
        }

    def __getitem__(self, name: str) -> np.ndarray:
        return self.views[name]


class ActorHeader(IntEnum):
    """Header slots (int64) of every actor -> learner message (tabular batches, unrolls and
    gradients alike), so one parameter-server exchange serves every layout."""

    ROWS = 0  # env steps it counts (the budget's last vector step may count fewer copies)
    POLICY_VERSION = 1  # version of the parameters its first step used
    FINAL = 2  # the actor's last message (budget spent or stopping)
    EPISODES = 3  # episodes that finished in it
    ACTOR_ENV_STEPS = 4  # the actor's env steps in this segment after it
    STOP = 5  # a preemption signal reached this actor
    STEPS = 6  # vector steps filled (unrolls: < unroll_length only in an actor's last)
    TRANSITIONS = 7  # Ape-X: n-step transitions in the message


class ParamsHeader(IntEnum):
    """Header slots (int64) of a learner -> actor parameter snapshot."""

    VERSION = 0  # learner updates behind these parameters (the policy version)
    FINAL = 1  # the answer to the actor's final message: nothing follows
    STOP = 2  # end with the current message (a preemption signal)
    RETIRED = 3  # this actor's messages the learner is done with (flow-control credit)
    ALLOWED = 4  # Ape-X: env steps each actor may have taken in this segment (flow control)


def tabular_experience_schema(rows: int) -> Schema:
    """Actor -> learner batch of up to `rows` transitions (time-major: vector step, then env)
    and of up to `rows` episodes that finished in it (header: `ActorHeader`)."""
    return Schema(
        [
            ("header", (8,), np.int64),
            ("obs", (rows,), np.int64),
            ("action", (rows,), np.int64),
            ("reward", (rows,), np.float64),
            ("next_obs", (rows,), np.int64),
            ("terminated", (rows,), np.bool_),
            *_episode_fields(rows),
        ]
    )


def q_table_schema(n_states: int, n_actions: int) -> Schema:
    """Learner -> actor snapshot of the Q-table with its version (header: `ParamsHeader`)."""
    return Schema(
        [("header", (len(ParamsHeader),), np.int64), ("q_table", (n_states, n_actions), np.float64)]
    )


# Seconds since the actor started: total, stepping envs, policy inference, waiting for a
# send buffer to come free, waiting for the first parameters.
class Timing(IntEnum):
    """Slots of an actor message's `timing` field (float64 seconds since it started)."""

    WALL = 0
    ENV = 1  # stepping envs
    INFERENCE = 2  # the policy, and the gradient an actor computes (`SendsGradients`)
    SEND_WAIT = 3  # waiting for a send buffer to come free
    PARAM_WAIT = 4  # waiting for the first parameters
    CPU = 5  # CPU time of the actor's process (`time.process_time`)


def unroll_schema(
    unroll_length: int,
    num_envs: int,
    obs_shape: tuple[int, ...],
    obs_dtype,
    action_shape: tuple[int, ...],
    action_dtype,
) -> Schema:
    """Actor -> learner: T = `unroll_length` vector steps of B = `num_envs` env copies,
    time-major, and the episodes that finished in them (at most T × B).

    obs (T + 1, B, *obs_shape): the observations acted on, then the one after the unroll
    (V-trace's bootstrap); behaviour_log_probs (T, B): log μ(a_t|x_t) of the actor's policy;
    truncation_values (T, B): V(final obs) under the behaviour parameters where a time limit
    cut the episode at step t (0 elsewhere), which the learner folds into the reward.
    """
    T, B = unroll_length, num_envs
    rows = T * B
    return Schema(
        [
            ("header", (8,), np.int64),
            ("timing", (len(Timing),), np.float64),
            ("obs", (T + 1, B, *obs_shape), obs_dtype),
            ("actions", (T, B, *action_shape), action_dtype),
            ("behaviour_log_probs", (T, B), np.float32),
            ("rewards", (T, B), np.float32),
            ("terminated", (T, B), np.float32),
            ("truncated", (T, B), np.float32),
            ("truncation_values", (T, B), np.float32),
            *_episode_fields(rows),
        ]
    )


def gradient_schema(n_parameters: int, rows: int) -> Schema:
    """Actor -> learner (A3C, asynchronous Q-learning): the gradient the actor computed on
    one unroll of `rows` = T × B env steps, as a (n_parameters, 1) float32 column (so a
    learner's batch of N lies side by side as (n_parameters, N), like unrolls), with the
    `unroll_schema` header, timing and episodes."""
    return Schema(
        [
            ("header", (8,), np.int64),
            ("timing", (len(Timing),), np.float64),
            ("gradient", (n_parameters, 1), np.float32),
            *_episode_fields(rows),
        ]
    )


def write_actor_header(
    msg: Message,
    rows: int,
    policy_version: int,
    final: bool,
    episodes: int,
    actor_env_steps: int,
    stop: bool,
    steps: int = 0,
) -> None:
    """Stamp an actor message's header (`ActorHeader`); `policy_version` < 0 (no step
    taken) is written as 0."""
    header = msg["header"]
    header[ActorHeader.ROWS] = rows
    header[ActorHeader.POLICY_VERSION] = max(policy_version, 0)
    header[ActorHeader.FINAL] = int(final)
    header[ActorHeader.EPISODES] = episodes
    header[ActorHeader.ACTOR_ENV_STEPS] = actor_env_steps
    header[ActorHeader.STOP] = int(stop)
    header[ActorHeader.STEPS] = steps


def write_episodes(
    msg: Message, start: int, batch, n: int, actor_env_steps: int, wall_time: float
) -> int:
    """Append to `msg`'s episode fields, from row `start`, the episodes that ended in one
    vector step (`hpcrl.envs.StepBatch`) among its first `n` (counted) env copies.

    Returns:
        The episode count after them.
    """
    counted = batch.done_envs < n
    k = int(counted.sum())
    if k:
        e = slice(start, start + k)
        msg["episode_return"][e] = batch.episode_returns[counted]
        msg["episode_length"][e] = batch.episode_lengths[counted]
        msg["episode_actor_env_steps"][e] = actor_env_steps
        msg["episode_wall_time"][e] = wall_time
    return start + k


def _episode_fields(rows: int) -> list[tuple[str, tuple[int, ...], type]]:
    """Up to `rows` episodes that finished in an actor message."""
    return [
        ("episode_return", (rows,), np.float64),
        ("episode_length", (rows,), np.int64),
        ("episode_actor_env_steps", (rows,), np.int64),  # actor's own count at episode end
        ("episode_wall_time", (rows,), np.float64),  # seconds since the run started
    ]


def parameters_schema(n_parameters: int) -> Schema:
    """Learner -> actor: the model's parameters as one flat float32 vector (the order of
    `module.parameters()`) with their version (header: `ParamsHeader`)."""
    return Schema(
        [("header", (len(ParamsHeader),), np.int64), ("parameters", (n_parameters,), np.float32)]
    )


class RequestHeader(IntEnum):
    """Header slots (int64) of an Ape-X learner -> replay rank request."""

    BATCH = 0  # transitions to sample (0: the shard's status only)
    PRIORITIES = 1  # new priorities that follow, for the shard's earlier batch
    CHECKPOINT = 2  # write the shard's checkpoint file at these env steps (-1: no)
    FINAL = 3  # the last request: answer it, then end


class ReplyHeader(IntEnum):
    """Header slots (int64) of an Ape-X replay rank -> learner reply."""

    ROWS = 0  # transitions sampled in it
    SIZE = 1  # transitions held
    ADDED = 2  # transitions inserted, ever
    SAMPLED = 3  # transitions sampled, ever
    ENV_STEPS = 4  # env steps of the shard's actors in this segment
    ACTORS_DONE = 5  # of the shard's actors, those whose last message it has
    STOP = 6  # a preemption signal reached one of its actors
    EPISODES = 7  # finished episodes in it
    CHECKPOINTED = 8  # env steps of the shard checkpoint written for this request (-1)
    ACTORS = 9  # actor rows in it
    RSS = 10  # the replay process's resident memory, bytes
    NBYTES = 11  # the buffer's arrays, bytes
    RSS_START = 12  # the replay process's resident memory before it allocated its buffer


def transition_fields(rows: int, obs_shape: tuple[int, ...], obs_dtype) -> list:
    """Up to `rows` n-step transitions (`hpcrl.replay.NStepTransitions`)."""
    return [
        ("obs", (rows, *obs_shape), obs_dtype),
        ("action", (rows,), np.int64),
        ("reward", (rows,), np.float32),
        ("next_obs", (rows, *obs_shape), obs_dtype),
        ("discount", (rows,), np.float32),
    ]


def replay_experience_schema(
    rows: int, episodes: int, obs_shape: tuple[int, ...], obs_dtype
) -> Schema:
    """Ape-X actor -> replay rank: up to `rows` n-step transitions with their initial
    priorities, and up to `episodes` finished episodes (header: `ActorHeader`, its
    `TRANSITIONS` the transitions filled)."""
    return Schema(
        [
            ("header", (8,), np.int64),
            ("timing", (len(Timing),), np.float64),
            *transition_fields(rows, obs_shape, obs_dtype),
            ("priority", (rows,), np.float64),
            *_episode_fields(episodes),
        ]
    )


def sample_request_schema(batch: int) -> Schema:
    """Ape-X learner -> replay rank (`RequestHeader`): β for the batch it asks for, and the
    new priorities of up to `batch` transitions it sampled earlier (slot, id, priority)."""
    return Schema(
        [
            ("header", (len(RequestHeader),), np.int64),
            ("beta", (1,), np.float64),
            ("slots", (batch,), np.int64),
            ("ids", (batch,), np.int64),
            ("priorities", (batch,), np.float64),
        ]
    )


REPLAY_EPISODE_COLUMNS = 5  # the rows of `reporting.EPISODE_COLUMNS`


def sample_reply_schema(
    batch: int, episodes: int, actors: int, obs_shape: tuple[int, ...], obs_dtype
) -> Schema:
    """Ape-X replay rank -> learner (`ReplyHeader`): up to `batch` sampled transitions
    (their slots, ids and importance weights), up to `episodes` finished episodes as
    `EPISODE_COLUMNS` rows (float64), one row per actor of the shard (its rank, env steps
    received, trajectory rows, then its `Timing`), and `inserted`: [Σ policy version ×
    transitions, transitions] over what it inserted since its previous reply."""
    return Schema(
        [
            ("header", (len(ReplyHeader),), np.int64),
            ("inserted", (2,), np.float64),
            ("slots", (batch,), np.int64),
            ("ids", (batch,), np.int64),
            ("weights", (batch,), np.float64),
            *transition_fields(batch, obs_shape, obs_dtype),
            ("episodes", (episodes, REPLAY_EPISODE_COLUMNS), np.float64),
            ("actors", (actors, 3 + len(Timing)), np.float64),
        ]
    )
