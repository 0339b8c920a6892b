"""SPIN vs continued SFT from a plateaued SFT model, at equal training compute (the paper's central claim).

The paper (Chen et al. 2024, Sec. 6.3, Fig. 2 / Table 3) shows that once SFT on a fixed dataset has
plateaued, more SFT epochs on the same data stop helping, while SPIN iterations on the SAME prompts and
replies keep improving the model. This script checks that claim at small scale, on both built-in tasks:

1. SFT to a plateau. A tiny character Llama is SFT-trained on a fixed set of `--sft-examples` examples
   (`spinlm.trainer.sft_train`, in chunks of `--chunk-steps` steps, each chunk one cosine cycle). After every
   chunk the per-token NLL on a separate VALIDATION set (not the test set) is measured; training stops when
   it has not improved by `--plateau-tol` (relative) for `--plateau-patience` chunks, and the best chunk is
   kept. The whole curve is written to results.json and summarised in the table ("plateau" column).
2. SPIN: `spinlm.loop.run` for 3 iterations from that model, on the same training examples.
3. Continued SFT: `sft_train` from the same model, on the same training examples, for the same number of
   optimizer steps per iteration, with twice SPIN's batch. Compute is matched in forward+backward
   SEQUENCES: each SPIN step runs B real + B generated sequences, each SFT step 2B real ones (same
   optimizer, learning rate, schedule shape). The trained token counts of both are measured and reported;
   they differ only by the length of generated vs real replies. SPIN's extra cost (generating one reply
   per prompt and scoring the pairs with the opponent, no backward) is reported separately in seconds.
4. Held-out test metrics after each iteration (= after each matched budget) for both: `addition`: greedy
   exact match; `grammar`: exact KL(p_data||p_theta), `neg_kl` and TV against the known p_data.

Everything runs over several seeds (model init, data, sampling) and reports mean +- std and min..max.
`--variant NAME:OVERRIDE,OVERRIDE` adds SPIN settings to compare (e.g. beta or the sampling temperature);
continued SFT is rerun only when the learning rate differs.

    python benchmarks/spin_vs_sft.py --out runs/spin_vs_sft --seeds 0 1 2 \\
        --variant beta1:train.beta=1.0 --variant temp07:generation.temperature=0.7

Writes OUT/results.json (everything, including the SFT curves) and OUT/results.md (the tables).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import spinlm.loop
from spinlm.config import SpinConfig, load_config, scheduled
from spinlm.evaluation import evaluate_model
from spinlm.logps import encode_all, score_logps
from spinlm.loop import load_examples
from spinlm.modeling import build_char_tokenizer, build_tiny_model, load_model, load_tokenizer, save_model
from spinlm.tasks import get_task
from spinlm.trainer import sft_train

log = logging.getLogger("spinlm.bench")

# Per task: the SFT set, test set, model size, reply length, and the metrics the table shows.
TASKS: dict[str, dict[str, Any]] = {
    "addition": {
        "sft_examples": 1000,
        "eval_size": 200,
        "hidden": 64,
        "max_new_tokens": 8,
        "metrics": ["exact_match", "loglik_real_per_token"],
    },
    "grammar": {
        "sft_examples": 600,
        "eval_size": 64,
        "hidden": 48,
        "max_new_tokens": 20,
        "metrics": ["neg_kl", "tv_exact", "loglik_real_per_token"],
    },
}


@dataclass
class Settings:
    out: Path
    seeds: list[int]
    tasks: list[str]
    iterations: int
    lr: float
    batch: int
    sft_lr: float
    chunk_steps: int
    max_chunks: int
    plateau_tol: float
    plateau_patience: int
    variants: dict[str, list[str]]


# --- SFT to a plateau ---------------------------------------------------------------------------------------


def heldout_nll(model: Any, tokenizer: Any, prompts: list, responses: list[str]) -> float:
    """Per-token NLL of the replies (end of turn included)."""
    logps = score_logps(model, tokenizer, prompts, responses, max_length=64, batch_size=256)
    tokens = sum(len(e.input_ids) - e.prompt_len for e in encode_all(tokenizer, prompts, responses, 64))
    return -sum(logps) / max(tokens, 1)


def validation_examples(task: str, n: int, seed: int, exclude: set[str]) -> list:
    """Fresh examples for early stopping, disjoint in prompt from train and test where the task allows it."""
    make = get_task(task).make_examples
    assert make is not None
    pool = make(n + len(exclude) + 100, seed + 7919)
    if task == "addition":
        pool = [ex for ex in pool if ex.prompt[0]["content"] not in exclude]
    return pool[:n]


def sft_to_plateau(cfg: SpinConfig, task: str, s: Settings, seed: int, out: Path) -> dict[str, Any]:
    """Train the starting model until validation NLL stops improving; save the best chunk to `out`."""
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=TASKS[task]["hidden"], num_layers=2, num_heads=4, seed=seed)
    train, held_out, _ = load_examples(cfg, tok)
    exclude = {ex.prompt[0]["content"] for ex in train + held_out}
    val = validation_examples(task, 200, seed, exclude)
    vp, vr = [ex.prompt for ex in val], [ex.response for ex in val]
    curve = [{"steps": 0, "val_nll": heldout_nll(model, tok, vp, vr)}]
    best, best_state, bad, t0 = math.inf, copy.deepcopy(model.state_dict()), 0, time.perf_counter()
    for chunk in range(s.max_chunks):
        sft_train(
            model,
            tok,
            [ex.prompt for ex in train],
            [ex.response for ex in train],
            steps=s.chunk_steps,
            lr=s.sft_lr,
            batch_size=32,
            seed=seed * 1000 + chunk,
            max_length=64,
        )
        nll = heldout_nll(model, tok, vp, vr)
        curve.append({"steps": (chunk + 1) * s.chunk_steps, "val_nll": nll})
        log.info("%s seed %d: SFT %d steps, validation NLL %.4f", task, seed, curve[-1]["steps"], nll)
        if nll < best * (1 - s.plateau_tol):
            best, best_state, bad = nll, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= s.plateau_patience:
                break
    model.load_state_dict(best_state)
    save_model(model, tok, out)
    best_steps = min((c for c in curve if c["val_nll"] == best), key=lambda c: c["steps"])["steps"]
    return {
        "curve": curve,
        "best_steps": best_steps,
        "plateaued": bad >= s.plateau_patience,
        "seconds": time.perf_counter() - t0,
    }


# --- SPIN and continued SFT ---------------------------------------------------------------------------------


def make_cfg(task: str, seed: int, s: Settings, run_dir: Path, sft_dir: Path, extra: list[str]) -> SpinConfig:
    spec = TASKS[task]
    return load_config(
        None,
        [
            f"train.iterations={s.iterations}",
            f"train.learning_rate={s.lr}",
            *extra,
        ],
        output_dir=str(run_dir),
        seed=seed,
        task=task,
        **{
            "model.name_or_path": str(sft_dir),
            "data.num_examples": spec["sft_examples"],
            "data.eval_size": spec["eval_size"],
            "generation.max_new_tokens": spec["max_new_tokens"],
            "generation.batch_size": 256,
            "generation.shard_size": 4096,
            "train.beta": 0.1,
            "train.epochs": 1,
            "train.optimizer": "adamw",
            "train.lr_scheduler": "cosine",
            "train.warmup_ratio": 0.05,
            "train.batch_size": s.batch,
            "train.max_length": 64,
            "train.save_steps": 0,
            "eval.batch_size": 256,
        },
    )


class _Timed:
    """Wraps a function of spinlm.loop and adds up the seconds spent in it."""

    def __init__(self, name: str) -> None:
        self.name, self.fn, self.seconds = name, getattr(spinlm.loop, name), 0.0

    def __enter__(self) -> _Timed:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return self.fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        setattr(spinlm.loop, self.name, wrapped)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(spinlm.loop, self.name, self.fn)


def run_spin(cfg: SpinConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    with _Timed("make_iteration_pairs") as pairs_t, _Timed("train_iteration") as train_t:
        summary = spinlm.loop.run(cfg)
    run_dir = Path(cfg.output_dir)
    tok = load_tokenizer(run_dir / "iteration_1" / "model", cfg.model)
    steps, tokens, gen_tokens = [], [], []
    for t in range(1, cfg.train.iterations + 1):
        it = run_dir / f"iteration_{t}"
        log_rows = [json.loads(line) for line in (it / "train_log.jsonl").read_text().splitlines()]
        steps.append(int(log_rows[-1]["step"]))
        pairs = [json.loads(line) for line in (it / "pairs.jsonl").read_text().splitlines()]
        prompts = [p["prompt"] for p in pairs]
        real = encode_all(tok, prompts, [p["chosen"][-1]["content"] for p in pairs], cfg.train.max_length)
        gen = encode_all(tok, prompts, [p["rejected"][-1]["content"] for p in pairs], cfg.train.max_length)
        tokens.append(sum(len(e.input_ids) for e in real + gen))
        gen_tokens.append(sum(len(e.input_ids) - e.prompt_len for e in gen))
    return {
        "metrics": [it["metrics"] for it in summary["iterations"]],
        "optimizer_steps": steps,
        "trained_tokens": tokens,
        "generated_tokens": gen_tokens,
        "seconds_total": time.perf_counter() - t0,
        "seconds_pairs": pairs_t.seconds,  # generation + opponent scoring
        "seconds_train": train_t.seconds,
    }


def run_sft(cfg: SpinConfig, steps: list[int], batch: int) -> dict[str, Any]:
    """Continued SFT with `steps[t]` steps of `batch` sequences per iteration; evaluated like SPIN."""
    tok = load_tokenizer(str(cfg.model.name_or_path), cfg.model)
    model = load_model(str(cfg.model.name_or_path), cfg.model, device=torch.device("cpu"))
    train, held_out, _ = load_examples(cfg, tok)
    prompts, replies = [ex.prompt for ex in train], [ex.response for ex in train]
    lengths = [len(e.input_ids) for e in encode_all(tok, prompts, replies, cfg.train.max_length)]
    metrics, seconds, tokens = [], 0.0, []
    for t, n in enumerate(steps, start=1):
        t0 = time.perf_counter()
        lr = float(scheduled(cfg.train.learning_rate, t))
        sft_train(model, tok, prompts, replies, steps=n, lr=lr, batch_size=batch, seed=cfg.seed * 1000 + t)
        seconds += time.perf_counter() - t0
        tokens.append(round(n * batch * statistics.fmean(lengths)))  # expected: batches are uniform draws
        m, _, _ = evaluate_model(model, tok, held_out, cfg, t, None)
        metrics.append(m)
    return {"metrics": metrics, "optimizer_steps": steps, "trained_tokens": tokens, "seconds_train": seconds}


# --- the experiment -----------------------------------------------------------------------------------------


def run_one(task: str, seed: int, s: Settings, sft_cache: dict) -> dict[str, Any]:
    base = s.out / task / f"seed{seed}"
    sft_dir = base / "sft_model"
    cfg0 = make_cfg(task, seed, s, base / "spin_base", sft_dir, [])
    if (base / "sft.json").exists() and (sft_dir / "config.json").exists():
        sft = json.loads((base / "sft.json").read_text())
    else:
        sft = sft_to_plateau(cfg0, task, s, seed, sft_dir)
        (base / "sft.json").write_text(json.dumps(sft, indent=1))
    result: dict[str, Any] = {"task": task, "seed": seed, "sft": sft, "variants": {}}
    for name, overrides in s.variants.items():
        cfg = make_cfg(task, seed, s, base / f"spin_{name}", sft_dir, overrides)
        log.info("%s seed %d: SPIN variant %s %s", task, seed, name, overrides)
        spin_res = run_spin(cfg)
        key = (task, seed, str(cfg.train.learning_rate), tuple(spin_res["optimizer_steps"]))
        if key not in sft_cache:
            log.info("%s seed %d: continued SFT, steps %s", task, seed, spin_res["optimizer_steps"])
            sft_cache[key] = run_sft(cfg, spin_res["optimizer_steps"], 2 * cfg.train.batch_size)
        start = spin_res["metrics"][0]
        result["variants"][name] = {
            "overrides": overrides,
            "start": start,
            "spin": spin_res,
            "sft": sft_cache[key],
        }
    return result


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f} [{min(values):.3f}, {max(values):.3f}]"


def tables(results: list[dict[str, Any]], s: Settings) -> str:
    lines: list[str] = []
    for task in s.tasks:
        rows = [r for r in results if r["task"] == task]
        if not rows:
            continue
        spec = TASKS[task]
        plateau = [r["sft"]["best_steps"] for r in rows]
        flat = sum(r["sft"]["plateaued"] for r in rows)
        lines.append(
            f"\n### {task} ({spec['sft_examples']} SFT examples, {spec['eval_size']} test prompts, "
            f"{len(rows)} seeds; SFT plateau at {min(plateau)}-{max(plateau)} steps, "
            f"{flat}/{len(rows)} stopped by the plateau rule)\n"
        )
        for metric in spec["metrics"]:
            head = "| variant | method | start (SFT plateau) | " + " | ".join(
                f"iter {t}" for t in range(1, s.iterations + 1)
            )
            lines += [f"\n`{metric}` (mean ± std [min, max] over seeds)\n", head + " |"]
            lines.append("|" + "---|" * (3 + s.iterations))
            for name in s.variants:
                start = [r["variants"][name]["start"][metric] for r in rows]
                for method in ("spin", "sft"):
                    ms = [r["variants"][name][method]["metrics"] for r in rows]
                    offset = 1 if method == "spin" else 0  # SPIN's list includes iteration 0
                    cells = [
                        _stat(
                            [m[t - 1 + offset][metric] for m in ms if m[t - 1 + offset][metric] is not None]
                        )
                        for t in range(1, s.iterations + 1)
                    ]
                    label = "SPIN" if method == "spin" else "continued SFT"
                    lines.append(f"| {name} | {label} | {_stat(start)} | " + " | ".join(cells) + " |")
        lines.append("\nCompute per run (mean over seeds, all iterations):\n")
        lines.append(
            "| variant | SPIN steps × seqs | SFT steps × seqs | SPIN trained tokens | SFT trained tokens "
            "| SPIN generated tokens | SPIN s (pairs / train / total) | SFT train s |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for name in s.variants:
            v = [r["variants"][name] for r in rows]
            sp, sf = v[0]["spin"], v[0]["sft"]
            bs = 2 * s.batch

            def mean(key: str, part: str, vs: list[dict[str, Any]] = v) -> float:
                return statistics.fmean(
                    sum(x[part][key]) if isinstance(x[part][key], list) else x[part][key] for x in vs
                )

            lines.append(
                f"| {name} | {sum(sp['optimizer_steps'])} × {bs} | {sum(sf['optimizer_steps'])} × {bs} "
                f"| {mean('trained_tokens', 'spin'):.0f} | {mean('trained_tokens', 'sft'):.0f} "
                f"| {mean('generated_tokens', 'spin'):.0f} "
                f"| {mean('seconds_pairs', 'spin'):.0f} / {mean('seconds_train', 'spin'):.0f} / "
                f"{mean('seconds_total', 'spin'):.0f} | {mean('seconds_train', 'sft'):.0f} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/spin_vs_sft")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3, help="SPIN and continued-SFT learning rate")
    p.add_argument("--batch", type=int, default=32, help="SPIN pairs per step (SFT: twice as many replies)")
    p.add_argument("--sft-lr", type=float, default=3e-3, help="learning rate of the SFT-to-plateau stage")
    p.add_argument("--chunk-steps", type=int, default=200)
    p.add_argument("--max-chunks", type=int, default=15)
    p.add_argument("--plateau-tol", type=float, default=0.01)
    p.add_argument("--plateau-patience", type=int, default=2)
    p.add_argument("--variant", action="append", default=[], help="NAME:override,override (SPIN config)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    a = p.parse_args(argv)
    variants: dict[str, list[str]] = {"base": []}
    for v in a.variant:
        name, _, rest = v.partition(":")
        variants[name] = [o for o in rest.split(",") if o]
    torch.set_num_threads(a.threads)
    return Settings(
        Path(a.out),
        a.seeds,
        a.tasks,
        a.iterations,
        a.lr,
        a.batch,
        a.sft_lr,
        a.chunk_steps,
        a.max_chunks,
        a.plateau_tol,
        a.plateau_patience,
        variants,
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "accelerate", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    s = parse_args(argv)
    s.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results, cache = [], {}  # type: ignore[var-annotated]
    for task in s.tasks:
        for seed in s.seeds:
            results.append(run_one(task, seed, s, cache))
            (s.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = tables(results, s) + f"\nTotal wall time: {time.perf_counter() - t0:.0f} s.\n"
    (s.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
