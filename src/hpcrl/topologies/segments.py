"""Segments and budgets: how a run's env steps are split over its acting ranks, and the
checkpoint a run resumes from.

A resume continues bit-exactly when the checkpoint holds every rank's state and the world
size is unchanged; otherwise (a different world size, or a parameter-server checkpoint,
which only rank 0 writes while actors run) it starts a new *segment*: the remaining
budget is split over the new acting ranks, they draw fresh seeds, and in-progress
episodes restart. The env-step total stays exact either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcrl.storage.checkpoints import read_group, read_shared


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

    @classmethod
    def of_run(cls, total_env_steps: int, acting_ranks: int, resume: ResumePoint | None):
        """The segment a run (or a resume from `resume`) acts in."""
        if resume is None:
            return cls(0, 0, total_env_steps, acting_ranks)
        if resume.exact:
            return cls(total_env_steps=total_env_steps, **resume.meta["segment"])
        previous = resume.meta["segment"]["index"]
        return cls(previous + 1, int(resume.meta["env_steps"]), total_env_steps, acting_ranks)

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


def split_budget(total: int, parts: int) -> list[int]:
    """Split `total` env steps over `parts` acting ranks; the first `total % parts` get one more."""
    base, extra = divmod(total, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]


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


class Lockstep:
    """The schedule of a layout whose ranks all act and step together (`allreduce`,
    `sharded`, `async`): each rank's share of the segment's budget, the vector steps every
    rank runs (the same on all, from the largest share), and the run's env steps after
    each of them."""

    def __init__(self, segment: Segment, num_envs: int, rank: int):
        self.segment, self.num_envs = segment, num_envs
        self.budgets = np.array(segment.budgets(), dtype=np.int64)
        self.budget = int(self.budgets[rank])  # this rank's env steps in the segment
        self.vector_steps = max(1, -(-int(self.budgets.max()) // num_envs))

    def global_steps_after(self, t: int) -> int:
        """Env steps of all ranks after vector step t."""
        steps = np.minimum(self.budgets, (t + 1) * self.num_envs).sum()
        return self.segment.start_env_steps + int(steps)
