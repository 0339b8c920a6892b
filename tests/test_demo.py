"""The demo's SFT warm-up: it stops at the target accuracy (or the step cap) and records how it got there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import spinlm.demo as demo


@pytest.mark.parametrize(("target", "steps"), [(0.0, 20), (1.1, 60)])
def test_warmup_stops_at_target_or_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: float, steps: int
) -> None:
    # Target 0.0 is reached at the first check (step 20); 1.1 never is, so the cap (60 steps) ends it.
    monkeypatch.setattr(demo, "SFT_TARGET", target)
    monkeypatch.setattr(demo, "SFT_MAX_STEPS", 60)
    monkeypatch.setattr(demo, "SFT_CHECK_EVERY", 20)
    monkeypatch.setattr(demo, "SFT_CHECK_PROMPTS", 16)
    monkeypatch.setattr(demo, "SFT_HIDDEN", 32)
    cfg = demo.demo_config(
        str(tmp_path / "run"), seed=0, overrides=["data.num_examples=64", "data.eval_size=8"]
    )
    info = demo.build_sft_model(cfg)
    assert info["steps"] == steps
    assert [c["step"] for c in info["curve"]] == list(range(20, steps + 1, 20))
    assert all(0.0 <= c["train_exact_match"] <= 1.0 for c in info["curve"])
    out = Path(str(cfg.model.name_or_path))
    assert (out / "config.json").exists()
    assert json.loads((out / "warmup.json").read_text())["steps"] == steps
    assert demo.build_sft_model(cfg) == {"sft_seconds": 0.0, "reused": True}  # a second call reuses it
