"""Report: one self-contained HTML page (plus two PNGs) that shows how a SPIN run went.

What it does: reads a run folder (`summary.json`, `config.yaml`, `iteration_*/train_log.jsonl`,
`iteration_*/samples.jsonl`) and writes

    RUN_DIR/plots/metrics.png    one small plot per numeric metric vs iteration (primary metric first, in red);
                                 a metric with one value in every iteration is listed under it, not plotted
    RUN_DIR/plots/training.png   rewards (real vs generated), reward margin, loss and reward accuracy over the
                                 global training step, concatenated across iterations (dashed lines = boundaries)
    RUN_DIR/report.html          title, stop reason, per-iteration metrics table, both plots (embedded as base64),
                                 sample generations per iteration and the resolved config: no external assets, no JS

Every file is written atomically (`name.tmp`, then `os.replace`). Any file of the run folder except
`summary.json` may be missing (a run in progress, or stopped early): the report shows what exists.

How to run:

    spinlm report RUN_DIR                      # or: python -m spinlm.report RUN_DIR

    from spinlm.report import write_report
    html_path = write_report("runs/addition")
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from spinlm.errors import SpinError
from spinlm.io import atomic_write_text, read_jsonl_tolerant

log = logging.getLogger(__name__)

__all__ = ["write_report"]

PRIMARY_COLOR = "#c0392b"
OTHER_COLOR = "#2c6fbb"
MAX_SAMPLES_PER_ITERATION = 8
# Train-log keys; TRL's DPO names (chosen/rejected) are accepted as fallbacks.
_TRAIN_SERIES: dict[str, tuple[str, ...]] = {
    "real": ("rewards/real", "rewards/chosen"),
    "generated": ("rewards/generated", "rewards/rejected"),
    "margin": ("rewards/margin", "rewards/margins"),
    "loss": ("loss",),
    "accuracy": ("rewards/accuracy", "rewards/accuracies"),
}


# --- reading the run folder ---------------------------------------------------------------------------------


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise SpinError(f"no summary.json in {run_dir}: is this a spinlm run folder?")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpinError(f"cannot read {path}: {e}") from e
    if not isinstance(summary, dict):
        raise SpinError(f"{path} is not a JSON object: is this a spinlm run folder?")
    return summary


def _iteration_dirs(run_dir: Path) -> dict[int, Path]:
    """`iteration_<k>` folders by k, in order."""
    found = {}
    for p in run_dir.glob("iteration_*"):
        m = re.fullmatch(r"iteration_(\d+)", p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def _iteration_rows(summary: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(iteration, metrics) per summary row, tolerant of missing or odd fields."""
    rows = []
    for i, it in enumerate(summary.get("iterations") or []):
        if not isinstance(it, dict):
            continue
        k = it.get("iteration", i)
        metrics = it.get("metrics")
        rows.append((int(k) if _is_number(k) else i, metrics if isinstance(metrics, dict) else {}))
    return rows


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _metric_names(rows: list[tuple[int, dict[str, Any]]], primary: str | None) -> list[str]:
    """Every metric name in first-seen order, the primary metric first."""
    names: list[str] = []
    for _, metrics in rows:
        names.extend(n for n in metrics if n not in names)
    if primary in names:
        names.remove(primary)
        names.insert(0, primary)
    return names


# --- plots --------------------------------------------------------------------------------------------------


def _placeholder(message: str) -> Figure:
    fig = Figure(figsize=(6, 1.5))
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=12, color="#666")
    return fig


def _plotted_metrics(
    rows: list[tuple[int, dict[str, Any]]], names: list[str], primary: str | None
) -> tuple[list[str], list[str]]:
    """(metrics to plot, constant metrics left out): with two or more iterations, a series that takes one
    value (e.g. `pairs_pairs`, identical-pair counts at 0) says nothing as a plot; the primary is always kept."""
    numeric = [n for n in names if any(_is_number(m.get(n)) for _, m in rows)]
    if len(rows) < 2:
        return numeric, []
    constant = [
        n
        for n in numeric
        if n != primary and len({float(m[n]) for _, m in rows if _is_number(m.get(n))}) == 1
    ]
    return [n for n in numeric if n not in constant], constant


def _metrics_figure(
    rows: list[tuple[int, dict[str, Any]]], numeric: list[str], primary: str | None
) -> Figure:
    if not numeric:
        return _placeholder("no numeric metrics yet")
    ncols = min(4, len(numeric))
    nrows = math.ceil(len(numeric) / ncols)
    fig = Figure(figsize=(3.3 * ncols, 2.5 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    lo, hi = min(k for k, _ in rows), max(k for k, _ in rows)
    for ax, name in zip(axes.flat, numeric):
        pts = [(k, float(m[name])) for k, m in rows if _is_number(m.get(name))]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        is_primary = name == primary
        color = PRIMARY_COLOR if is_primary else OTHER_COLOR
        ax.plot(xs, ys, marker="o", color=color, linewidth=2 if is_primary else 1.5, markersize=5)
        ax.set_title(
            f"{name} (primary)" if is_primary else name,
            fontsize=10,
            color=color if is_primary else "black",
            fontweight="bold" if is_primary else "normal",
        )
        # the same integer x axis on every subplot, so iterations line up across metrics
        ax.set_xlim(lo - 0.4, hi + 0.4)
        if hi - lo <= 12:
            ax.set_xticks(range(lo, hi + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if is_primary:
            for spine in ax.spines.values():
                spine.set_edgecolor(PRIMARY_COLOR)
                spine.set_linewidth(1.5)
    for ax in axes.flat[len(numeric) :]:
        ax.set_visible(False)
    return fig


def _series(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> tuple[list[float], list[float]]:
    """(global step, value) of the first present key per row; a NaN between iterations breaks the line."""
    xs: list[float] = []
    ys: list[float] = []
    prev = None
    for r in rows:
        for key in keys:
            if _is_number(r.get(key)):
                if prev is not None and r["_iteration"] != prev:
                    xs.append(math.nan)
                    ys.append(math.nan)
                prev = r["_iteration"]
                xs.append(float(r["_global_step"]))
                ys.append(float(r[key]))
                break
    return xs, ys


def _training_logs(iter_dirs: dict[int, Path]) -> tuple[list[dict[str, Any]], list[tuple[int, float, float]]]:
    """All logged train steps with a `_global_step` (steps concatenated across iterations), and per
    iteration with a log its (iteration, first global step, last global step)."""
    rows: list[dict[str, Any]] = []
    spans: list[tuple[int, float, float]] = []
    offset = 0.0
    for k, d in iter_dirs.items():
        log_rows = [r for r in read_jsonl_tolerant(d / "train_log.jsonl") if isinstance(r, dict)]
        if not log_rows:
            continue
        first, last = math.inf, 0.0
        for r in log_rows:
            step = float(r["step"]) if _is_number(r.get("step")) else last + 1
            first, last = min(first, step), max(last, step)
            rows.append({**r, "_global_step": offset + step, "_iteration": k})
        spans.append((k, offset + first, offset + last))
        offset += last
    return rows, spans


def _training_figure(iter_dirs: dict[int, Path]) -> Figure:
    rows, spans = _training_logs(iter_dirs)
    s = {name: _series(rows, keys) for name, keys in _TRAIN_SERIES.items()}
    panels: list[tuple[str, list[tuple[str, str]]]] = [
        ("reward", [("real", "#2e8b57"), ("generated", "#d35400")]),
        ("reward margin", [("margin", "#7d3c98")]),
        ("loss", [("loss", "#34495e")]),
        ("reward accuracy", [("accuracy", "#2c6fbb")]),
    ]
    panels = [(label, lines) for label, lines in panels if any(s[n][0] for n, _ in lines)]
    if not panels:
        return _placeholder("no training logs yet")
    fig = Figure(figsize=(10, 0.6 + 2.0 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    many = len(rows) > 60
    for ax, (label, lines) in zip(axes, panels):
        for name, color in lines:
            xs, ys = s[name]
            style = {"marker": None if many else ".", "markersize": 4, "linewidth": 1.2}
            ax.plot(xs, ys, color=color, label=_TRAIN_SERIES[name][0], **style)
        if label == "reward":
            ax.legend(loc="best", fontsize=8, framealpha=0.8)
        if label == "reward margin":
            ax.axhline(0.0, color="#999", linewidth=0.8)
        if label == "reward accuracy":
            ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel(label, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        for (_, _, prev_end), (_, start, _) in zip(spans, spans[1:]):
            ax.axvline((prev_end + start) / 2, color="#888", linestyle="--", linewidth=1)
    axes[-1].set_xlabel("global training step (concatenated across iterations)", fontsize=9)
    top = axes[0].secondary_xaxis("top")
    top.set_xticks([(a + b) / 2 for _, a, b in spans], labels=[f"iteration {k}" for k, _, _ in spans])
    top.tick_params(length=0, labelsize=9)
    return fig


def _png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="white")
    return buf.getvalue()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SpinError(f"cannot write {path}: {e.strerror or e}") from e


# --- HTML ---------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #555; } .scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; } tr:nth-child(even) td { background: #fafafa; }
th.primary, td.primary { background: #fdecea !important; font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
details { margin: 0.6em 0; } summary { cursor: pointer; font-weight: bold; }
.sample { border: 1px solid #ddd; border-radius: 4px; margin: 0.6em 0; padding: 0.4em 0.8em; }
.label { font-size: 0.8em; text-transform: uppercase; color: #777; margin-top: 0.3em; }
pre { white-space: pre-wrap; word-break: break-word; background: #f7f7f7; padding: 0.4em 0.6em; margin: 0.1em 0;
      font-size: 0.85em; }
"""


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool | int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table_html(rows: list[tuple[int, dict[str, Any]]], names: list[str], primary: str | None) -> str:
    if not rows:
        return "<p>No iterations recorded yet.</p>"

    def cls(n: str) -> str:
        return ' class="primary"' if n == primary else ""

    head = "".join(f"<th{cls(n)}>{html.escape(n)}</th>" for n in names)
    body = "".join(
        f"<tr><td>{k}</td>" + "".join(f"<td{cls(n)}>{_fmt(m.get(n))}</td>" for n in names) + "</tr>\n"
        for k, m in rows
    )
    return f'<div class="scroll"><table>\n<tr><th>iteration</th>{head}</tr>\n{body}</table></div>'


def _samples_html(iter_dirs: dict[int, Path]) -> str:
    parts = []
    for k, d in iter_dirs.items():
        samples = [r for r in read_jsonl_tolerant(d / "samples.jsonl") if isinstance(r, dict)]
        if not samples:
            continue
        shown = samples[:MAX_SAMPLES_PER_ITERATION]
        more = f", first {len(shown)} shown" if len(shown) < len(samples) else ""
        items = []
        for r in shown:
            fields = "".join(
                f'<div class="label">{label}</div><pre>{html.escape(str(r.get(label, "")))}</pre>'
                for label in ("prompt", "real", "generated")
            )
            items.append(f'<div class="sample">{fields}</div>')
        parts.append(
            f"<details open><summary>Iteration {k} ({len(samples)} samples{more})</summary>\n"
            + "\n".join(items)
            + "</details>"
        )
    return "\n".join(parts) if parts else "<p>No samples yet.</p>"


def _config_text(run_dir: Path, summary: dict[str, Any]) -> str:
    path = run_dir / "config.yaml"
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    if isinstance(summary.get("config"), dict):
        return "# config.yaml missing; from summary.json\n" + yaml.safe_dump(
            summary["config"], sort_keys=False
        )
    return "(no config.yaml)"


def _constant_html(rows: list[tuple[int, dict[str, Any]]], constant: list[str]) -> str:
    if not constant:
        return ""
    values = {n: next(m[n] for _, m in rows if _is_number(m.get(n))) for n in constant}
    shown = ", ".join(f"{html.escape(n)} = {_fmt(v)}" for n, v in values.items())
    return f'<p class="meta">Not plotted, the same in every iteration: {shown}.</p>'


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _headline(rows: list[tuple[int, dict[str, Any]]], primary: str | None) -> str:
    pts = [(k, float(m[primary])) for k, m in rows if primary and _is_number(m.get(primary))]
    if not pts:
        return ""
    steps = " &rarr; ".join(f"{_fmt(v)} (iteration {k})" for k, v in dict.fromkeys([pts[0], pts[-1]]))
    return f" &middot; {html.escape(str(primary))}: {steps}"


def write_report(run_dir: str | Path) -> Path:
    """Write `RUN_DIR/plots/{metrics,training}.png` and `RUN_DIR/report.html`; return the HTML path.

    Raises `SpinError` if `run_dir` has no readable `summary.json`."""
    run_dir = Path(run_dir)
    summary = _read_summary(run_dir)
    primary = summary.get("primary_metric")
    primary = str(primary) if primary else None
    rows = _iteration_rows(summary)
    names = _metric_names(rows, primary)
    iter_dirs = _iteration_dirs(run_dir)

    plotted, constant = _plotted_metrics(rows, names, primary)
    pngs = {
        "metrics": _png_bytes(_metrics_figure(rows, plotted, primary)),
        "training": _png_bytes(_training_figure(iter_dirs)),
    }
    for name, data in pngs.items():
        _atomic_write_bytes(run_dir / "plots" / f"{name}.png", data)

    stop = summary.get("stop_reason")
    title = html.escape(run_dir.resolve().name)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>SPIN report: {title}</title>
<style>{_CSS}</style></head>
<body>
<h1>SPIN report: {title}</h1>
<p class="meta">{len(rows)} iteration(s) recorded{_headline(rows, primary)}<br>
Stop reason: <b>{html.escape(str(stop)) if stop else "none (not stopped early)"}</b></p>
<h2>Metrics per iteration</h2>
{_table_html(rows, names, primary)}
<h2>Metrics</h2>
{_img(pngs["metrics"], "metrics per iteration")}
{_constant_html(rows, constant)}
<h2>Training</h2>
{_img(pngs["training"], "training curves")}
<h2>Samples</h2>
{_samples_html(iter_dirs)}
<h2>Config</h2>
<pre>{html.escape(_config_text(run_dir, summary))}</pre>
</body></html>
"""
    out = run_dir / "report.html"
    atomic_write_text(out, page)
    log.info("wrote %s", out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m spinlm.report RUN_DIR")
    try:
        print(write_report(sys.argv[1]))
    except SpinError as e:
        sys.exit(f"spinlm: error: {e}")
