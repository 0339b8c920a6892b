"""Resuming a run folder: refuse a changed config that would change results.

`spin run` on an existing folder continues where it stopped (see loop.py for the stage markers). If the
folder's `config.yaml` differs from the new config in a field that changes results (model, data, sampling,
training), the run is refused with the list of differing fields; `--force` overrides. Fields that only
change bookkeeping (logging, how many iterations to play, stopping) may change freely.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from spin.config import SpinConfig
from spin.errors import SpinError

# Dotted prefixes that do not change any result already on disk.
HARMLESS = (
    "output_dir",
    "report_to",
    "push_to_hub",
    "train.iterations",
    "train.logging_steps",
    "train.save_steps",
    "eval.stop",
    "eval.num_samples",
    "eval.lm_eval",
    "generation.engine",
)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key != "data.columns":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names of result-changing fields whose values differ."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(HARMLESS)]


def check_resume_config(run_dir: Path, cfg: SpinConfig, force: bool) -> None:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return
    old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    diff = config_differences(old, cfg.to_dict())
    if diff and not force:
        shown = ", ".join(f"{k} ({_get(old, k)!r} -> {_get(cfg.to_dict(), k)!r})" for k in diff[:6])
        more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
        raise SpinError(
            f"{run_dir} holds a run with a different config: {shown}{more}",
            hint="use another output_dir, or pass --force to resume with the new values",
        )


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)  # type: ignore[assignment]
    return d
