"""Generation throughput: one prompt at a time vs plain batched `generate` vs spin's engine.

What: the same model and the same prompts are generated three ways, with the same sampling settings
(temperature 1, no top-k / top-p, `--max-new-tokens`, stop at end of turn):

1. one at a time: `model.generate` per prompt (the paper's simplified loop);
2. plain batched: `model.generate` on batches of `--batch-size` prompts in input order, left padded (what a
   competent user writes);
3. spin: `spinlm.generation.generate_responses` with engine=auto (a rule: refill where the model supports
   it, no timing runs), and each engine on its own.

Reported: generated tokens/s (end-of-turn token included) and prompts/s; the ratios vs the targets
(spin >= 20x one-at-a-time, >= 1.5x plain batched, on CPU).

Model (default): a character-level Llama, hidden 256, 4 layers (4.2M parameters), SFT-trained for
`--sft-steps` on the stochastic `grammar` task, so replies vary from 1 to 16 characters (a few samples run on
longer; the mean and max lengths are printed). Its training examples carry a system message of 0-48 random
letters, so the same model serves two prompt sets:
- default: the task's own prompts (6-10 tokens; the task has 16 distinct prompts, so 1,024 prompts repeat
  each ~64 times, as in `spinlm demo` on grammar; spin's refill engine prefills identical prompts once);
- `--system-prompts`: a random system message of 0-48 letters in front of each (14-68 tokens, all distinct,
  prefill-heavy: no prompt sharing, gains come from length sorting and row dropping).
Each way runs `--repeats` times; the median wall time is reported (the machine is shared), with the CPU time
of the process beside it.

`--qwen`: a Qwen2-0.5B-shaped model (random weights, bf16, hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151936), random prompts of 16-128 tokens, 256 new tokens; random weights rarely emit
end of turn, so every row runs to max_new_tokens (the engine's row dropping cannot help; batching does).
Prints the decode roofline: each step reads every weight once, 2 bytes x N parameters.

    python benchmarks/generation.py [--device cuda] [--prompts 1024] [--max-new-tokens 64]
    python benchmarks/generation.py --threads 1 --model-cache /tmp/bench_model --system-prompts
    python benchmarks/generation.py --qwen --device cuda

`--threads` (default 2) sets torch's CPU threads: on a machine shared with other jobs, 2 threads can be many
times slower than 1 (OpenMP threads waiting for each other), so compare runs at the same setting and load.
`--model-cache DIR` keeps the SFT model (300 steps take minutes on 2 cores) for the next run.
"""

from __future__ import annotations

import argparse
import functools
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

from spinlm.config import GenerationConfig
from spinlm.generation import _choose_engine, generate_responses, supported_engines
from spinlm.modeling import build_char_tokenizer, build_tiny_model, count_parameters, encode, render_prompt

log = logging.getLogger("bench")


# ------------------------------------------------------------------------------------------------------
# Models and prompts


def char_model(
    steps: int, seed: int, device: torch.device, cache: Path | None
) -> tuple[Any, Any, list[list[dict]]]:
    """The 4.2M-parameter char Llama SFT-trained on `grammar` with random-length system prompts
    (loaded from `cache` when a previous run saved it there)."""
    from spinlm.config import ModelConfig
    from spinlm.modeling import load_model, load_tokenizer, save_model
    from spinlm.tasks import get_task
    from spinlm.trainer import sft_train

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
        model: Any = Qwen2ForCausalLM(config)
    model = model.to(dtype=torch.bfloat16).eval()
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


def spin_run(
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


def timed(name: str, fn: Callable[[], list[int]], sync: Callable[[], None], repeats: int) -> dict[str, Any]:
    """Median over `repeats` runs of wall and process CPU time; tokens from the last run."""
    walls, cpus = [], []
    for _ in range(repeats):
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        lengths = fn()
        sync()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    dt, cpu_s = statistics.median(walls), statistics.median(cpus)
    row = {
        "way": name,
        "seconds": dt,
        "cpu_seconds": cpu_s,
        "all_seconds": walls,
        "prompts": len(lengths),
        "tokens": sum(lengths),
        "tokens_per_s": sum(lengths) / dt,
        "tokens_per_cpu_s": sum(lengths) / cpu_s,
        "prompts_per_s": len(lengths) / dt,
        "mean_len": statistics.fmean(lengths),
        "max_len": max(lengths),
        "at_max_new_tokens": sum(n >= max(lengths) for n in lengths) if max(lengths) > 16 else 0,
    }
    log.info(
        "%-34s %8.0f tok/s %7.1f prompts/s  (%.2f s wall, %.2f s CPU; mean length %.1f, max %d)",
        name,
        row["tokens_per_s"],
        row["prompts_per_s"],
        dt,
        cpu_s,
        row["mean_len"],
        row["max_len"],
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (256 with --qwen)")
    ap.add_argument("--batch-size", type=int, default=64, help="batch size of plain batched and spin")
    ap.add_argument("--big-batch", type=int, default=256, help="also time plain and spin at this batch size")
    ap.add_argument("--one-at-a-time-prompts", type=int, default=None, help="subset for way 1 (default: all)")
    ap.add_argument("--system-prompts", action="store_true", help="distinct prompts of 14-68 tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--model-cache", type=Path, default=None, help="save / reuse the SFT model here")
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
        if not args.system_prompts:
            prompts = [[m for m in p if m["role"] != "system"] for p in prompts]
        ids = [encode(tok, render_prompt(tok, p)) for p in prompts]
        eos, pad = tok.eos_token_id, tok.pad_token_id
    n_params = count_parameters(model)
    lens = [len(p) for p in ids]
    log.info(
        "model: %.2fM parameters on %s, %d threads; %d prompts of %d-%d tokens (%d distinct)",
        n_params / 1e6,
        device,
        torch.get_num_threads(),
        len(ids),
        min(lens),
        max(lens),
        len({tuple(p) for p in ids}),
    )

    bs, big, reps = args.batch_size, args.big_batch, args.repeats
    k = args.one_at_a_time_prompts or len(ids)
    ways: list[tuple[str, Callable[[], list[int]]]] = [
        (f"one at a time ({k} prompts)", lambda: one_at_a_time(model, ids[:k], eos, pad, max_new)),
        (f"plain batched, batch {bs}", lambda: plain_batched(model, ids, eos, pad, max_new, bs)),
    ]
    rows = []
    with torch.inference_mode():
        for name, fn in ways:
            rows.append(timed(name, fn, sync, 1 if name.startswith("one") else reps))
        chosen = _choose_engine(model)  # what engine=auto runs here (a rule: no timing)
        rows.append(
            timed(
                f"spin auto (= {chosen[0]}), batch {bs}",
                lambda: spin_run(model, tok, prompts, max_new, bs, "auto"),
                sync,
                reps,
            )
        )
        for engine in supported_engines(model):
            rows.append(
                timed(
                    f"spin engine={engine}, batch {bs}",
                    functools.partial(spin_run, model, tok, prompts, max_new, bs, engine),
                    sync,
                    reps,
                )
            )
        if big and big != bs:
            rows.append(
                timed(
                    f"plain batched, batch {big}",
                    lambda: plain_batched(model, ids, eos, pad, max_new, big),
                    sync,
                    reps,
                )
            )
            rows.append(
                timed(
                    f"spin engine=refill, batch {big}",
                    lambda: spin_run(model, tok, prompts, max_new, big, "refill"),
                    sync,
                    reps,
                )
            )

    one, plain, spin = rows[0]["tokens_per_s"], rows[1]["tokens_per_s"], rows[2]["tokens_per_s"]
    print(f"\nauto chose: {chosen[0]} ({chosen[1]})")
    print("| way | tokens/s (wall) | tokens/s (CPU time) | prompts/s | mean / max len | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['way']} | {r['tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} | {r['prompts_per_s']:.1f} "
            f"| {r['mean_len']:.1f} / {r['max_len']} | {r['seconds']:.2f} |"
        )
    ratios = {
        "spin_vs_one_at_a_time": spin / one,
        "spin_vs_plain_batched": spin / plain,
    }
    print(
        f"\nspin (auto, batch {bs}) / one at a time: {ratios['spin_vs_one_at_a_time']:.1f}x (target >= 20x)"
    )
    print(
        f"spin (auto, batch {bs}) / plain batched (batch {bs}): {ratios['spin_vs_plain_batched']:.2f}x (target >= 1.5x)"
    )
    result: dict[str, Any] = {
        "params": n_params,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "max_new_tokens": max_new,
        "system_prompts": args.system_prompts,
        "rows": rows,
        "ratios": ratios,
        "auto": chosen,
    }
    if args.qwen or device.type == "cuda":
        result["roofline"] = roofline(n_params)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


def roofline(n_params: int, bandwidth: float = 3.0e12, flops: float = 800e12) -> dict[str, float]:
    """H100 decode roofline: each step reads every weight once (bf16, 2 bytes each), whatever the batch, and
    costs 2 x N FLOPs per sequence; so tokens/s <= min(B x bandwidth / 2N, flops / 2N)."""
    bytes_per_step = 2 * n_params
    steps_per_s = bandwidth / bytes_per_step
    compute_tokens_per_s = flops / (2 * n_params)
    out = {
        "bytes_per_step": bytes_per_step,
        "steps_per_s": steps_per_s,
        "compute_tokens_per_s": compute_tokens_per_s,
        "batch_at_ridge": compute_tokens_per_s / steps_per_s,
    }
    print(
        f"roofline (H100: 3 TB/s, 800 TFLOP/s bf16), {n_params / 1e6:.0f}M params: {bytes_per_step / 1e9:.2f} GB "
        f"read per decode step -> <= {steps_per_s:.0f} steps/s, i.e. <= {steps_per_s:.0f} x B tokens/s at batch B, "
        f"up to the compute bound of {compute_tokens_per_s:.0f} tokens/s (reached at B ~ {out['batch_at_ridge']:.0f}; "
        "the KV cache reads, ignored here, lower it further at long contexts)"
    )
    return out


if __name__ == "__main__":
    main()
