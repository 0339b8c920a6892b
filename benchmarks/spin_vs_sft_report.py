"""Read the SPIN vs continued SFT result files (benchmarks/real_spin_vs_sft.py) and regenerate the docs.

What it reads: docs/bench/real_spin_vs_sft/ (`--dir`): `seed<S>.json` (a complete seed), else that seed's
partial files `seed<S>-spin.json` / `seed<S>-sft.json`, `start.json` / `warmup.json`, and any SPIN variant's
`seed<S>-spin-<variant>.json` (reported beside the two methods, for the seeds that have one). Every evaluation
in them carries, besides its metrics, the per-question vectors the metrics are computed from (`questions`:
see `metrics_from_vectors`), so everything here is recomputed from the files present and the table grows
seed by seed.

What it computes, on the same test questions for both methods:

- per metric, iteration 0..T x method: mean over seeds and min..max (the table to paste into docs);
- greedy exact match, paired per question (`paired_counts`): per iteration and seed, the questions SPIN gets
  right and SFT wrong and the reverse, with the exact McNemar p (`mcnemar_exact`: two-sided binomial test on
  the discordant pairs; it ignores the concordant ones, as it should);
- held-out log-likelihood per token of the real answers: SPIN - SFT per iteration and seed with a paired
  bootstrap interval over questions (`bootstrap_ci`: percentile interval, seeded, so rerunning gives the
  same numbers); the same paired difference and interval for the sample-level metrics
  (`differences_table`: final-answer rates, calculator annotations, W1 length distance);
- one PNG (`--png`): each metric over iterations 0..T for both methods, the mean over seeds with a 95%
  bootstrap interval over questions (the same resampled questions for every seed and both methods), and
  each seed's own value as a dot.

Run it (seconds; matplotlib for the PNG):

    python benchmarks/spin_vs_sft_report.py                     # prints the Markdown, writes table.md + PNG
    python benchmarks/spin_vs_sft_report.py --dir /tmp/fake --png /tmp/fake/plot.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

DOCS_DIR = Path(__file__).resolve().parents[1] / "docs" / "bench" / "real_spin_vs_sft"
METHODS = ("spin", "sft")
LABELS = {"start": "start (both)", "spin": "SPIN", "sft": "continued SFT"}
SHORT = {"spin": "SPIN", "sft": "SFT"}
VARIANT_FILE = re.compile(r"seed(\d+)-(spin-[a-z0-9]+)\.json")


def label(method: str, short: bool = False) -> str:
    """'spin' -> 'SPIN', 'sft' -> 'continued SFT' ('SFT' short), 'spin-beta1' -> 'SPIN (beta1)'."""
    if method.startswith("spin-"):
        return f"SPIN ({method.removeprefix('spin-')})"
    return (SHORT if short else LABELS)[method]


# (metric, short title for the plot, decimals, better): better is "high", "low" or "half" (0.5 is the target)
METRICS = (
    ("answer_exact_match", "greedy exact match", 3, "high"),
    ("loglik_real_per_token", "log-lik. of real answers / token", 3, "high"),
    ("final_answer_rate", "greedy: last line #### N", 3, "high"),
    ("sample_final_answer_rate", "T=1 samples: last line #### N", 3, "high"),
    ("calc_accuracy", "greedy: right <<a=b>> annotations", 3, "high"),
    ("sample_calc_accuracy", "T=1 samples: right <<a=b>>", 3, "high"),
    ("gen_len_w1", "T=1 length distance to real (W1, tokens)", 1, "low"),
    ("discriminability", "discriminability (0.5 = fixed point)", 3, "half"),
)
DRAWS = 2000  # bootstrap resamples
LEVEL = 0.95


# --- statistics (pure) ----------------------------------------------------------------------------------


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p for b and c discordant pairs: P[X <= min(b, c)] * 2 for X ~ Bin(b + c, 1/2),
    capped at 1 (1 when there are no discordant pairs)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_ci(
    stat: Callable[[np.ndarray], float | None],
    n: int,
    draws: int = DRAWS,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[float, float] | None:
    """Percentile interval of `stat(indices)` over `draws` resamples of n question indices with replacement
    (numpy's PCG64 seeded with `seed`: the same interval every run). None when stat is undefined on most
    resamples (e.g. no calculator annotations at all)."""
    rng = np.random.default_rng(seed)
    values = [stat(idx) for idx in rng.integers(0, n, size=(draws, n))]
    got = np.array([v for v in values if v is not None], dtype=float)
    if len(got) < draws / 2:
        return None
    lo, hi = np.quantile(got, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def w1(a: np.ndarray, b: np.ndarray) -> float | None:
    """`spinlm.evaluation.wasserstein_1` on arrays (the same 1,000-quantile grid, so the same value)."""
    if len(a) == 0 or len(b) == 0:
        return None
    xs, ys = np.sort(a), np.sort(b)
    q = (np.arange(1000) + 0.5) / 1000
    return float(np.abs(xs[(q * len(xs)).astype(int)] - ys[(q * len(ys)).astype(int)]).sum() / 1000)


def decode_flags(text: str) -> np.ndarray:
    """A flag string ("1" right, "0" wrong, "h" a tie: 1/2) as floats."""
    return np.array([0.5 if ch == "h" else float(ch) for ch in text], dtype=float)


def vectors(q: dict[str, Any]) -> dict[str, np.ndarray]:
    """The per-question vectors of one evaluation (its `questions` record) as numpy arrays."""
    out = {k: decode_flags(q[k]) for k in ("correct", "final", "sample_final")}
    for k in (
        "calc_right",
        "calc_total",
        "sample_calc_right",
        "sample_calc_total",
        "sample_tokens",
        "loglik",
    ):
        out[k] = np.asarray(q[k], dtype=float)
    if q.get("wins") is not None:
        out["wins"] = decode_flags(q["wins"])
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> float | None:
    total = float(den.sum())
    return float(num.sum()) / total if total > 0 else None


FLAGS = {
    "answer_exact_match": "correct",
    "final_answer_rate": "final",
    "sample_final_answer_rate": "sample_final",
}
RATIOS = {
    "calc_accuracy": ("calc_right", "calc_total"),
    "sample_calc_accuracy": ("sample_calc_right", "sample_calc_total"),
}


def metric_value(
    metric: str, v: dict[str, np.ndarray], real_tokens: np.ndarray, idx: np.ndarray | None = None
) -> float | None:
    """One reported metric from the per-question vectors, on the questions `idx` (all when None): means of
    the flags, ratios of sums for calculator accuracy and log-likelihood per token, W1 between the samples'
    and the real answers' token lengths; None where it is undefined (no annotations, no opponent)."""

    def pick(x: np.ndarray) -> np.ndarray:
        return x if idx is None else x[idx]

    if metric in FLAGS:
        return float(pick(v[FLAGS[metric]]).mean())
    if metric in RATIOS:
        num, den = RATIOS[metric]
        return _ratio(pick(v[num]), pick(v[den]))
    if metric == "loglik_real_per_token":
        return _ratio(pick(v["loglik"]), pick(real_tokens))
    if metric == "gen_len_w1":
        return w1(pick(v["sample_tokens"]), pick(real_tokens))
    if metric == "discriminability":
        return float(pick(v["wins"]).mean()) if "wins" in v else None
    raise KeyError(metric)


def metrics_from_vectors(
    v: dict[str, np.ndarray], real_tokens: np.ndarray, idx: np.ndarray | None = None
) -> dict[str, float | None]:
    """Every reported metric (`metric_value`); on all questions equal to what
    `spinlm.evaluation.evaluate_model` reported (real_spin_vs_sft checks it before writing a file)."""
    return {m: metric_value(m, v, real_tokens, idx) for m, *_ in METRICS}


def paired_counts(spin: np.ndarray, sft: np.ndarray) -> dict[str, Any]:
    """Greedy exact match of both methods on the same questions: SPIN right & SFT wrong, the reverse, both,
    neither, and the exact McNemar p of the two discordant counts."""
    a, b = spin.astype(bool), sft.astype(bool)
    spin_only, sft_only = int((a & ~b).sum()), int((~a & b).sum())
    return {
        "spin_only": spin_only,
        "sft_only": sft_only,
        "both": int((a & b).sum()),
        "neither": int((~a & ~b).sum()),
        "p": mcnemar_exact(spin_only, sft_only),
    }


def loglik_difference(
    spin: np.ndarray, sft: np.ndarray, real_tokens: np.ndarray, seed: int = 0
) -> tuple[float, tuple[float, float] | None]:
    """SPIN - SFT held-out log-likelihood per token of the real answers, and its paired bootstrap interval
    (both methods resampled on the same questions)."""

    def diff(idx: np.ndarray | None = None) -> float:
        pick = (lambda x: x) if idx is None else (lambda x: x[idx])
        tokens = float(pick(real_tokens).sum())
        return float(pick(spin).sum() - pick(sft).sum()) / tokens

    return diff(), bootstrap_ci(diff, len(real_tokens), seed=seed)


# --- the result files -----------------------------------------------------------------------------------


def eval_keys(iterations: int, methods: tuple[str, ...] = METHODS) -> list[str]:
    """start, spin_1, sft_1, ..., spin_T, sft_T (and each further method's, after them per iteration)."""
    return ["start"] + [f"{m}_{t}" for t in range(1, iterations + 1) for m in methods]


def load_seeds(folder: Path) -> dict[int, dict[str, Any]]:
    """seed -> its record: `seed<S>.json`, or the union of its partial files (`evals`, `seconds`,
    `training`, `commits` merged; the rest from either)."""
    seeds: dict[int, dict[str, Any]] = {}
    for path in sorted(folder.glob("seed*.json")):
        m = re.fullmatch(r"seed(\d+)(?:-(spin|sft))?\.json", path.name)
        if m is None:
            continue
        seed, record = int(m.group(1)), json.loads(path.read_text(encoding="utf-8"))
        if m.group(2) is None:
            seeds[seed] = record | {"complete": True}
            continue
        if seeds.get(seed, {}).get("complete"):
            continue  # a stale partial beside the merged file: the merged one wins
        seeds[seed] = merge_partials(seeds.get(seed), record)
    return dict(sorted(seeds.items()))


def load_variants(folder: Path, seeds: dict[int, dict[str, Any]]) -> tuple[str, ...]:
    """Merge every `seed<S>-spin-<variant>.json` of a seed in `seeds` into its record (evaluations keyed
    `spin-<variant>_t`, seconds, training, commits); the variant methods found, sorted."""
    found = set()
    for path in sorted(folder.glob("seed*-spin-*.json")):
        m = VARIANT_FILE.fullmatch(path.name)
        if m is None or int(m.group(1)) not in seeds:
            continue
        record, base = json.loads(path.read_text(encoding="utf-8")), seeds[int(m.group(1))]
        for key in ("evals", "seconds", "training", "commits"):
            base[key] = {
                **base.get(key, {}),
                **{k: v for k, v in record.get(key, {}).items() if k != "start"},
            }
        found.add(m.group(2))
    return tuple(sorted(found))


def merge_partials(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """One seed's record from its partial (seed, method) records."""
    if a is None:
        return dict(b) | {"complete": False}
    out = dict(a) | {k: v for k, v in b.items() if k not in a}
    for key in ("evals", "seconds", "training", "commits"):
        out[key] = {**a.get(key, {}), **b.get(key, {})}
    out["complete"] = all(f"{m}_1" in out["evals"] for m in METHODS)
    return out


def iterations_of(seeds: dict[int, dict[str, Any]]) -> int:
    return max((int(r["settings"]["iterations"]) for r in seeds.values()), default=0)


# --- the tables -----------------------------------------------------------------------------------------


def _cell(values: list[float], digits: int, total: int) -> str:
    """mean (min..max) over the seeds that have a value, (n=k) when some have none."""
    if not values:
        return "–"
    text = f"{statistics.fmean(values):.{digits}f}"
    if len(values) > 1:
        text += f" ({min(values):.{digits}f}..{max(values):.{digits}f})"
    return text + (f" (n={len(values)})" if len(values) < total else "")


def metric_values(seeds: dict[int, dict[str, Any]], key: str, metric: str) -> list[float]:
    """The reported value of `metric` in evaluation `key` of every seed that has it."""
    out = []
    for record in seeds.values():
        value = record["evals"].get(key, {}).get("metrics", {}).get(metric)
        if value is not None:
            out.append(float(value))
    return out


def metrics_table(
    seeds: dict[int, dict[str, Any]], iterations: int, methods: tuple[str, ...] = METHODS
) -> list[str]:
    head = "| iteration | method | " + " | ".join(m for m, *_ in METRICS) + " |"
    lines = [head, "|---|---|" + "---|" * len(METRICS)]
    for key in eval_keys(iterations, methods):
        method, t = (key, 0) if key == "start" else (key.rsplit("_", 1)[0], int(key.rsplit("_", 1)[1]))
        values = [metric_values(seeds, key, m) for m, *_ in METRICS]
        if not any(values):
            continue  # a variant no seed has run to this iteration
        cells = [_cell(v, d, len(seeds)) for v, (_, _, d, _) in zip(values, METRICS)]
        lines.append(f"| {t} | {label(method)} | " + " | ".join(cells) + " |")
    return lines


def paired_evaluations(
    seeds: dict[int, dict[str, Any]], iterations: int, first: str, second: str
) -> Iterator[tuple[int, int, dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]]:
    """(iteration, seed, first's vectors, second's vectors, real answer lengths) for every iteration and
    seed that has both evaluations."""
    for t in range(1, iterations + 1):
        for seed, record in seeds.items():
            evals = record["evals"]
            if f"{first}_{t}" in evals and f"{second}_{t}" in evals:
                a, b = (
                    vectors(evals[f"{first}_{t}"]["questions"]),
                    vectors(evals[f"{second}_{t}"]["questions"]),
                )
                yield t, seed, a, b, np.asarray(record["real_tokens"], dtype=float)


def paired_table(
    seeds: dict[int, dict[str, Any]], iterations: int, first: str = "spin", second: str = "sft"
) -> list[str]:
    """Per iteration and seed with both methods: exact match first-only / second-only and McNemar p; the
    log-likelihood per token difference with its bootstrap interval."""
    a_name, b_name = label(first, short=True), label(second, short=True)
    lines = [
        f"| iteration | seed | exact match {a_name} / {b_name} | {a_name} right, {b_name} wrong "
        f"| {b_name} right, {a_name} wrong | McNemar p (exact) "
        f"| loglik/token {a_name} − {b_name} [95% bootstrap] |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, seed, a, b, real in paired_evaluations(seeds, iterations, first, second):
        pc = paired_counts(a["correct"], b["correct"])
        diff, ci = loglik_difference(a["loglik"], b["loglik"], real, seed=seed * 1000 + t)
        interval = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "–"
        lines.append(
            f"| {t} | {seed} | {a['correct'].mean():.3f} / {b['correct'].mean():.3f} | {pc['spin_only']} "
            f"| {pc['sft_only']} | {pc['p']:.3g} | {diff:+.4f} {interval} |"
        )
    return lines


def metric_difference(
    metric: str, a: dict[str, np.ndarray], b: dict[str, np.ndarray], real: np.ndarray, seed: int = 0
) -> tuple[float | None, tuple[float, float] | None]:
    """a - b on one metric of two evaluations of the same questions, and its paired bootstrap interval (both
    resampled on the same questions); None where the metric is undefined for either."""

    def diff(idx: np.ndarray | None = None) -> float | None:
        x, y = metric_value(metric, a, real, idx), metric_value(metric, b, real, idx)
        return None if x is None or y is None else x - y

    value = diff()
    return value, (bootstrap_ci(diff, len(real), seed=seed) if value is not None else None)


def differences_table(
    seeds: dict[int, dict[str, Any]], iterations: int, first: str = "spin", second: str = "sft"
) -> list[str]:
    """Per iteration and seed: first - second on every metric but exact match and discriminability (those
    have their own test / no direction), with a paired 95% bootstrap interval; * when it excludes 0."""
    metrics = [(m, d) for m, _, d, _ in METRICS if m not in ("answer_exact_match", "discriminability")]
    a_name, b_name = label(first, short=True), label(second, short=True)
    lines = [
        "| iteration | seed | " + " | ".join(f"{m} {a_name} − {b_name}" for m, _ in metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for t, seed, a, b, real in paired_evaluations(seeds, iterations, first, second):
        cells = []
        for k, (m, d) in enumerate(metrics):
            value, ci = metric_difference(m, a, b, real, seed=seed * 1000 + 10 * t + k)
            if value is None:
                cells.append("–")
                continue
            star = "*" if ci and (ci[0] > 0 or ci[1] < 0) else ""
            interval = f" [{ci[0]:+.{d}f}, {ci[1]:+.{d}f}]" if ci else ""
            cells.append(f"{value:+.{d}f}{interval}{star}")
        lines.append(f"| {t} | {seed} | " + " | ".join(cells) + " |")
    return lines


def seconds_table(seeds: dict[int, dict[str, Any]], iterations: int) -> list[str]:
    """Wall seconds per stage, mean over the seeds that ran it."""

    def mean(key: str, part: str) -> str:
        vs = [float(r["seconds"][key][part]) for r in seeds.values() if part in r["seconds"].get(key, {})]
        return f"{statistics.fmean(vs):.0f}" if vs else "–"

    lines = [
        "| iteration | generate s (SPIN) | score s (SPIN) | train s (SPIN) | iteration s (SPIN) | train s (SFT) "
        "| eval s (SPIN) | eval s (SFT) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in range(1, iterations + 1):
        sp, sf = f"spin_{t}", f"sft_{t}"
        lines.append(
            f"| {t} | {mean(sp, 'generate')} | {mean(sp, 'score')} | {mean(sp, 'train')} "
            f"| {mean(sp, 'total')} "
            f"| {mean(sf, 'train')} | {mean('eval_' + sp, 'total')} | {mean('eval_' + sf, 'total')} |"
        )
    return lines


def warmup_line(seeds: dict[int, dict[str, Any]], folder: Path) -> str:
    record = next((r["warmup"] for r in seeds.values() if r.get("warmup")), None)
    if record is None and (folder / "warmup.json").is_file():
        record = json.loads((folder / "warmup.json").read_text(encoding="utf-8"))
    if record is None:
        return "Warm-up: no record yet."
    curve = ", ".join(f"{c['steps']}: {c['val_nll']:.4f}" for c in record["curve"])
    return (
        f"Warm-up SFT: {record['steps_run']} steps of {record['batch']} (kept: step {record['best_steps']}, "
        f"{'stopped by the plateau rule' if record['plateaued'] else 'stopped by the step cap'}), "
        f"{record['seconds']:.0f} s; validation NLL per token by step: {curve}."
    )


def markdown(folder: Path) -> str:
    """The whole Markdown section body: settings line, metric table, paired table, seconds, warm-up."""
    seeds = load_seeds(folder)
    if not seeds:
        return f"No seed results in {folder} yet.\n"
    iterations = iterations_of(seeds)
    first = next(iter(seeds.values()))
    s = first["settings"]
    variants = load_variants(folder, seeds)
    complete = [seed for seed, r in seeds.items() if r.get("complete")]
    lines = [
        f"Seeds {list(seeds)} (complete: {complete}); {s['prompts']} GSM8K train prompts; {s['eval_size']} "
        f"GSM8K test questions; replies ≤ {s['max_new_tokens']} tokens; {iterations} iterations; precision "
        f"{s['precision']}, generation dtype {s['gen_dtype']}. Cells: mean (min..max) over seeds; "
        "iteration 0 is the shared start.\n",
        *metrics_table(seeds, iterations),
        "\nPaired per question (same test questions, same evaluation seeds for both methods):\n",
        *paired_table(seeds, iterations),
        "\nThe other metrics, paired per question (95% bootstrap over questions; * the interval excludes 0):\n",
        *differences_table(seeds, iterations),
        *variant_lines(seeds, iterations, variants),
        "\nWall seconds per stage (mean over seeds):\n",
        *seconds_table(seeds, iterations),
        "",
        warmup_line(seeds, folder),
        "",
        "Commits: " + "; ".join(f"seed {k}: {r.get('commits')}" for k, r in seeds.items()),
    ]
    return "\n".join(lines) + "\n"


def variant_lines(seeds: dict[int, dict[str, Any]], iterations: int, variants: tuple[str, ...]) -> list[str]:
    """Each SPIN variant beside the two methods: its metrics, then paired against continued SFT and
    against plain SPIN of the same seeds."""
    lines: list[str] = []
    for v in variants:
        have = [seed for seed, r in seeds.items() if f"{v}_1" in r["evals"]]
        lines += [
            f"\n{label(v)}, seeds {have} (its own unit; the rows of the other methods are the same seeds'):\n",
            *metrics_table({k: seeds[k] for k in have}, iterations, (*METHODS, v)),
            "",
            *paired_table(seeds, iterations, v, "sft"),
            "",
            *paired_table(seeds, iterations, v, "spin"),
            "",
            *differences_table(seeds, iterations, v, "sft"),
        ]
    return lines


# --- the plot -------------------------------------------------------------------------------------------


def series(
    seeds: dict[int, dict[str, Any]], method: str, iterations: int, metric: str
) -> list[tuple[int, list[float], tuple[float, float] | None]]:
    """(iteration, per-seed values, 95% interval of their mean over questions) for one method's curve,
    iteration 0 being the start."""
    out = []
    for t in range(iterations + 1):
        key = "start" if t == 0 else f"{method}_{t}"
        have = [r for r in seeds.values() if key in r["evals"]]
        if not have:
            continue
        vecs = [vectors(r["evals"][key]["questions"]) for r in have]
        reals = [np.asarray(r["real_tokens"], dtype=float) for r in have]
        values = [
            float(r["evals"][key]["metrics"][metric])
            for r in have
            if r["evals"][key]["metrics"].get(metric) is not None
        ]

        def mean_over_seeds(idx: np.ndarray, vecs: list = vecs, reals: list = reals) -> float | None:
            got = [metric_value(metric, v, real, idx) for v, real in zip(vecs, reals)]
            return (
                statistics.fmean(g for g in got if g is not None) if any(g is not None for g in got) else None
            )

        ci = bootstrap_ci(mean_over_seeds, len(reals[0]), draws=500, seed=t) if values else None
        out.append((t, values, ci))
    return out


def plot(folder: Path, path: Path) -> Path | None:
    """One panel per metric: both methods over iterations 0..T, mean over seeds with 95% bootstrap
    intervals over questions, each seed a dot. None when there is nothing to plot."""
    seeds = load_seeds(folder)
    if not seeds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iterations = iterations_of(seeds)
    methods = (*METHODS, *load_variants(folder, seeds))
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    colors = dict(zip(methods, ("tab:red", "tab:blue", "tab:orange", "tab:green", "tab:purple")))
    for ax, (metric, title, _, _) in zip(axes.flat, METRICS):
        for k, method in enumerate(methods):
            points = series(seeds, method, iterations, metric)
            points = [p for p in points if p[1]]
            shift = (k - (len(methods) - 1) / 2) * 0.08  # methods side by side, not on top of each other
            xs = [t + shift for t, _, _ in points]
            ys = [statistics.fmean(v) for _, v, _ in points]
            lo = [y - ci[0] if ci else 0.0 for y, (_, _, ci) in zip(ys, points)]
            hi = [ci[1] - y if ci else 0.0 for y, (_, _, ci) in zip(ys, points)]
            ax.errorbar(
                xs, ys, yerr=[lo, hi], color=colors[method], marker="o", capsize=3, label=label(method)
            )
            for x, (_, v, _) in zip(xs, points):
                ax.scatter([x] * len(v), v, color=colors[method], s=8, alpha=0.4)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(iterations + 1))
        ax.set_xlabel("iteration (0 = start)")
        if metric == "discriminability":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    axes.flat[0].legend(fontsize=9)
    fig.suptitle(
        f"SPIN vs continued SFT, SmolLM2-135M-Instruct on GSM8K ({len(seeds)} seed(s); bars: 95% bootstrap "
        "over test questions)",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--dir", type=Path, default=DOCS_DIR, help="folder of the result files")
    p.add_argument("--png", type=Path, default=None, help="plot path (default: DIR/spin_vs_sft.png)")
    p.add_argument("--md", type=Path, default=None, help="table path (default: DIR/table.md)")
    a = p.parse_args(argv)
    text = markdown(a.dir)
    md = a.md or a.dir / "table.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text, encoding="utf-8")
    png = plot(a.dir, a.png or a.dir / "spin_vs_sft.png")
    print(text)
    print(f"wrote {md}" + (f" and {png}" if png else " (no plot: no seed results yet)"))


if __name__ == "__main__":
    main()
