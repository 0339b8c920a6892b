"""Pairs stage: chosen = the dataset's reply y, rejected = the opponent's sample y', plus the opponent's
log-probabilities of both, computed once per iteration.

Pairs are saved as `iteration_t/pairs.jsonl` in TRL's conversational preference format
(`prompt` / `chosen` / `rejected` message lists), so any TRL trainer reads them; the opponent's scores sit in
`ref_chosen_logps` / `ref_rejected_logps`, the column names TRL's `DPOTrainer` uses for precomputed reference
log-probs. Storing them is what lets `spinlm train` hold a single model in memory (the official code keeps a
second full model and scores it at every step).

A pair whose sample equals the real reply contributes exactly zero gradient (both log-ratios cancel); such
pairs are kept, counted and reported as `identical_pairs`.

The log-probs themselves come from `spinlm.logps` (the forward pass training shares).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spinlm.data import Example, jsonl_rows
from spinlm.errors import SpinError
from spinlm.generation import Generation


def build_pairs(examples: Sequence[Example], generations: Sequence[Generation], iteration: int) -> list[dict]:
    """One pair per example: (prompt, chosen = real reply, rejected = the opponent's sample)."""
    return [
        {
            "id": f"{iteration}-{i}",
            "iteration": iteration,
            "prompt": ex.prompt,
            "chosen": [{"role": "assistant", "content": ex.response}],
            "rejected": [{"role": "assistant", "content": g.text}],
            "rejected_finished": g.finished,
        }
        for i, (ex, g) in enumerate(zip(examples, generations))
    ]


def add_reference_logps(
    pairs: list[dict], chosen_logps: Sequence[float], rejected_logps: Sequence[float]
) -> list[dict]:
    for p, c, r in zip(pairs, chosen_logps, rejected_logps):
        p["ref_chosen_logps"] = c
        p["ref_rejected_logps"] = r
    return pairs


def chosen_text(pair: dict) -> str:
    return str(pair["chosen"][-1]["content"])


def rejected_text(pair: dict) -> str:
    return str(pair["rejected"][-1]["content"])


def pair_stats(pairs: Sequence[dict]) -> dict[str, float]:
    n = max(len(pairs), 1)
    identical = sum(chosen_text(p) == rejected_text(p) for p in pairs)
    unfinished = sum(not p.get("rejected_finished", True) for p in pairs)
    return {
        "pairs": len(pairs),
        "identical_pairs": identical,
        "identical_fraction": identical / n,
        "unfinished_generations": unfinished,
    }


IDENTICAL_WARNING_FRACTION = 0.5


def identical_pairs_warning(stats: dict[str, float], iteration: int) -> str | None:
    """A warning when most pairs are identical (sample == real reply), else None.

    Such pairs give exactly zero gradient, so the update comes from the few others, and Adam / RMSProp scale
    those few gradients up to full-size steps. Measured (docs/results/spin-vs-sft.md): from a model that
    reproduced its SFT replies, 999 of 1000 identical pairs and AdamW at lr 1e-3 took held-out exact match
    from 1.0 to 0.9 in one iteration, and to 0.14 by iteration 3.
    """
    if stats["pairs"] == 0 or stats["identical_fraction"] < IDENTICAL_WARNING_FRACTION:
        return None
    return (
        f"iteration {iteration}: {stats['identical_pairs']} of {stats['pairs']} pairs "
        f"({stats['identical_fraction']:.0%}) have a generated reply equal to the real one and give no "
        "gradient; the model already reproduces much of its SFT data (SPIN's fixed point is p = p_data). "
        "The few other pairs drive the whole update (Adam / RMSProp scale it up): consider stopping here "
        "or lowering train.learning_rate for this iteration"
    )


PAIR_KEYS = ("prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps")


def read_pairs_file(path: Path) -> list[dict]:
    """The pairs of a `spinlm generate` file, every row checked: a one-line SpinError names the file, line and
    field of an empty file, a line that is not JSON, a missing column or a value of the wrong type."""
    hint = "write pairs with `spinlm generate`"
    path = Path(path)
    if not path.is_file():
        raise SpinError(f"pairs file not found: {path}", hint=hint)
    rows = []
    for where, _, row in jsonl_rows(path):
        if not isinstance(row, dict):
            raise SpinError(f"{where}: a pair must be a JSON object; got {type(row).__name__}", hint=hint)
        missing = [k for k in PAIR_KEYS if k not in row]
        if missing:
            raise SpinError(f"{where}: the pair lacks {', '.join(missing)}", hint=hint)
        _check_pair(row, where, hint)
        rows.append(row)
    if not rows:
        raise SpinError(f"{path} holds no pairs (the file is empty)", hint=hint)
    return rows


def _check_pair(row: dict, where: str, hint: str) -> None:
    prompt = row["prompt"]
    ok = isinstance(prompt, list) and bool(prompt) and all(_is_message(m) for m in prompt)
    if not ok:
        raise SpinError(
            f"{where}: 'prompt' must be a non-empty list of {{role, content}} messages", hint=hint
        )
    for side in ("chosen", "rejected"):
        value = row[side]
        if not (isinstance(value, list) and value and _is_message(value[-1])):
            raise SpinError(f"{where}: '{side}' must be a list ending with an assistant message", hint=hint)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        value = row[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise SpinError(f"{where}: '{key}' must be a finite number; got {value!r}", hint=hint)


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
