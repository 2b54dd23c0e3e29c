"""DD-PPO's preemption threshold: stragglers stop collecting early (Wijmans et al., ICLR 2020,
"DD-PPO", Sec. 4, "Preemption threshold"; habitat-lab's `should_end_early`).

Every rank counts itself as done when its rollout is complete by adding 1 to one `int64`
counter in rank 0's memory (an MPI RMA window, `Fetch_and_op` under a passive-target
`Lock_all` epoch: no rank waits for another to read or update it). A rank still collecting
reads the counter after each vector step; once at least `sync_frac × world` ranks are done
for this rollout and it has taken at least `min_fraction` of its own rollout, it stops and
learns from the shorter rollout. The counter is never reset: during a rank's rollout number
u (counted from 0 since the window was made), the ranks done with it are `counter − u·world`,
because no rank starts rollout u+1 before every rank has finished rollout u (the update's
gradient `Allreduce` lies between them).
"""

from __future__ import annotations

import math

import numpy as np
from mpi4py import MPI

MIN_FRACTION = 0.25  # DD-PPO: a straggler still collects at least 25% of its rollout


class StragglerCutoff:
    """One rank's view of the "rollouts done" counter (collective to create and to `close`).

    Args:
        comm: the ranks that collect rollouts in lockstep.
        sync_frac: fraction of the ranks that must be done before the others stop, in (0, 1].
            With `ceil(sync_frac × world) ≥ world` nobody can ever be cut (e.g. 1 or 2 ranks
            at the default 0.6, or `sync_frac` 1): then no window is made and `should_stop`
            is always False.
        rollout_steps: vector steps of a full rollout on this rank.
        min_fraction: a rank stops only after `ceil(min_fraction × rollout_steps)` steps.
    """

    def __init__(
        self, comm: MPI.Comm, sync_frac: float, rollout_steps: int, min_fraction=MIN_FRACTION
    ):
        if not 0.0 < sync_frac <= 1.0:
            raise ValueError(f"sync_frac must be in (0, 1], got {sync_frac!r}")
        self.world = comm.Get_size()
        self.threshold = max(1, math.ceil(sync_frac * self.world - 1e-9))
        self.min_steps = max(1, math.ceil(min_fraction * rollout_steps))
        self.active = self.threshold < self.world
        self.rollouts = 0  # rollouts this rank has finished since the window was made
        self._one = np.ones(1, dtype=np.int64)
        self._value = np.zeros(1, dtype=np.int64)
        self.win = None
        if self.active:
            size = 8 if comm.Get_rank() == 0 else 0
            self.win = MPI.Win.Allocate(size, disp_unit=8, comm=comm)
            if comm.Get_rank() == 0:
                np.frombuffer(self.win.tomemory(), dtype=np.int64)[:] = 0
            comm.Barrier()  # the counter is zero before anyone touches it
            self.win.Lock_all()
            self.win.Sync()  # the store above is visible to RMA (separate memory model)

    def done_this_rollout(self) -> int:
        """Ranks that have finished the current rollout (reads rank 0's counter)."""
        self.win.Fetch_and_op(self._one, self._value, 0, 0, MPI.NO_OP)
        self.win.Flush(0)
        return int(self._value[0]) - self.rollouts * self.world

    def should_stop(self, steps_done: int) -> bool:
        """Whether this rank, `steps_done` vector steps into its rollout, stops now."""
        if not self.active or steps_done < self.min_steps:
            return False
        return self.done_this_rollout() >= self.threshold

    def finish(self) -> None:
        """This rank's rollout is over (complete or cut): count it in."""
        if self.active:
            self.win.Fetch_and_op(self._one, self._value, 0, 0, MPI.SUM)
            self.win.Flush(0)
        self.rollouts += 1

    def close(self) -> None:
        """Collective: end the access epoch and free the window."""
        if self.win is not None:
            self.win.Unlock_all()
            self.win.Free()
            self.win = None
