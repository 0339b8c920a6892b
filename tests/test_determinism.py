"""Determinism on CPU: the same config and seed give the same pairs, logs, weights and metrics (all but the
wall-clock `seconds`), run into two different folders. Both runs go with every socket blocked: a run on a
local model folder contacts no network.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from spinlm.config import SpinConfig


def _no_network(*args: Any, **kwargs: Any) -> None:
    raise AssertionError(f"network access attempted: {args[1:] or kwargs}")


def _metrics(run: Path, t: int) -> dict[str, Any]:
    metrics = json.loads((run / f"iteration_{t}" / "metrics.json").read_text())
    for key in [k for k in metrics if k == "seconds" or k.startswith("seconds_")]:  # wall-clock times
        metrics.pop(key)
    return metrics


@pytest.mark.slow
def test_same_config_and_seed_give_identical_results_offline(
    make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spinlm.loop import run

    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    overrides = ["data.num_examples=24", "data.eval_size=8", "train.iterations=1", "seed=5"]
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        cfg = make_config(*overrides, output_dir=out)
        assert isinstance(cfg, SpinConfig)
        run(cfg)

    for t in (0, 1):
        assert _metrics(a, t) == _metrics(b, t)
    it_a, it_b = a / "iteration_1", b / "iteration_1"
    for name in ("pairs.jsonl", "train_log.jsonl", "samples.jsonl", "eval_state.json"):
        assert (it_a / name).read_bytes() == (it_b / name).read_bytes(), name
    w_a, w_b = (
        load_file(str(it_a / "model" / "model.safetensors")),
        load_file(str(it_b / "model" / "model.safetensors")),
    )
    assert w_a.keys() == w_b.keys() and all(w_a[k].equal(w_b[k]) for k in w_a)
    # Not trivially equal: the opponent really sampled (responses differ from the real replies somewhere).
    pairs = [json.loads(line) for line in (it_a / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 24 and any(p["chosen"] != p["rejected"] for p in pairs)
