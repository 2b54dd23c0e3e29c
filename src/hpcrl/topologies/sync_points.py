"""What the ranks decide together at a sync point: the vote buffer (log, checkpoint, stop,
episodes held) and when a checkpoint is due by env steps.

Every layout's loop reaches sync points (an `Allreduce` of the tabular tables, a gradient
update, a learner-group round, a parameter-server tick). There each rank votes with a
`Vote`-indexed float64 buffer summed over the ranks: rank 0 alone keeps the log and
wall-time checkpoint clocks; any rank that received a preemption signal votes stop; and
each rank adds the finished episodes it holds, so that the ranks send them to rank 0
before they pile up (`reporting.flush_episodes`).
"""

from __future__ import annotations

import time
from enum import IntEnum

import numpy as np


class Vote(IntEnum):
    """Slots of the vote buffer (summed over the ranks; > 0 means yes)."""

    LOG = 0
    CHECKPOINT = 1
    STOP = 2
    EPISODES = 3  # finished episodes held, not yet sent to rank 0 (summed: every rank's)


def vote_buffer() -> np.ndarray:
    """A zeroed (len(Vote),) float64 vote buffer."""
    return np.zeros(len(Vote), dtype=np.float64)


class CheckpointClock:
    """When checkpoints are due: every `interval_env_steps` global env steps (0: never by
    env steps) and every `interval_s` seconds of wall time (0: never by time).

    Call sequence: `due(env_steps)` at a sync point; after a checkpoint, `written(env_steps)`.
    """

    def __init__(self, interval_env_steps: int, interval_s: float, env_steps: int):
        self.interval_env_steps = interval_env_steps
        self.interval_s = interval_s
        self.next_env_steps = self._next(env_steps)
        self.last_time = time.perf_counter()

    def _next(self, env_steps: int) -> int | None:
        interval = self.interval_env_steps
        return (env_steps // interval + 1) * interval if interval > 0 else None

    def due_by_env_steps(self, env_steps: int) -> bool:
        return self.next_env_steps is not None and env_steps >= self.next_env_steps

    def due_by_time(self) -> bool:
        interval = self.interval_s
        return interval > 0 and time.perf_counter() - self.last_time >= interval

    def written(self, env_steps: int) -> None:
        """A checkpoint was written at `env_steps`: the next is one interval further."""
        self.last_time = time.perf_counter()
        self.advance(env_steps)

    def advance(self, env_steps: int) -> None:
        """Move the env-step mark past `env_steps` (without a checkpoint)."""
        if self.interval_env_steps > 0:
            self.next_env_steps = self._next(env_steps)
