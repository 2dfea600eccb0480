"""Keep the C allocator from handing freed transfer buffers back to the kernel.

A node moves objects in chunks of about 1 MiB: gRPC's read buffers, the messages,
the bytes handed to hashing and to the spool file. With glibc's defaults every
thread's arena gives memory at its top back to the kernel as soon as more than a
little is free (``madvise(MADV_DONTNEED)`` / ``sbrk``), so the next chunk's buffer
is fresh memory again: a page fault and a zeroed page for every 4 KiB of every
chunk, in both nodes. Measured on a 150 MiB transfer (bench/README.md, "Transfer
CPU"), that was about a quarter of the two nodes' CPU time.

:func:`keep_freed_memory` raises the trim threshold (free memory kept at an arena's
top before it is returned) and the mmap threshold (allocations below it come from
the arenas, so they are reused instead of being mapped and unmapped each time),
and limits the arenas to two. What a node holds stays bounded by what it used at
its peak plus the trim threshold per arena: a 2 GiB transfer peaked at 159 / 154
MiB (hospital / factory) with these settings, as without them; with 64 MiB and one
arena per thread it was 199 / 245 MiB.

Only for glibc (Linux); elsewhere, or when the operator already chose malloc
tunables through ``GLIBC_TUNABLES``, nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
TRIM_THRESHOLD = 16 * 1024 * 1024
MMAP_THRESHOLD = 4 * 1024 * 1024
ARENA_MAX = 2  # what each arena keeps adds up: few arenas bound it (the GIL serializes anyway)


def keep_freed_memory() -> bool:
    """Set the thresholds (see the module docstring); True when they were set."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        log.debug("malloc tunables set by GLIBC_TUNABLES; allocator left as configured")
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no such thresholds)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(
        mallopt(param, value)
        for param, value in (
            (M_ARENA_MAX, ARENA_MAX),
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        )
    )
    if not ok:
        log.warning("could not set the allocator's thresholds; transfers cost more CPU")
    return ok
