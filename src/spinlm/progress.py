"""Progress of long stages (generation, scoring, training, evaluation) that reaches a terminal and a log.

On a terminal, a tqdm bar as usual. When the output is not a terminal (`spinlm run ... > run.log 2>&1`, how long
runs are run), tqdm draws nothing; instead one line is logged through the `spinlm` logger every
`INTERVAL` seconds (from a heartbeat thread, so also while nothing finishes) (`progress_seconds` in the config, default 30) with done/total, rate and ETA, and a last
line when a stage that logged ends:

    generate: 384/8000 prompts (5%), 6.21 prompts/s, ETA 20m26s (prompts_s=6.2, tokens_s=403)

    bar = Progress(total=len(prompts), desc="generate", unit="prompt")
    bar.update(1); bar.set_postfix(loss="0.69"); bar.close()
    for batch in track(batches, total=len(batches), desc="score", unit="batch"): ...
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

log = logging.getLogger("spinlm")
T = TypeVar("T")

INTERVAL = 30.0  # seconds between progress lines when not on a terminal; 0 disables (spinlm.runtime sets it)


def set_interval(seconds: float) -> None:
    global INTERVAL
    INTERVAL = float(seconds)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """A tqdm bar that, when tqdm draws nothing (not a terminal), logs a line every `INTERVAL` seconds."""

    def __init__(
        self, total: int, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start_n = initial
        self.bar = tqdm(
            total=total, initial=initial, desc=desc, unit=unit, leave=False, disable=None if enabled else True
        )
        self.interval = INTERVAL
        self.lines = enabled and bool(self.bar.disable) and self.interval > 0 and total > 0
        self.start = self.last = time.monotonic()
        self.logged_n: int | None = None  # progress at the last line logged
        self.postfix: dict[str, Any] = {}
        # A heartbeat thread logs even when nothing finished for a while (a batch of long generations).
        self._stop = threading.Event()
        if self.lines:
            threading.Thread(target=self._beat, name=f"progress {desc}", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(max(self.interval / 2, 1.0)):
            if self.lines and time.monotonic() - self.last >= self.interval:
                self._log()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.bar.update(n)
        if self.lines and time.monotonic() - self.last >= self.interval:
            self._log()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        self.bar.set_postfix(refresh=False, **values)

    def line(self) -> str:
        """`desc: done/total unit (pct), rate, ETA` (plus the postfix values)."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        pct = 100 * self.n / self.total if self.total else 100.0
        units = self.unit + ("es" if self.unit.endswith(("s", "x", "ch", "sh")) else "s")
        text = f"{self.desc}: {self.n}/{self.total} {units} ({pct:.0f}%), {rate:.3g} {units}/s"
        if self.n < self.total:
            text += f", ETA {_duration((self.total - self.n) / rate)}" if rate > 0 else ", ETA unknown"
        else:
            text += f", done in {_duration(elapsed)}"
        if self.postfix:
            text += " (" + ", ".join(f"{k}={v}" for k, v in self.postfix.items()) + ")"
        return text

    def _log(self) -> None:
        self.last = time.monotonic()
        self.logged_n = self.n
        log.info("%s", self.line())

    def close(self) -> None:
        self._stop.set()
        self.bar.close()
        if self.lines and self.logged_n is not None and self.logged_n != self.n:
            self._log()  # the last line of a stage that logged: where it ended
        self.lines = False


def track(
    iterable: Iterable[T], total: int, desc: str, unit: str = "it", enabled: bool = True
) -> Iterator[T]:
    """Iterate with a `Progress` (closed even when the loop stops early)."""
    bar = Progress(total, desc, unit, enabled=enabled)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()
