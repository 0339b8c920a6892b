"""Cost versus size: one whole SPIN iteration (`spinlm.loop.run`) on a real model at several prompt counts.

What: SmolLM2-135M-Instruct on GSM8K, one iteration of the game (generate a reply per training prompt,
score both replies under the opponent, train on the pairs, evaluate) at each of `--sizes` training prompts,
all other settings fixed: replies capped at `--max-new-tokens` (default 64, not the paper's 256, to keep the
largest size to hours on a CPU: a longer cap makes generation and training dearer per prompt, not the
scaling different), engine `refill` (auto would time the engines only at the larger sizes), batch
`--gen-batch-size` for generation and `--batch-size` pairs per step, max_length `--max-length`, RMSprop at
5e-7, 1 epoch, gradient checkpointing on (spin's defaults); `--precision` (train.precision; bf16: autocast in training
and in scoring the reference, as the policy runs) and `--gen-dtype` (generation.dtype; bfloat16: the engines
sample from a bf16 copy), both `auto` by default: bf16 on a CPU with AMX or AVX512-BF16 (each ~1.7-1.8x
faster with AMX), fp32 on a CPU without (where bf16 measured ~3x slower; docs/results/training.md).
Evaluation runs on the same `--eval-size` held-out questions at every size: each size's data file holds
those questions plus its first `size` others, and the held-out questions are the ones spin's own split
(`spinlm.data.split_holdout`, a hash of seed and prompt) ranks first over the whole GSM8K file, so spin holds
out exactly them whatever else the file holds.

Each size runs in a fresh process, in its own run folder `OUT/size_N` (iteration 0 evaluates the starting
model first, as every `spinlm run` does). The seconds per stage come from `iteration_1/metrics.json`
(`seconds_generate`, `seconds_score`, `seconds_train`, `seconds_eval`). Reported: seconds per stage per
1,000 training prompts at each size and its ratio to the smallest size (the target: linear, every ratio
within 1 +- 0.2); evaluation is on a fixed set, so its seconds are reported as they are (ratio ~1 expected).
To tell a per-prompt cost that falls because batches pad less from one that falls because a fixed cost is
spread thinner, a second table gives the work each stage did (`stage_work`: sampled tokens; positions of
the padded batches scoring and training ran, recomputed from the run folder the way spin batches them) and
seconds per 1,000 of them, and each stage's least-squares line `seconds = fixed + per_prompt * size` over
the sizes (with its largest relative residual: a super-linear stage would show as a bent line).

Resumable: rerunning the same command reuses every run folder; `spinlm.loop.run` resumes each after its last
finished stage (a finished size costs only loading the model, and keeps the peak RSS its measuring run
wrote to results.json). A folder refuses other settings: change `--out` with them.

    python benchmarks/real_cost.py --threads 2 --out runs/real_cost                      # the full run
    OMP_NUM_THREADS=1 python benchmarks/real_cost.py --sizes 4 8 --max-new-tokens 8 --eval-size 4 \\
        --batch-size 4 --threads 1 --out runs/real_cost_smoke                            # smoke

Needs the GSM8K file (`--data`; default ../shared/data/gsm8k/train.jsonl, else /work/shared/data/gsm8k/
train.jsonl); without it, it says so and exits 0. Writes under `--out`: `data/` (each size's data file),
`size_N/` (each run folder), `results.json`; the Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from real_common import batch_positions, default_gsm8k, gsm8k_missing, line_fit, run_worker, smollm2_folder

STAGES = ("generate", "score", "train")  # scale with the training prompts; eval is on a fixed set
COLUMNS = {"prompt": "question", "response": "answer"}


def data_config(path: Path) -> Any:
    from spinlm.config import DataConfig

    return DataConfig(path=str(path), columns=COLUMNS, answer_pattern="gsm8k")


def write_data(args: argparse.Namespace, size: int) -> Path:
    """OUT/data/gsm8k_N.jsonl: the fixed held-out questions, then the first `size` other questions.

    The same file at every run (held-out first: spin's split does not depend on the order)."""
    from spinlm.data import load_sft_examples, prompt_key, split_holdout

    path = Path(args.out) / "data" / f"gsm8k_{size}.jsonl"
    if path.is_file():
        return path
    examples, _ = load_sft_examples(data_config(Path(args.data)), seed=args.seed)
    rest, held = split_holdout(examples, args.eval_size, args.seed)
    if len(rest) < size:
        raise SystemExit(f"{args.data} has {len(rest)} questions besides the held-out ones; lower --sizes")
    rows = [{"question": ex.prompt[-1]["content"], "answer": ex.response} for ex in held + rest[:size]]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"tmp_{path.name}")  # spin reads it by its .jsonl suffix
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    # spin reads this file with the same split: it must hold out exactly these questions.
    again, _ = load_sft_examples(data_config(tmp), seed=args.seed)
    got = split_holdout(again, args.eval_size, args.seed)[1]
    assert {prompt_key(e.prompt) for e in got} == {prompt_key(e.prompt) for e in held}, "held-out set moved"
    tmp.replace(path)
    return path


def spin_config(args: argparse.Namespace, size: int) -> Any:
    """The run's whole configuration: everything but the data file is the same at every size."""
    from spinlm.config import load_config

    folder = Path(args.model) if args.model else smollm2_folder()
    settings: dict[str, Any] = {
        "output_dir": str(Path(args.out) / f"size_{size}"),
        "seed": args.seed,
        "threads": args.threads,
        "model.name_or_path": str(folder.resolve()),
        "data.path": str((Path(args.out) / "data" / f"gsm8k_{size}.jsonl").resolve()),
        "data.columns": COLUMNS,
        "data.answer_pattern": "gsm8k",
        "data.eval_size": args.eval_size,
        "generation.temperature": 1.0,
        "generation.top_k": 0,
        "generation.max_new_tokens": args.max_new_tokens,
        "generation.batch_size": args.gen_batch_size,
        "generation.engine": "refill",
        "generation.dtype": args.gen_dtype,
        "train.iterations": 1,
        "train.learning_rate": 5e-7,
        "train.epochs": 1,
        "train.optimizer": "rmsprop",
        "train.batch_size": args.batch_size,
        "train.max_length": args.max_length,
        "train.precision": args.precision,
        "train.padding_free": not args.padded,
        "eval.batch_size": args.eval_batch_size,
        "eval.num_samples": 2,
    }
    return load_config(None, **settings)


def worker(args: argparse.Namespace, size: int) -> dict[str, Any]:
    """One size's run folder, played (or resumed) to the end by `spinlm.loop.run` in this fresh process."""
    import logging
    import os

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "datasets", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from spinlm.loop import run

    start = time.perf_counter()
    run(spin_config(args, size))
    return {"seconds": time.perf_counter() - start}


def measure(args: argparse.Namespace, size: int) -> dict[str, Any]:
    """Run (or resume) one size in a fresh process; its iteration 1 stage seconds."""
    write_data(args, size)
    it1 = Path(args.out) / f"size_{size}" / "iteration_1"
    reused = (it1 / ".eval.done").exists()
    print(f"size {size}: {'finished before, reusing' if reused else 'running'} {it1.parent}", flush=True)
    r = run_worker([sys.executable, __file__, *sys.argv[1:], "--worker", str(size)], echo=True)
    metrics = json.loads((it1 / "metrics.json").read_text())
    row: dict[str, Any] = {"size": size, "reused": reused, "wall_s_this_call": r["process_s"]}
    # A reused size's process only loaded the model: keep the peak RSS of the run that measured it, where
    # an earlier results.json has it (None where it does not).
    earlier = Path(args.out) / "results.json"
    before = {e["size"]: e for e in json.loads(earlier.read_text())["results"]} if earlier.is_file() else {}
    row["peak_rss_mb"] = before.get(size, {}).get("peak_rss_mb") if reused else r["peak_rss_mb"]
    for stage in (*STAGES, "eval"):
        row[f"seconds_{stage}"] = float(metrics.get(f"seconds_{stage}", float("nan")))
    row["seconds_iteration"] = float(metrics.get("seconds", float("nan")))
    return row


def stage_work(args: argparse.Namespace, size: int) -> dict[str, Any]:
    """The work each stage did at this size, recomputed from its run folder the way spin batches it.

    generate: sampled tokens (`num_tokens` in the generation shards) and prompt tokens (each prefilled once);
    score: positions of the batches `spinlm.logps.score_logps` ran (each side sorted by length,
    `eval.batch_size` sequences, packed into rows without padding under `train.padding_free`, else padded to
    the batch's longest) and the real tokens among them; train: positions of the micro-batches of 2B
    sequences in `spinlm.trainer.plan_batches`' order (packed, or padded to the longest) and the real tokens
    among them."""
    from spinlm.config import scheduled
    from spinlm.io import read_jsonl
    from spinlm.logps import encode_all
    from spinlm.modeling import load_tokenizer
    from spinlm.trainer import featurize, plan_batches

    cfg = spin_config(args, size)
    it1 = Path(cfg.output_dir) / "iteration_1"
    gens = [g for f in sorted((it1 / "generations").glob("shard_*.jsonl")) for g in read_jsonl(f)]
    pairs = list(read_jsonl(it1 / "pairs.jsonl"))
    tok = load_tokenizer(cfg.model.name_or_path, cfg.model)
    prompts = [p["prompt"] for p in pairs]
    prompt_only = encode_all(tok, prompts, [""] * len(prompts), cfg.train.max_length)
    feats = featurize(tok, pairs, cfg.train.max_length)
    work = {"generated_tokens": sum(int(g["num_tokens"]) for g in gens)}
    work["prompt_tokens"] = sum(e.prompt_len for e in prompt_only)
    work["score_positions"] = work["score_tokens"] = 0
    pack = cfg.train.padding_free  # SmolLM2 packs (spinlm.logps.can_pack)
    for side in ("chosen", "rejected"):
        lengths = sorted((len(getattr(f, side).input_ids) for f in feats), reverse=True)
        for b in range(0, len(lengths), cfg.eval.batch_size):
            chunk = lengths[b : b + cfg.eval.batch_size]
            work["score_positions"] += batch_positions(chunk, pack)
            work["score_tokens"] += sum(chunk)
    epochs = float(scheduled(cfg.train.epochs, 1))
    work["train_steps"], micro = plan_batches(len(feats), cfg.train, epochs, cfg.seed * 1000 + 1, 1)
    work["train_positions"] = work["train_tokens"] = 0
    for batch in micro:
        lengths = [len(s.input_ids) for i in batch for s in (feats[i].chosen, feats[i].rejected)]
        work["train_positions"] += batch_positions(lengths, pack)
        work["train_tokens"] += sum(lengths)
    return work


# The work unit per stage (stage_work's key) that its seconds are divided by.
WORK_UNIT = {"generate": "generated_tokens", "score": "score_positions", "train": "train_positions"}


def fit_lines(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per stage, the least-squares line seconds = fixed + slope * size over the sizes (2 or more)."""
    return {stage: line_fit([(r["size"], r[f"seconds_{stage}"]) for r in rows]) for stage in STAGES}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Seconds per 1,000 training prompts (generate, score, train and their sum) and ratios to the smallest
    size; eval (a fixed set) as it is, with its ratio."""
    for r in rows:
        for stage in STAGES:
            r[f"per_1k_{stage}"] = r[f"seconds_{stage}"] / r["size"] * 1000
        r["per_1k_total"] = sum(r[f"per_1k_{s}"] for s in STAGES)
    base = min(rows, key=lambda r: r["size"])
    for r in rows:
        for key in (*(f"per_1k_{s}" for s in STAGES), "per_1k_total"):
            r[f"ratio_{key.removeprefix('per_1k_')}"] = r[key] / base[key]
        r["ratio_eval"] = r["seconds_eval"] / base["seconds_eval"]
        ratios = [r[f"ratio_{s}"] for s in (*STAGES, "total")]
        r["linear_within_20pct"] = all(0.8 <= x <= 1.2 for x in ratios)
        for stage, unit in WORK_UNIT.items():
            r[f"ms_per_{unit}"] = r[f"seconds_{stage}"] / r["work"][unit] * 1000
            r[f"ratio_ms_per_{unit}"] = r[f"ms_per_{unit}"] / (
                base[f"seconds_{stage}"] / base["work"][unit] * 1000
            )


def print_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    print(
        f"\nSmolLM2-135M-Instruct, one SPIN iteration on GSM8K, <= {args.max_new_tokens} new tokens (refill, "
        f"batch {args.gen_batch_size}, generation.dtype {args.gen_dtype}), train batch {args.batch_size}, "
        f"max_length {args.max_length}, train.precision {args.precision}, 1 epoch, "
        f"eval on {args.eval_size} fixed held-out questions, {args.threads} thread(s); seconds per 1,000 "
        f"training prompts (ratio to size {rows[0]['size']})\n"
    )
    print("| prompts | generate | score | train | generate+score+train | eval s (fixed set) | linear ±20% |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        cells = [f"{r[f'per_1k_{s}']:.0f} ({r[f'ratio_{s}']:.2f}x)" for s in (*STAGES, "total")]
        eval_cell = f"{r['seconds_eval']:.0f} ({r['ratio_eval']:.2f}x)"
        print(
            f"| {r['size']} | {' | '.join(cells)} | {eval_cell} | {'yes' if r['linear_within_20pct'] else 'no'} |"
        )


def print_work(rows: list[dict[str, Any]]) -> None:
    """The work table (stage_work, ms per unit) and, with 2 sizes or more, each stage's fitted line."""
    print("\nWork per stage (padding included), ms per unit of it (ratio to the smallest size):\n")
    header = ["prompts", "generated tokens", "ms/token", "scored positions (real)", "ms/position"]
    print("| " + " | ".join([*header, "trained positions (real)", "ms/position"]) + " |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        w, cells = r["work"], []
        for stage, unit in WORK_UNIT.items():
            real = {"score": f" ({w['score_tokens']})", "train": f" ({w['train_tokens']})"}.get(stage, "")
            cells += [f"{w[unit]}{real}", f"{r[f'ms_per_{unit}']:.2f} ({r[f'ratio_ms_per_{unit}']:.2f}x)"]
        print(f"| {r['size']} | {' | '.join(cells)} |")
    if len(rows) < 2:
        return
    print(
        "\nLeast-squares line per stage over the sizes: seconds = fixed + (s per 1,000 prompts) * size / 1000\n"
    )
    print("| stage | fixed s | s per 1,000 prompts | largest residual |")
    print("|---|---:|---:|---:|")
    for stage, line in fit_lines(rows).items():
        cells = [
            f"{line['fixed_s']:.1f}",
            f"{line['per_1k_prompts_s']:.0f}",
            f"{100 * line['max_rel_residual']:.1f}%",
        ]
        print(f"| {stage} | {' | '.join(cells)} |")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024], help="training prompts per run")
    p.add_argument("--max-new-tokens", type=int, default=64, help="reply cap (64 keeps the runs short)")
    p.add_argument("--eval-size", type=int, default=32, help="fixed held-out questions, every size")
    p.add_argument("--gen-batch-size", type=int, default=32, help="generation batch (refill engine)")
    p.add_argument("--batch-size", type=int, default=8, help="training pairs per optimizer step")
    p.add_argument("--max-length", type=int, default=512, help="prompt + reply token limit in training")
    p.add_argument("--eval-batch-size", type=int, default=16, help="sequences per scoring batch")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--precision",
        default="auto",
        help="train.precision (auto: bf16 where bf16 is fast, a bf16 GPU or a CPU with AMX / AVX512-BF16)",
    )
    p.add_argument(
        "--gen-dtype",
        default="auto",
        help="generation.dtype (auto: a bfloat16 copy where bf16 is fast: AMX or AVX512-BF16 CPUs, bf16 GPUs)",
    )
    p.add_argument(
        "--padded", action="store_true", help="train.padding_free=false: padded batches, as before packing"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model folder (default: runs/smollm2, made once)")
    p.add_argument("--data", default=default_gsm8k(), help="GSM8K jsonl with question / answer fields")
    p.add_argument("--out", default="runs/real_cost", help="folder of the data files and run folders")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if gsm8k_missing(args.data):
        return
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(args, args.worker)), flush=True)
        return
    rows = [measure(args, size) for size in sorted(set(args.sizes))]
    for r in rows:
        r["work"] = stage_work(args, r["size"])
    add_ratios(rows)
    for r in rows:
        print(json.dumps(r), flush=True)
    print_table(args, rows)
    print_work(rows)
    out = Path(args.out) / "results.json"
    lines = fit_lines(rows) if len(rows) > 1 else {}
    out.write_text(json.dumps({"args": vars(args), "results": rows, "lines": lines}, indent=1) + "\n")


if __name__ == "__main__":
    main()
