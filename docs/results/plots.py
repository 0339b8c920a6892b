"""The plots on the results pages, drawn from the benchmark JSON in docs/bench/ (nothing typed in by hand).

Each plot reads one or two files that a benchmark wrote (the command that made each file is on the page
that shows the plot) and writes a PNG next to the pages, in docs/results/img/:

    generation.png   tokens/s of each way of generating, SmolLM2-135M, fp32 and bf16 weights
                     (docs/bench/real_generation_fp32.json, real_generation_bf16.json)
    training.png     pairs/s and peak RSS of spin's trainer and TRL's DPOTrainer (real_training_128.json)
    cost.png         seconds per 1,000 prompts of each stage at 64, 256 and 1,024 prompts (real_cost.json)
    cpu_bf16.png     matmul GFLOP/s in fp32 and bf16 on a CPU with AMX (cpu_bf16.json)

Run it after a benchmark rewrites its JSON (matplotlib is a dependency of spinlm):

    python docs/results/plots.py            # writes docs/results/img/*.png
    python docs/results/plots.py --out DIR  # somewhere else (tests/test_docs.py does)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

DOCS = Path(__file__).resolve().parents[1]
BENCH = DOCS / "bench"
OUT = DOCS / "results" / "img"
SPIN, OTHER = "#3f51b5", "#9e9e9e"  # spin's bars in the site's indigo, the baselines grey
# Labels of the ways benchmarks/real_generation.py and real_training.py name in their JSON.
WAYS = {
    "hf_one": "HF generate, one prompt at a time",
    "hf_batch32": "HF generate, batch 32",
    "hf_batch64": "HF generate, batch 64",
    "spin_refill": "spinlm refill, batch 64",
    "spin_generate": "spinlm generate, batch 64",
    "spin_continuous": "spinlm continuous, batch 64",
}
TRAINERS = {
    "spin": "spinlm",
    "trl_live": "TRL DPOTrainer,\nlive reference",
    "trl_precompute": "TRL DPOTrainer,\nprecomputed ref.",
}


def _load(name: str) -> Any:
    return json.loads((BENCH / name).read_text(encoding="utf-8"))


def _save(fig: Any, out: Path, name: str) -> Path:
    path = out / name
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def _bars(ax: Any, labels: list[str], values: list[float], colors: list[str], fmt: str) -> None:
    """Horizontal bars, first label on top, each with its value written after it."""
    ys = range(len(labels))[::-1]
    ax.barh(list(ys), values, color=colors)
    ax.set_yticks(list(ys), labels)
    for y, v in zip(ys, values):
        ax.text(v, y, " " + fmt.format(v), va="center", fontsize=9)
    ax.set_xlim(0, max(values) * 1.18)
    ax.spines[["top", "right"]].set_visible(False)


def generation(out: Path) -> Path:
    fig, axes = plt.subplots(2, 1, figsize=(7.5, 6.0), sharex=True, height_ratios=(6, 4))
    for ax, (dtype, name) in zip(
        axes, (("fp32", "real_generation_fp32.json"), ("bf16", "real_generation_bf16.json"))
    ):
        results = _load(name)["results"]
        ways = [w for w in WAYS if w in results]
        _bars(
            ax,
            [WAYS[w] for w in ways],
            [results[w]["tokens_per_s"] for w in ways],
            [SPIN if w.startswith("spin") else OTHER for w in ways],
            "{:.1f}",
        )
        ax.set_title(f"{dtype} weights", fontsize=10)
    axes[-1].set_xlabel("generated tokens/s (2 CPU threads)")
    fig.suptitle("SmolLM2-135M-Instruct, 256 GSM8K prompts, up to 256 new tokens, temperature 1", fontsize=10)
    return _save(fig, out, "generation.png")


def training(out: Path) -> Path:
    rows = {r["variant"]: r for r in _load("real_training_128.json")["results"]}
    names = [v for v in TRAINERS if v in rows]
    labels = [TRAINERS[v] for v in names]
    colors = [SPIN if v == "spin" else OTHER for v in names]
    fig, (speed, memory) = plt.subplots(2, 1, figsize=(7.5, 4.6))
    _bars(speed, labels, [rows[v]["pairs_per_s_train"] for v in names], colors, "{:.3f}")
    speed.set_xlabel("pairs/s in training (higher is better)")
    _bars(memory, labels, [rows[v]["peak_rss_mb"] for v in names], colors, "{:,.0f} MB")
    memory.set_xlabel("peak RSS, MB (lower is better)")
    fig.suptitle("SmolLM2-135M-Instruct, 128 GSM8K pairs, batch 4, fp32, 2 CPU threads", fontsize=10)
    return _save(fig, out, "training.png")


def cost(out: Path) -> Path:
    results = _load("real_cost.json")["results"]
    stages = (("generate", "#7986cb"), ("score", "#c5cae9"), ("train", SPIN))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(len(results))
    bottom = [0.0] * len(results)
    for stage, color in stages:
        values = [r[f"per_1k_{stage}"] / 60 for r in results]
        ax.bar(list(xs), values, bottom=bottom, color=color, label=stage, width=0.55)
        bottom = [b + v for b, v in zip(bottom, values)]
    for x, total in zip(xs, bottom):
        ax.text(x, total, f"{total:.0f} min", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(xs), [f"{r['size']:,} prompts" for r in results])
    ax.set_ylabel("minutes per 1,000 prompts")
    ax.set_ylim(0, max(bottom) * 1.3)
    ax.legend(loc="upper center", ncol=3, fontsize=9, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("One SPIN iteration, SmolLM2-135M, bf16 on a CPU with AMX, replies ≤ 64 tokens", fontsize=10)
    return _save(fig, out, "cost.png")


def cpu_bf16(out: Path) -> Path:
    rows = _load("cpu_bf16.json")["matmul"]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ys = range(len(rows))[::-1]
    height = 0.38
    ax.barh([y + height / 2 for y in ys], [r["float32"] for r in rows], height, color=OTHER, label="float32")
    ax.barh([y - height / 2 for y in ys], [r["bfloat16"] for r in rows], height, color=SPIN, label="bfloat16")
    ax.set_yticks(list(ys), [r["shape"] for r in rows], fontsize=8)
    ax.set_xlabel("GFLOP/s (2 threads)")
    ax.legend(fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("torch matmul on a CPU with AMX: float32 against bfloat16", fontsize=10)
    return _save(fig, out, "cpu_bf16.png")


PLOTS = (generation, training, cost, cpu_bf16)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNGs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for plot in PLOTS:
        print(f"wrote {plot(args.out)}")


if __name__ == "__main__":
    main()
