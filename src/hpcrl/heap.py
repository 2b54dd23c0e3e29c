"""A rank's C heap: keep freed memory for the next step instead of returning it at once.

A rank's loop makes the same numpy temporaries every step: on FrozenLake 8x8 with 8,192
copies a rank, gathered Q rows, tie-breaking uniforms and masks of 256 KiB each (8,192 x 4
float64). glibc's `malloc` adapts its thresholds to such sizes (its "dynamic mmap
threshold": after freeing an `mmap`ed block of X bytes, blocks up to X come from the heap
and the heap is trimmed when more than 2X lies free at its top). Whether a step's
temporaries then land at the top of the heap, and are handed back to the kernel and
faulted in again on every step, depends on what else was allocated before: it differs
between processes running the same code. Measured on a 2-core VM (`benchmarks/RESULTS.md`,
"A rank's heap"): one rank of two took 925,000 minor page faults in a 48M-step run, the
other 70,000; its sys time was 1.5 s of 9 s, and the other rank waited for it at the
final collective, so 2 ranks made 1.5x one rank's rate where two independent processes
made 1.96x.

`keep_freed_memory` fixes both thresholds (glibc `mallopt`, `M_MMAP_THRESHOLD` and
`M_TRIM_THRESHOLD`) at the largest values the dynamic rule would reach on a 64-bit
system: blocks under 32 MiB come from the heap, and the heap is trimmed only when more
than 64 MiB lie free at its top. A rank's resident memory can then stay up to 64 MiB above
what it uses; its measured peak grew by 6 MiB on FrozenLake 8x8 and not at all with a
10^6-state shard (`benchmarks/tabular_scale.py --million`).
Blocks of 32 MiB and more (replay buffers, large tables) are still `mmap`ed and returned
at `free`.

A user who sets glibc's own knobs (`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TOP_PAD_`, `MALLOC_MMAP_MAX_`, or `glibc.malloc.*` in `GLIBC_TUNABLES`) keeps
them: nothing is changed then, nor on a C library without `mallopt` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES  # what the dynamic rule pairs with it
USER_SETTINGS = (
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)


def keep_freed_memory() -> bool:
    """Fix this process's glibc malloc thresholds as the module docstring says (calling
    it again sets the same values).

    Returns:
        True when both thresholds were set; False when the user set glibc's own malloc
        settings, the C library has no `mallopt`, or it refused a value.
    """
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
