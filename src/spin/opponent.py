"""The opponent's side of iteration t: its samples y' and the reference log-probs stored with each pair.

Default (the paper): the opponent is p_{t-1}, the latest iterate; it samples y' for every training prompt
and scores both y (real) and y' (its own sample): `ref_* = log p_{t-1}(.|x)`.

Earlier iterations' pairs mixed into iteration t (`train.mix_previous`, the official recipe mixes the
previous iteration's) are re-scored by the current opponent, because the loss at iteration t is defined
against p_{t-1}; the scores are computed once here and reused for every epoch.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from spin.config import SpinConfig
from spin.data import Example
from spin.generate import generate_responses
from spin.io import read_jsonl
from spin.pairs import add_reference_logps, build_pairs, chosen_text, rejected_text, score_logps


def mixed_pairs(run_dir: Path, t: int, cfg: SpinConfig) -> list[dict]:
    """Pairs of earlier iterations mixed into iteration t (window, fraction), to be re-scored."""
    mixed: list[dict] = []
    for s in range(max(1, t - cfg.train.mix_previous.window), t):
        rows = [r for r in read_jsonl(run_dir / f"iteration_{s}" / "pairs.jsonl") if r["iteration"] == s]
        rng = random.Random(cfg.seed * 7919 + t * 31 + s)
        keep = sorted(rng.sample(range(len(rows)), round(cfg.train.mix_previous.fraction * len(rows))))
        mixed += [rows[i] for i in keep]
    return mixed


def make_iteration_pairs(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    cfg: SpinConfig,
    t: int,
    run_dir: Path,
    accelerator: Any = None,
) -> list[dict]:
    """All training pairs of iteration t with reference log-probs (`model` is the opponent p_{t-1})."""
    it_dir = run_dir / f"iteration_{t}"
    gens = generate_responses(
        model,
        tokenizer,
        [ex.prompt for ex in examples],
        cfg.generation,
        seed=cfg.seed * 1000 + t,
        shard_dir=it_dir / "generations",
        desc=f"generate {t}",
        accelerator=accelerator,
    )
    pairs = build_pairs(examples, gens, iteration=t) + mixed_pairs(run_dir, t, cfg)
    prompts = [p["prompt"] for p in pairs]

    def score(responses: list[str], desc: str) -> list[float]:
        tc = cfg.train
        return score_logps(
            model,
            tokenizer,
            prompts,
            responses,
            tc.max_length,
            cfg.eval.batch_size,
            tc.length_normalize,
            desc=desc,
        )

    return add_reference_logps(
        pairs,
        score([chosen_text(p) for p in pairs], f"score real {t}"),
        score([rejected_text(p) for p in pairs], f"score generated {t}"),
    )
