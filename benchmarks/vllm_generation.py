"""Generation throughput on a real model: vLLM (spin's `vllm` engine) vs spin's `refill` vs plain batched HF.

What: SmolLM2-135M-Instruct (float32), the first `--prompts` GSM8K training questions as user turns (its
chat template adds its default system prompt), temperature 1, no top-k / top-p, at most `--max-new-tokens`
new tokens, stop at end of turn. Three ways, each in its own fresh process, back to back in one run:

1. `vllm`: spin's vLLM engine (`spinlm.vllm_engine.VllmEngine`: vLLM's offline `LLM` on the model folder,
   spin's prompt ids); start-up = importing vLLM + starting the engine (model load, KV cache, workers);
2. `refill`: `generate_responses(engine=refill, batch_size=--batch-size)`; start-up = loading the model;
3. `hf`: plain batched `model.generate(do_sample=True, temperature=1, top_k=0)` on batches of `--batch-size`
   prompts in input order, left padded (what a competent user writes); start-up = loading the model.

Reported per way: generated tokens (end-of-turn token included), seconds generating, seconds of the whole
process (interpreter start, imports, model load, generation, shutdown), and tokens/s excluding and
including start-up. Needs a Python with vLLM (`make install-vllm` builds .venv-vllm) and the GSM8K file
(default ../shared/data/gsm8k/train.jsonl, fields question/answer); without it, it says so and exits 0.

    .venv-vllm/bin/python benchmarks/vllm_generation.py --prompts 256 --max-new-tokens 256
    .venv-vllm/bin/python benchmarks/vllm_generation.py --prompts 64 --out runs/bench_vllm.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
WAYS = ("vllm", "refill", "hf")


def gsm8k_prompts(path: Path, n: int) -> list[list[dict]]:
    rows = [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()][:n]
    return [[{"role": "user", "content": r["question"]}] for r in rows]


def worker(way: str, args: argparse.Namespace) -> dict[str, Any]:
    """One way, in this (fresh) process: {'tokens', 'prompts', 'startup_s', 'generate_s'}."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from spinlm.config import GenerationConfig, ModelConfig
    from spinlm.generation import _eos_ids, generate_responses
    from spinlm.modeling import encode, load_model, load_tokenizer, render_prompt

    sys.path.insert(0, str(REPO / "benchmarks"))
    from real_common import smollm2_folder

    folder = smollm2_folder()
    prompts = gsm8k_prompts(Path(args.data), args.prompts)
    cfg = GenerationConfig(
        temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )
    tok = load_tokenizer(folder, ModelConfig())
    model = load_model(folder, ModelConfig(dtype="float32"), device=torch.device("cpu")).eval()
    if way == "vllm":
        from spinlm.engines import Sampler, Spec
        from spinlm.vllm_engine import VllmEngine

        cfg = replace(cfg, engine="vllm")
        ids = [encode(tok, render_prompt(tok, p)) for p in prompts]
        eos = _eos_ids(model, tok)
        spec = Spec(
            tok, cfg.max_new_tokens, cfg.batch_size, eos, tok.pad_token_id, (), Sampler(cfg, 0), cfg, 0
        )
        engine = VllmEngine(model, spec, folder)
        engine.start(load=True)
        t1 = time.perf_counter()
        rows = engine(model, ids, list(range(len(ids))), spec, lambda _: None)
        t2 = time.perf_counter()
        engine.close()
        tokens = sum(len(r) for r in rows)
    elif way == "refill":
        t1 = time.perf_counter()
        gens = generate_responses(model, tok, prompts, replace(cfg, engine="refill"), seed=0)
        t2 = time.perf_counter()
        tokens = sum(g.num_tokens for g in gens)
    else:
        t1 = time.perf_counter()
        tokens = hf_batched(model, tok, prompts, cfg, _eos_ids(model, tok))
        t2 = time.perf_counter()
    return {"tokens": tokens, "prompts": len(prompts), "startup_s": t1 - t0, "generate_s": t2 - t1}


def hf_batched(model: Any, tok: Any, prompts: list[list[dict]], cfg: Any, eos: frozenset[int]) -> int:
    """Plain `model.generate` sampling on left-padded batches in input order; generated tokens in all."""
    import torch

    from spinlm.modeling import render_prompt

    tok.padding_side = "left"
    tokens = 0
    torch.manual_seed(0)
    for b in range(0, len(prompts), cfg.batch_size):
        texts = [render_prompt(tok, p) for p in prompts[b : b + cfg.batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=cfg.max_new_tokens,
                eos_token_id=sorted(eos),
                pad_token_id=tok.pad_token_id,
            )[:, enc["input_ids"].shape[1] :].tolist()
        for row in out:
            tokens += next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
    return tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64, help="refill and hf batch size")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (refill, hf)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--ways", default=",".join(WAYS))
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not Path(args.data).is_file():
        print(f"skipped: no GSM8K file at {args.data} (give --data PATH to a jsonl with `question` fields)")
        return
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return

    results: dict[str, dict[str, Any]] = {}
    for way in args.ways.split(","):
        cmd = [sys.executable, __file__, "--worker", way, *sys.argv[1:]]
        start = time.perf_counter()
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        )
        wall = time.perf_counter() - start
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{way} failed (exit {proc.returncode})")
        r = json.loads(line[len("RESULT ") :]) | {"process_s": wall}
        r["tokens_per_s"] = r["tokens"] / r["generate_s"]
        r["tokens_per_s_with_startup"] = r["tokens"] / wall
        results[way] = r
        print(f"{way}: {json.dumps(r)}", flush=True)

    print(
        f"\nSmolLM2-135M-Instruct, {args.prompts} GSM8K prompts, <= {args.max_new_tokens} new tokens, T=1\n"
    )
    print("| engine | tokens | start-up s | generate s | process s | tokens/s | tokens/s incl. start-up |")
    print("|---|---|---|---|---|---|---|")
    for way, r in results.items():
        print(
            f"| {way} | {r['tokens']} | {r['startup_s']:.0f} | {r['generate_s']:.0f} | {r['process_s']:.0f} "
            f"| {r['tokens_per_s']:.0f} | {r['tokens_per_s_with_startup']:.0f} |"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
