"""Process memory on CPU: give freed heap memory back to the OS between training steps and stages.

What it does: `release_free_memory()` calls glibc's `malloc_trim(0)`, which returns the free parts of the
heap to the OS (the top of the heap and, with `madvise`, free pages inside it). PyTorch allocates CPU
tensors with malloc; glibc keeps freed blocks of up to 32 MiB on the heap for reuse, which is fast (no page
faults on reuse) but lets the resident set keep the high-water mark of every batch shape seen. spinlm's
trainer trims after every optimizer step and the loop after each iteration's pairs stage, so a step's or
a stage's free memory does not carry into the next; within a step the heap works as glibc made it.

Why not a low mmap threshold (what spinlm did before): `MALLOC_MMAP_THRESHOLD_=1048576` makes every tensor
of 1 MiB or more a fresh mmap that page-faults on first touch and goes back to the OS when freed. The
resident set then follows the live tensors (peak 3.27 against 4.39 GB on 8 SmolLM2 bf16 training steps of 8
pairs), but the same steps ran 1.7x slower (12.8 against 7.5 s a step; fp32 1.5x), and a whole 256-prompt
iteration 1.5x slower (docs/results/cost.md). Where memory is short and time is not, set that variable
before starting spinlm: glibc reads it at process start and spinlm leaves it alone.

Elsewhere than Linux with glibc it is a no-op.

    from spinlm.memory import release_free_memory
    release_free_memory()
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

_LIBC: list[Any] = []  # [the loaded libc, or None where there is no glibc]


def _libc() -> Any:
    if not _LIBC:
        lib = None
        name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        if name is not None:
            try:
                lib = ctypes.CDLL(name)
                lib.malloc_trim  # noqa: B018  # glibc only (musl has none): AttributeError otherwise
            except (OSError, AttributeError):
                lib = None
        _LIBC.append(lib)
    return _LIBC[0]


def release_free_memory() -> bool:
    """Return the heap's free memory to the OS (glibc `malloc_trim(0)`); True when some was released."""
    lib = _libc()
    return bool(lib is not None and lib.malloc_trim(0))
