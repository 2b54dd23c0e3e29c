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


class ParamsHeader(IntEnum):
    """Header slots (int64) of a learner -> actor parameter snapshot."""

    VERSION = 0  # learner updates behind these parameters (the policy version)
    FINAL = 1  # the answer to the actor's final message: nothing follows
    STOP = 2  # end with the current message (a preemption signal)
    RETIRED = 3  # this actor's messages the learner is done with (flow-control credit)


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
