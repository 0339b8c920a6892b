"""`spinlm generate` as a user runs it: the whole process, default engine against `generation.engine=refill`.

What: the toy job of benchmarks/generation.py (the 4.2M-parameter character Llama SFT-trained on `grammar`,
its 1,024 evaluation prompts, each with the task's reply as the chosen side), written as a JSONL SFT file and
given to the `spinlm generate` command line in a fresh process per run, up to 64 new tokens. Each engine
setting runs `--repeats` times, alternating, and the median is reported: the wall time of the whole process
(interpreter start, imports, model load, generation, scoring of the pairs, writing) and, from spinlm's own
log, the seconds of generation and of scoring.

Why: `generation.engine: auto` once timed every engine before generating, which cost more than it saved on a
job this size; it is now a rule (vLLM on a GPU where installed, else `refill`, else `generate`), so the
default should take no longer than asking for `refill`.

    python benchmarks/cli_generate.py --model-cache /tmp/bench_model --out runs/cli_generate.json

`--model-cache` is shared with benchmarks/generation.py (the 300-step SFT takes a few minutes the first time).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import char_model  # noqa: E402

from spinlm.tasks import get_task  # noqa: E402

# spinlm generate's closing log line (spinlm.api.generate)
STAGE = re.compile(r"generate: \d+ replies in ([\d.]+) s; score: both sides of \d+ pairs in ([\d.]+) s")


def write_dataset(path: Path, prompts: list[list[dict]], seed: int) -> None:
    """The prompts with the task's replies as `messages` rows (spinlm generate keeps them as `chosen`)."""
    make = get_task("grammar").make_examples
    assert make is not None
    replies = [e.response for e in make(len(prompts), seed + 1)]
    with path.open("w") as f:
        for p, r in zip(prompts, replies, strict=True):
            f.write(json.dumps({"messages": [*p, {"role": "assistant", "content": r}]}) + "\n")


def one_run(args: argparse.Namespace, data: Path, engine: str | None, k: int) -> dict[str, Any]:
    """One `spinlm generate` process; its wall time and the stage times its progress log reports."""
    out = args.work / f"pairs_{engine or 'default'}_{k}.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "spinlm",
        "generate",
        "--model",
        str(args.model_cache),
        "--dataset",
        str(data),
    ]
    cmd += ["--output", str(out), f"generation.max_new_tokens={args.max_new_tokens}"]
    cmd += [f"generation.batch_size={args.batch_size}", f"threads={args.threads}"]
    if engine:
        cmd.append(f"generation.engine={engine}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"spinlm generate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    log = proc.stdout + proc.stderr
    found = STAGE.search(log)
    stages = {"generate": float(found.group(1)), "score": float(found.group(2))} if found else {}
    chosen = re.search(r"engine[^\n]*?\b(refill|generate|continuous|vllm)\b", log)
    used = chosen.group(1) if chosen else engine  # an engine asked for by name is not logged
    return {"wall_s": wall, **stages, "engine_used": used, "log_tail": log[-600:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-cache", type=Path, required=True, help="the toy model folder (made once)")
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("runs/cli_generate"))
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    _, _, prompts = char_model(args.sft_steps, args.seed, torch.device("cpu"), args.model_cache)
    prompts = [[m for m in p if m["role"] != "system"] for p in prompts[: args.prompts]]
    data = args.work / "prompts.jsonl"
    write_dataset(data, prompts, args.seed)

    runs: dict[str, list[dict[str, Any]]] = {"default": [], "refill": []}
    for k in range(args.repeats):  # alternate, so that a change in the machine's load hits both
        for engine in (None, "refill"):
            row = one_run(args, data, engine, k)
            runs[engine or "default"].append(row)
            print(
                f"{engine or 'default':8s} run {k}: {row['wall_s']:.1f} s wall, "
                f"generate {row.get('generate', float('nan')):.1f} s, score {row.get('score', float('nan')):.1f} s, "
                f"engine used: {row['engine_used']}",
                flush=True,
            )
    table = {}
    for name, rows in runs.items():
        table[name] = {
            key: statistics.median(r[key] for r in rows if key in r)
            for key in ("wall_s", "generate", "score")
            if any(key in r for r in rows)
        }
        table[name]["engine_used"] = rows[0]["engine_used"]
    print("\n| engine setting | engine used | process s | generate s | score s |\n|---|---|---:|---:|---:|")
    for name, t in table.items():
        print(
            f"| {name} | {t['engine_used']} | {t['wall_s']:.1f} | {t.get('generate', float('nan')):.1f} "
            f"| {t.get('score', float('nan')):.1f} |"
        )
    ratio = table["default"]["wall_s"] / table["refill"]["wall_s"]
    print(f"\ndefault / refill process time: {ratio:.3f} (target: <= 1, within run-to-run noise)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) for k, v in vars(args).items()}
        args.out.write_text(
            json.dumps({"settings": settings, "median": table, "runs": runs}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
