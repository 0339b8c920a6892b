"""Fixed costs of generating and scoring on a real model: a stage's first call in a process against the same
call again, and warm calls at several sizes.

Why: `benchmarks/real_cost.py` found the cost per prompt of generation and scoring *falling* from 64 to 1,024
prompts (a stage line `seconds = fixed + slope * prompts` with a fixed part of several seconds). This tells
where the fixed part is: warm-up (the first call meets every tensor shape for the first time: oneDNN builds
its kernels per shape, above all for bf16 on AMX, and the allocator grows) or the end of each call (the
refill engine's last batch drains row by row; the last scoring batch is short).

What, in one fresh process: SmolLM2-135M-Instruct (fp32 weights, as `spinlm run` loads it), the first
`--prompts` GSM8K questions as user turns, and for each stage:

1. generate: `spinlm.generation.generate_responses` (engine `refill`, batch `--gen-batch-size`, at most
   `--max-new-tokens` tokens, temperature 1, top_k 0, `generation.dtype` `--gen-dtype`, seed 0) on the
   prompts: call 1 (cold), call 2 on the same prompts (warm), then warm calls on each of `--warm-sizes`
   prompts;
2. score: `spinlm.logps.score_logps` of the GSM8K answers (`--eval-batch-size` sequences per batch, max_length
   512, under bf16 CPU autocast with `--precision bf16`, as the pairs stage scores) in the same order: cold,
   warm, then the warm sizes.

Reported: seconds per call; cold − warm (the warm-up cost) and, over the warm calls, the least-squares line
seconds = fixed + slope * prompts (the fixed part that stays when nothing is new).

    python benchmarks/real_fixed_costs.py --threads 2 --precision bf16 --gen-dtype bfloat16 \\
        --out runs/real_fixed_costs.json                                                   # as real_cost ran
    OMP_NUM_THREADS=1 python benchmarks/real_fixed_costs.py --prompts 4 --warm-sizes 2 4 --max-new-tokens 4 \\
        --threads 1                                                                        # smoke

Needs the GSM8K file (`--data`); without it, it says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from real_common import default_gsm8k, gsm8k_missing, line_fit, smollm2_folder


def timed_calls(call: Any, n: int, warm_sizes: list[int]) -> dict[str, Any]:
    """cold and warm seconds of call(n), then warm seconds of call(k) for each k in warm_sizes."""
    out: dict[str, Any] = {}
    for name, k in [("cold", n), ("warm", n), *((f"warm_{k}", k) for k in warm_sizes)]:
        start = time.perf_counter()
        call(k)
        out[f"seconds_{name}"] = time.perf_counter() - start
    out["warmup_s"] = out["seconds_cold"] - out["seconds_warm"]
    points = [(n, out["seconds_warm"]), *((k, out[f"seconds_warm_{k}"]) for k in warm_sizes)]
    out["warm_line"] = line_fit(points) if len({k for k, _ in points}) > 1 else {}
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from spinlm.config import GenerationConfig, ModelConfig
    from spinlm.generation import generate_responses
    from spinlm.logps import score_logps
    from spinlm.modeling import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    folder = Path(args.model) if args.model else smollm2_folder()
    tok = load_tokenizer(folder, ModelConfig())
    model = load_model(folder, ModelConfig(), device=torch.device("cpu")).eval()
    n = max(args.prompts, *args.warm_sizes)
    rows = [json.loads(x) for x in Path(args.data).open(encoding="utf-8") if x.strip()][:n]
    prompts = [[{"role": "user", "content": r["question"]}] for r in rows]
    answers = [r["answer"] for r in rows]
    cfg = GenerationConfig(
        temperature=1.0,
        top_k=0,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.gen_batch_size,
        shard_size=10**9,  # one shard: a shard boundary would cut the refill batch
        engine="refill",
        dtype=args.gen_dtype,
    )

    def generate(k: int) -> None:
        generate_responses(model, tok, prompts[:k], cfg, seed=0)

    def score(k: int) -> None:
        bf16 = args.precision == "bf16"
        autocast = torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            score_logps(model, tok, prompts[:k], answers[:k], 512, args.eval_batch_size)

    return {
        "generate": timed_calls(generate, args.prompts, args.warm_sizes),
        "score": timed_calls(score, args.prompts, args.warm_sizes),
    }


def print_table(args: argparse.Namespace, result: dict[str, Any]) -> None:
    sizes = ", ".join(str(k) for k in args.warm_sizes)
    print(
        f"\nSmolLM2-135M-Instruct, {args.prompts} GSM8K prompts, generation.dtype {args.gen_dtype}, precision "
        f"{args.precision}, {args.threads} thread(s); warm calls also on {sizes} prompts\n"
    )
    print("| stage | cold s | warm s | warm-up s | warm line: fixed s | warm line: s per 1,000 prompts |")
    print("|---|---:|---:|---:|---:|---:|")
    for stage, r in result.items():
        line = r["warm_line"]
        fit = f"{line['fixed_s']:.1f} | {line['per_1k_prompts_s']:.0f}" if line else "- | -"
        print(
            f"| {stage} | {r['seconds_cold']:.1f} | {r['seconds_warm']:.1f} | {r['warmup_s']:.1f} | {fit} |"
        )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64, help="prompts of the cold and first warm call")
    p.add_argument("--warm-sizes", type=int, nargs="*", default=[32, 128], help="more warm calls")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gen-batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=16, help="sequences per scoring batch")
    p.add_argument("--gen-dtype", default="model", help="generation.dtype (model: fp32, or bfloat16)")
    p.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16"], help="scoring under bf16 autocast"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="model folder (default: runs/smollm2, made once)")
    p.add_argument("--data", default=default_gsm8k(), help="GSM8K jsonl with question / answer fields")
    p.add_argument("--out", default=None, help="write the settings and numbers here as JSON")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if gsm8k_missing(args.data):
        return
    result = measure(args)
    print_table(args, result)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
