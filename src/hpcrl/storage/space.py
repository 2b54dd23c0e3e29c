"""Running out of space (ENOSPC, or EDQUOT on a full quota) anywhere hpcrl writes, as one
error instead of a segfault.

HDF5 writes its chunk and metadata caches when it evicts or closes an object, so a full
disk often surfaces first in the deallocation of a temporary h5py object, where Python
can only print an "Exception ignored" trace (hundreds of them), and later as a
segmentation fault inside a library left in a broken state. Here:

- `install()` routes those ignored errors to a record instead of stderr when they are a
  full file system's (`sys.unraisablehook`; any other one is printed as before);
- `guard(path)` wraps each write (trajectories, run.h5, checkpoints, TensorBoard files):
  an `OSError` or h5py `RuntimeError` carrying ENOSPC/EDQUOT, or one recorded since the
  last write, becomes `DiskFullError`, one line naming the file and what to free.

`hpcrl.runner.guarded` prints it, reports it to rank 0 (which marks the run `failed` if
run.h5 can still be written) and aborts the job. Checkpoints are written to a temporary
file and renamed, so the last intact one stays intact (`hpcrl.storage.checkpoints`).

A write that fails half-way can leave run.h5's HDF5 metadata inconsistent (the file then
does not open: measured with A2C filling a tmpfs with run.h5 rows). So `reserve(run_dir)`
sets `RESERVE_BYTES` aside in the run directory when a run starts, and `DiskFullError`
frees them (`release`): run.h5 then has room to write its metadata whole, its status
`failed`, and close.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from hpcrl.errors import UserError

FULL_ERRNOS = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT"}
_ERRNO_TEXT = re.compile(r"errno = (\d+)")
_FILENAME_TEXT = re.compile(r"filename = '([^']*)'")

RESERVE_NAME = ".hpcrl-space-reserve"  # in the run directory, while a run is live
RESERVE_BYTES = 256 * 1024  # run.h5's metadata written whole after a full disk (KiBs)

_recorded: list[str] = []  # messages of full-disk errors Python could not raise
_reserve: Path | None = None  # this process's view of the run's reserve file
_previous_hook = None
_previous_excepthook = None
_previous_thread_hook = None


def reserve(run_dir: str | Path, create: bool) -> None:
    """Set `RESERVE_BYTES` of the run directory's file system aside (`create`: rank 0;
    the other ranks only note the file, so that whichever rank meets a full disk frees
    it). A file system already too full for it is left to the first write to report."""
    global _reserve
    path = Path(run_dir) / RESERVE_NAME
    _reserve = path
    if not create:
        return
    try:
        with open(path, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, RESERVE_BYTES)
    except OSError as exc:
        path.unlink(missing_ok=True)
        if full_errno(exc) is None and exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def release() -> None:
    """Free the reserve (a write failed for lack of space, or the run ended)."""
    global _reserve
    if _reserve is not None:
        with contextlib.suppress(OSError):
            _reserve.unlink(missing_ok=True)
        _reserve = None


class DiskFullError(UserError):
    """A write failed because the file system (or the user's quota) is full. Creating it
    frees the run's space reserve (`release`), so run.h5 can still be closed whole."""

    exit_code = 1

    def __init__(self, path: str | Path, code: int):
        release()
        where = Path(path)
        what = "disk quota exceeded" if code == errno.EDQUOT else "no space left on device"
        super().__init__(
            f"{what} ({FULL_ERRNOS.get(code, code)}) writing {str(where)!r}: free space on its "
            f"file system (df -h {str(where.parent)!r}), or turn off record_trajectories, "
            "or use another --run-dir; the last intact checkpoint is kept (--resume)"
        )


def full_errno(exc: BaseException) -> int | None:
    """ENOSPC or EDQUOT when `exc` says a write failed for lack of space, else None (an
    `OSError`'s errno, or the `errno = N` an h5py message carries)."""
    code = getattr(exc, "errno", None)
    if code in FULL_ERRNOS:
        return code
    match = _ERRNO_TEXT.search(str(exc))
    if match and int(match.group(1)) in FULL_ERRNOS:
        return int(match.group(1))
    return None


def install() -> None:
    """Record full-disk errors raised where Python cannot raise them (h5py objects'
    deallocation: Cython prints the traceback through `sys.excepthook`, then reports it
    through `sys.unraisablehook`; TensorBoard's writer thread, through
    `threading.excepthook`) instead of printing each one; others print as before."""
    global _previous_hook, _previous_excepthook, _previous_thread_hook
    if _previous_hook is None:
        _previous_hook, _previous_excepthook = sys.unraisablehook, sys.excepthook
        _previous_thread_hook = threading.excepthook
        sys.unraisablehook, sys.excepthook = _unraisable, _excepthook
        threading.excepthook = _thread_excepthook


def _unraisable(unraisable) -> None:
    exc = unraisable.exc_value
    if exc is not None and full_errno(exc) is not None:
        _recorded.append(str(exc))
        return
    _previous_hook(unraisable)


def _excepthook(kind, value, tb) -> None:
    if full_errno(value) is not None and _in_h5py(tb):
        _recorded.append(str(value))
        return
    _previous_excepthook(kind, value, tb)


def _thread_excepthook(args) -> None:
    if args.exc_value is not None and full_errno(args.exc_value) is not None:
        _recorded.append(str(args.exc_value))
        return
    _previous_thread_hook(args)


def _in_h5py(tb) -> bool:
    while tb is not None:
        if "h5py" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


@contextlib.contextmanager
def guard(path: str | Path) -> Iterator[None]:
    """Turn a full file system during the block (or recorded before it) into
    `DiskFullError` naming `path` (or the file HDF5 names).

    Raises:
        DiskFullError: a write failed with ENOSPC or EDQUOT.
    """
    try:
        yield
    except (OSError, RuntimeError) as exc:
        code = full_errno(exc)
        if code is None:
            raise
        raise DiskFullError(_file_named(str(exc)) or path, code) from None
    if _recorded:
        text = _recorded[0]
        _recorded.clear()
        raise DiskFullError(_file_named(text) or path, full_errno(RuntimeError(text)))


def _file_named(text: str) -> str | None:
    match = _FILENAME_TEXT.search(text)
    return match.group(1) if match else None
