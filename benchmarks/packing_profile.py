"""Where packing's training speed-up comes from: one micro-batch of SPIN pairs, six layouts, profiled.

What: SmolLM2-135M-Instruct (fp32, CPU), the first `--steps` training micro-batches of a pairs file written by
benchmarks/real_training.py (`OUT/work/pairs.jsonl`: GSM8K questions, real answer = chosen, the model's own
sample = rejected), in spinlm's batch order (`spinlm.trainer.plan_batches`, run_seed 0, iteration 1). Each
micro-batch's 2 x `--batch-size` sequences run one forward + backward (gradient checkpointing on, as spinlm
trains) in six layouts of the same tokens:

- `padded`: the right-padded (N, T) batch with its attention mask (`train.padding_free: false`);
- `packed`: rows of at most T tokens (`spinlm.logps.pack_batch`, what `train.padding_free` runs);
- `cost_model`: rows of the capacity `spinlm.logps.row_capacity` picks (least estimated compute);
- `one_row`: every sequence of the micro-batch back to back in a single row (no filler at all; attention
  runs over the whole row under a block-diagonal mask, so its cost grows with the row's square).
- `segments`: the same single row under `sdpa_segments` (`spinlm.attention`), which attends within each
  sequence's slice of the row: no filler and no attention across sequences. What `train.padding_free` runs
  on CPU, where `spinlm.modeling.load_model` gives SDPA models this attention; every other layout runs
  under plain `sdpa`.
- `per_sequence`: every sequence in a forward of its own, (1, n) without padding or mask (no filler, and
  attention only within each sequence, as flash-attention's varlen path does on a GPU; the price is one
  call per sequence and matrix products of n rows instead of the batch's).

Reported per layout: positions run (and the share that is padding or filler), median seconds of forward +
backward (`--forward-only`: the forward alone, without gradients) over `--repeats` passes of all
micro-batches, and with `--profile` the top operators by self CPU time (torch.profiler) of one pass. Not an optimizer step: the weights do not change between passes.

    python benchmarks/real_training.py --pairs 128 --steps 16 --variants spin --out runs/real_training128
    python benchmarks/packing_profile.py --pairs runs/real_training128/work/pairs.jsonl --profile
    python benchmarks/packing_profile.py --pairs runs/real_training128/work/pairs.jsonl \
        --layouts padded packed per_sequence --forward-only      # forwards alone, as scoring runs them
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from real_common import smollm2_folder

BF16 = [False]  # set by --precision bf16: every forward under CPU bf16 autocast (fp32 weights)
LAYOUTS = ("padded", "packed", "cost_model", "one_row", "segments", "per_sequence")


def layouts(batch: dict[str, torch.Tensor], attention: float) -> dict[str, dict[str, Any]]:
    """Each layout of one collated batch: its rows (input_ids, scored, owner), the model's other inputs
    and its attention, as `spinlm.logps.forward_logps` runs them; `per_sequence` is a list of such layouts
    (`parts`), one (1, n) row per sequence."""
    from spinlm.attention import SEGMENT_ATTENTION
    from spinlm.logps import _padded_rows, pack_batch, row_capacity, segment_kwargs

    lengths = batch["attention_mask"].sum(dim=1).tolist()
    auto = row_capacity(lengths, batch["input_ids"].shape[1], attention)
    out: dict[str, dict[str, Any]] = {
        "padded": {**_padded_rows(batch), "extra": {"attention_mask": batch["attention_mask"]}}
    }
    for name, cap in (("packed", None), ("cost_model", auto), ("one_row", sum(lengths))):
        rows = pack_batch(batch, capacity=cap)
        out[name] = {**rows, "extra": {"position_ids": rows["position_ids"], "use_cache": False}}
    rows = pack_batch(batch, capacity=sum(lengths))
    extra = {"position_ids": rows["position_ids"], "use_cache": False}
    extra |= segment_kwargs(rows["position_ids"], torch.device("cpu"))  # on_device moves the offsets
    out["segments"] = {**rows, "extra": extra, "attention": SEGMENT_ATTENTION}
    parts = []
    for i, n in enumerate(lengths):
        ids = batch["input_ids"][i : i + 1, :n]  # (1, n) the sequence alone
        parts.append(
            {
                "input_ids": ids,
                "scored": batch["loss_mask"][i : i + 1, 1:n].bool(),
                "owner": torch.full((1, max(n - 1, 0)), i),
                "extra": {"use_cache": False},
            }
        )
    out["per_sequence"] = {"parts": parts}
    return out


def positions(layout: dict[str, Any]) -> int:
    """Positions the model runs for one layout."""
    return sum(positions(p) for p in layout["parts"]) if "parts" in layout else layout["input_ids"].numel()


def shapes(layout: dict[str, Any]) -> list[int] | list[list[int]]:
    """(rows, width) of a layout; one (1, n) per sequence for `per_sequence`."""
    if "parts" in layout:
        return [list(p["input_ids"].shape) for p in layout["parts"]]
    return list(layout["input_ids"].shape)


def use_attention(model: Any, layout: dict[str, Any]) -> None:
    """Switch the model to the layout's attention (`sdpa_segments` for `segments`, else plain `sdpa`)."""
    name = layout.get("attention", "sdpa")
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)


def fwd_bwd(model: Any, rows: dict[str, Any], backward: bool = True) -> None:
    """forward_logps' forward (logits only where a response token is predicted), then a backward (without
    `backward`: the forward alone, no graph, as reference scoring runs)."""
    if "parts" in rows:
        for part in rows["parts"]:
            fwd_bwd(model, part, backward)
        return
    use_attention(model, rows)
    keep = torch.zeros_like(rows["input_ids"], dtype=torch.bool)  # (R, L)
    keep[:, :-1] = rows["scored"]
    with torch.set_grad_enabled(backward), torch.autocast("cpu", torch.bfloat16, enabled=BF16[0]):
        logits = model(input_ids=rows["input_ids"], logits_to_keep=keep, **rows["extra"]).logits  # (M, V)
        total = logits.float().logsumexp(-1).mean()  # a scalar that reaches every kept logit
    if backward:
        total.backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=Path, required=True, help="pairs.jsonl of benchmarks/real_training.py")
    ap.add_argument("--steps", type=int, default=4, help="micro-batches to run")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch (real_training's)")
    ap.add_argument("--max-length", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS, help="layouts to time")
    ap.add_argument("--forward-only", action="store_true", help="time forwards without gradients (scoring)")
    ap.add_argument("--profile", action="store_true", help="also print the top operators of each layout")
    ap.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: under CPU autocast, as train.precision",
    )
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    BF16[0] = args.precision == "bf16"
    from spinlm.config import ModelConfig, TrainConfig
    from spinlm.modeling import load_model, load_tokenizer
    from spinlm.trainer import collate_pairs, featurize, plan_batches, set_activation_checkpointing

    folder = smollm2_folder()
    tok = load_tokenizer(folder, ModelConfig())
    model = load_model(folder, ModelConfig(), device=torch.device("cpu"))
    set_activation_checkpointing(model, True)  # as spinlm trains
    model.train()
    pairs = [json.loads(line) for line in args.pairs.read_text().splitlines() if line.strip()]
    rows = [{**p, "ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0} for p in pairs]  # lengths only
    feats = featurize(tok, rows, args.max_length)
    cfg = TrainConfig(batch_size=args.batch_size, gradient_accumulation_steps=1, max_length=args.max_length)
    _, micro = plan_batches(len(feats), cfg, 1.0, 1, 1)
    from spinlm.logps import attention_cost

    share = attention_cost(model)
    batches = [
        layouts(collate_pairs([feats[i] for i in b], tok.pad_token_id), share) for b in micro[: args.steps]
    ]
    tokens = sum(int(b["padded"]["extra"]["attention_mask"].sum()) for b in batches)
    results: dict[str, Any] = {}
    for name in args.layouts:
        count = sum(positions(b[name]) for b in batches)
        fwd_bwd(model, batches[0][name], not args.forward_only)  # warm-up: oneDNN kernels for this shape
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for b in batches:
                fwd_bwd(model, b[name], not args.forward_only)
                model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        results[name] = {
            "positions": count,
            "waste": 1 - tokens / count,
            "shapes": [shapes(b[name]) for b in batches],
            "seconds": statistics.median(times),
        }
        print(
            f"{name:12s} positions {count:6d} ({100 * (1 - tokens / count):4.1f}% padding/filler), "
            f"fwd+bwd {results[name]['seconds']:.2f} s, rows {results[name]['shapes']}",
            flush=True,
        )
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for b in batches:
                    fwd_bwd(model, b[name])
                    model.zero_grad(set_to_none=True)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
            results[name]["profile"] = table
            print(table, flush=True)
    base = results[args.layouts[0]]["seconds"]
    for name, r in results.items():
        r[f"speed_vs_{args.layouts[0]}"] = base / r["seconds"]
        print(f"{name:12s} speed vs {args.layouts[0]}: {base / r['seconds']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "tokens": tokens, "results": results},
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
