"""Training on a real model: spin's trainer vs TRL's `DPOTrainer` (live and precomputed reference), GSM8K pairs.

What: SmolLM2-135M-Instruct (fp32 on CPU), `--pairs` GSM8K training questions as user turns; chosen = the
question's real GSM8K answer, rejected = a reply the model itself sampled (spin's `refill` engine,
temperature 1, top_k 0, at most `--max-new-tokens` tokens: one SPIN iteration's pairs). The samples are drawn
once, in a fresh process, and cached in `OUT/rejected_sampled_T{max_new_tokens}.jsonl`, so a rerun (or a
smaller `--pairs`) reuses them. `--rejected repeat` skips sampling for a quick run: the rejected reply is the
real answer of the question after the last one, repeated to `--repeat-tokens` tokens (as
benchmarks/real_memory.py does: the length SmolLM2's temperature-1 samples often run to).

Three trainers, one epoch over the same pairs, each in its own fresh process (benchmarks/training.py's
workers, which set every setting TRL has another default for explicitly and equally: RMSprop, learning rate,
linear schedule with warmup 0.1, 1 epoch, batch `--batch-size`, max_length `--max-length` (never reached
by these pairs, so neither trainer truncates), clipping 1.0, beta 0.1, sigmoid loss, fp32 weights, `--precision` compute (fp32 by default; bf16: autocast, TRL bf16=True on
CPU), no dropout; gradient checkpointing on for both as in spin's default, non-reentrant, or off for both
with `--no-gradient-checkpointing`):

- `spin`: the reference pass (`spinlm.logps.score_logps`, as `spinlm run` does when it builds the pairs), then
  `spinlm.trainer.train_iteration`, sequences packed into rows without padding (`train.padding_free`, default);
- `spin_padded`: the same with padded batches (`train.padding_free: false`), spin before packing;
- `trl_live`: `DPOTrainer` with a live reference model (a second copy, one extra forward per step);
- `trl_precompute`: `DPOTrainer(precompute_ref_log_probs=True)` (the reference pass in its constructor).
  TRL 1.16's `padding_free=True` is not offered: the trainer warns that it "is temporarily unavailable after a
  refactor and is currently disabled" and falls back to padding (trl/trainer/dpo_trainer.py), so
  precomputed reference log-probs are TRL's fastest setting that runs here.

Reported per trainer: seconds of the reference pass and of training, pairs/s of training alone and of
reference + training, trained tokens/s (both sequences of every pair, prompt included, padding not; counted
with spin's tokenisation) and that as % of the machine's matmul limit at 6 N FLOPs per token (forward +
backward of the policy; recomputation under checkpointing and TRL's live reference forward are overhead, not
counted), and the peak resident memory of the whole worker process (the kernel's high-water mark, `wait4`'s
ru_maxrss: exact, no sampling; it includes imports and model loading). The limit: a fresh process times a
2048 x 2048 fp32 matmul with the same thread count (best of 5, GFLOP/s) before the first trainer. Memory
allocator: by default each trainer runs as a user runs it (glibc's malloc; spinlm trims the heap after each
step, `spinlm.memory`); `--mmap-threshold N` sets `MALLOC_MMAP_THRESHOLD_` = N for every worker (1048576:
resident memory follows the live tensors, every trainer slower; the tables before 2026-12-05 ran so).

Needs the GSM8K file (`--data`; default ../shared/data/gsm8k/train.jsonl, else /work/shared/data/gsm8k/
train.jsonl); without it, it says so and exits 0.

    python benchmarks/real_training.py --threads 2 --out runs/real_training              # the full run
    OMP_NUM_THREADS=1 python benchmarks/real_training.py --pairs 8 --rejected repeat --repeat-tokens 32 \\
        --steps 2 --batch-size 1 --max-length 512 --threads 1 --out runs/real_training_smoke   # smoke (~2 min)

Writes under `--out`: the sampled rejected replies (cache), `work/` (the pairs and the trainers' scratch
files), `results.json` (settings and every trainer's numbers); the Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from real_common import (
    REPO,
    batch_positions,
    default_gsm8k,
    gsm8k_missing,
    gsm8k_rows,
    matmul_gflops,
    run_worker,
    smollm2_folder,
)

VARIANTS = ("spin", "spin_padded", "trl_live", "trl_precompute")  # spin_padded: padding_free=false
TRAINING = REPO / "benchmarks" / "training.py"  # its --worker mode runs one trainer


def model_folder(args: argparse.Namespace) -> Path:
    return Path(args.model) if args.model else smollm2_folder()


def prompt_of(row: dict[str, str]) -> list[dict[str, str]]:
    return [{"role": "user", "content": row["question"]}]


# ------------------------------------------------------------------------------------------------------
# Workers (fresh processes): the sampled rejected replies, and the matmul limit with the parameter count.


def sample_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Sample one reply per question with spin's refill engine; write the cache file."""
    import time

    import torch

    torch.set_num_threads(args.threads)
    from spinlm.config import GenerationConfig, ModelConfig
    from spinlm.generation import generate_responses
    from spinlm.io import write_jsonl
    from spinlm.modeling import load_model, load_tokenizer

    folder = model_folder(args)
    tok = load_tokenizer(folder, ModelConfig())
    model = load_model(folder, ModelConfig(dtype="float32"), device=torch.device("cpu")).eval()
    rows = gsm8k_rows(args.data, args.pairs)
    cfg = GenerationConfig(
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.gen_batch_size,
        engine="refill",
    )
    start = time.perf_counter()
    gens = generate_responses(model, tok, [prompt_of(r) for r in rows], cfg, seed=0, desc="sample rejected")
    seconds = time.perf_counter() - start
    out = [
        {"question": r["question"], "rejected": g.text, "num_tokens": g.num_tokens, "finished": g.finished}
        for r, g in zip(rows, gens)
    ]
    write_jsonl(cache_path(args), out)  # atomic: a killed run leaves no half-written cache
    return {"seconds": seconds, "tokens": sum(g.num_tokens for g in gens)}


def limit_worker(args: argparse.Namespace) -> dict[str, Any]:
    """The matmul limit, and the model's parameter count (built on the meta device: no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from spinlm.modeling import count_parameters

    gflops = matmul_gflops(args.threads)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_folder(args)))
    return {"gflops": gflops, "parameters": count_parameters(model)}


# ------------------------------------------------------------------------------------------------------
# Parent: the pairs, then one fresh process per trainer.


def cache_path(args: argparse.Namespace) -> Path:
    return Path(args.out) / f"rejected_sampled_T{args.max_new_tokens}.jsonl"


def sampled_rejected(args: argparse.Namespace, rows: list[dict[str, str]]) -> list[str]:
    """The cached samples of these questions, sampled first (in a fresh process) when the cache lacks them."""
    path = cache_path(args)

    def cached() -> list[dict[str, Any]] | None:
        if not path.is_file():
            return None
        have = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        ok = len(have) >= len(rows) and all(h["question"] == r["question"] for h, r in zip(have, rows))
        return have[: len(rows)] if ok else None

    have = cached()
    if have is None:
        print(
            f"sampling {len(rows)} rejected replies (<= {args.max_new_tokens} tokens) into {path}", flush=True
        )
        r = run_worker([sys.executable, __file__, *sys.argv[1:], "--worker", "sample"], echo=True)
        print(f"sampled {r['tokens']} tokens in {r['seconds']:.0f} s", flush=True)
        have = cached()
        assert have is not None, f"{path} was not written"
    else:
        print(f"rejected replies: reusing {path}", flush=True)
    return [h["rejected"] for h in have]


def repeated_rejected(tok: Any, filler: str, n: int, tokens: int) -> list[str]:
    """`filler` repeated and cut to `tokens` tokens, for every pair (benchmarks/real_memory.py's shapes)."""
    ids = tok(filler, add_special_tokens=False)["input_ids"]
    return [tok.decode((ids * (tokens // len(ids) + 1))[:tokens])] * n


def build_pairs(args: argparse.Namespace, tok: Any) -> list[dict[str, Any]]:
    """Conversational pairs (the format both trainers read): the first `--pairs` questions, or only the first
    `--steps` x `--batch-size` of them when `--steps` caps the run."""
    rows = gsm8k_rows(args.data, args.pairs + 1)  # one more: the repeat filler
    if len(rows) <= args.pairs:
        raise SystemExit(f"{args.data} has only {len(rows)} rows; lower --pairs")
    filler, rows = rows[-1]["answer"], rows[:-1]
    if args.rejected == "sampled":
        rejected = sampled_rejected(args, rows)
    else:
        rejected = repeated_rejected(tok, filler, len(rows), args.repeat_tokens)
    pairs = [
        {
            "prompt": prompt_of(r),
            "chosen": [{"role": "assistant", "content": r["answer"]}],
            "rejected": [{"role": "assistant", "content": x}],
        }
        for r, x in zip(rows, rejected)
    ]
    return pairs[: args.steps * args.batch_size] if args.steps else pairs


def count_tokens(tok: Any, pairs: list[dict[str, Any]], max_length: int) -> tuple[int, int]:
    """(trained tokens of both sequences of every pair, the longest sequence), as spin tokenises them."""
    from spinlm.logps import encode_all

    prompts = [p["prompt"] for p in pairs]
    lengths = [
        len(e.input_ids)
        for side in ("chosen", "rejected")
        for e in encode_all(tok, prompts, [p[side][0]["content"] for p in pairs], max_length)
    ]
    return sum(lengths), max(lengths)


def positions(tok: Any, pairs: list[dict[str, Any]], batch_size: int, max_length: int) -> dict[str, int]:
    """Positions spin's forward passes run (one row per batch under sdpa_segments, rows <= T under sdpa, and
    padded), and the real tokens among them: training's
    micro-batches of 2 x `batch_size` sequences in `spinlm.trainer.plan_batches`' order (benchmarks/training.py
    trains with run_seed 0, iteration 1), and the reference pass's batches of 2 x `batch_size` sequences of
    one side, sorted by length (`spinlm.logps.score_logps`). Counted from spin's tokenisation, not timed."""
    from spinlm.config import TrainConfig
    from spinlm.trainer import featurize, plan_batches

    rows = [{**p, "ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0} for p in pairs]  # lengths only
    feats = featurize(tok, rows, max_length)
    cfg = TrainConfig(batch_size=batch_size, gradient_accumulation_steps=1, max_length=max_length)
    _, micro = plan_batches(len(feats), cfg, 1.0, 0 * 1000 + 1, 1)
    work = {"tokens": 0}
    layouts = {"one_row": (True, True), "packed": (True, False), "padded": (False, False)}
    for batch in micro:
        lengths = [len(s.input_ids) for i in batch for s in (feats[i].chosen, feats[i].rejected)]
        work["tokens"] += sum(lengths)
        for name, (packed, one_row) in layouts.items():
            work[f"train_{name}"] = work.get(f"train_{name}", 0) + batch_positions(lengths, packed, one_row)
    for side in ("chosen", "rejected"):
        lengths = sorted((len(getattr(f, side).input_ids) for f in feats), reverse=True)
        for b in range(0, len(lengths), 2 * batch_size):
            chunk = lengths[b : b + 2 * batch_size]
            for name, (packed, one_row) in layouts.items():
                work[f"ref_{name}"] = work.get(f"ref_{name}", 0) + batch_positions(chunk, packed, one_row)
    return work


def run_trainers(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    env = dict(os.environ)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    results = []
    for variant in args.variants:
        cmd = [sys.executable, str(TRAINING), "--worker", variant, "--workdir", str(work)]
        cmd += ["--batch-size", str(args.batch_size), "--lr", str(args.lr), "--threads", str(args.threads)]
        cmd += ["--max-length", str(args.max_length), "--precision", args.precision]
        cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        r = run_worker(cmd, env)
        results.append(r)
        print(json.dumps(r), flush=True)
    return results


def add_rates(r: dict[str, Any], n_pairs: int, tokens: int, params: int, gflops: float) -> None:
    """Rates of one trainer: pairs/s (training; reference + training), tokens/s, % of the matmul limit."""
    ref = r["ref_seconds"] if r["variant"] != "trl_live" else 0.0  # trl_live's reference is in training
    r["pairs_per_s_train"] = n_pairs / r["train_seconds"]
    r["pairs_per_s_total"] = n_pairs / (r["train_seconds"] + ref)
    r["tokens_per_s_train"] = tokens / r["train_seconds"]
    r["pct_of_matmul_limit"] = 100 * 6 * params * r["tokens_per_s_train"] / (gflops * 1e9)


def print_table(args: argparse.Namespace, setup: dict[str, Any], results: list[dict[str, Any]]) -> None:
    gc = "on" if args.gradient_checkpointing else "off"
    print(
        f"\nSmolLM2-135M-Instruct ({setup['parameters'] / 1e6:.1f}M parameters, {args.precision}), {setup['pairs']} GSM8K "
        f"pairs (rejected: {args.rejected}), {setup['tokens']} trained tokens (longest sequence "
        f"{setup['longest']}), batch {args.batch_size}, max_length {args.max_length}, 1 epoch, gradient "
        f"checkpointing {gc}, {args.threads} thread(s); matmul limit {setup['matmul_gflops']:.1f} GFLOP/s, "
        f"6N FLOPs per token\n"
    )
    print(
        "| trainer | steps | ref pass s | train s | pairs/s train | pairs/s ref+train | train tokens/s "
        "| % of matmul limit | peak RSS MB | process s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['variant']} | {r['steps']} | {r['ref_seconds']:.1f} | {r['train_seconds']:.1f} "
            f"| {r['pairs_per_s_train']:.3f} | {r['pairs_per_s_total']:.3f} | {r['tokens_per_s_train']:.1f} "
            f"| {r['pct_of_matmul_limit']:.2f} | {r['peak_rss_mb']:.0f} | {r['process_s']:.0f} |"
        )
    by = {r["variant"]: r for r in results}
    for other in ("spin_padded", "trl_live", "trl_precompute"):
        if "spin" in by and other in by:
            a, b = by["spin"], by[other]
            print(
                f"spin / {other}: peak RSS {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x, pairs/s training "
                f"{a['pairs_per_s_train'] / b['pairs_per_s_train']:.2f}x, reference + training "
                f"{a['pairs_per_s_total'] / b['pairs_per_s_total']:.2f}x"
            )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=128, help="GSM8K training questions (the first ones)")
    p.add_argument("--rejected", choices=("sampled", "repeat"), default="sampled", help="see above")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest sampled rejected reply")
    p.add_argument("--repeat-tokens", type=int, default=256, help="length of a `repeat` rejected reply")
    p.add_argument("--gen-batch-size", type=int, default=64, help="refill batch size when sampling")
    p.add_argument("--steps", type=int, default=None, help="train only the first STEPS x batch pairs")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step, every trainer")
    p.add_argument("--max-length", type=int, default=768, help="prompt + reply token limit, every trainer")
    p.add_argument("--lr", type=float, default=5e-7, help="peak learning rate (RMSprop, the paper's)")
    p.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="turn activation checkpointing off for every trainer (default on: spin's default)",
    )
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="compute precision (bf16: autocast)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads, every worker and the matmul")
    p.add_argument(
        "--mmap-threshold", type=int, default=0, help="MALLOC_MMAP_THRESHOLD_ for every worker (0: glibc's)"
    )
    p.add_argument("--model", default=None, help="model folder (default: runs/smollm2, made once)")
    p.add_argument("--data", default=default_gsm8k(), help="GSM8K jsonl with question / answer fields")
    p.add_argument("--out", default="runs/real_training", help="folder for the cache, work files, results")
    p.add_argument("--worker", choices=("sample", "limit"), help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if gsm8k_missing(args.data):
        return
    if args.worker:
        work = sample_worker if args.worker == "sample" else limit_worker
        print("RESULT " + json.dumps(work(args)), flush=True)
        return
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args).resolve()
    if (work / "model").is_symlink() or (work / "model").exists():
        (work / "model").unlink()
    (work / "model").symlink_to(folder)  # training.py's workers load WORKDIR/model
    from spinlm.config import ModelConfig
    from spinlm.modeling import load_tokenizer

    tok = load_tokenizer(folder, ModelConfig())
    pairs = build_pairs(args, tok)
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    tokens, longest = count_tokens(tok, pairs, args.max_length)
    if longest >= args.max_length:
        print(
            f"warning: a sequence reaches max_length {args.max_length}: the trainers truncate it differently"
        )
    limit = run_worker([sys.executable, __file__, *sys.argv[1:], "--worker", "limit"])
    setup = {"pairs": len(pairs), "tokens": tokens, "longest": longest, "parameters": limit["parameters"]}
    setup["matmul_gflops"] = limit["gflops"]
    setup["positions"] = positions(tok, pairs, args.batch_size, args.max_length)
    print(f"{json.dumps(setup)}", flush=True)
    results = run_trainers(args, work)
    for r in results:
        add_rates(r, len(pairs), tokens, setup["parameters"], setup["matmul_gflops"])
    print_table(args, setup, results)
    (out / "results.json").write_text(
        json.dumps({"args": vars(args), "setup": setup, "results": results}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
