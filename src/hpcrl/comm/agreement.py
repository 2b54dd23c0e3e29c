"""Collective decisions about errors: every rank learns of a user error and exits together."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from mpi4py import MPI

from hpcrl.comm.waits import wait_all
from hpcrl.errors import UserError

T = TypeVar("T")


class CollectiveUserError(UserError):
    """A `UserError` every rank raises together: rank 0 prints it, every rank exits 2."""


def agree(comm: MPI.Comm, fn: Callable[[], T], root_only: bool = False) -> T:
    """Run `fn` on every rank (or only on rank 0, then broadcast its result) and agree on
    failure: if it raised `UserError` on any rank, raise `CollectiveUserError` on all.

    This is a small pickled control exchange (`allgather` of an error string or None),
    entered once every rank is done (`Ibarrier`, polled with sleeps): MPICH busy-polls in
    a blocking collective, and with more ranks than cores the ranks that finished first
    would starve the one still working (64 ranks on 2 cores: rank 0's checks took ~50 s).
    """
    result, error = None, None
    if not root_only or comm.Get_rank() == 0:
        try:
            result = fn()
        except UserError as exc:
            error = str(exc)
    if comm.Get_size() > 1:
        # No watchdog: a rank may legitimately take long here (reading a run directory).
        wait_all([comm.Ibarrier()], comm, "the other ranks' checks", float("inf"))
    errors = comm.allgather(error) if comm.Get_size() > 1 else [error]
    first = next((e for e in errors if e), None)
    if first is not None:
        raise CollectiveUserError(first)
    if root_only and comm.Get_size() > 1:
        result = comm.bcast(result, root=0)
    return result
