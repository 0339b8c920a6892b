"""The GPU check on the CPU (benchmarks/gpu_check.py): its dry run, so that it cannot rot while no GPU is at hand.

- `run --cpu`: the same script and code paths as on the GPU at tiny sizes (about 30 s on 2 cores): the
  install of a carried wheel (a one-module wheel made here) into the site folder, the environment report,
  `pytest -m gpu` (every test skips), the generation, training and packing benchmarks on tiny Llama and Qwen2
  models;
  check.json holds every figure, and the token counts are what the settings imply.
- The pieces of the report: the FLOP formula on a model whose numbers are worked out by hand, a part that
  outruns its limit is killed with its children, the targets are None until their figures exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def make_wheel(folder: Path, name: str = "gpucheck_probe") -> Path:
    """A minimal pure-Python wheel holding module `name` (what pip needs: the module, METADATA, WHEEL, RECORD)."""
    folder.mkdir(parents=True)
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {
        f"{name}.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as z:
        for arc, text in files.items():
            z.writestr(arc, text)
        z.writestr(f"{info}/RECORD", "".join(f"{arc},,\n" for arc in [*files, f"{info}/RECORD"]))
    return path


@pytest.mark.slow
def test_cpu_dry_run_runs_every_part(tmp_path: Path) -> None:
    out, site = tmp_path / "out", tmp_path / "site"
    make_wheel(tmp_path / "wheels")
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "run", "--cpu", "--out", str(out)]
    cmd += ["--wheels", str(tmp_path / "wheels"), "--site", str(site)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    report = json.loads((out / "check.json").read_text())
    assert {n: p["status"] for n, p in report["parts"].items()} == dict.fromkeys(gpu_check.PARTS, "ok")
    assert (site / "gpucheck_probe.py").is_file()  # the carried wheel went into the site folder
    assert report["environment"]["versions"]["torch"][0].isdigit()
    assert report["environment"]["device"] == "cpu (no CUDA)"
    # Every GPU test was collected and skipped (no CUDA), none failed to import.
    assert len(report["tests"]) >= 7 and set(report["tests"].values()) == {"SKIPPED"}, report["tests"]

    s = gpu_check.CPU_DRY_RUN
    gen = report["generation"]
    assert len(gen) == len(s.sizes) * len(s.gen_batch_sizes) * 2
    assert all(r["prompts"] == min(s.gen_prompts, 2 * r["batch"]) for r in gen)
    assert all(r["ran_to_max"] and r["tokens"] == r["prompts"] * s.max_new_tokens for r in gen)
    assert all(r["tokens_per_s"] > 0 for r in gen)
    train = report["training"]
    assert [r["size"] for r in train] == s.sizes
    # Character tokenizer: <|user|> prompt <|end|> <|assistant|> then the reply and <|end|>; two per pair.
    per_sequence = (s.train_prompt_chars + 3) + (s.reply_chars + 1)
    for r in train:
        assert r["steps"] == s.train_steps and r["timed_steps"] == s.train_steps - s.warmup_steps
        assert r["tokens_per_step"] == 2 * s.train_batch * per_sequence
        assert r["train_tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["score_tokens_per_s"] > 0
    packing = report["packing"]
    assert [(r["size"], r["layout"]) for r in packing] == [
        (size, layout)
        for size in s.sizes
        for layout in ("padded", "packed", "cost_model", "one_row", "segments", "per_sequence")
    ]
    for r in packing:
        assert r["micro_batches"] == s.packing_steps and r["seconds"] > 0
        assert r["tokens"] <= r["positions"] and 0 <= r["waste"] < 1
        assert r["max_logp_diff"] < 1e-3  # fp32: packing computes the same log-probs as padding
    one_row = [r for r in packing if r["layout"] in ("one_row", "segments")]
    assert all(r["waste"] == 0 and all(shape[0] == 1 for shape in r["shapes"]) for r in one_row)
    per_sequence = [r for r in packing if r["layout"] == "per_sequence"]
    assert all(len(shapes) == 2 * s.train_batch for r in per_sequence for shapes in r["shapes"])
    assert all(r["waste"] == 0 for r in per_sequence)
    md = (out / "check.md").read_text()
    assert "refill / HF generate" in md and "train tokens/s" in md and "max logp diff" in md
    assert {p.name for p in out.iterdir()} == {"check.json", "check.md"} | {
        f"{p}.log" for p in gpu_check.PARTS
    }


def test_model_flops_by_hand() -> None:
    model, _ = gpu_check.build_model("tiny-llama", "cpu", "float32")
    # tiny-llama: hidden 64, 4 heads of 16, 2 kv heads, MLP 128, 2 layers, vocab 512, tied embeddings.
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64  # q, o; k, v; gate, up, down; 2 norms
    body = 2 * per_layer + 64  # final norm
    assert gpu_check.body_parameters(model) == body
    assert sum(p.numel() for p in model.parameters()) == body + 512 * 64
    seq, scored = [10, 20], 7
    forward = 2 * body * 30 + 2 * 2 * 64 * (100 + 400) + 2 * 64 * 512 * scored
    assert gpu_check.model_flops(model, seq, scored, training=False) == forward
    assert gpu_check.model_flops(model, seq, scored, training=True) == 3 * forward


def test_a_part_past_its_limit_is_killed_with_its_children(tmp_path: Path) -> None:
    # The part starts a grandchild that would outlive it; killing the process group ends both.
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    result = gpu_check.run_part("slow", [sys.executable, "-c", code], 2, tmp_path, dict(os.environ))
    assert result["status"] == "timed_out" and result["returncode"] is None and result["seconds"] < 30
    assert (tmp_path / "slow.log").read_text().startswith("$ ")


def test_targets_are_none_until_their_figures_exist() -> None:
    empty: dict[str, Any] = {"generation": [], "training": [], "tests": {}}
    assert gpu_check.targets(empty) == dict.fromkeys(
        ("generation_2x", "training_35pct_mfu_1.7b", "nothing_leaked"), None
    )
    rows = [
        {"size": "m", "batch": 64, "way": "hf_generate", "tokens_per_s": 100.0, "retained_mib": 0.0},
        {"size": "m", "batch": 64, "way": "refill", "tokens_per_s": 250.0, "retained_mib": 0.0},
    ]
    train = [{"size": "smollm2-1.7b", "mfu": 0.3, "retained_mib_score": 0.0, "retained_mib_train": 200.0}]
    got = gpu_check.targets(
        {"generation": rows, "training": train, "tests": {"t::test_x_baseline_y": "PASSED"}}
    )
    assert got == {"generation_2x": True, "training_35pct_mfu_1.7b": False, "nothing_leaked": False}


def test_travelling_bytes_counts_the_wheel_folder(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "w")
    sizes = gpu_check.travelling_bytes(tmp_path / "w")
    assert sizes["wheels"] == wheel.stat().st_size
    assert sizes["project"] > (REPO / "pyproject.toml").stat().st_size
    assert sizes["total"] == sizes["project"] + sizes["wheels"]
