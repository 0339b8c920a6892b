"""spinlm.memory: freed heap memory goes back to the OS when spinlm asks for it."""

from __future__ import annotations

import os
import sys

import pytest

from spinlm.memory import _libc, release_free_memory

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _libc() is None, reason="needs Linux with glibc"
)


def _rss_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_release_returns_free_heap_pages_to_the_os() -> None:
    # 3,000 blocks of 64 KiB (below glibc's initial 128 KiB mmap threshold: they live on the heap); keeping
    # every 16th pins the heap's top, so freeing the rest leaves ~176 MiB of free pages inside the heap that
    # glibc does not return by itself.
    blocks = [bytes(65536) for _ in range(3000)]
    kept = blocks[::16]
    del blocks
    before = _rss_bytes()
    assert release_free_memory()
    released = before - _rss_bytes()
    assert released > 64 * 2**20, f"only {released / 2**20:.0f} MiB released"
    assert len(kept) == 188  # still alive: the test measured free pages, not a shrunk heap
