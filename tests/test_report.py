"""Tests for spinlm.report: plots and a self-contained HTML page from a (fake) run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread

from spinlm.errors import SpinError
from spinlm.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = "task: addition\nmodel: tiny-gpt2\nspin:\n  iterations: 3\n  beta: 0.1\n"


def _metrics(it: int) -> dict[str, Any]:
    m: dict[str, Any] = {"exact_match": 0.3123456 + 0.1 * it, "loglik_real": -5.2 + it, "gen_len_mean": 3.1}
    m.update(
        {"reward_accuracy": None, "reward_margin": None}
        if it == 0
        else {"reward_accuracy": 0.8 + 0.05 * it, "reward_margin": 1.23456 * it}
    )
    m["seconds"] = 12.3 + it
    return m


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _make_run(root: Path, iterations: int = 3, train_logs: tuple[int, ...] = (1,)) -> Path:
    """A run folder with `iterations` iterations; train logs only for the listed iterations."""
    run = root / "my_run"
    run.mkdir()
    (run / "config.yaml").write_text(CONFIG, encoding="utf-8")
    summary = {
        "primary_metric": "exact_match",
        "stop_reason": "converged: discriminability < 0.55",
        "config": {"task": "addition"},
        "iterations": [{"iteration": i, "metrics": _metrics(i)} for i in range(iterations)],
    }
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    for i in range(iterations):
        samples = [
            {
                "prompt": f"What is {i} + 2?",
                "real": str(i + 2),
                "generated": f"{i}<script>alert('x')</script>",
            },
            {"prompt": "What is 1 + 1?", "real": "2", "generated": "3 & more"},
        ]
        _write_jsonl(run / f"iteration_{i}" / "samples.jsonl", samples)
    for i in train_logs:
        log = [
            {
                "step": s,
                "epoch": s / 4,
                "loss": 0.69 - 0.05 * s,
                "lr": 1e-4,
                "rewards/real": 0.01 * s,
                "rewards/generated": -0.02 * s,
                "rewards/margin": 0.03 * s,
                "rewards/accuracy": min(1.0, 0.5 + 0.1 * s),
            }
            for s in range(1, 5)
        ]
        _write_jsonl(run / f"iteration_{i}" / "train_log.jsonl", log)
    return run


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50 and img.shape[2] in (3, 4)


def test_write_report_writes_pngs_and_html(tmp_path: Path) -> None:
    # iteration 2 has no train_log.jsonl (a missing file), iteration 0 never trains
    run = _make_run(tmp_path, train_logs=(1,))
    out = write_report(run)
    assert out == run / "report.html" and out.is_file()
    _check_png(run / "plots" / "metrics.png")
    _check_png(run / "plots" / "training.png")
    assert not list(run.rglob("*.tmp"))

    page = out.read_text(encoding="utf-8")
    assert "my_run" in page
    assert "converged: discriminability &lt; 0.55" in page
    # table: 4 significant digits, null -> en dash, primary metric is the first column
    assert "0.3123" in page and "0.4123" in page and "1.235" in page and "2.469" in page
    assert "<td>–</td>" in page
    header = page[page.index("<th>iteration</th>") :]
    assert header.index("exact_match") < header.index("loglik_real") < header.index("reward_accuracy")
    assert page.count("data:image/png;base64,") == 2
    assert 'src="http' not in page and "<script" not in page and "<link" not in page
    # samples are escaped
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page and "3 &amp; more" in page
    assert "What is 2 + 2?" in page
    # config shown verbatim
    assert "model: tiny-gpt2" in page and "  beta: 0.1" in page


def test_write_report_concatenates_training_logs(tmp_path: Path) -> None:
    run = _make_run(tmp_path, train_logs=(1, 2))
    write_report(run)
    _check_png(run / "plots" / "training.png")


def test_write_report_partial_run(tmp_path: Path) -> None:
    # a run still at iteration 0: no train logs, no config.yaml, a torn last line in samples
    run = _make_run(tmp_path, iterations=1, train_logs=())
    (run / "config.yaml").unlink()
    with open(run / "iteration_0" / "samples.jsonl", "a", encoding="utf-8") as f:
        f.write('{"prompt": "torn')
    page = write_report(run).read_text(encoding="utf-8")
    _check_png(run / "plots" / "metrics.png")
    _check_png(run / "plots" / "training.png")
    assert "task: addition" in page  # config falls back to summary.json
    assert "What is 0 + 2?" in page


def test_write_report_overwrites_previous_report(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    write_report(run)
    summary = json.loads((run / "summary.json").read_text())
    summary["stop_reason"] = None
    (run / "summary.json").write_text(json.dumps(summary))
    page = write_report(str(run)).read_text(encoding="utf-8")
    assert "not stopped early" in page


def test_missing_summary_raises(tmp_path: Path) -> None:
    with pytest.raises(SpinError, match="no summary.json"):
        write_report(tmp_path)


def test_corrupt_summary_raises(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(SpinError, match="summary.json"):
        write_report(tmp_path)


def test_constant_metrics_are_listed_not_plotted(tmp_path: Path) -> None:
    from spinlm.report import _plotted_metrics

    run = _make_run(tmp_path)  # gen_len_mean is 3.1 in every iteration
    rows = [(0, {"exact_match": 0.5, "pairs_pairs": 48, "gen_len_mean": 3.0})]
    rows += [(1, {"exact_match": 0.5, "pairs_pairs": 48, "pairs_identical_pairs": 0, "gen_len_mean": 4.0})]
    plotted, constant = _plotted_metrics(
        rows, ["exact_match", "pairs_pairs", "pairs_identical_pairs", "gen_len_mean"], "exact_match"
    )
    assert plotted == ["exact_match", "gen_len_mean"]  # a constant primary metric is still plotted
    assert constant == ["pairs_pairs", "pairs_identical_pairs"]
    page = write_report(run).read_text(encoding="utf-8")
    assert "Not plotted, the same in every iteration: gen_len_mean = 3.1" in page
    assert "<th>gen_len_mean</th>" in page  # still in the table


def test_spin_report_says_wrote_once(tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: Any) -> None:
    import logging

    from spinlm.cli import main

    run = _make_run(tmp_path)
    with caplog.at_level(logging.INFO, logger="spinlm"):
        assert main(["report", str(run)]) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err + caplog.text
    assert text.count("report.html") == 1, text
