"""Generation throughput on a real model: one at a time vs plain batched HF `generate` vs spin's engines.

What: SmolLM2-135M-Instruct (float32, or `--dtype bfloat16` for every way), the first `--prompts` GSM8K
training questions as user turns (its chat template adds its default system prompt), temperature 1, top_k 0,
top_p 1, at most `--max-new-tokens` new tokens, stop at end of turn. Each way runs in its own fresh process, back to back in one run:

1. `hf_one`: `model.generate` on one prompt at a time (the paper's simplified loop; `--one-prompts` runs it
   on the first K prompts only, since it is by far the slowest: its rates stay comparable);
2. `hf_batchB` for each B in `--hf-batch-sizes` (default 32 and 64): plain `model.generate` on batches of B
   prompts in input order, left padded (what a competent user writes);
3. `spin_refill`, `spin_generate`, `spin_continuous`: `spinlm.generation.generate_responses` with that engine
   and batch `--batch-size` (`--continuous-prompts K`: `spin_continuous` on the first K prompts only, as
   `--one-prompts` for `hf_one`) (the one-prompt and HF loops are `benchmarks/vllm_generation.py`'s `hf_batched`).

Reported per way: generated tokens (end-of-turn token included), seconds generating (the model already
loaded), tokens/s, prompts/s, and the share of the machine's matmul limit that generation reaches: a fresh
process times a 2048 x 2048 matmul in `--dtype` with the same thread count (best of 5, GFLOP/s) before the first way
and after the last, and the higher of the two is the limit; a generated token costs 2 N FLOPs (N = the
parameter count, the tied embedding counted once: every weight is one multiply-add per token; attention over
the context and the prefill of the prompts are not counted, so with few new tokens per prompt the share is
an underestimate), so % of limit = tokens/s x 2N / limit. Decoding a small batch is bound by memory
traffic, not by matmul, so this share says how far each way is from what the cores could compute.

`--profile WAY` instead runs that one way under `torch.profiler` (`--profiler cprofile`: Python's cProfile,
for interpreter overhead) on `--profile-prompts` prompts, after a 2-token warm-up, and prints the top
operators by self time (also written next to `--out` as profile_WAY.txt).

Needs the GSM8K file (`--data`; default ../shared/data/gsm8k/train.jsonl, else /work/shared/data/gsm8k/
train.jsonl); without it, it says so and exits 0. The model folder is made once by `real_common.smollm2_folder`.

    python benchmarks/real_generation.py --threads 2 --out runs/real_generation.json     # the full run
    OMP_NUM_THREADS=1 python benchmarks/real_generation.py --prompts 4 --max-new-tokens 8 --threads 1  # smoke
    python benchmarks/real_generation.py --profile spin_refill --prompts 16 --threads 1

Writes: a Markdown table on stdout, and with `--out` the settings and every way's numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from real_common import default_gsm8k, gsm8k_missing, matmul_gflops, run_worker, smollm2_folder
from vllm_generation import gsm8k_prompts, hf_batched

SPIN_ENGINES = ("refill", "generate", "continuous")


def all_ways(args: argparse.Namespace) -> list[str]:
    return ["hf_one", *(f"hf_batch{b}" for b in args.hf_batch_sizes), *(f"spin_{e}" for e in SPIN_ENGINES)]


def generation_config(args: argparse.Namespace, batch_size: int, engine: str = "refill") -> Any:
    from spinlm.config import GenerationConfig

    # One shard: shards only matter for resuming, and a shard boundary would cut the refill engine's batch.
    return GenerationConfig(
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
        batch_size=batch_size,
        shard_size=10**9,
        engine=engine,
    )


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from spinlm.config import ModelConfig
    from spinlm.modeling import load_model, load_tokenizer

    folder = Path(args.model) if args.model else smollm2_folder()
    tok = load_tokenizer(folder, ModelConfig())
    model = load_model(folder, ModelConfig(dtype=args.dtype), device=torch.device(args.device)).eval()
    return model, tok


def generate_way(way: str, model: Any, tok: Any, prompts: list[list[dict]], args: argparse.Namespace) -> int:
    """Generate with `way`; the generated tokens (end of turn included) in all."""
    from spinlm.generation import _eos_ids, generate_responses

    if way == "hf_one":  # a batch of one: no padding, the prompt alone
        return hf_batched(model, tok, prompts, generation_config(args, 1), _eos_ids(model, tok))
    if way.startswith("hf_batch"):
        cfg = generation_config(args, int(way.removeprefix("hf_batch")))
        return hf_batched(model, tok, prompts, cfg, _eos_ids(model, tok))
    cfg = generation_config(args, args.batch_size, engine=way.removeprefix("spin_"))
    return sum(g.num_tokens for g in generate_responses(model, tok, prompts, cfg, seed=0, desc=way))


def worker(way: str, args: argparse.Namespace) -> dict[str, Any]:
    """One way, in this (fresh) process: tokens, prompts, parameters, start-up and generation seconds."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    if way == "matmul":
        return {"gflops": matmul_gflops(args.threads, device=args.device, dtype=args.dtype)}
    from spinlm.modeling import count_parameters

    model, tok = load(args)
    prompts = gsm8k_prompts(Path(args.data), args.prompts)
    if way == "hf_one" and args.one_prompts:
        prompts = prompts[: args.one_prompts]
    if way == "spin_continuous" and args.continuous_prompts:
        prompts = prompts[: args.continuous_prompts]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    t1, c1 = time.perf_counter(), time.process_time()
    tokens = generate_way(way, model, tok, prompts, args)
    sync()
    t2, c2 = time.perf_counter(), time.process_time()
    return {
        "tokens": tokens,
        "prompts": len(prompts),
        "parameters": count_parameters(model),
        "startup_s": t1 - t0,
        "generate_s": t2 - t1,
        "generate_cpu_s": c2 - c1,
    }


def profile_worker(way: str, args: argparse.Namespace) -> None:
    """Run `way` on `--profile-prompts` prompts under torch.profiler or cProfile; print the top rows."""
    import torch

    torch.set_num_threads(args.threads)
    model, tok = load(args)
    prompts = gsm8k_prompts(Path(args.data), args.profile_prompts)
    generate_way(way, model, tok, prompts[:1], replace_args(args, max_new_tokens=2))  # warm-up, not profiled
    if args.profiler == "cprofile":
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.runcall(generate_way, way, model, tok, prompts, args)
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.profile_rows)
        table = buf.getvalue()
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate_way(way, model, tok, prompts, args)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)
    header = f"{args.profiler} profile of {way}: {len(prompts)} prompts, <= {args.max_new_tokens} new tokens"
    print(f"{header}, {args.threads} thread(s)\n{table}", flush=True)
    if args.out:
        path = Path(args.out).with_name(f"profile_{way}.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{header}\n{table}")
        print(f"written to {path}")


def replace_args(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every way in a fresh process, between two matmul-limit measurements; the rates added."""
    ways = args.ways.split(",") if args.ways else all_ways(args)
    unknown = set(ways) - set(all_ways(args))
    if unknown:
        raise SystemExit(
            f"unknown way(s) {', '.join(sorted(unknown))}; choose from {', '.join(all_ways(args))}"
        )

    def worker_cmd(way: str) -> list[str]:  # the worker gets the same settings (and ignores --ways)
        return [sys.executable, __file__, *sys.argv[1:], "--worker", way]

    limits = [run_worker(worker_cmd("matmul"))["gflops"]]
    print(f"matmul limit (before): {limits[0]:.1f} GFLOP/s", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for way in ways:
        r = run_worker(worker_cmd(way))
        r["tokens_per_s"] = r["tokens"] / r["generate_s"]
        r["prompts_per_s"] = r["prompts"] / r["generate_s"]
        results[way] = r
        print(f"{way}: {json.dumps(r)}", flush=True)
    limits.append(run_worker(worker_cmd("matmul"))["gflops"])
    limit = max(limits)
    print(f"matmul limit (after): {limits[1]:.1f} GFLOP/s", flush=True)
    for r in results.values():
        r["pct_of_matmul_limit"] = 100 * r["tokens_per_s"] * 2 * r["parameters"] / (limit * 1e9)
    return {"matmul_gflops": limits, "matmul_limit_gflops": limit, "results": results}


def print_table(args: argparse.Namespace, out: dict[str, Any]) -> None:
    results = out["results"]
    n = next(iter(results.values()))["parameters"] if results else 0
    print(
        f"\nSmolLM2-135M-Instruct ({n / 1e6:.1f}M parameters, {args.dtype}, {args.device}), {args.prompts} GSM8K prompts, "
        f"<= {args.max_new_tokens} new tokens, T=1, top_k 0, {args.threads} thread(s); spin engines at batch "
        f"{args.batch_size}; {args.dtype} matmul limit {out['matmul_limit_gflops']:.1f} GFLOP/s "
        f"(before {out['matmul_gflops'][0]:.1f}, after {out['matmul_gflops'][1]:.1f}), 2N FLOPs per token\n"
    )
    print(
        "| way | prompts | tokens | tokens/prompt | start-up s | generate s | tokens/s | prompts/s | % of matmul limit |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for way, r in results.items():
        print(
            f"| {way} | {r['prompts']} | {r['tokens']} | {r['tokens'] / r['prompts']:.1f} | {r['startup_s']:.1f} "
            f"| {r['generate_s']:.1f} | {r['tokens_per_s']:.1f} | {r['prompts_per_s']:.2f} "
            f"| {r['pct_of_matmul_limit']:.2f} |"
        )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=256, help="GSM8K training questions (the first ones)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64, help="batch size of the spin engines")
    p.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[32, 64], help="plain batched HF ways")
    p.add_argument("--one-prompts", type=int, default=None, help="hf_one on the first K prompts only")
    p.add_argument("--continuous-prompts", type=int, default=None, help="spin_continuous on the first K only")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads, every way and the matmul")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="weights dtype, every way (and the matmul)",
    )
    p.add_argument("--model", default=None, help="model folder (default: runs/smollm2, made once)")
    p.add_argument("--data", default=default_gsm8k(), help="GSM8K jsonl with `question` fields")
    p.add_argument("--ways", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--profile", default=None, metavar="WAY", help="profile this way instead (see above)")
    p.add_argument("--profiler", choices=("torch", "cprofile"), default="torch")
    p.add_argument("--profile-prompts", type=int, default=8)
    p.add_argument("--profile-rows", type=int, default=25, help="rows of the profile table")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if gsm8k_missing(args.data, "`question` fields"):
        return
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return
    if args.profile:
        if args.profile not in all_ways(args):
            raise SystemExit(f"--profile: choose one of {', '.join(all_ways(args))}")
        # In this process: nothing but the standard library is imported yet, so it is as fresh as a worker.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        profile_worker(args.profile, args)
        return
    out = run_all(args)
    print_table(args, out)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), **out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
