"""bfloat16 vs float32 on this CPU: matmuls at SmolLM2's shapes and one training step of SmolLM2-135M.

Why: on a CPU with AMX (Intel Sapphire Rapids and later; `torch.cpu._is_amx_tile_supported()`), oneDNN runs
bf16 matmuls several times faster than fp32 ones, which decides whether `generation.dtype: bfloat16` and
`train.precision: bf16` are worth it there (on CPUs without AMX bf16 is emulated and slower).

What: (1) GFLOP/s of `a @ b` in fp32 and bf16 (best of `--repeats` after a warm-up) for a 2048^3 matmul and for
SmolLM2-135M's decode shapes (64 rows: one refill batch) and training shapes (1,024 rows); (2) seconds per
optimizer step of SmolLM2-135M-Instruct on a (8, 400) batch of random token ids, loss on the last 200
positions, gradient checkpointing on, RMSprop, fp32 weights: plain fp32 vs `torch.autocast("cpu",
torch.bfloat16)` (what `train.precision: bf16` does through accelerate). Median of `--steps` steps after one
warm-up step.

    python benchmarks/cpu_bf16.py --threads 2 --out runs/cpu_bf16.json

Writes a Markdown table on stdout and, with `--out`, the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from real_common import smollm2_folder

SHAPES = [
    (2048, 2048, 2048),
    (64, 576, 1536),
    (64, 1536, 576),
    (64, 576, 49152),
    (1024, 576, 1536),
    (1024, 576, 49152),
]


def matmul_table(repeats: int) -> list[dict[str, Any]]:
    import torch

    rows = []
    for m, k, n in SHAPES:
        row: dict[str, Any] = {"shape": f"({m}, {k}) x ({k}, {n})"}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            a @ b  # warm-up: thread pool, oneDNN kernel selection
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - start)
            row[str(dtype).removeprefix("torch.")] = 2 * m * k * n / best / 1e9
        rows.append(row)
    return rows


def training_steps(steps: int) -> dict[str, float]:
    """Median seconds per optimizer step, fp32 and bf16 autocast (fp32 weights), same model and batch."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (8, 400), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-7)
    out = {}
    for name, bf16 in (("float32", False), ("bf16_autocast", True)):
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids, logits_to_keep=200).logits  # (8, 200, V)
            loss = torch.logsumexp(logits.float(), dim=-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times[1:])  # the first step warms up
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="timings per matmul (best is reported)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per precision")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    result = {"threads": args.threads, "amx": amx, "matmul": matmul_table(args.repeats)}
    result["train_step_s"] = training_steps(args.steps)
    print(f"\n{args.threads} thread(s), AMX: {amx}\n")
    print("| matmul | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |\n|---|---:|---:|---:|")
    for r in result["matmul"]:
        print(
            f"| {r['shape']} | {r['float32']:.0f} | {r['bfloat16']:.0f} | {r['bfloat16'] / r['float32']:.2f} |"
        )
    s = result["train_step_s"]
    print(
        f"\nSmolLM2-135M training step, (8, 400) tokens, checkpointing: fp32 {s['float32']:.1f} s, "
        f"bf16 autocast {s['bf16_autocast']:.1f} s ({s['float32'] / s['bf16_autocast']:.2f}x)"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
