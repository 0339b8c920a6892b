"""How far bf16 training's step-0 log-ratios are from 0, with the reference scored in fp32 or under autocast.

What: SmolLM2-135M-Instruct (fp32 weights) on the first `--pairs` GSM8K questions; both sides of a pair are
the real answer and a second real answer (the next question's, so no sampling is needed). The reference
log-probs of every sequence are scored as spin's pairs stage does (`spinlm.logps.score_logps`, batches of
`--score-batch` sorted by length) once in fp32 and once under bf16 autocast; the policy's log-probs are then
computed as spin's trainer computes them at step 0 (`spinlm.trainer.collate_pairs`: real sequences, then
generated, one (2B, T) forward of `--batch-size` pairs, under bf16 autocast; `train.precision: bf16`) with
the same weights. At step 0 policy = reference, so every log-ratio log p/p_ref should be 0: reported are
the mean and largest |log-ratio| in nats per sequence for each way of scoring the reference, and the
largest |margin| (the DPO margin of a pair, before beta) they give.

    python benchmarks/bf16_reference.py --pairs 32 --threads 2          # ~2 min on 2 cores

Needs the GSM8K file (`--data`); without it, it says so and exits 0. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

from real_common import default_gsm8k, gsm8k_missing, gsm8k_rows, smollm2_folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4, help="pairs per training forward")
    p.add_argument(
        "--score-batch", type=int, default=16, help="sequences per scoring batch (eval.batch_size)"
    )
    p.add_argument("--max-length", type=int, default=768)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=default_gsm8k())
    args = p.parse_args()
    if gsm8k_missing(args.data):
        return
    import torch

    from spinlm.config import ModelConfig
    from spinlm.logps import forward_logps, score_logps
    from spinlm.modeling import load_model, load_tokenizer
    from spinlm.trainer import collate_pairs, featurize

    torch.set_num_threads(args.threads)
    folder = smollm2_folder()
    tok = load_tokenizer(folder, ModelConfig())
    model = load_model(folder, ModelConfig(dtype="float32"), device=torch.device("cpu"))
    rows = gsm8k_rows(args.data, args.pairs + 1)
    prompts = [[{"role": "user", "content": r["question"]}] for r in rows[:-1]]
    chosen = [r["answer"] for r in rows[:-1]]
    rejected = [r["answer"] for r in rows[1:]]

    def reference(autocast: bool) -> tuple[list[float], list[float]]:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return tuple(  # type: ignore[return-value]
                score_logps(model, tok, prompts, side, args.max_length, args.score_batch)
                for side in (chosen, rejected)
            )

    refs = {"fp32": reference(False), "bf16_autocast": reference(True)}
    pairs = [
        {
            "prompt": x,
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
            "ref_chosen_logps": 0.0,
            "ref_rejected_logps": 0.0,
        }
        for x, c, r in zip(prompts, chosen, rejected)
    ]
    features = featurize(tok, pairs, args.max_length)
    policy_c: list[float] = []
    policy_r: list[float] = []
    model.train()  # as in training (SmolLM2 has no dropout)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for b in range(0, len(features), args.batch_size):
            batch = collate_pairs(features[b : b + args.batch_size], tok.pad_token_id)
            logps = forward_logps(model, batch)  # (2B,) real then generated
            n = logps.shape[0] // 2
            policy_c += logps[:n].tolist()
            policy_r += logps[n:].tolist()
    out: dict[str, object] = {"pairs": len(pairs), "batch_size": args.batch_size}
    for name, (ref_c, ref_r) in refs.items():
        ratios = [a - b for a, b in zip(policy_c + policy_r, ref_c + ref_r)]
        margins = [(pc - rc) - (pr - rr) for pc, rc, pr, rr in zip(policy_c, ref_c, policy_r, ref_r)]
        out[f"ref_{name}"] = {
            "mean_abs_log_ratio": sum(abs(x) for x in ratios) / len(ratios),
            "max_abs_log_ratio": max(abs(x) for x in ratios),
            "max_abs_margin": max(abs(x) for x in margins),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
