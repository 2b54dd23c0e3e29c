"""Preemption requests: `SIGUSR1` and `SIGTERM` only set a flag.

The handler does no I/O and no MPI: the topology loops read `requested()` at their next
sync point, agree on it with the other ranks (a flag in a small allreduce or a message
header), write a collective checkpoint, mark the run `interrupted` and exit with
`EXIT_INTERRUPTED`. SLURM sends `SIGUSR1` before the time limit with `--signal`, and
`SIGTERM` when it preempts or cancels; `mpiexec` (MPICH hydra) and `srun` forward both to
every rank. Open MPI's `mpirun` kills its ranks on `SIGTERM` before a handler runs, so
send it `SIGUSR1` (HPC-NOTES).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

EXIT_INTERRUPTED = 3  # "checkpointed, not finished": the job scripts requeue on it
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_received: list[int] = []


class EvaluationInterrupted(Exception):
    """A preemption signal stopped a collective evaluation (raised on every rank)."""


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    _received.append(signum)


def install() -> None:
    """Route `SIGUSR1` and `SIGTERM` to the flag (main thread only, as Python requires)."""
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def ignore() -> None:
    """Ignore `SIGUSR1` and `SIGTERM` from here on (main thread only).

    For `python -m hpcrl` once its command has ended (`__main__.py`): the run's state is
    on disk, so a request that arrives late has nothing left to do. Python's finalization
    puts back the default action of every signal it handles, which for these two kills
    the process, so a request landing during the teardown would turn a finished run's
    exit 0 into death by signal; an ignored signal stays ignored through the teardown.
    """
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """`install` for the block, then the process's previous handlers again and a clear
    flag (`hpcrl.train` in a script or notebook that goes on afterwards). Off the main
    thread, where Python allows no handler, the block runs with the process's own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    install()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        clear()


def requested() -> bool:
    """Whether a preemption signal has arrived in this process."""
    return bool(_received)


def signal_name() -> str:
    """Name of the first signal received ("" when none)."""
    return signal.Signals(_received[0]).name if _received else ""


def request() -> None:
    """Set the flag as a signal would (tests and fault injection)."""
    _received.append(signal.SIGUSR1)


def clear() -> None:
    """Forget the signals received so far."""
    _received.clear()
