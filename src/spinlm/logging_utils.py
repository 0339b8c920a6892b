"""Logging and progress: per-iteration TensorBoard / Weights & Biases writers and the one-screen summary.

TensorBoard logs go to `RUN_DIR/tensorboard/iteration_t/` (one run per iteration, so curves sit side by side)
and the evaluation metrics to `RUN_DIR/tensorboard/eval/` against the iteration number.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from spinlm.errors import SpinError

log = logging.getLogger("spinlm")


class _WandbWriter:
    """The one method of SummaryWriter the trainer uses, sent to Weights & Biases."""

    def __init__(self, run: Any, prefix: str) -> None:
        self.run, self.prefix = run, prefix

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({f"{self.prefix}{tag}": value})

    def close(self) -> None:
        pass


class IterationLogger:
    def __init__(self, run_dir: Path, report_to: list[str], enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.report_to = [r for r in report_to if r != "none"] if enabled else []
        self._writers: dict[str, Any] = {}
        self._wandb: Any = None
        if "wandb" in self.report_to:
            try:
                import wandb
            except ImportError as e:
                raise SpinError(
                    "report_to includes wandb but wandb is not installed",
                    hint="pip install 'spinlm[wandb]' or drop wandb from report_to",
                ) from e
            self._wandb = wandb.init(project="spinlm", name=self.run_dir.name, dir=str(self.run_dir))

    def _tb(self, name: str) -> Any:
        if name not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[name] = SummaryWriter(log_dir=str(self.run_dir / "tensorboard" / name))
        return self._writers[name]

    def writer(self, iteration: int) -> Any:
        """A scalar writer for iteration `iteration`'s training curves (None when nothing is reported)."""
        if "tensorboard" in self.report_to:
            return self._tb(f"iteration_{iteration}")
        if self._wandb is not None:
            return _WandbWriter(self._wandb, "")
        return None

    def log_metrics(self, iteration: int, metrics: dict[str, Any]) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and v is not None}
        if "tensorboard" in self.report_to:
            w = self._tb("eval")
            for k, v in numeric.items():
                w.add_scalar(f"eval/{k}", v, iteration)
            w.flush()
        if self._wandb is not None:
            self._wandb.log({f"eval/{k}": v for k, v in numeric.items()} | {"iteration": iteration})

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        if self._wandb is not None:
            self._wandb.finish()


SUMMARY_KEYS = ("discriminability", "reward_margin", "loglik_real", "gen_len_mean", "pairs_identical_pairs")


def format_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_iteration(t: int, metrics: dict[str, Any], primary: str) -> None:
    """One screen after each iteration: the primary metric first, then the game's vital signs."""
    keys = [primary] + [k for k in SUMMARY_KEYS if k in metrics and k != primary] + ["seconds"]
    parts = [f"{k}={format_value(metrics.get(k))}" for k in keys]
    log.info("iteration %d | %s", t, " | ".join(parts))
