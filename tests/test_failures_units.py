"""Unit tests of issue 18's pieces: naming a failed, dead or stopped rank
(`hpcrl.comm.failures`) and turning a full disk into one error (`hpcrl.storage.space`)."""

from __future__ import annotations

import errno
import signal
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from hpcrl.storage import space


@pytest.fixture
def peers():
    """`failures` installed on COMM_SELF with two fake local peers: one whose process has
    exited (rank 1) and one stopped by SIGSTOP (rank 2)."""
    from mpi4py import MPI

    from hpcrl.comm import failures

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stopped = subprocess.Popen(["sleep", "60"])
    stopped.send_signal(signal.SIGSTOP)
    time.sleep(0.1)
    failures.install(MPI.COMM_SELF)
    host = socket.gethostname()
    failures._state["peers"] += [(host, gone.pid), (host, stopped.pid)]
    try:
        yield failures, gone.pid, stopped.pid
    finally:
        failures.uninstall()
        stopped.kill()
        stopped.wait()


def test_census_names_dead_and_stopped_ranks_of_this_node(peers):
    failures, gone, stopped = peers
    host = socket.gethostname()
    text = failures.census()
    assert f"rank 1 ({host}, pid {gone}) died" in text
    assert f"rank 2 ({host}, pid {stopped}) is stopped" in text
    assert failures.describe(2) == f"rank 2 ({host}, pid {stopped})"


def test_poll_raises_for_a_dead_rank_while_training_only(peers):
    failures, gone, _ = peers
    failures._state["last_census"] = 0.0
    with pytest.raises(failures.PeerFailed, match=rf"rank 1 \(.*pid {gone}\) died"):
        failures.poll()
    failures._state.update(last_census=0.0, last_poll=0.0)
    failures._state["finished"].add(1)  # it said it had finished before it left
    failures.poll()
    failures._state.update(last_census=0.0, last_poll=0.0, training=False)
    failures._state["finished"].clear()
    failures.poll()  # after training (evaluation, shutdown) ranks leave: no census


def test_full_errno_reads_oserror_and_h5py_messages():
    assert space.full_errno(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
    assert space.full_errno(OSError(errno.EDQUOT, "Disk quota exceeded")) == errno.EDQUOT
    h5 = RuntimeError(
        "Can't decrement id ref count (file write failed: filename = "
        "'/x/traj/rank-1.h5', errno = 28, error message = 'No space left')"
    )
    assert space.full_errno(h5) == errno.ENOSPC
    assert space.full_errno(OSError(errno.EACCES, "Permission denied")) is None
    assert space.full_errno(RuntimeError("errno = 2")) is None


def test_guard_turns_a_full_disk_into_one_line_naming_the_file(tmp_path):
    with pytest.raises(space.DiskFullError) as exc:
        with space.guard(tmp_path / "run.h5"):
            raise OSError(errno.ENOSPC, "No space left on device")
    text = str(exc.value)
    assert "\n" not in text and "no space left on device (ENOSPC)" in text
    assert str(tmp_path / "run.h5") in text and "df -h" in text
    assert exc.value.exit_code == 1
    with pytest.raises(space.DiskFullError, match="disk quota exceeded .EDQUOT. writing '/q/f.h5'"):
        with space.guard(tmp_path / "other.h5"):
            raise RuntimeError("write failed: filename = '/q/f.h5', errno = 122, message")
    with pytest.raises(OSError, match="Permission"):
        with space.guard(tmp_path):
            raise OSError(errno.EACCES, "Permission denied")


def test_a_full_disk_frees_the_runs_space_reserve(tmp_path):
    """Rank 0 sets RESERVE_BYTES aside in the run directory; another rank only notes the
    file. The first DiskFullError, on any rank, frees it, so that run.h5 can still write
    its metadata whole and close."""
    reserve = tmp_path / space.RESERVE_NAME
    space.reserve(tmp_path, create=True)
    assert reserve.stat().st_size == space.RESERVE_BYTES
    space.release()
    assert not reserve.exists()
    space.reserve(tmp_path, create=True)
    space.reserve(tmp_path, create=False)  # as another rank of the same run sees it
    assert reserve.exists()
    with pytest.raises(space.DiskFullError):
        with space.guard(tmp_path / "run.h5"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not reserve.exists()
    space.release()  # again: nothing left to free


def test_errors_python_cannot_raise_are_recorded_then_raised_by_the_next_guard(
    tmp_path, monkeypatch
):
    """h5py reports a failed write in an object's deallocation, where Python can only print
    it: the hook records it (nothing printed) and the next `guard` raises it."""
    printed = []
    monkeypatch.setattr(space, "_previous_hook", printed.append)
    monkeypatch.setattr(sys, "unraisablehook", space._unraisable)

    class Dealloc:
        def __init__(self, text):
            self.text = text

        def __del__(self):
            raise RuntimeError(self.text)

    Dealloc("flush failed: filename = '/d/traj.h5', errno = 28, oops")
    assert printed == []
    with pytest.raises(space.DiskFullError, match="writing '/d/traj.h5'"):
        with space.guard(tmp_path / "x.h5"):
            pass
    with space.guard(tmp_path / "x.h5"):  # raised once, then cleared
        pass
    Dealloc("not about space")
    assert [str(u.exc_value) for u in printed] == ["not about space"]


def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one(tmp_path, monkeypatch):
    from hpcrl.storage import checkpoints as ckpt

    first = ckpt.write_checkpoint(tmp_path, 10, {"q": np.zeros(3)}, {"env_steps": 10}, keep=3)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.File, "create_dataset", full)
    with pytest.raises(space.DiskFullError):
        ckpt.write_checkpoint(tmp_path, 20, {"q": np.ones(3)}, {"env_steps": 20}, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.h5", "step-10.h5"]
    assert (tmp_path / "latest.h5").resolve() == first.resolve()
    monkeypatch.undo()
    ckpt.load_checkpoint(first)


def test_a_checkpoint_whose_hdf5_structures_are_damaged_is_skipped(tmp_path, monkeypatch):
    """A flipped byte in HDF5's own metadata surfaces as a RuntimeError from h5py ("Object
    visitation failed"), not an OSError: the checkpoint is damaged, and a resume falls back
    to the previous one (found by benchmarks/faults.py on an Ape-X checkpoint)."""
    from hpcrl.errors import CheckpointError
    from hpcrl.storage import checkpoints as ckpt

    path = ckpt.write_checkpoint(tmp_path, 10, {"q": np.zeros(3)}, {"env_steps": 10}, keep=3)

    def damaged(*args, **kwargs):
        raise RuntimeError("Object visitation failed (actual len exceeds EOA)")

    monkeypatch.setattr(h5py.Group, "visititems", damaged)
    with pytest.raises(CheckpointError, match="cannot be read: Object visitation failed"):
        ckpt.load_checkpoint(path)
