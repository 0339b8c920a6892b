"""Process-wide settings applied at the start of every entry point (run, generate, train, eval): torch's CPU
threads (`threads`) and the progress-line interval (`progress_seconds`).

Threads: unset means the cores this process may run on (`os.sched_getaffinity`), not torch's default; two
jobs on one machine that each use every core run several times slower than either alone (measured: the
refill engine took 55-77 s on a 2-prompt probe with 2 threads beside another 2-thread job, 2.5 s with 1).

    apply_settings(cfg)
"""

from __future__ import annotations

import logging
import os
from typing import Any

from spinlm.progress import set_interval

log = logging.getLogger("spinlm")


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def apply_settings(cfg: Any) -> int:
    """Set torch's intra-op threads (cfg.threads, default `available_cores()`) and the progress interval;
    returns the number of threads."""
    import torch

    threads = cfg.threads or available_cores()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.debug("torch threads: %d", threads)
    set_interval(cfg.progress_seconds)
    return threads
