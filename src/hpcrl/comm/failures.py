"""Failure reports: which rank failed or died, told to rank 0 before the job is aborted.

`COMM_WORLD.Abort` ends every process at once, so without help only the failing rank knows
what happened and rank 0, which alone writes `run.h5`, never marks the run `failed`. At
the start of a run every rank calls `install(comm)` (collective): the ranks' host names and
process ids are gathered (one small pickled `allgather`), and a duplicate of `comm` carries
the reports, so they never meet a layout's messages.

- A rank whose code raises sends one line (`report`, a buffer `Isend` on the duplicate) to
  rank 0 and gives it up to `REPORT_GRACE_S` to act before it aborts the job itself.
- Rank 0 looks for reports whenever it waits (`hpcrl.comm.waits.Backoff.pause` calls
  `poll`, at most every `POLL_INTERVAL_S`) and raises `PeerFailed` naming the rank (host,
  pid): `hpcrl.runner.train` marks the run `failed` and `guarded` prints the one line and
  aborts.
- A rank that cannot report (killed, segfault, stopped by SIGSTOP) is found by `census`:
  the ranks on this node whose process is gone, a zombie, or stopped (`/proc/<pid>/stat`).
  Rank 0 takes it every `CENSUS_INTERVAL_S` while training (`poll`) and raises
  `PeerFailed` for a rank that died; a watchdog timeout's or an MPI error's message adds
  it too (stopped ranks as well). Each rank says `finished` when its part of training
  ends, so a rank that has finished and exited is not taken for dead. Ranks on other
  nodes cannot be checked from here: a dead one surfaces as an MPI error or a watchdog
  timeout instead.

Launchers differ in what they do when a rank dies. `srun` (unless `--kill-on-bad-exit`)
and `mpiexec -disable-auto-cleanup` leave the others running: rank 0 then names the dead
rank within `CENSUS_INTERVAL_S` and aborts. MPICH's `mpiexec` by default kills every
other rank within milliseconds itself, naming a PID of the job (not always the dead one)
and its host in its banner; `run.h5` keeps each rank's host and pid (`rank_hosts`,
`rank_pids`) to match it.
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np
from mpi4py import MPI

REPORT_GRACE_S = 5.0  # a failing rank waits this long for rank 0 to abort the job
POLL_INTERVAL_S = 0.01
CENSUS_INTERVAL_S = 1.0
_MAX_REPORT_BYTES = 2000
_FAILED, _FINISHED = 0, 1  # tags on the duplicate communicator

_state: dict = {}


class PeerFailed(RuntimeError):
    """Another rank reported a failure (raised on rank 0 by `poll`)."""


def install(comm: MPI.Comm) -> None:
    """Collective over `comm`: gather every rank's (host, pid) and open the report channel.
    Idempotent per run: a second call replaces the first (`uninstall` frees it)."""
    uninstall()
    peers = comm.allgather((socket.gethostname(), os.getpid()))
    _state.update(
        comm=comm.Dup(),
        peers=peers,
        rank=comm.Get_rank(),
        last_poll=0.0,
        last_census=time.monotonic(),
        finished=set(),
        training=True,
        sent=[],
    )


def peers() -> list[tuple[str, int]]:
    """[(host, pid)] of every rank, as gathered by `install` ([] when not installed)."""
    return list(_state.get("peers", []))


def finished() -> None:
    """Every rank, when its part of training has ended (before it may exit): rank 0 stops
    taking a census; another rank tells rank 0 it may now leave without having died."""
    dup = _state.get("comm")
    if dup is None:
        return
    _state["training"] = False
    if _state["rank"] != 0:
        empty = np.empty(0, dtype=np.uint8)
        _state["sent"].append(dup.Isend([empty, MPI.BYTE], dest=0, tag=_FINISHED))


def uninstall() -> None:
    """Close the report channel (not collective: `Free` of a duplicate is local in MPICH
    and Open MPI once no request is pending on it)."""
    dup = _state.pop("comm", None)
    for request in _state.get("sent", []):
        request.Test()
    _state.clear()
    if dup is not None and dup != MPI.COMM_NULL:
        try:
            dup.Free()
        except MPI.Exception:
            pass


def describe(rank: int) -> str:
    """'rank k (host, pid N)', or 'rank k' when the table is not installed."""
    peers = _state.get("peers")
    if not peers or not 0 <= rank < len(peers):
        return f"rank {rank}"
    host, pid = peers[rank]
    return f"rank {rank} ({host}, pid {pid})"


def report(text: str) -> bool:
    """A failing rank other than 0: send `text` (its error, one line) to rank 0, then wait
    up to `REPORT_GRACE_S` for rank 0 to mark the run and abort the job (which ends this
    process too). Returns whether a report was sent (False on rank 0 and when not
    installed); returning at all means rank 0 did not act in time."""
    dup = _state.get("comm")
    if dup is None or _state["rank"] == 0:
        return False
    data = np.frombuffer(text.encode()[:_MAX_REPORT_BYTES], dtype=np.uint8).copy()
    try:
        request = dup.Isend([data, MPI.BYTE], dest=0, tag=_FAILED)
        deadline = time.monotonic() + REPORT_GRACE_S
        while time.monotonic() < deadline:
            request.Test()
            time.sleep(0.01)
    except MPI.Exception:
        pass  # rank 0 is gone too: the caller aborts
    return True


def poll() -> None:
    """Rank 0: raise `PeerFailed` when another rank has reported a failure, or (while
    training, every `CENSUS_INTERVAL_S`) a rank on this node has died. Cheap enough to
    call in every wait: it probes at most every `POLL_INTERVAL_S`.

    Raises:
        PeerFailed: "rank k (host, pid N) failed: <its error>" or "... died ...".
    """
    dup = _state.get("comm")
    if dup is None or _state["rank"] != 0:
        return
    now = time.monotonic()
    if now - _state["last_poll"] < POLL_INTERVAL_S:
        return
    _state["last_poll"] = now
    status = MPI.Status()
    while dup.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
        source, tag = status.Get_source(), status.Get_tag()
        data = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
        dup.Recv([data, MPI.BYTE], source=source, tag=tag)
        if tag == _FINISHED:
            _state["finished"].add(source)
            continue
        raise PeerFailed(f"{describe(source)} failed: {data.tobytes().decode(errors='replace')}")
    if _state["training"] and now - _state["last_census"] >= CENSUS_INTERVAL_S:
        _state["last_census"] = now
        dead = [k for k in _local_peers() if k not in _state["finished"] and not _alive(k)]
        if dead:
            raise PeerFailed(
                "; ".join(f"{describe(k)} died" for k in dead)
                + " (its process is gone without a report: killed, or crashed in native code)"
            )


def _local_peers() -> list[int]:
    """The other ranks on this node."""
    host = socket.gethostname()
    return [k for k, (h, _) in enumerate(_state["peers"]) if h == host and k != _state["rank"]]


def _alive(rank: int) -> bool:
    state = _process_state(_state["peers"][rank][1])
    return state is not None and state not in "ZX"


def census() -> str:
    """The ranks on this node whose process has died or is stopped, in words ("" when
    every local rank runs, or the table is not installed); what a watchdog timeout or an
    MPI error adds to its message."""
    if not _state.get("peers"):
        return ""
    found = []
    for rank in _local_peers():
        state = _process_state(_state["peers"][rank][1])
        if state is None or state in "ZX":
            if rank not in _state["finished"]:
                found.append(f"{describe(rank)} died")
        elif state in "Tt":
            found.append(f"{describe(rank)} is stopped (SIGSTOP or a debugger)")
    if not found:
        return ""
    remote = len(_local_peers()) + 1 < len(_state["peers"])
    return "; ".join(found) + (" (ranks on other nodes not checked)" if remote else "")


def _process_state(pid: int) -> str | None:
    """The state letter of `/proc/<pid>/stat` (R, S, D, T, Z, ...), None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
