"""Does a model trained under bf16 autocast on a CPU train the same model as fp32 training?

What: SmolLM2-135M-Instruct (fp32 weights) is fine-tuned with `spinlm.trainer.sft_train` on GSM8K train
answers (AdamW, constant lr after a 10% warm-up, batch 16, gradient checkpointing), under bf16 autocast
(`--precision bf16`, what `train.precision: bf16` does) or in fp32. Every `--every` steps the per-token NLL
of `--val` held-out GSM8K train answers (the last rows of the file) is scored twice: with the fp32 weights
and under bf16 autocast. Found (docs/results/training.md, "bf16 training on a CPU"): both precisions give
the same NLL step for step at learning rates 1e-6 to 3e-5. (This script once ran the whole training
inside one autocast context, whose weight cache kept the first step's bf16 weights for every step, and
reported a drift that was that; `sft_train(precision=...)` autocasts each forward on its own now.)

    python benchmarks/bf16_drift.py --precision bf16 --lr 1e-5 --steps 20 --threads 2 --out bf16_1e-5.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from real_common import default_gsm8k, smollm2_folder

from spinlm.config import ModelConfig
from spinlm.logps import encode_all, score_logps
from spinlm.modeling import load_model, load_tokenizer
from spinlm.trainer import set_activation_checkpointing, sft_train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="training precision")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=5, help="steps between validation points")
    p.add_argument("--train", type=int, default=2000, help="GSM8K train rows trained on (the first ones)")
    p.add_argument("--val", type=int, default=32, help="held-out rows (the last ones of the file)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=default_gsm8k())
    p.add_argument("--out", help="also write the validation points and losses to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = smollm2_folder()
    cfg = ModelConfig(name_or_path=str(folder), dtype="float32")
    model = load_model(str(folder), cfg, device=torch.device("cpu"))
    tok = load_tokenizer(str(folder), cfg)
    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    train, val = rows[: args.train], rows[-args.val :]

    def prompts(rs: list[dict]) -> list[list[dict]]:
        return [[{"role": "user", "content": r["question"]}] for r in rs]

    answers = [r["answer"] for r in val]
    tokens = sum(len(e.input_ids) - e.prompt_len for e in encode_all(tok, prompts(val), answers, 768))

    def nll(bf16: bool) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return -sum(score_logps(model, tok, prompts(val), answers, 768, 16)) / tokens

    points: list[dict] = []

    def check(step: int) -> bool:
        points.append({"step": step, "nll_fp32": nll(False), "nll_bf16_autocast": nll(True)})
        print(
            f"step {step}: validation NLL/token fp32 {points[-1]['nll_fp32']:.4f}, "
            f"bf16 autocast {points[-1]['nll_bf16_autocast']:.4f}",
            flush=True,
        )
        return False

    check(0)
    set_activation_checkpointing(model, True)
    start = time.perf_counter()
    losses = sft_train(
        model,
        tok,
        prompts(train),
        [r["answer"] for r in train],
        steps=args.steps,
        lr=args.lr,
        batch_size=16,
        seed=0,
        max_length=768,
        lr_scheduler="constant",
        warmup_ratio=0.1,
        stop=check,
        check_every=args.every,
        optimizer="adamw",
        precision=args.precision,
    )
    seconds = time.perf_counter() - start
    print("training losses", [round(x, 3) for x in losses], f"({seconds:.0f} s)")
    if args.out:
        result = {"precision": args.precision, "lr": args.lr, "points": points, "losses": losses}
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(
                {**result, "seconds": seconds, "val_rows": args.val, "train_rows": args.train}, f, indent=1
            )


if __name__ == "__main__":
    main()
