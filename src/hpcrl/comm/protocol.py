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


# Header slots of a tabular experience message (int64). EXP_FINAL: the actor's last batch
# (budget spent or stopping); EXP_STOP: a preemption signal reached this actor.
EXP_ROWS, EXP_POLICY_VERSION, EXP_FINAL, EXP_EPISODES, EXP_ACTOR_ENV_STEPS, EXP_STOP = range(6)
# Header slots of a parameter snapshot (int64). PARAMS_STOP: end with the current batch.
PARAMS_VERSION, PARAMS_FINAL, PARAMS_STOP = range(3)


def tabular_experience_schema(rows: int) -> Schema:
    """Actor -> learner batch of up to `rows` transitions (time-major: vector step, then env)
    and of up to `rows` episodes that finished in it."""
    return Schema(
        [
            ("header", (8,), np.int64),
            ("obs", (rows,), np.int64),
            ("action", (rows,), np.int64),
            ("reward", (rows,), np.float64),
            ("next_obs", (rows,), np.int64),
            ("terminated", (rows,), np.bool_),
            ("episode_return", (rows,), np.float64),
            ("episode_length", (rows,), np.int64),
            ("episode_actor_env_steps", (rows,), np.int64),  # actor's own count at episode end
            ("episode_wall_time", (rows,), np.float64),  # seconds since the run started
        ]
    )


def q_table_schema(n_states: int, n_actions: int) -> Schema:
    """Learner -> actor snapshot of the Q-table with its version."""
    return Schema([("header", (3,), np.int64), ("q_table", (n_states, n_actions), np.float64)])
