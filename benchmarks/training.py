"""Training speed and memory: spin's `train_iteration` vs TRL's `DPOTrainer`, same model, data and settings.

What it measures
----------------
One epoch of full fine-tuning on the same pairs, three ways, each in a fresh subprocess (so peak memory is
that variant's alone):

- `trl_live`: `DPOTrainer` with a live reference model (a second copy in memory, one extra forward per
  step): the paper's simplified setup, and what the official SPIN code does.
- `trl_precompute`: `DPOTrainer(precompute_ref_log_probs=True)`: one reference pass before training (inside
  the trainer's constructor), then one model.
- `spin`: the reference pass (`spinlm.logps.score_logps`, what `spinlm run` does when it builds the pairs), then
  `spinlm.trainer.train_iteration`. Training time and the reference pass are reported separately and summed.

Per variant: wall time of the reference pass (if any) and of training, pairs/s of training alone and of
reference + training, tokens/s, peak memory (CPU: peak RSS of the process, `ru_maxrss`; GPU:
`torch.cuda.max_memory_allocated`) and, on GPU, MFU = 6 * N * trained tokens / training time / peak FLOP/s
(6N: forward + backward of the policy; a reference forward is overhead, not counted as useful work).

Memory on CPU: PyTorch allocates CPU tensors with malloc. glibc's default lets its mmap threshold grow to
32 MiB, so activation tensors (a few MiB each) land on the heap, and with batch shapes changing every step
the heap fragments: peak RSS then drifts up by hundreds of MiB over an epoch, differently per run, and
swamps the one difference between the trainers that is structural (TRL's second model, 4 bytes a
parameter). Every worker therefore runs with the same `MALLOC_MMAP_THRESHOLD_` (default 1 MiB: large
tensors are mmapped and returned to the OS when freed), so RSS follows the live tensors; this costs all
variants the same page faults (system time, counted in the CPU time). `--mmap-threshold 0` measures with
glibc's defaults.

Every setting TRL has a different default for is set explicitly and identically: fp32 on CPU / bf16 on GPU,
no gradient checkpointing (`--gradient-checkpointing`: both, non-reentrant), RMSprop (the paper's optimizer), learning rate, linear schedule with warmup 0.1,
1 epoch, batch size, clipping 1.0, beta 0.1, sigmoid loss, no truncation, no dropout, no logging / saving.

How to run
----------
    python benchmarks/training.py                  # CPU: char Llama (hidden 512, 8 layers), 512 pairs ~128 tokens
    python benchmarks/training.py --quick          # a small smoke run (seconds)
    python benchmarks/training.py --qwen           # GPU: Qwen2-0.5B shape, bf16, 512-token sequences
    python benchmarks/training.py --variants spin trl_live --out results.json

The model is randomly initialised from a config (no download); the tokenizer is the built-in character
tokenizer, so a token is a character (with --qwen the vocabulary still has Qwen2's 151,936 rows, which is
what the LM head costs). Results are printed as a Markdown table and written to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("trl_live", "trl_precompute", "spin", "spin_padded")  # spin_padded: train.padding_free=false
H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM dense bf16 (no sparsity)


# ------------------------------------------------------------------------------------------------------
# Setup (parent process): one model checkpoint and one pairs file shared by all variants.


def build_model(args: argparse.Namespace, tokenizer: Any) -> Any:
    if args.qwen:
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        config = Qwen2Config(  # Qwen2-0.5B's shape
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return Qwen2ForCausalLM(config)
    from spinlm.modeling import build_tiny_model

    return build_tiny_model(
        tokenizer,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=args.intermediate,
        max_positions=2 * args.seq + 64,
    )


def make_pairs(n: int, seq: int, seed: int = 0) -> list[dict]:
    """`n` pairs whose prompt + response is ~`seq` characters (= tokens) on average, lengths varying ±25%."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
        for _ in range(500)
    ]

    def text(length: int) -> str:
        out = ""
        while len(out) < length:
            out += rng.choice(words) + " "
        return out[:length].strip()

    pairs = []
    for _ in range(n):
        p = rng.randint(seq // 8, seq * 3 // 8)  # prompt ~ seq/4
        r = seq - 4 - p  # 4 tokens of chat template around the turns
        pairs.append(
            {
                "prompt": [{"role": "user", "content": text(p)}],
                "chosen": [{"role": "assistant", "content": text(rng.randint(r * 3 // 4, r * 5 // 4))}],
                "rejected": [{"role": "assistant", "content": text(rng.randint(r * 3 // 4, r * 5 // 4))}],
            }
        )
    return pairs


# ------------------------------------------------------------------------------------------------------
# Workers (one fresh process per variant).


def peak_memory_mb(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_spin(args: argparse.Namespace, work: Path, pairs: list[dict], device: Any, dtype: Any) -> dict:
    import torch

    from spinlm.config import ModelConfig, TrainConfig
    from spinlm.logps import score_logps
    from spinlm.modeling import load_model, load_tokenizer
    from spinlm.trainer import train_iteration

    tokenizer = load_tokenizer(work / "model", ModelConfig())
    model = load_model(work / "model", ModelConfig(), device=device, dtype=dtype)
    prompts = [p["prompt"] for p in pairs]
    packed = args.worker != "spin_padded"  # sequences packed into rows without padding (spinlm.logps)
    t0, c0 = time.perf_counter(), time.process_time()
    # The reference pass of `spinlm run`: both sides scored by the opponent, 2B sequences per batch as in training.
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=precision(args, device) == "bf16")
    with autocast:  # the reference under the training's autocast, as spinlm.opponent scores it
        real = score_logps(
            model,
            tokenizer,
            prompts,
            [p["chosen"][0]["content"] for p in pairs],
            args.max_length,
            2 * args.batch_size,
            packed=packed,
        )
        gen = score_logps(
            model,
            tokenizer,
            prompts,
            [p["rejected"][0]["content"] for p in pairs],
            args.max_length,
            2 * args.batch_size,
            packed=packed,
        )
    if device.type == "cuda":
        torch.cuda.synchronize()
    ref_seconds, ref_cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = [{**p, "ref_chosen_logps": c, "ref_rejected_logps": r} for p, c, r in zip(pairs, real, gen)]
    cfg = TrainConfig(
        iterations=1,
        learning_rate=args.lr,
        beta=0.1,
        epochs=1,
        loss_type="sigmoid",
        batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        optimizer="rmsprop",
        lr_scheduler="linear",
        warmup_ratio=0.1,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=args.max_length,
        precision=precision(args, device),
        padding_free=packed,
        gradient_checkpointing=args.gradient_checkpointing,
        save_steps=0,
        logging_steps=10**9,
    )
    t1, c1 = time.perf_counter(), time.process_time()
    result = train_iteration(model, tokenizer, rows, cfg, iteration=1, run_seed=0, log_dir=work / "spin_log")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {
        "ref_seconds": ref_seconds,
        "ref_cpu": ref_cpu,
        "train_seconds": time.perf_counter() - t1,
        "train_cpu": time.process_time() - c1,
        "steps": result.steps,
    }


def precision(args: argparse.Namespace, device: Any) -> str:
    """Both trainers' compute precision: bf16 autocast on a GPU, `--precision` on CPU (fp32 by default)."""
    return "bf16" if device.type == "cuda" else args.precision


def run_trl(
    args: argparse.Namespace, work: Path, pairs: list[dict], device: Any, dtype: Any, live: bool
) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from spinlm.config import ModelConfig
    from spinlm.modeling import load_tokenizer

    tokenizer = load_tokenizer(work / "model", ModelConfig())
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=dtype).to(device)
    ref = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=dtype).to(device) if live else None
    gpu = device.type == "cuda"
    config = DPOConfig(
        output_dir=str(work / "trl_out"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0.1,  # a float < 1 is a ratio of the total steps in transformers 5
        optim="rmsprop",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        bf16=precision(args, device) == "bf16",  # accelerate's autocast over fp32 weights on CPU
        fp16=False,
        use_cpu=not gpu,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={
            "use_reentrant": False
        },  # what spin uses (set_activation_checkpointing)
        precompute_ref_log_probs=not live,
        precompute_ref_batch_size=args.batch_size,
        disable_dropout=True,
        report_to="none",
        logging_steps=10**9,
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        dataloader_pin_memory=gpu,
        disable_tqdm=True,
        seed=0,
    )
    dataset = Dataset.from_list(pairs)
    t0, c0 = time.perf_counter(), time.process_time()
    # Tokenisation, and with precompute_ref_log_probs the whole reference pass, happen in the constructor.
    trainer = DPOTrainer(
        model=model, ref_model=ref, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    init_seconds, init_cpu = time.perf_counter() - t0, time.process_time() - c0
    t1, c1 = time.perf_counter(), time.process_time()
    trainer.train()
    if gpu:
        import torch

        torch.cuda.synchronize()
    return {
        "ref_seconds": init_seconds if not live else 0.0,
        "ref_cpu": init_cpu if not live else 0.0,
        "init_seconds": init_seconds,
        "train_seconds": time.perf_counter() - t1,
        "train_cpu": time.process_time() - c1,
        "steps": trainer.state.global_step,
    }


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # What each trainer imports (spin does not need trl or datasets), before any model exists: the baseline.
    if args.worker.startswith("spin"):
        import spinlm.trainer  # noqa: F401
    else:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    from spinlm.modeling import default_device

    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    work = Path(args.workdir)
    pairs = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    baseline = peak_memory_mb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = 0.0
    if args.worker.startswith("spin"):
        out = run_spin(args, work, pairs, device, dtype)
    else:
        out = run_trl(args, work, pairs, device, dtype, live=args.worker == "trl_live")
    out.update(variant=args.worker, peak_mb=peak_memory_mb(device), baseline_mb=baseline, device=str(device))
    print("RESULT " + json.dumps(out))


# ------------------------------------------------------------------------------------------------------
# Parent: set up once, run each variant in a subprocess, tabulate.


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--qwen", action="store_true", help="GPU mode: Qwen2-0.5B shape, bf16, 512-token sequences"
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None, help="average tokens per prompt + response")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1408, help="MLP width (Llama's 8/3 x hidden)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (both trainers)")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads per worker (1: robust on a shared machine)"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="both trainers recompute activations (non-reentrant)",
    )
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=2**20,
        help="glibc MALLOC_MMAP_THRESHOLD_ for every worker (0: glibc's default); see the docstring",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="CPU compute precision, both trainers"
    )
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    if args.quick:
        args.hidden, args.layers, args.heads, args.intermediate = 64, 2, 4, 256
    args.pairs = args.pairs or (32 if args.quick else 512)
    args.seq = args.seq or (512 if args.qwen else 64 if args.quick else 128)
    args.max_length = 2 * args.seq  # never truncate: both trainers see every token

    import torch

    from spinlm.modeling import build_char_tokenizer, count_parameters, save_model

    if args.qwen and not torch.cuda.is_available():
        print("--qwen needs a CUDA GPU (bf16, Qwen2-0.5B shape); none is available here", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory(prefix="spin_bench_train_") as tmp:
        work = Path(tmp)
        tokenizer = build_char_tokenizer()
        model = build_model(args, tokenizer)
        n_params = count_parameters(model)
        save_model(model, tokenizer, work / "model")
        del model
        pairs = make_pairs(args.pairs, args.seq)
        (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        tokens_per_pair = [
            sum(len(m["content"]) for m in p["prompt"]) * 2
            + len(p["chosen"][0]["content"])
            + len(p["rejected"][0]["content"])
            + 8
            for p in pairs
        ]  # both sequences of a pair, with the template's special tokens (2 x 4)
        tokens = sum(tokens_per_pair)
        print(
            f"model: {n_params / 1e6:.1f}M parameters; {len(pairs)} pairs, {tokens / (2 * len(pairs)):.0f} tokens per sequence on average"
        )

        results = []
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--worker", variant, "--workdir", str(work)]
            for flag in ("batch_size", "lr", "threads", "max_length"):
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            if args.qwen:
                cmd.append("--qwen")
            if args.gradient_checkpointing:
                cmd.append("--gradient-checkpointing")
            env = dict(os.environ)
            if args.mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"variant {variant} failed")
            r = json.loads(line[len("RESULT ") :])
            # CPU-time rates too: on a shared machine wall time depends on the neighbours, process time less.
            r["pairs_per_cpu_s_train"] = len(pairs) / r["train_cpu"]
            r["pairs_per_cpu_s_total"] = len(pairs) / (r["train_cpu"] + r["ref_cpu"])
            r["pairs_per_s_train"] = len(pairs) / r["train_seconds"]
            r["pairs_per_s_total"] = len(pairs) / (
                r["train_seconds"] + (r["ref_seconds"] if variant != "trl_live" else 0.0)
            )
            r["tokens_per_s_train"] = tokens / r["train_seconds"]
            if r["device"].startswith("cuda"):
                r["mfu_train"] = 6 * n_params * tokens / r["train_seconds"] / H100_BF16_DENSE
            results.append(r)
            print(json.dumps(r))

    print_table(results, args, n_params)
    if args.out is not None:
        setup = {k: v for k, v in vars(args).items() if k not in ("worker", "workdir", "out")}
        args.out.write_text(
            json.dumps({"setup": {**setup, "parameters": n_params}, "results": results}, indent=2)
        )


def print_table(results: list[dict], args: argparse.Namespace, n_params: int) -> None:
    by = {r["variant"]: r for r in results}
    print(
        f"\n{n_params / 1e6:.1f}M params, {args.pairs} pairs, ~{args.seq} tokens/sequence, batch {args.batch_size}, "
        f"1 epoch, {args.threads} thread(s)\n"
    )
    print(
        "| variant | ref pass s | train s | pairs/s train | pairs/s ref+train | pairs/CPU-s train "
        "| pairs/CPU-s ref+train | peak MB | after imports MB | peak - imports MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['variant']} | {r['ref_seconds']:.1f} | {r['train_seconds']:.1f} | {r['pairs_per_s_train']:.2f} "
            f"| {r['pairs_per_s_total']:.2f} | {r['pairs_per_cpu_s_train']:.2f} | {r['pairs_per_cpu_s_total']:.2f} "
            f"| {r['peak_mb']:.0f} | {r['baseline_mb']:.0f} | {r['peak_mb'] - r['baseline_mb']:.0f} |"
        )

    def ratios(a: dict, b: dict) -> str:
        mem = a["peak_mb"] / b["peak_mb"]
        mem_above = (a["peak_mb"] - a["baseline_mb"]) / (b["peak_mb"] - b["baseline_mb"])
        return (
            f"peak memory {mem:.2f}x (above imports {mem_above:.2f}x); pairs/s training alone "
            f"{a['pairs_per_s_train'] / b['pairs_per_s_train']:.2f}x wall, "
            f"{a['pairs_per_cpu_s_train'] / b['pairs_per_cpu_s_train']:.2f}x CPU; with the reference pass "
            f"{a['pairs_per_s_total'] / b['pairs_per_s_total']:.2f}x wall, "
            f"{a['pairs_per_cpu_s_total'] / b['pairs_per_cpu_s_total']:.2f}x CPU"
        )

    if "spin" in by and "trl_live" in by:
        print(
            f"\nspin / TRL live reference: {ratios(by['spin'], by['trl_live'])} (targets: <= 0.8x, >= 1.2x)"
        )
    if "spin" in by and "trl_precompute" in by:
        print(
            f"spin / TRL precomputed reference: {ratios(by['spin'], by['trl_precompute'])} (targets: <= 1x, >= 1x)"
        )


if __name__ == "__main__":
    main()
