"""Where the memory of a SPIN iteration on a real model goes: SmolLM2-135M-Instruct, GSM8K-length pairs.

What it measures: the peak resident memory (VmHWM of /proc/self/status, reset between phases through
/proc/self/clear_refs) of each phase of an iteration, on the issue's settings (batch 4, max_length 768):
loading the model, scoring the reference log-probs (eval.batch_size sequences per forward), and training
steps with and without gradient checkpointing, under glibc's default malloc (what spinlm runs, trimming the
heap after each step: `spinlm.memory`) and under a 1 MiB mmap threshold (what `MALLOC_MMAP_THRESHOLD_=1048576`
gives: leaner, slower; spinlm's default before). Each configuration runs in a fresh subprocess.

Pairs: GSM8K train questions with their real answers as chosen, and as rejected a real answer of another
question repeated to 256 tokens (the length SmolLM2's temperature-1 samples often run to), so no generation
is needed and the shapes are the worst case of a real iteration.

    python benchmarks/real_memory.py                       # all configurations, a Markdown table
    python benchmarks/real_memory.py --steps 4 --out runs/real_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
CONFIGS = {
    "default malloc, no checkpointing": {"gc": False, "heap": False},
    "default malloc, checkpointing": {"gc": True, "heap": False},
    "1 MiB mmap threshold, no checkpointing": {"gc": False, "heap": True},
    "1 MiB mmap threshold, checkpointing": {"gc": True, "heap": True},
}


def _hwm_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def worker(model_dir: str, gc: bool, heap: bool, steps: int, n_pairs: int) -> dict[str, Any]:
    import torch

    if heap:  # as MALLOC_MMAP_THRESHOLD_=1048576 would: mallopt(M_MMAP_THRESHOLD = -3, 1 MiB)
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
    from spinlm.config import ModelConfig, TrainConfig
    from spinlm.logps import score_logps
    from spinlm.modeling import load_model, load_tokenizer
    from spinlm.trainer import train_iteration

    torch.manual_seed(0)
    out: dict[str, Any] = {"start_gb": _rss_gb()}
    _reset_peak()
    tok = load_tokenizer(model_dir, ModelConfig())
    model = load_model(model_dir, ModelConfig(), device=torch.device("cpu"))
    out["load_peak_gb"], out["after_load_gb"] = _hwm_gb(), _rss_gb()

    rows = [json.loads(line) for line in GSM8K.open()][: n_pairs + 1]
    prompts = [[{"role": "user", "content": r["question"]}] for r in rows[:n_pairs]]
    chosen = [r["answer"] for r in rows[:n_pairs]]
    filler = rows[-1]["answer"]
    ids = tok(filler, add_special_tokens=False)["input_ids"]
    rejected = [tok.decode((ids * (256 // len(ids) + 1))[:256])] * n_pairs
    _reset_peak()
    t0 = time.perf_counter()
    ref_c = score_logps(model, tok, prompts, chosen, 768, 8)
    ref_r = score_logps(model, tok, prompts, rejected, 768, 8)
    out["score_peak_gb"], out["score_s"] = _hwm_gb(), time.perf_counter() - t0
    pairs = [
        {
            "prompt": p,
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
            "ref_chosen_logps": a,
            "ref_rejected_logps": b,
        }
        for p, c, r, a, b in zip(prompts, chosen, rejected, ref_c, ref_r)
    ]
    cfg = TrainConfig(
        batch_size=4,
        max_length=768,
        epochs=steps * 4 / n_pairs,
        gradient_checkpointing=gc,
        learning_rate=5e-7,
        save_steps=0,
    )
    _reset_peak()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train_iteration(model, tok, pairs, cfg, iteration=1, run_seed=0, log_dir=Path(tmp))
        out["train_s_per_step"] = (time.perf_counter() - t0) / result.steps
    out["train_peak_gb"], out["after_train_gb"] = _hwm_gb(), _rss_gb()
    out["train_tokens_per_step"] = sum(
        len(tok(c)["input_ids"]) + len(tok(r)["input_ids"]) for c, r in zip(chosen[:4], rejected[:4])
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="training steps per configuration")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--out", default="runs/real_memory.json")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL_DIR", "GC", "HEAP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        d, gc, heap = args.worker
        print(json.dumps(worker(d, gc == "1", heap == "1", args.steps, args.pairs)))
        return
    if not GSM8K.is_file():
        print(f"skipped: {GSM8K} not found (GSM8K lives in ../shared/data/gsm8k)")
        return
    from real_common import smollm2_folder

    model_dir = smollm2_folder()
    results = {}
    for name, c in CONFIGS.items():
        cmd = [sys.executable, __file__, "--steps", str(args.steps), "--pairs", str(args.pairs)]
        cmd += ["--worker", str(model_dir), str(int(c["gc"])), str(int(c["heap"]))]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("\n| configuration | load peak GB | scoring peak GB | training peak GB | s / step |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['load_peak_gb']:.2f} | {r['score_peak_gb']:.2f} | {r['train_peak_gb']:.2f} "
            f"| {r['train_s_per_step']:.1f} |"
        )


if __name__ == "__main__":
    main()
