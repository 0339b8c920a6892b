"""Generation throughput: one prompt at a time vs plain batched `generate` vs spin's engine.

What: the same model and the same prompts are generated three ways, with the same sampling settings
(temperature 1, no top-k / top-p, `--max-new-tokens`, stop at end of turn):

1. one at a time: `model.generate` per prompt (the paper's simplified loop);
2. plain batched: `model.generate` on batches of `--batch-size` prompts in input order, left padded (what a
   competent user writes);
3. spin: `spin.generate.generate_responses` with engine=auto, timed twice: the first call includes auto's
   one-off probe of every engine, the second reuses the cached choice (what every later SPIN iteration in
   the process gets). Each engine is also timed on its own.

Reported: generated tokens/s (end-of-turn token included) and prompts/s; the ratios vs the targets
(spin >= 20x one-at-a-time, >= 1.5x plain batched, on CPU).

Model (default): a character-level Llama, hidden 256, 4 layers (4.2M parameters), SFT-trained for
`--sft-steps` on the stochastic `grammar` task, so replies vary from 1 to 16 characters. To vary prompt
lengths as well, every example gets a system message of 0-48 random letters (prompts of 14-68 tokens),
which the model learns to ignore. The briefly trained model is not perfect: some samples run on to
max_new_tokens, which the length statistics printed below show.

`--qwen`: a Qwen2-0.5B-shaped model (random weights, bf16, hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151936), random prompts of 16-128 tokens, 256 new tokens; random weights rarely emit
end of turn, so every row runs to max_new_tokens (the engine's row dropping cannot help; batching does).
Prints the decode roofline: each step reads every weight once, 2 bytes x N parameters.

    python benchmarks/generation.py [--device cuda] [--prompts 1024] [--max-new-tokens 64]
    python benchmarks/generation.py --qwen --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spin.config import GenerationConfig
from spin.generate import _ENGINE_CACHE, generate_responses, supported_engines
from spin.modeling import build_char_tokenizer, build_tiny_model, count_parameters, encode, render_prompt

log = logging.getLogger("bench")


# ------------------------------------------------------------------------------------------------------
# Models and prompts


def char_model(
    steps: int, seed: int, device: torch.device, cache: Path | None
) -> tuple[Any, Any, list[list[dict]]]:
    """The 4.2M-parameter char Llama SFT-trained on `grammar` with random-length system prompts
    (loaded from `cache` when a previous run saved it there)."""
    from spin.config import ModelConfig
    from spin.modeling import load_model, load_tokenizer, save_model
    from spin.tasks import get_task
    from spin.train import sft_train

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=256, num_layers=4, num_heads=4, seed=seed)
    make = get_task("grammar").make_examples
    assert make is not None
    rng = random.Random(seed)

    def with_system(prompt: list[dict]) -> list[dict]:
        n = rng.randint(0, 48)
        system = "".join(rng.choice(string.ascii_lowercase) for _ in range(n))
        return ([{"role": "system", "content": system}] if n else []) + prompt

    examples = make(4000, seed)
    train_prompts = [with_system(e.prompt) for e in examples]  # drawn first: the eval prompts stay the same
    eval_prompts = [with_system(e.prompt) for e in make(4096, seed + 1)]
    if cache is not None and (cache / "config.json").exists():
        log.info("SFT model loaded from %s", cache)
        return (
            load_model(cache, ModelConfig(), device=device).eval(),
            load_tokenizer(cache, ModelConfig()),
            eval_prompts,
        )
    start = time.perf_counter()
    sft_train(
        model,
        tok,
        train_prompts,
        [e.response for e in examples],
        steps=steps,
        lr=2e-3,
        batch_size=32,
        seed=seed,
    )
    log.info("SFT: %d steps in %.0f s", steps, time.perf_counter() - start)
    if cache is not None:
        save_model(model, tok, cache)
    return model.to(device).eval(), tok, eval_prompts


def qwen_model(device: torch.device, seed: int) -> tuple[Any, Any]:
    """Qwen2-0.5B shape, random bf16 weights, with a stand-in tokenizer-free setup (ids are fed directly)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=151645,
        pad_token_id=151643,
    )
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = 151645
    model.generation_config.pad_token_id = 151643
    return model, None


# ------------------------------------------------------------------------------------------------------
# The three ways


def hf_kwargs(tok_eos: int, pad: int, max_new: int) -> dict[str, Any]:
    # Same sampling as spin: temperature 1, top_k=0 (not transformers' default 50), top_p 1, stop at EOS.
    return dict(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new,
        eos_token_id=tok_eos,
        pad_token_id=pad,
    )


def count_new(row: list[int], eos: int) -> int:
    """Generated tokens up to and including the first end of turn."""
    return row.index(eos) + 1 if eos in row else len(row)


def one_at_a_time(model: Any, ids: list[list[int]], eos: int, pad: int, max_new: int) -> list[int]:
    dev = next(model.parameters()).device
    out = []
    for p in ids:
        x = torch.tensor([p], device=dev)
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **hf_kwargs(eos, pad, max_new))
        out.append(count_new(y[0, len(p) :].tolist(), eos))
    return out


def plain_batched(model: Any, ids: list[list[int]], eos: int, pad: int, max_new: int, bs: int) -> list[int]:
    dev = next(model.parameters()).device
    out = []
    for b in range(0, len(ids), bs):
        batch = ids[b : b + bs]
        width = max(map(len, batch))
        x = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=dev)  # left padded
        m = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=dev)
        y = model.generate(input_ids=x, attention_mask=m, **hf_kwargs(eos, pad, max_new))
        out += [count_new(r, eos) for r in y[:, width:].tolist()]
    return out


class _IdsTokenizer:
    """For --qwen (no real tokenizer): prompts are already token ids; `render_prompt`/`encode` pass them on."""

    def __init__(self, eos: int, pad: int) -> None:
        self.eos_token_id, self.pad_token_id = eos, pad

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> str:
        return str(messages[0]["content"])

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))

    def batch_decode(self, rows: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r) for r in rows]


def spin_engine(
    model: Any, tok: Any, prompts: list[list[dict]], max_new: int, bs: int, engine: str
) -> list[int]:
    cfg = GenerationConfig(
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new,
        batch_size=bs,
        shard_size=10**9,
        engine=engine,
    )
    return [g.num_tokens for g in generate_responses(model, tok, prompts, cfg, seed=0, desc=f"spin {engine}")]


def timed(name: str, fn: Callable[[], list[int]], sync: Callable[[], None]) -> dict[str, Any]:
    sync()
    start = time.perf_counter()
    lengths = fn()
    sync()
    dt = time.perf_counter() - start
    row = {
        "way": name,
        "seconds": dt,
        "prompts": len(lengths),
        "tokens": sum(lengths),
        "tokens_per_s": sum(lengths) / dt,
        "prompts_per_s": len(lengths) / dt,
        "mean_len": statistics.fmean(lengths),
        "max_len": max(lengths),
    }
    log.info(
        "%-28s %8.1f tok/s %7.1f prompts/s  (%.1f s, mean length %.1f)",
        name,
        row["tokens_per_s"],
        row["prompts_per_s"],
        dt,
        row["mean_len"],
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (256 with --qwen)")
    ap.add_argument("--batch-size", type=int, default=64, help="batch size of plain batched and spin")
    ap.add_argument("--one-at-a-time-prompts", type=int, default=None, help="subset for way 1 (default: all)")
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument(
        "--model-cache", type=Path, default=None, help="save / reuse the SFT model in this folder"
    )
    ap.add_argument("--qwen", action="store_true", help="Qwen2-0.5B shape, random bf16 weights (GPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    max_new = args.max_new_tokens or (256 if args.qwen else 64)

    if args.qwen:
        model, _ = qwen_model(device, args.seed)
        eos, pad = 151645, 151643
        tok: Any = _IdsTokenizer(eos, pad)
        rng = random.Random(args.seed)
        ids = [[rng.randrange(0, 151000) for _ in range(rng.randint(16, 128))] for _ in range(args.prompts)]
        prompts = [[{"role": "user", "content": " ".join(map(str, p))}] for p in ids]
    else:
        model, tok, all_prompts = char_model(args.sft_steps, args.seed, device, args.model_cache)
        prompts = all_prompts[: args.prompts]
        ids = [encode(tok, render_prompt(tok, p)) for p in prompts]
        eos, pad = tok.eos_token_id, tok.pad_token_id
    n_params = count_parameters(model)
    lens = [len(p) for p in ids]
    log.info(
        "model: %.1fM parameters on %s; %d prompts of %d-%d tokens",
        n_params / 1e6,
        device,
        len(ids),
        min(lens),
        max(lens),
    )

    rows = []
    with torch.inference_mode():
        k = args.one_at_a_time_prompts or len(ids)
        rows.append(
            timed(
                f"one at a time ({k} prompts)", lambda: one_at_a_time(model, ids[:k], eos, pad, max_new), sync
            )
        )
        rows.append(
            timed(
                f"plain batched (bs {args.batch_size})",
                lambda: plain_batched(model, ids, eos, pad, max_new, args.batch_size),
                sync,
            )
        )
        _ENGINE_CACHE.clear()
        rows.append(
            timed(
                "spin auto, 1st call (probe)",
                lambda: spin_engine(model, tok, prompts, max_new, args.batch_size, "auto"),
                sync,
            )
        )
        rows.append(
            timed(
                "spin auto, cached choice",
                lambda: spin_engine(model, tok, prompts, max_new, args.batch_size, "auto"),
                sync,
            )
        )
        chosen = next(iter(_ENGINE_CACHE.values()))
        for engine in supported_engines(model):
            rows.append(
                timed(
                    f"spin engine={engine}",
                    lambda e=engine: spin_engine(model, tok, prompts, max_new, args.batch_size, e),
                    sync,
                )
            )

    one, plain, spin = rows[0]["tokens_per_s"], rows[1]["tokens_per_s"], rows[3]["tokens_per_s"]
    print(f"\nauto chose: {chosen[0]} ({chosen[1]})")
    print("| way | tokens/s | prompts/s | mean len | seconds |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['way']} | {r['tokens_per_s']:.0f} | {r['prompts_per_s']:.1f} | {r['mean_len']:.1f} | {r['seconds']:.1f} |"
        )
    print(f"\nspin (cached choice) / one at a time: {spin / one:.1f}x (target >= 20x)")
    print(f"spin (cached choice) / plain batched: {spin / plain:.2f}x (target >= 1.5x)")
    print(f"spin (1st call, with probe) / plain batched: {rows[2]['tokens_per_s'] / plain:.2f}x")
    result: dict[str, Any] = {
        "params": n_params,
        "device": str(device),
        "max_new_tokens": max_new,
        "rows": rows,
        "auto": chosen,
    }
    if args.qwen or device.type == "cuda":
        # Decode is memory bound at small batch: every step reads all weights once (bf16: 2 bytes each).
        bytes_per_step = 2 * n_params
        steps_per_s = 3.0e12 / bytes_per_step  # H100 HBM3 ~3 TB/s
        flops_per_token = 2 * n_params
        print(
            f"roofline (H100, 3 TB/s, 800 TFLOP/s bf16): {bytes_per_step / 1e9:.2f} GB per decode step -> "
            f"<= {steps_per_s:.0f} steps/s; at batch B <= {steps_per_s:.0f}*B tokens/s until compute bound at "
            f"~{800e12 / flops_per_token:.0f} tokens/s (B ~ {800e12 / flops_per_token / steps_per_s:.0f})"
        )
        result["roofline"] = {
            "bytes_per_step": bytes_per_step,
            "steps_per_s": steps_per_s,
            "compute_tokens_per_s": 800e12 / flops_per_token,
        }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
