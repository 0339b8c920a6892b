"""Model cards: each iteration's checkpoint gets a README.md saying what it is and how it scored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spinlm.config import SpinConfig, config_to_yaml
from spinlm.io import atomic_write_text
from spinlm.logging_utils import format_value


def write_model_card(model_dir: Path, cfg: SpinConfig, iteration: int, metrics: dict[str, Any]) -> None:
    rows = "\n".join(f"| {k} | {format_value(v)} |" for k, v in metrics.items())
    text = f"""---
base_model: {cfg.model.name_or_path}
tags: [spinlm, self-play-fine-tuning, trl]
library_name: transformers
---

# SPIN iteration {iteration} of `{cfg.model.name_or_path}`

This model is iteration {iteration} of Self-Play Fine-Tuning (SPIN; Chen et al., ICML 2024,
arXiv 2401.01335) starting from `{cfg.model.name_or_path}`, trained with `spinlm`: the model after
{iteration} rounds of playing against its previous iterate on the SFT data `{cfg.data.path or cfg.task}`.

Load it with `AutoModelForCausalLM.from_pretrained("{model_dir}")`.

## Held-out metrics after this iteration

| metric | value |
|---|---|
{rows}

## Recipe

```yaml
{config_to_yaml(cfg)}```
"""
    atomic_write_text(Path(model_dir) / "README.md", text)
