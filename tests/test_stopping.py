"""The stopping rule: `should_stop` on hand-made histories, and a tiny run that ends early because of it."""

from __future__ import annotations

import html
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from spinlm.config import SpinConfig, load_config
from spinlm.loop import should_stop


def _cfg(band: float = 0.0, patience: int = 0, min_delta: float = 0.0) -> SpinConfig:
    return load_config(
        None,
        [
            "task=addition",
            f"eval.stop.discriminability_band={band}",
            f"eval.stop.patience={patience}",
            f"eval.stop.min_delta={min_delta}",
        ],
    )


def _history(primary: list[float | None], disc: list[float | None] | None = None) -> list[dict[str, Any]]:
    disc = disc or [None] + [0.9] * (len(primary) - 1)
    return [{"exact_match": p, "discriminability": d} for p, d in zip(primary, disc)]


# --- discriminability band ---------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [0.5, 0.55, 0.45, 0.6])
def test_band_hit(d: float) -> None:
    reason = should_stop(_history([0.1, 0.2], [None, d]), "exact_match", _cfg(band=0.1))
    assert reason is not None
    assert f"discriminability {d:.3f}" in reason and "within 0.1 of 0.5" in reason


@pytest.mark.parametrize("d", [0.95, 0.05, 0.7, 1.0])
def test_band_missed(d: float) -> None:
    assert should_stop(_history([0.1, 0.2], [None, d]), "exact_match", _cfg(band=0.1)) is None


def test_band_zero_disables_even_at_one_half() -> None:
    assert should_stop(_history([0.1, 0.2], [None, 0.5]), "exact_match", _cfg(band=0.0)) is None


def test_band_ignores_missing_discriminability() -> None:
    assert should_stop(_history([0.1, 0.2], [None, None]), "exact_match", _cfg(band=0.4)) is None


def test_band_looks_only_at_the_last_iteration() -> None:
    history = _history([0.1, 0.2, 0.3], [None, 0.5, 0.99])
    assert should_stop(history, "exact_match", _cfg(band=0.1)) is None


# --- patience ----------------------------------------------------------------------------------------------


def test_patience_hit_when_flat() -> None:
    reason = should_stop(_history([0.3, 0.3]), "exact_match", _cfg(patience=1))
    assert reason == "exact_match has not improved on 0.3 for 1 iteration(s)"


def test_patience_hit_when_worse() -> None:
    assert should_stop(_history([0.3, 0.5, 0.4]), "exact_match", _cfg(patience=1)) is not None


def test_patience_respects_min_delta() -> None:
    history = _history([0.30, 0.35, 0.351])
    assert should_stop(history, "exact_match", _cfg(patience=1, min_delta=0.0)) is None
    reason = should_stop(history, "exact_match", _cfg(patience=1, min_delta=0.01))
    assert reason is not None and "has not improved on 0.35 for 1 iteration" in reason


def test_patience_window_of_two() -> None:
    cfg = _cfg(patience=2)
    # best before the window is 0.5; neither of the last two beats it
    assert should_stop(_history([0.3, 0.5, 0.45, 0.49]), "exact_match", cfg) is not None
    # the window [0.5, 0.45] contains an improvement over 0.3
    assert should_stop(_history([0.3, 0.5, 0.45]), "exact_match", cfg) is None
    # too short a history to judge
    assert should_stop(_history([0.3, 0.3]), "exact_match", cfg) is None


def test_patience_zero_disables() -> None:
    assert should_stop(_history([0.3, 0.2, 0.1]), "exact_match", _cfg(patience=0)) is None


def test_patience_with_missing_values_does_not_stop() -> None:
    """A None primary metric (e.g. a NaN turned into null) leaves nothing to compare: no stop, no crash."""
    cfg = _cfg(patience=1)
    assert should_stop(_history([None, 0.3, 0.3]), "exact_match", cfg) is None
    assert should_stop(_history([0.3, None]), "exact_match", cfg) is None
    assert should_stop([{"discriminability": 0.9}, {"discriminability": 0.9}], "exact_match", cfg) is None


def test_band_is_checked_before_patience() -> None:
    reason = should_stop(_history([0.3, 0.3], [None, 0.5]), "exact_match", _cfg(band=0.1, patience=1))
    assert reason is not None and reason.startswith("discriminability")


# --- end to end ----------------------------------------------------------------------------------------------

PER_ITERATION = (
    "discriminability",
    "reward_margin",
    "loglik_real",
    "exact_match",
    "gen_len_mean",
    "gen_len_std",
)


@pytest.mark.slow
def test_run_stops_early_on_patience(make_config, caplog: pytest.LogCaptureFixture) -> None:
    """A learning rate too small to change any greedy answer: exact match is flat, patience=1 ends the game."""
    from spinlm.loop import run

    cfg = make_config("train.iterations=3", "train.learning_rate=1e-9", "eval.stop.patience=1")
    assert isinstance(cfg, SpinConfig)
    with caplog.at_level(logging.INFO, logger="spinlm"):
        summary = run(cfg)
    out = Path(cfg.output_dir)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))

    played = [it["iteration"] for it in on_disk["iterations"]]
    assert played == [0, 1] and len(played) - 1 < cfg.train.iterations
    assert not (out / "iteration_2").exists()
    reason = on_disk["stop_reason"]
    assert reason.startswith("exact_match has not improved on") and "for 1 iteration(s)" in reason
    assert f"stopping after iteration 1: {reason}" in caplog.text

    first, last = (it["metrics"] for it in on_disk["iterations"])
    assert first["exact_match"] == last["exact_match"]
    assert first["discriminability"] is None
    for key in PER_ITERATION:
        assert isinstance(last[key], float), key
    assert 0.0 <= last["discriminability"] <= 1.0

    # The report shows the stop reason and every per-iteration metric, with iteration 1's values.
    page = (out / "report.html").read_text(encoding="utf-8")
    assert html.escape(reason) in page
    header = re.search(r"<tr><th>iteration</th>(.*?)</tr>", page)
    row = re.search(r"<tr><td>1</td>(.*?)</tr>", page)
    assert header is not None and row is not None
    names = re.findall(r"<th[^>]*>(.*?)</th>", header.group(1))
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))
    shown = dict(zip(names, cells))
    for key in PER_ITERATION:
        assert shown[key] == f"{last[key]:.4g}", key
