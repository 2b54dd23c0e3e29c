"""Non-blocking waits and collectives with a watchdog, so no rank can hang silently.

MPICH busy-polls inside blocking calls, which steals the core from other ranks when the
job oversubscribes; these helpers poll with `Test`, yielding the core between polls
(`os.sched_yield()`) for the first `_SPIN_S` seconds, so a partner that is just late costs
no sleep granularity, then back off with sleeps up to 1 ms. Not `time.sleep(0)`: it sleeps
for the kernel's timer slack (50 us by default), which made a 3 us `Ialltoall` on 2 ranks
take 160 us to wait for (`benchmarks/tabular_scale.py`). They raise `WatchdogTimeout`
(which aborts the job) after `watchdog_s` seconds.
"""

from __future__ import annotations

import os
import time

import numpy as np
from mpi4py import MPI

from hpcrl.comm import failures

_MAX_SLEEP_S = 1e-3
# Yield-spin this long before sleeping. 20 ms, not 2: with ranks > cores, a partner that is
# merely descheduled takes a few ms to reach the collective, and sleeping through its
# arrival cost 2.5x on a flat-gradient Allreduce loop (4 ranks on 2 cores, 3 ms of work
# per step: 16.1 ms per step with 2 ms, 7.3 ms with 20 ms, 6.5 ms with a blocking call).
_SPIN_S = 20e-3


class WatchdogTimeout(RuntimeError):
    """A wait lasted longer than the configured watchdog (`watchdog_s`)."""


class Backoff:
    """The pause between two polls: yield the core for the first `_SPIN_S` seconds of a
    wait, then sleep, doubling up to `_MAX_SLEEP_S`. `waited_s` feeds the watchdog."""

    def __init__(self, spin_s: float = _SPIN_S, max_sleep_s: float = _MAX_SLEEP_S):
        self.spin_s, self.max_sleep_s = spin_s, max_sleep_s
        self.pauses = 0
        self.reset()

    def reset(self) -> None:
        """A new wait starts (something arrived)."""
        self.start = time.monotonic()
        self.sleep_s = 0.0

    @property
    def waited_s(self) -> float:
        return time.monotonic() - self.start

    def pause(self) -> None:
        # Rank 0 looks for another rank's failure report, which ends the wait
        # (`hpcrl.comm.failures`): in the spin, every 256th pause only (a microsecond wait
        # pays nothing for it).
        self.pauses += 1
        if self.waited_s < self.spin_s:
            if not self.pauses & 255:
                failures.poll()
            os.sched_yield()
            return
        failures.poll()
        time.sleep(self.sleep_s)
        self.sleep_s = min(2 * self.sleep_s + 5e-5, self.max_sleep_s)


def wait_all(
    requests: list[MPI.Request],
    comm: MPI.Comm,
    what: str,
    watchdog_s: float,
    spin_s: float = _SPIN_S,
    max_sleep_s: float = _MAX_SLEEP_S,
) -> None:
    """Wait for every request, polling: yield-spinning for the first `spin_s` seconds,
    then sleeping up to `max_sleep_s` between polls. A wait expected to be long (an actor
    its learner is behind on) passes spin_s 0 and a longer sleep, leaving the cores to the
    ranks it waits for.

    Raises:
        WatchdogTimeout: not complete after `watchdog_s` seconds; the message names the rank
            and `what` it waited for.
    """
    if not requests:
        return
    backoff = Backoff(spin_s, max_sleep_s)
    while not MPI.Request.Testall(requests):
        if backoff.waited_s > watchdog_s:
            raise WatchdogTimeout(
                f"rank {comm.Get_rank()} waited more than {watchdog_s:g} s for {what} "
                "(watchdog_s); aborting the job"
            )
        backoff.pause()


def allreduce_sum(comm: MPI.Comm, buffer: np.ndarray, watchdog_s: float) -> None:
    """In-place sum of `buffer` over every rank of `comm` (one `Iallreduce`)."""
    if comm.Get_size() == 1:
        return
    request = comm.Iallreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
    wait_all([request], comm, "Allreduce", watchdog_s)


def bcast(comm: MPI.Comm, buffer: np.ndarray, root: int, watchdog_s: float) -> None:
    """Broadcast `buffer` from `root` in place (one `Ibcast`)."""
    if comm.Get_size() == 1:
        return
    wait_all([comm.Ibcast(buffer, root=root)], comm, "Bcast", watchdog_s)


def gather_rows(
    comm: MPI.Comm, rows: np.ndarray | list[np.ndarray], root: int, watchdog_s: float
) -> np.ndarray | None:
    """Concatenate every rank's 1-D `rows` (any count, same dtype) on `root`, in rank order.
    `rows` may also be a non-empty list of 1-D chunks, concatenated in order; the root
    copies its own straight into their place in the result (`MPI.IN_PLACE`), one pass.

    Returns:
        The concatenation on `root` (on one rank, a single array itself, not a copy), None
        elsewhere.
    """
    chunks = rows if isinstance(rows, list) else [np.ascontiguousarray(rows)]
    if comm.Get_size() == 1:
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
    mine = sum(chunk.size for chunk in chunks)
    counts = np.zeros(comm.Get_size(), dtype=np.int64)
    counts[comm.Get_rank()] = mine
    allreduce_sum(comm, counts, watchdog_s)
    if comm.Get_rank() != root:
        send = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        wait_all([comm.Igatherv(send, None, root=root)], comm, "Gatherv", watchdog_s)
        return None
    out = np.empty(int(counts.sum()), dtype=chunks[0].dtype)
    start = int(counts[:root].sum())
    np.concatenate(chunks, out=out[start : start + mine])
    request = comm.Igatherv(MPI.IN_PLACE, [out, counts], root=root)
    wait_all([request], comm, "Gatherv", watchdog_s)
    return out
