"""The demo over several seeds, next to continued SFT at the same training budget (issue 2's check).

For each seed this runs `spinlm.demo.run_demo` (SFT warm-up to SFT_TARGET exact match on training prompts,
then 3 SPIN iterations) and then, from the same SFT model, continued SFT on the same 8000 examples with the
same optimizer, per-iteration learning rate, schedule and warmup, for the same number of optimizer steps as
each SPIN iteration, with twice SPIN's batch (a SPIN step trains B real + B generated sequences, an SFT step
2B real ones). Both are scored on the same 500 held-out problems (greedy exact match), so the table answers
two questions: does SPIN raise the task metric from iteration 0 to 3 for every seed, and does it do better
than simply training longer on the SFT data?

    python benchmarks/demo_seeds.py --out runs/demo_seeds --seeds 0 1 2

Writes OUT/results.json and OUT/results.md; OUT/seedN is each seed's demo run folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from spinlm.config import scheduled
from spinlm.demo import demo_config, run_demo
from spinlm.evaluation import evaluate_model
from spinlm.loop import load_examples
from spinlm.modeling import load_model, load_tokenizer
from spinlm.trainer import sft_train


def continued_sft(out: Path, seed: int, steps: list[int]) -> dict[str, Any]:
    """Continued SFT from OUT/sft_model: steps[t-1] steps of iteration t's lr and schedule; held-out metrics."""
    cfg = demo_config(str(out), seed)
    tok = load_tokenizer(str(cfg.model.name_or_path), cfg.model)
    model = load_model(str(cfg.model.name_or_path), cfg.model, device=torch.device("cpu"))
    train, held_out, _ = load_examples(cfg, tok)
    prompts, replies = [ex.prompt for ex in train], [ex.response for ex in train]
    metrics, seconds = [], 0.0
    for t, n in enumerate(steps, start=1):
        t0 = time.perf_counter()
        sft_train(
            model,
            tok,
            prompts,
            replies,
            steps=n,
            lr=float(scheduled(cfg.train.learning_rate, t)),
            batch_size=2 * cfg.train.batch_size,
            seed=seed * 1000 + t,
            max_length=cfg.train.max_length,
            lr_scheduler=cfg.train.lr_scheduler,
            warmup_ratio=cfg.train.warmup_ratio,
        )
        seconds += time.perf_counter() - t0
        m, _, _ = evaluate_model(model, tok, held_out, cfg, t, None)
        metrics.append(m)
    return {"metrics": metrics, "seconds_train": seconds}


def run_seed(out: Path, seed: int) -> dict[str, Any]:
    summary = run_demo(str(out), seed)
    steps = []
    for t in range(1, len(summary["iterations"])):
        rows = (out / f"iteration_{t}" / "train_log.jsonl").read_text().splitlines()
        steps.append(int(json.loads(rows[-1])["step"]))
    sft_info = json.loads((out / "sft_model" / "warmup.json").read_text())
    return {
        "seed": seed,
        "sft": sft_info,
        "demo_seconds": summary["demo_seconds"],
        "spin": [it["metrics"] for it in summary["iterations"]],
        "spin_steps": steps,
        "continued_sft": continued_sft(out, seed, steps),
    }


def table(results: list[dict[str, Any]], metric: str) -> str:
    lines = [
        f"`{metric}` on the 500 held-out problems (iteration 0 = the SFT warm-up model)",
        "",
        "| seed | SFT warm-up steps | method | iter 0 | iter 1 | iter 2 | iter 3 | demo s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        start = r["spin"][0][metric]
        spin = [m[metric] for m in r["spin"][1:]]
        sft = [m[metric] for m in r["continued_sft"]["metrics"]]
        cells = " | ".join(f"{v:.3f}" for v in spin)
        lines.append(
            f"| {r['seed']} | {r['sft']['steps']} | SPIN | {start:.3f} | {cells} | {r['demo_seconds']:.0f} |"
        )
        lines.append(
            f"| {r['seed']} | | continued SFT | {start:.3f} | {' | '.join(f'{v:.3f}' for v in sft)} | |"
        )
    gains = [r["spin"][-1][metric] - r["spin"][0][metric] for r in results]
    sft_gains = [r["continued_sft"]["metrics"][-1][metric] - r["spin"][0][metric] for r in results]
    lines += [
        "",
        f"iteration 3 minus iteration 0: SPIN {', '.join(f'{g:+.3f}' for g in gains)} "
        f"(mean {statistics.fmean(gains):+.3f}); continued SFT {', '.join(f'{g:+.3f}' for g in sft_gains)} "
        f"(mean {statistics.fmean(sft_gains):+.3f}).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo_seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in a.seeds:
        results.append(run_seed(out / f"seed{seed}", seed))
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = table(results, "exact_match") + "\n\n" + table(results, "loglik_real") + "\n"
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
