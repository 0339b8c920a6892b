"""`spin demo`: the whole game on a laptop CPU in about a minute and a half, with nothing downloaded.

1. Builds a character-level tokenizer with a chat template and a tiny Llama (2 layers, hidden 128).
2. SFT-trains it on 8000 problems of the built-in `addition` task ("07+38=" -> "045") at a constant learning
   rate until it answers SFT_TARGET (25%) of 256 training problems, so the SFT model answers some problems
   and misses others, as a real SFT checkpoint does (how it got there: sft_model/warmup.json).
3. Plays 3 SPIN iterations on the same 8000 SFT prompts (`spin.loop.run`) and prints a table per iteration:
   exact match on 500 held-out problems, held-out reward accuracy (discriminability), reward margin, seconds.

Departures from the paper, for a 2-core CPU: a tiny model instead of zephyr-7b; AdamW at lr 5e-4, then 1e-4
for iterations 2 and 3, instead of RMSProp at 5e-7, then 1e-7 (the same 5x drop); beta 1.0 instead of 0.1;
1 epoch per iteration instead of 2. What we measured on the way (docs/results.md, "The demo"): with beta 0.1,
or with the same lr in every iteration, or from an SFT model that had stopped improving, this tiny model got
worse, not better (the real replies' likelihood fell with the generated ones'). And SPIN here is not better
than training longer on the SFT data: `python benchmarks/demo_seeds.py` puts continued SFT, at the same number
of optimizer steps, next to the demo for several seeds.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from spin.config import SpinConfig, load_config
from spin.io import write_json
from spin.modeling import build_char_tokenizer, build_tiny_model, save_model

log = logging.getLogger("spin")

# SFT warm-up: AdamW at a constant lr, stopped once greedy exact match on SFT_CHECK_PROMPTS training prompts
# reaches SFT_TARGET (checked every SFT_CHECK_EVERY steps), at most SFT_MAX_STEPS steps. A fixed step budget
# left some seeds on the long loss plateau that precedes learning addition and others nearly converged; the
# target puts every seed's starting model at the same place: it answers about a quarter of the problems.
SFT_TARGET = 0.25
SFT_MAX_STEPS = 2000
SFT_CHECK_EVERY = 50
SFT_CHECK_PROMPTS = 256
SFT_LR = 1e-3
SFT_BATCH = 32
SFT_HIDDEN = 128


def demo_config(output_dir: str, seed: int, overrides: list[str] | None = None) -> SpinConfig:
    """The demo's SPIN recipe (also shipped as recipes/cpu-tiny.yaml)."""
    return load_config(
        None,
        overrides,
        output_dir=output_dir,
        seed=seed,
        task="addition",
        **{
            "model.name_or_path": str(Path(output_dir) / "sft_model"),
            "data.num_examples": 8000,
            "data.eval_size": 500,
            "generation.max_new_tokens": 8,
            "generation.batch_size": 256,
            "generation.shard_size": 1024,
            "train.iterations": 3,
            "train.learning_rate": [5e-4, 1e-4, 1e-4],
            "train.beta": 1.0,
            "train.epochs": 1,
            "train.optimizer": "adamw",
            "train.batch_size": 32,
            "train.max_length": 64,
            "train.save_steps": 50,
            "eval.batch_size": 256,
        },
    )


def build_sft_model(cfg: SpinConfig) -> dict[str, Any]:
    """Train the demo's starting SFT model on the task's training split; save it to cfg.model.name_or_path."""
    from spin.loop import load_examples

    out = Path(str(cfg.model.name_or_path))
    if (out / "config.json").exists():
        return {"sft_seconds": 0.0, "reused": True}  # e.g. a second `spin demo` in the same folder
    t0 = time.perf_counter()
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=SFT_HIDDEN, num_layers=2, num_heads=4, seed=cfg.seed)
    train, _held_out, _ = load_examples(cfg, tokenizer)
    from spin.generate import generate_responses
    from spin.tasks import get_task
    from spin.train import sft_train

    check = train[:SFT_CHECK_PROMPTS]  # training prompts: the warm-up never looks at the held-out set
    # One batch of prompts: name the engine, so no probe timing and no log line at every check.
    check_gen = dataclasses.replace(cfg.generation, engine="refill")
    curve: list[tuple[int, float]] = []

    def reached_target(step: int) -> bool:
        gens = generate_responses(
            model, tokenizer, [ex.prompt for ex in check], check_gen, cfg.seed, greedy=True, desc="sft check"
        )
        em = get_task("addition").score(check, [g.text for g in gens])["exact_match"]
        curve.append((step, em))
        log.info("sft warm-up: step %d, exact match on %d training prompts %.3f", step, len(check), em)
        return em >= SFT_TARGET

    losses = sft_train(
        model,
        tokenizer,
        [ex.prompt for ex in train],
        [ex.response for ex in train],
        steps=SFT_MAX_STEPS,
        lr=SFT_LR,
        batch_size=SFT_BATCH,
        seed=cfg.seed,
        desc="sft warm-up",
        lr_scheduler="constant",
        stop=reached_target,
        check_every=SFT_CHECK_EVERY,
    )
    info = {
        "sft_seconds": time.perf_counter() - t0,
        "steps": len(losses),
        "target": SFT_TARGET,
        "final_loss": sum(losses[-20:]) / min(20, len(losses)),
        "curve": [{"step": step, "train_exact_match": em} for step, em in curve],
    }
    save_model(model, tokenizer, out)
    write_json(out / "warmup.json", info)  # how this SFT model was made, next to its weights
    return info


def run_demo(
    output_dir: str = "runs/demo", seed: int = 0, overrides: list[str] | None = None
) -> dict[str, Any]:
    from spin.io import claim_output_dir
    from spin.loop import run
    from spin.runtime import apply_settings

    cfg = demo_config(output_dir, seed, overrides)
    apply_settings(cfg)  # torch threads (cfg.threads), progress lines
    claim_output_dir(Path(output_dir), what="--output-dir")  # before the SFT warm-up writes sft_model/
    t0 = time.perf_counter()
    sft = build_sft_model(cfg)
    log.info(
        "SFT model ready in %.1fs, %s steps (final loss %.3f)",
        sft["sft_seconds"],
        sft.get("steps", "reused"),
        sft.get("final_loss", float("nan")),
    )
    summary = run(cfg)
    summary["demo_seconds"] = time.perf_counter() - t0
    print(format_table(summary))
    print(
        f"total {summary['demo_seconds']:.0f}s; run folder: {output_dir} (report: {output_dir}/report.html)"
    )
    return summary


def format_table(summary: dict[str, Any]) -> str:
    primary = summary["primary_metric"]
    head = f"{'iteration':>9} | {primary:>12} | {'reward acc':>10} | {'margin':>8} | {'seconds':>7}"
    lines = [head, "-" * len(head)]
    for row in summary["iterations"]:
        m = row["metrics"]
        cells = [
            _fmt(m.get(primary), ".3f"),
            _fmt(m.get("discriminability"), ".3f"),
            _fmt(m.get("reward_margin"), ".3f"),
            _fmt(m.get("seconds"), ".1f"),
        ]
        lines.append(
            f"{row['iteration']:>9} | {cells[0]:>12} | {cells[1]:>10} | {cells[2]:>8} | {cells[3]:>7}"
        )
    return "\n".join(lines)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)
