"""The GPU check: one command that a CUDA machine with no network runs start to finish in under ~9 minutes.

What `run` does, each part in its own process with its own time limit (`--limit PART=SECONDS`), writing
`check.json` (every figure), `check.md` (the tables for docs/results/gpu.md) and one log per part to `--out`:

1. `install`: `pip install --no-index --no-deps --target SITE` of the wheels carried in `--wheels` (what the
   H200 image lacks: `WHEELS` and DeepSpeed, fetched here by `download`); SITE and src/ go first on every
   later part's PYTHONPATH. Skipped when the folder holds no wheel (the CPU dry run).
2. `environment`: versions of torch, CUDA, transformers, accelerate, peft, trl, datasets, deepspeed (each
   imported: an import error is recorded, not fatal), the device, and `pip check`.
3. `tests`: `pytest -m gpu tests/test_gpu.py` (on CPU every test skips).
4. `generation`: tokens/s of spinlm's `refill` engine vs plain batched HF `generate`
   (`benchmarks/real_generation.generate_way`: the same two ways the CPU benchmark times) at batch 64 and 256
   (128 and 256 prompts: two batches at most), 256 new tokens, temperature 1, on randomly initialised models of real size built from a config
   (`SHAPES`: Qwen2.5-0.5B's and SmolLM2-1.7B's shapes; no download). End of turn is switched off (no EOS id in
   the tokenizer or the model's generation config), so every reply runs to max_new_tokens and both ways do
   the same work; `ran_to_max` checks it. Prompts are the built-in character tokenizer's (1 token per
   character, 64-192 characters), the model's vocabulary its real size. Each way is run once on 2 prompts
   first (kernel selection, allocator warm-up) and not timed.
5. `training`: `spinlm.trainer.train_iteration` (the train stage as `spinlm run` calls it, bf16, RMSprop) on
   10 steps (`Settings.train_steps`) of 16 pairs (`train_batch`), each side a 128-character prompt and a
   256-character reply (388 tokens per sequence, all of one length: no padding); the reference log-probs are
   scored first with `spinlm.logps.score_logps` (timed too). Tokens/s over the steps after the first 2
   (`warmup_steps`), and model FLOPs
   utilisation: FLOPs per sequence of s tokens, 3x forward for training, forward =
   2 N_body s + 2 L d s^2 (causal attention, L layers, d = heads x head_dim) + 2 h V per reply token (spinlm
   projects only those through the LM head), N_body the parameters outside the embedding and LM head; against
   `PEAK_BF16` = 989.4 TFLOP/s (the H100/H200 SXM datasheet's dense bf16 figure, no sparsity) and against the
   bf16 matmul rate measured in the same process (`real_common.matmul_gflops`, 8192^3).
   Both benchmarks record peak GPU memory per way, and the memory still allocated after each stage relative to
   the baseline taken after a warm-up step (`retained_mib`; 0 = nothing leaked between stages).
6. `packing`: which layout of a training micro-batch is fastest on the GPU (on the CPU, rows no wider than the
   padded batch: docs/results/training.md). `packing_steps` micro-batches of 2 x `train_batch` sequences of
   unequal, SPIN-like lengths (a prompt of `packing_prompt` tokens and a reply of `packing_reply`, uniform in
   each range, random token ids), one forward + backward each (gradient checkpointing on, as spinlm trains;
   `benchmarks/packing_profile.py`'s `layouts` and `fwd_bwd`) in six layouts of the same tokens: padded,
   packed into rows no wider than the padded batch (under plain sdpa, the GPU default), rows of
   `spinlm.logps.row_capacity`'s width, one row of everything, one row under spinlm's `sdpa_segments`
   (attention within each sequence; the CPU default), and each sequence in a forward of its own. Median seconds over `packing_repeats` passes after a warm-up pass, the share
   of positions that are padding or filler, peak memory, and the largest difference of the per-sequence
   log-probs from the padded layout's (packing must not change what is computed).

`--cpu`: the same script and code paths at tiny sizes on the CPU (tests/test_gpu_check.py runs it in
`make test`): no install unless wheels are given, the GPU tests skip, tiny Llama and Qwen2 models.

    make gpu-wheels                       # here: fetch / build the wheels into .whl and measure what travels
    python3 benchmarks/gpu_check.py run --out OUT           # on the GPU (= make gpu-check OUT=OUT)
    python3 benchmarks/gpu_check.py run --out OUT --cpu     # the CPU dry run (= make gpu-check OUT=OUT CPU=1)
    python3 benchmarks/gpu_check.py size                    # wheels + project against the 64 MiB limit

Nothing here departs from the paper: it measures spinlm's stages, it does not change them.
Only the standard library is imported at module level: `download`, `size` and the orchestration of `run`
work in a Python without torch (the workers import it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"

# What the H200 image lacks of spinlm's dependencies (trl, datasets) and of DeepSpeed's, per the device's
# package list (KINDS.md): pinned, one version each (two versions of one package stop the whole install).
WHEELS = (
    "trl==1.16.0",
    # 5.0.1: the newest datasets that asks only pyarrow>=21 (5.1+ ask >=24; the image's pyarrow is unrecorded)
    # and huggingface-hub<2 (the image has 1.33).
    "datasets==5.0.1",
    "dill==0.4.1",  # datasets needs dill<0.4.2, multiprocess<0.70.20
    "multiprocess==0.70.19",
    "hjson==3.1.0",  # DeepSpeed needs hjson and pydantic
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",  # pydantic 2.14 needs >=4.16; the image's version is unrecorded
)
# An sdist on PyPI: built here into a pure-Python wheel without compiled ops (DS_BUILD_OPS=0); ops it would
# need are JIT-built on first use (the image has nvcc and ninja). ZeRO-3 with a torch optimizer needs none.
DEEPSPEED = "deepspeed==0.19.8"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
TRAVEL_LIMIT_MIB = 64  # what may be copied to the GPU machine: the checkout plus the carried wheel folder

LEAK_MIB = 16  # memory a stage may leave allocated (allocator slack); a leak here is hundreds of MiB
PEAK_BF16 = 989.4e12  # FLOP/s: H100 / H200 SXM dense bf16 (datasheet, without sparsity)

# Model shapes built from a config with random weights (no download). Real sizes: the vocabulary, embedding
# and every layer as in the named model; the tiny ones are the CPU dry run's.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "rope_theta": 1e6,
    },
    "smollm2-1.7b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 49152,
        "rope_theta": 130000.0,
    },
    "tiny-llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    },
    "tiny-qwen2": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    },
}


@dataclass
class Settings:
    """Everything a worker needs; the GPU defaults, `CPU_DRY_RUN` the tiny ones."""

    device: str = "cuda"
    dtype: str = "bfloat16"  # model weights; training runs under precision `precision`
    precision: str = "bf16"
    sizes: list[str] = field(default_factory=lambda: ["qwen2.5-0.5b", "smollm2-1.7b"])
    gen_batch_sizes: list[int] = field(default_factory=lambda: [64, 256])
    gen_prompts: int = 256
    max_new_tokens: int = 256
    prompt_chars: tuple[int, int] = (64, 192)  # generation prompts: lengths drawn in this range
    train_batch: int = 16  # pairs per step
    train_steps: int = 10
    warmup_steps: int = 2  # steps not timed
    train_prompt_chars: int = 128
    reply_chars: int = 256
    score_batch: int = 32
    matmul_n: int = 8192
    packing_steps: int = 3  # micro-batches of 2 x train_batch sequences
    packing_repeats: int = 2  # timed passes over them, after a warm-up pass
    packing_prompt: tuple[int, int] = (32, 256)  # prompt tokens, drawn uniformly in this range
    packing_reply: tuple[int, int] = (64, 768)  # reply tokens, likewise
    limits: dict[str, int] = field(
        default_factory=lambda: {
            "install": 25,
            "environment": 35,
            "tests": 250,
            "generation": 115,
            "training": 55,
            "packing": 45,
        }
    )

    def __post_init__(self) -> None:
        if not 1 <= self.warmup_steps < self.train_steps:
            raise ValueError(f"warmup_steps must be in [1, train_steps); got {self.warmup_steps}")
        unknown = set(self.sizes) - set(SHAPES)
        if unknown:
            raise ValueError(f"unknown model shapes {sorted(unknown)}; choose from {', '.join(SHAPES)}")


CPU_DRY_RUN = Settings(
    device="cpu",
    dtype="float32",
    precision="fp32",
    sizes=["tiny-llama", "tiny-qwen2"],
    gen_batch_sizes=[2, 4],
    gen_prompts=4,
    max_new_tokens=6,
    prompt_chars=(8, 16),
    train_batch=2,
    train_steps=3,
    warmup_steps=1,
    train_prompt_chars=12,
    reply_chars=10,
    score_batch=4,
    matmul_n=128,
    packing_steps=2,
    packing_repeats=1,
    packing_prompt=(4, 12),
    packing_reply=(4, 24),
    limits={
        "install": 60,
        "environment": 60,
        "tests": 120,
        "generation": 120,
        "training": 120,
        "packing": 120,
    },
)
PARTS = ("install", "environment", "tests", "generation", "training", "packing")


# ------------------------------------------------------------------------------------------------------
# Here: the wheels, and what travels.


def download(dest: Path) -> None:
    """Fetch WHEELS for the device (CPython 3.12, manylinux x86-64) and build DeepSpeed's wheel into `dest`,
    replacing any wheel there (one version of each)."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
        + ["--implementation", "cp", *platforms, "-d", str(dest), *WHEELS],
        check=True,
    )
    env = {**os.environ, "DS_BUILD_OPS": "0"}  # no compiled ops: a py3-none-any wheel
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dest), DEEPSPEED], check=True, env=env)


def travelling_bytes(wheels: Path) -> dict[str, int]:
    """Bytes of what is copied to the GPU machine: the project (tracked plus untracked files that git does
    not ignore, as `git ls-files --cached --others --exclude-standard` lists them) and the wheel folder."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    project = sum(
        (REPO / name.decode()).stat().st_size for name in listed if name and (REPO / name.decode()).is_file()
    )
    carried = sum(p.stat().st_size for p in wheels.rglob("*") if p.is_file()) if wheels.is_dir() else 0
    return {"project": project, "wheels": carried, "total": project + carried}


def print_size(wheels: Path) -> bool:
    sizes = travelling_bytes(wheels)
    mib = {k: v / 2**20 for k, v in sizes.items()}
    ok = mib["total"] <= TRAVEL_LIMIT_MIB
    print(
        f"travels: project {mib['project']:.2f} MiB + wheels ({wheels.name}) {mib['wheels']:.2f} MiB = "
        f"{mib['total']:.2f} MiB of {TRAVEL_LIMIT_MIB} MiB: {'fits' if ok else 'TOO LARGE'}"
    )
    return ok


# ------------------------------------------------------------------------------------------------------
# The orchestration of `run` (standard library only: it runs before the install).


def run_part(name: str, cmd: list[str], limit: int, out: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one part in its own process group with a time limit; its output goes to OUT/NAME.log."""
    log_path = out / f"{name}.log"
    print(f"[gpu-check] {name}: start (limit {limit} s)", flush=True)
    start = time.perf_counter()
    with log_path.open("a", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
        try:
            rc: int | None = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and everything it started (launchers, workers)
            proc.wait()
            rc, status = None, "timed_out"
    seconds = time.perf_counter() - start
    print(f"[gpu-check] {name}: {status} in {seconds:.0f} s (log {log_path.name})", flush=True)
    return {"status": status, "returncode": rc, "seconds": round(seconds, 1), "limit_s": limit}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The RESULT rows a worker appended (those written before a time-out too)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def parse_pytest(log: Path) -> dict[str, str]:
    """{test id: PASSED / FAILED / SKIPPED / ERROR} from `pytest -v` output."""
    outcomes: dict[str, str] = {}
    if not log.is_file():
        return outcomes
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        words = line.split()
        if (
            len(words) >= 2
            and "::" in words[0]
            and words[1] in ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL")
        ):
            outcomes[words[0]] = words[1]
    return outcomes


def part_commands(args: argparse.Namespace, settings: Settings, tmp: Path) -> dict[str, list[str] | None]:
    """The command of every part (None: nothing to do)."""
    me = [sys.executable, str(Path(__file__).resolve())]
    wheels = sorted(str(p) for p in Path(args.wheels).glob("*.whl")) if args.wheels else []
    install = (
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        + ["--no-cache-dir", "--upgrade", "--target", args.site, *wheels]
        if wheels
        else None
    )
    pytest = [
        sys.executable,
        "-m",
        "pytest",
        "-v",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        "tests/test_gpu.py",
    ]
    worker = [*me, "worker", "--settings", json.dumps(asdict(settings))]
    return {
        "install": install,
        "environment": [*worker, "environment", "--results", str(tmp / "environment.jsonl")],
        "tests": pytest,
        "generation": [*worker, "generation", "--results", str(tmp / "generation.jsonl")],
        "training": [*worker, "training", "--results", str(tmp / "training.jsonl")],
        "packing": [*worker, "packing", "--results", str(tmp / "packing.jsonl")],
    }


def run_check(args: argparse.Namespace) -> int:
    """`run`: every part in order; check.json and check.md in --out; exit 1 if a part failed or timed out."""
    settings = replace(CPU_DRY_RUN if args.cpu else Settings())
    settings.limits = {**settings.limits, **dict(_limit(x) for x in args.limit)}
    if args.sizes:
        settings.sizes = args.sizes.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu_dry_run": bool(args.cpu),
        "settings": asdict(settings),
        "parts": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # The CPU dry run installs only wheels it is given (.whl holds the GPU's Python 3.12 builds), into a
        # folder of its own.
        if args.wheels is None:
            args.wheels = "" if args.cpu else str(REPO / ".whl")
        if args.site is None:
            args.site = str(tmp / "site") if args.cpu else "/tmp/spinlm-site"
        Path(args.site).mkdir(parents=True, exist_ok=True)  # on PYTHONPATH from the start (module docstring)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([args.site, str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        commands = part_commands(args, settings, tmp)
        for name in args.parts.split(","):
            cmd = commands[name]
            if cmd is None:
                report["parts"][name] = {"status": "skipped", "reason": f"no wheels in {args.wheels!r}"}
                print(f"[gpu-check] {name}: skipped (no wheels in {args.wheels!r})", flush=True)
                continue
            report["parts"][name] = run_part(name, cmd, settings.limits[name], out, env)
        env_rows = read_rows(tmp / "environment.jsonl")
        report["environment"] = env_rows[0] if env_rows else None
        report["tests"] = parse_pytest(out / "tests.log")
        report["generation"] = read_rows(tmp / "generation.jsonl")
        report["training"] = read_rows(tmp / "training.jsonl")
        report["packing"] = read_rows(tmp / "packing.jsonl")
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["targets"] = targets(report)
    (out / "check.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    markdown = render_markdown(report)
    (out / "check.md").write_text(markdown, encoding="utf-8")
    print(markdown, flush=True)
    bad = [n for n, p in report["parts"].items() if p["status"] not in ("ok", "skipped")]
    print(
        f"[gpu-check] done in {report['seconds']:.0f} s; "
        + (f"FAILED: {', '.join(bad)}" if bad else "all parts ok")
    )
    return 1 if bad else 0


def _limit(text: str) -> tuple[str, int]:
    name, _, seconds = text.partition("=")
    if name not in PARTS or not seconds.isdigit():
        raise SystemExit(f"--limit takes PART=SECONDS with PART one of {', '.join(PARTS)}; got {text!r}")
    return name, int(seconds)


# ------------------------------------------------------------------------------------------------------
# The report: targets and Markdown tables.


def generation_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """refill tokens/s over plain HF generate's, per (size, batch)."""
    by_key = {(r["size"], r["batch"], r["way"]): r for r in rows}
    out = []
    for (size, batch, way), r in by_key.items():
        hf = by_key.get((size, batch, "hf_generate"))
        if way == "refill" and hf is not None:
            out.append(
                {"size": size, "batch": batch, "refill_over_hf": r["tokens_per_s"] / hf["tokens_per_s"]}
            )
    return out


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, None where the figure is missing: generation >= 2x plain batched HF generate
    (every size and batch), training >= 35% MFU on the 1.7B shape, nothing leaked between stages."""
    ratios = generation_ratios(report["generation"])
    mfu = [r["mfu"] for r in report["training"] if r["size"] == "smollm2-1.7b"]
    retained = [
        v
        for r in report["generation"] + report["training"]
        for k, v in r.items()
        if k.startswith("retained_mib") and v is not None
    ]
    leak_test = [o for t, o in report["tests"].items() if "baseline" in t]
    return {
        "generation_2x": all(r["refill_over_hf"] >= 2 for r in ratios) if ratios else None,
        "training_35pct_mfu_1.7b": mfu[0] >= 0.35 if mfu else None,
        "nothing_leaked": (all(v <= LEAK_MIB for v in retained) and all(o == "PASSED" for o in leak_test))
        if retained and leak_test
        else None,
    }


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def render_markdown(report: dict[str, Any]) -> str:
    env = report.get("environment") or {}
    lines = [
        f"GPU check, {report['started']}, {'CPU dry run' if report['cpu_dry_run'] else env.get('device', '?')}; "
        f"{report['seconds']:.0f} s in all",
        "",
        "| part | status | seconds | limit s |",
        "|---|---|---:|---:|",
    ]
    for name, p in report["parts"].items():
        lines.append(
            f"| {name} | {p['status']} | {_fmt(p.get('seconds'), '.0f')} | {_fmt(p.get('limit_s'), 'd')} |"
        )
    lines += ["", "| versions | |", "|---|---|"] + [
        f"| {k} | {v} |" for k, v in env.get("versions", {}).items()
    ]
    counts: dict[str, int] = {}
    for outcome in report["tests"].values():
        counts[outcome] = counts.get(outcome, 0) + 1
    lines += ["", "| GPU test | outcome |", "|---|---|"]
    lines += [f"| {t.split('::')[-1]} | {o} |" for t, o in report["tests"].items()]
    lines += ["", "| model | batch | way | tokens/s | seconds | ran to max | peak MiB | retained MiB |"]
    lines += ["|---|---:|---|---:|---:|---|---:|---:|"]
    for r in report["generation"]:
        lines.append(
            f"| {r['size']} | {r['batch']} | {r['way']} | {r['tokens_per_s']:.0f} | {r['seconds']:.1f} "
            f"| {r['ran_to_max']} | {_fmt(r['peak_mib'], '.0f')} | {_fmt(r['retained_mib'], '.0f')} |"
        )
    lines += ["", "| model | batch | refill / HF generate |", "|---|---:|---:|"]
    lines += [
        f"| {r['size']} | {r['batch']} | {r['refill_over_hf']:.2f}x |"
        for r in generation_ratios(report["generation"])
    ]
    lines += [
        "",
        "| model | params | train tokens/s | MFU | % of measured matmul | score tokens/s | peak MiB ",
    ]
    lines[-1] += "| retained MiB (score, train) |"
    lines += ["|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["training"]:
        lines.append(
            f"| {r['size']} | {r['parameters'] / 1e6:.0f}M | {r['train_tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% "
            f"| {100 * r['share_of_matmul']:.1f}% | {r['score_tokens_per_s']:.0f} | {_fmt(r['peak_mib'], '.0f')} "
            f"| {_fmt(r['retained_mib_score'], '.0f')}, {_fmt(r['retained_mib_train'], '.0f')} |"
        )
    lines += [
        "",
        "| model | layout | positions | padding or filler | fwd+bwd s | vs padded | peak MiB | max logp diff |",
    ]
    lines += ["|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report.get("packing", []):
        lines.append(
            f"| {r['size']} | {r['layout']} | {r['positions']} | {100 * r['waste']:.1f}% | {r['seconds']:.3f} "
            f"| {r['speed_vs_padded']:.2f}x | {_fmt(r['peak_mib'], '.0f')} | {r['max_logp_diff']:.2g} |"
        )
    lines += ["", "targets: " + ", ".join(f"{k} {v}" for k, v in report["targets"].items()), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------
# Shared by the workers and tests/test_gpu.py (torch imported inside).


def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def settled_memory(device: Any) -> int | None:
    """Bytes in live tensors on a CUDA `device` after garbage collection (None on CPU): what a stage that
    has returned still holds."""
    import gc

    import torch

    if torch.device(device).type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return int(torch.cuda.memory_allocated(device))


def warm_up(model: Any, tokenizer: Any) -> None:
    """One forward and backward pass on two short sequences, gradients dropped: the cuBLAS / cuBLASLt
    workspaces, which PyTorch allocates on first use and keeps for the process, exist before a memory
    baseline is taken (else they would count as retained by the first stage)."""
    from spinlm.logps import collate, encode_all, forward_logps

    prompt = [{"role": "user", "content": "1+1="}]
    batch = collate(encode_all(tokenizer, [prompt, prompt], ["2", "22"], 32), tokenizer.pad_token_id)
    forward_logps(model, batch).sum().backward()
    model.zero_grad(set_to_none=True)


def _mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def build_model(size: str, device: str, dtype: str, eos: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer): SHAPES[size] with random weights, built on `device` in `dtype`, and the built-in
    character tokenizer. `eos=False`: no end-of-turn id anywhere, so generation runs to max_new_tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from spinlm.modeling import DTYPES, build_char_tokenizer

    tokenizer = build_char_tokenizer()
    shape = dict(SHAPES[size])
    config = AutoConfig.for_model(
        shape.pop("model_type"),
        **shape,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id if eos else None,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1.7B model's init on the CPU takes long
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id if eos else None
    if not eos:
        tokenizer.eos_token = None
    return model, tokenizer


def body_parameters(model: Any) -> int:
    """Parameters outside the input embedding and (untied) LM head: 2 FLOPs each per token forward."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return total - embed.numel() - (0 if head.data_ptr() == embed.data_ptr() else head.numel())


def model_flops(model: Any, seq_lens: list[int], scored: int, training: bool) -> float:
    """FLOPs of a forward (x3 with `training`) over sequences of `seq_lens` tokens with `scored` reply
    tokens in all (see the module docstring for the formula)."""
    c = model.config
    d_attn = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    forward = (
        2 * body_parameters(model) * sum(seq_lens)
        + 2 * c.num_hidden_layers * d_attn * sum(s * s for s in seq_lens)
        + 2 * c.hidden_size * c.vocab_size * scored
    )
    return float(forward * (3 if training else 1))


def words(rng: random.Random, n_chars: int) -> str:
    """Lower-case pseudo-words, exactly `n_chars` characters (= tokens for the character tokenizer)."""
    text = ""
    while len(text) < n_chars:
        text += "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) + " "
    return text[:n_chars]


# ------------------------------------------------------------------------------------------------------
# Workers: each appends one JSON row per measurement to --results as soon as it has it.


def append_row(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print("RESULT " + json.dumps(row), flush=True)


def environment_worker(settings: Settings, results: Path) -> None:
    """Versions (each package imported: an error is recorded), the device, and `pip check`."""
    import importlib

    versions: dict[str, str] = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "deepspeed", "spinlm"):
        try:
            module = importlib.import_module(name)
            versions[name] = str(getattr(module, "__version__", "imported"))
        except Exception as e:  # noqa: BLE001 - recorded: the check goes on without it
            versions[name] = f"not importable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    import torch

    versions["cuda"] = str(torch.version.cuda)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)"
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    print(check.stdout + check.stderr)
    append_row(results, {"versions": versions, "device": device, "pip_check": check.stdout.splitlines()[:40]})


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: str) -> float | None:
    import torch

    return _mib(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def _retained(base: int | None, after: int | None) -> float | None:
    return None if base is None or after is None else _mib(after - base)


class OnDevice:
    """A tokenizer whose batch encodings land on `device`: `vllm_generation.hf_batched` (the plain HF way)
    passes them to `generate` as they come, on the CPU, which a model on a GPU refuses. Everything else is the
    tokenizer's own."""

    def __init__(self, tokenizer: Any, device: str) -> None:
        self._tokenizer, self._device = tokenizer, device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs).to(self._device)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def generation_worker(settings: Settings, results: Path) -> None:
    """Per size: every (batch, way) on the same prompts, timed after an untimed warm-up of each way."""
    sys.path.insert(0, str(BENCH))
    from real_generation import generate_way

    from spinlm.modeling import build_char_tokenizer

    rng = random.Random(0)
    prompts = [
        [{"role": "user", "content": words(rng, rng.randint(*settings.prompt_chars))}]
        for _ in range(settings.gen_prompts)
    ]
    ways = {"hf_generate": "hf_batch{}", "refill": "spin_refill"}  # real_generation's names for them
    device = settings.device
    for size in settings.sizes:
        model, tok = build_model(size, device, settings.dtype, eos=False)
        model.eval()
        toks = {"hf_generate": OnDevice(tok, device), "refill": tok}
        warm = argparse.Namespace(max_new_tokens=4, batch_size=2)
        for way, name in ways.items():
            generate_way(name.format(2), model, toks[way], prompts[:2], warm)
        warm_up(model, build_char_tokenizer())  # one with an end of turn: warm_up's replies end with it
        base = settled_memory(device)
        for batch in settings.gen_batch_sizes:
            ns = argparse.Namespace(max_new_tokens=settings.max_new_tokens, batch_size=batch)
            some = prompts[: 2 * batch]  # two batches' worth at most: every row runs to the end anyway
            for way, name in ways.items():
                _reset_peak(device)
                sync(device)
                start = time.perf_counter()
                tokens = generate_way(name.format(batch), model, toks[way], some, ns)
                sync(device)
                seconds = time.perf_counter() - start
                row = {"size": size, "batch": batch, "way": way, "prompts": len(some), "tokens": tokens}
                row |= {"seconds": seconds, "tokens_per_s": tokens / seconds, "peak_mib": _peak_mib(device)}
                row |= {"ran_to_max": tokens == len(some) * settings.max_new_tokens}
                row["retained_mib"] = _retained(base, settled_memory(device))
                append_row(results, row)
        del model
        settled_memory(device)


def synthetic_pairs(settings: Settings, n: int) -> tuple[list[list[dict]], list[str], list[str]]:
    """(prompts, real replies, generated replies), every one of the same length: no padding anywhere."""
    rng = random.Random(1)
    prompts = [[{"role": "user", "content": words(rng, settings.train_prompt_chars)}] for _ in range(n)]
    real = [words(rng, settings.reply_chars) for _ in range(n)]
    return prompts, real, [words(rng, settings.reply_chars) for _ in range(n)]


def scored_pairs(model: Any, tok: Any, settings: Settings, max_length: int) -> tuple[list[dict], float]:
    """(SPIN pairs with their reference log-probs from `score_logps`, seconds the scoring took)."""
    from spinlm.logps import score_logps

    prompts, real, generated = synthetic_pairs(settings, settings.train_batch * settings.train_steps)
    sync(settings.device)
    start = time.perf_counter()
    ref_real = score_logps(model, tok, prompts, real, max_length, settings.score_batch)
    ref_gen = score_logps(model, tok, prompts, generated, max_length, settings.score_batch)
    sync(settings.device)
    seconds = time.perf_counter() - start
    pairs = [
        {
            "prompt": p,
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": g}],
            "ref_chosen_logps": rc,
            "ref_rejected_logps": rg,
        }
        for p, c, g, rc, rg in zip(prompts, real, generated, ref_real, ref_gen)
    ]
    return pairs, seconds


def step_times(model: Any, tok: Any, pairs: list[dict], settings: Settings, max_length: int) -> list[float]:
    """One `train_iteration` over `pairs` (one epoch, train_batch pairs a step); the clock at each step's end."""
    from spinlm.config import TrainConfig
    from spinlm.trainer import train_iteration

    cfg = TrainConfig(
        iterations=1,
        epochs=1,
        batch_size=settings.train_batch,
        max_length=max_length,
        save_steps=0,
        precision=settings.precision,
    )
    stamps: list[float] = []

    def on_step(step: int) -> None:
        sync(settings.device)
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as log_dir:
        train_iteration(model, tok, pairs, cfg, 1, 0, Path(log_dir), on_step=on_step)
    return stamps


def training_worker(settings: Settings, results: Path) -> None:
    """Per size: score the pairs (the reference), then one train_iteration, timed per optimizer step."""
    import torch

    sys.path.insert(0, str(BENCH))
    from real_common import matmul_gflops

    from spinlm.trainer import featurize

    device, threads = settings.device, torch.get_num_threads()
    matmul = matmul_gflops(threads, n=settings.matmul_n, device=device, dtype=settings.dtype) * 1e9
    max_length = settings.train_prompt_chars + settings.reply_chars + 16
    for size in settings.sizes:
        model, tok = build_model(size, device, settings.dtype)
        warm_up(model, tok)
        base = settled_memory(device)
        _reset_peak(device)
        pairs, score_s = scored_pairs(model, tok, settings, max_length)
        after_score = settled_memory(device)
        stamps = step_times(model, tok, pairs, settings, max_length)
        after_train = settled_memory(device)
        features = featurize(tok, pairs, max_length)
        seqs = [len(e.input_ids) for f in features for e in (f.chosen, f.rejected)]
        scored = sum(len(e.input_ids) - e.prompt_len for f in features for e in (f.chosen, f.rejected))
        timed = len(stamps) - settings.warmup_steps
        train_s = stamps[-1] - stamps[settings.warmup_steps - 1]
        share = timed / len(stamps)  # of all the work: every step has train_batch pairs of equal length
        flops = model_flops(model, seqs, scored, training=True) * share
        row: dict[str, Any] = {"size": size, "parameters": sum(p.numel() for p in model.parameters())}
        row |= {"steps": len(stamps), "timed_steps": timed, "pairs_per_step": settings.train_batch}
        row |= {"tokens_per_step": sum(seqs) / len(stamps), "train_seconds": train_s}
        row |= {"train_tokens_per_s": sum(seqs) * share / train_s, "train_tflops": flops / train_s / 1e12}
        row |= {"mfu": flops / train_s / PEAK_BF16, "share_of_matmul": flops / train_s / matmul}
        row |= {"matmul_tflops": matmul / 1e12, "score_seconds": score_s}
        row |= {"score_tokens_per_s": sum(seqs) / score_s}
        row |= {"score_mfu": model_flops(model, seqs, scored, training=False) / score_s / PEAK_BF16}
        row |= {"peak_mib": _peak_mib(device), "retained_mib_score": _retained(base, after_score)}
        row |= {"retained_mib_train": _retained(base, after_train)}
        append_row(results, row)
        del model
        settled_memory(device)


def packing_batches(settings: Settings, vocab: int) -> list[dict[str, Any]]:
    """`packing_steps` collated (2 x train_batch, T) micro-batches of random token ids with SPIN-like,
    unequal lengths (module docstring, part 6)."""
    from spinlm.logps import collate
    from spinlm.modeling import Encoded

    rng = random.Random(2)
    batches = []
    for _ in range(settings.packing_steps):
        encoded = []
        for _ in range(2 * settings.train_batch):
            prompt, reply = rng.randint(*settings.packing_prompt), rng.randint(*settings.packing_reply)
            encoded.append(Encoded([rng.randrange(1, vocab) for _ in range(prompt + reply)], prompt))
        batches.append(collate(encoded, 0))
    return batches


def on_device(layout: dict[str, Any], device: str) -> dict[str, Any]:
    """A layout of `packing_profile.layouts` with every tensor, its model inputs (`extra`) included, on `device`."""
    import torch

    if "parts" in layout:
        return {"parts": [on_device(p, device) for p in layout["parts"]]}

    def move(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in d.items()}

    return {**move(layout), "extra": move(layout["extra"])}


def sequence_logps(model: Any, layout: dict[str, Any], n: int) -> Any:
    """(n,) per-sequence log-probs of one layout of a batch (no gradient), for the equality check."""
    import torch

    from spinlm.logps import TokenLogps

    if "parts" in layout:
        return sum(sequence_logps(model, p, n) for p in layout["parts"])
    from packing_profile import use_attention  # on sys.path: packing_worker put it there

    use_attention(model, layout)  # sdpa_segments for `segments`, plain sdpa for the others
    keep = torch.zeros_like(layout["input_ids"], dtype=torch.bool)  # (R, L)
    keep[:, :-1] = layout["scored"]
    with torch.no_grad():
        logits = model(input_ids=layout["input_ids"], logits_to_keep=keep, **layout["extra"]).logits  # (M, V)
        token = TokenLogps.apply(logits, layout["input_ids"][:, 1:][layout["scored"]])  # (M,) fp32
    return token.new_zeros(n).index_add(0, layout["owner"][layout["scored"]], token)


def packing_worker(settings: Settings, results: Path) -> None:
    """Per size and layout: forward + backward of the same micro-batches, timed (module docstring, part 6)."""
    import statistics

    sys.path.insert(0, str(BENCH))
    from packing_profile import LAYOUTS, fwd_bwd, layouts, positions, shapes

    from spinlm.logps import attention_cost
    from spinlm.trainer import set_activation_checkpointing

    device = settings.device
    for size in settings.sizes:
        model, _ = build_model(size, device, settings.dtype)
        set_activation_checkpointing(model, True)
        model.train()
        collated = packing_batches(settings, model.config.vocab_size)
        tokens = sum(int(b["attention_mask"].sum()) for b in collated)
        laid = [
            {name: on_device(layout, device) for name, layout in layouts(b, attention_cost(model)).items()}
            for b in collated
        ]
        padded_logps = [
            sequence_logps(model, b["padded"], len(c["input_ids"])) for b, c in zip(laid, collated)
        ]
        base = None
        for name in LAYOUTS:
            diff = max(
                float((sequence_logps(model, b[name], len(c["input_ids"])) - ref).abs().max())
                for b, c, ref in zip(laid, collated, padded_logps)
            )
            _reset_peak(device)
            times = []
            for repeat in range(settings.packing_repeats + 1):  # the first pass is the warm-up
                sync(device)
                start = time.perf_counter()
                for b in laid:
                    fwd_bwd(model, b[name])
                    model.zero_grad(set_to_none=True)
                sync(device)
                if repeat:
                    times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            base = base or seconds
            count = sum(positions(b[name]) for b in laid)
            row: dict[str, Any] = {"size": size, "layout": name, "micro_batches": len(laid)}
            row |= {"sequences_per_micro_batch": 2 * settings.train_batch, "tokens": tokens}
            row |= {"positions": count, "waste": 1 - tokens / count, "seconds": seconds}
            row |= {"speed_vs_padded": base / seconds, "peak_mib": _peak_mib(device), "max_logp_diff": diff}
            row |= {"shapes": [shapes(b[name]) for b in laid]}
            append_row(results, row)
        del model, laid
        settled_memory(device)


WORKERS = {
    "environment": environment_worker,
    "generation": generation_worker,
    "training": training_worker,
    "packing": packing_worker,
}


# ------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the check (on the GPU; --cpu: the dry run)")
    run.add_argument("--out", required=True, help="folder for check.json, check.md and the logs")
    run.add_argument("--cpu", action="store_true", help="the CPU dry run: tiny sizes, same code paths")
    run.add_argument(
        "--wheels", default=None, help="carried wheels to install first (default: .whl; --cpu: none)"
    )
    run.add_argument(
        "--site",
        default=None,
        help="where the wheels are installed (default /tmp/spinlm-site; --cpu: a temporary one)",
    )
    run.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    run.add_argument("--sizes", default=None, help=f"comma-separated model shapes ({', '.join(SHAPES)})")
    run.add_argument(
        "--limit", action="append", default=[], metavar="PART=SECONDS", help="a part's time limit"
    )
    dl = sub.add_parser("download", help="fetch the wheels the device lacks, then measure what travels")
    dl.add_argument("--dir", default=str(REPO / ".whl"))
    size = sub.add_parser("size", help="measure what is copied to the GPU machine against the 64 MiB limit")
    size.add_argument("--dir", default=str(REPO / ".whl"))
    worker = sub.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("--settings", required=True)
    worker.add_argument("part", choices=sorted(WORKERS))
    worker.add_argument("--results", required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "download":
        download(Path(args.dir))
        return 0 if print_size(Path(args.dir)) else 1
    if args.command == "size":
        return 0 if print_size(Path(args.dir)) else 1
    if args.command == "worker":
        raw = json.loads(args.settings)
        raw["prompt_chars"] = tuple(raw["prompt_chars"])
        WORKERS[args.part](Settings(**raw), Path(args.results))
        return 0
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
