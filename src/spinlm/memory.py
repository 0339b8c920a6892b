"""Process memory on CPU: keep glibc's heap from growing with fragmentation during training.

What it does: `limit_heap_growth()` sets glibc's mmap threshold to 1 MiB with `mallopt` (the same as the
environment variable `MALLOC_MMAP_THRESHOLD_=1048576`). PyTorch allocates CPU tensors with malloc; by
default glibc raises its mmap threshold up to 32 MiB as large blocks are freed, so activation tensors of a
few MiB land on the heap, and with batch shapes changing every step the heap fragments and the resident
set keeps the high-water mark of every shape seen. With a fixed 1 MiB threshold, tensors of 1 MiB and more
are mmapped and go back to the OS when freed, so the resident set follows the live tensors
(docs/results/training.md, "Memory on a real model", has the measurements). Small allocations are unchanged.

Where it departs from defaults: only on Linux with glibc, only once per process, and only when the user has
not chosen a threshold through the environment (`MALLOC_MMAP_THRESHOLD_` set: left alone). Elsewhere it is
a no-op. `spinlm` calls it at the start of every command.

    from spinlm.memory import limit_heap_growth
    limit_heap_growth()
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20
_done = False


def limit_heap_growth() -> bool:
    """Set glibc's mmap threshold to 1 MiB (once); True when it was set by this call."""
    global _done
    if _done or not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    _done = True
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    log.debug("malloc mmap threshold set to %d bytes: %s", MMAP_THRESHOLD_BYTES, ok)
    return ok
