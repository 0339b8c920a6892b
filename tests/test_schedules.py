"""Per-iteration schedules (learning rate, β, epochs) and mixing the previous iteration's pairs, end to end.

One 2-iteration run of the tiny model with
    train.learning_rate=[1e-3, 1e-4]  train.beta=[0.1, 5.0]  train.epochs=[1, 2]
    train.mix_previous: {window: 1, fraction: 0.5}
16 training prompts and micro-batches of 8: iteration 1 trains on its 16 pairs for 1 epoch (2 steps),
iteration 2 on its 16 pairs plus 8 of iteration 1's, re-scored by p_1, for 2 epochs (2 * 3 = 6 steps).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from spinlm.config import SpinConfig

LR = {1: 1e-3, 2: 1e-4}
BETA = {1: 0.1, 2: 5.0}
EPOCHS = {1: 1, 2: 2}
STEPS = {1: 2, 2: 6}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def scheduled_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SpinConfig:
    from spinlm.config import load_config
    from spinlm.loop import run

    cfg = load_config(
        None,
        [
            "task=addition",
            f"model.name_or_path={tiny_model_dir}",
            f"output_dir={tmp_path_factory.mktemp('schedules') / 'run'}",
            "data.num_examples=16",
            "data.eval_size=4",
            "generation.max_new_tokens=6",
            "generation.batch_size=16",
            "train.iterations=2",
            "train.optimizer=adamw",
            "train.batch_size=8",
            "train.max_length=48",
            "train.logging_steps=1",
            "train.learning_rate=[1e-3,1e-4]",
            "train.beta=[0.1,5.0]",
            "train.epochs=[1,2]",
            "train.mix_previous.window=1",
            "train.mix_previous.fraction=0.5",
            "eval.batch_size=32",
            "eval.num_samples=0",
        ],
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("spinlm.report.write_report", lambda run_dir: None)  # plots: tests/test_end_to_end.py
        run(cfg)
    return cfg


def _train_log(cfg: SpinConfig, t: int) -> list[dict[str, Any]]:
    return _jsonl(Path(cfg.output_dir) / f"iteration_{t}" / "train_log.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("t", [1, 2])
def test_learning_rate_schedule_sets_each_iterations_peak(scheduled_run: SpinConfig, t: int) -> None:
    lrs = [row["lr"] for row in _train_log(scheduled_run, t)]
    # Linear decay after warmup: the largest logged lr is the peak or one decay step below it.
    assert LR[t] * (1 - 1 / STEPS[t]) - 1e-12 <= max(lrs) <= LR[t] * (1 + 1e-9)
    assert lrs == sorted(lrs, reverse=True)


@pytest.mark.slow
@pytest.mark.parametrize("t", [1, 2])
def test_beta_and_epoch_schedules(scheduled_run: SpinConfig, t: int) -> None:
    rows = _train_log(scheduled_run, t)
    assert {row["beta"] for row in rows} == {BETA[t]}
    assert [row["step"] for row in rows] == list(range(1, STEPS[t] + 1))
    assert rows[-1]["epoch"] == pytest.approx(EPOCHS[t])


@pytest.mark.slow
def test_mix_previous_adds_half_of_iteration_1_pairs_rescored_by_p1(scheduled_run: SpinConfig) -> None:
    from spinlm.logps import score_logps
    from spinlm.modeling import load_model, load_tokenizer
    from spinlm.opponent import mixed_pairs

    cfg = scheduled_run
    run_dir = Path(cfg.output_dir)
    first = {p["id"]: p for p in _jsonl(run_dir / "iteration_1" / "pairs.jsonl")}
    second = _jsonl(run_dir / "iteration_2" / "pairs.jsonl")
    fresh = [p for p in second if p["iteration"] == 2]
    mixed = [p for p in second if p["iteration"] == 1]
    assert len(first) == len(fresh) == 16 and len(mixed) == 8
    assert [p["id"] for p in mixed] == [p["id"] for p in mixed_pairs(run_dir, 2, cfg)]
    for p in mixed:
        old = first[p["id"]]
        assert (p["prompt"], p["chosen"], p["rejected"]) == (old["prompt"], old["chosen"], old["rejected"])
        assert p["opponent_iteration"] == 0 and p["reference_iteration"] == 1

    # The mixed pairs' reference is now p_1 (the opponent of iteration 2), no longer p_0.
    model_dir = run_dir / "iteration_1" / "model"
    tok = load_tokenizer(model_dir, cfg.model)
    p1 = load_model(model_dir, cfg.model)
    prompts = [p["prompt"] for p in mixed]
    real = score_logps(p1, tok, prompts, [p["chosen"][0]["content"] for p in mixed], cfg.train.max_length, 8)
    assert [p["ref_chosen_logps"] for p in mixed] == pytest.approx(real, abs=1e-4)
    assert [p["ref_chosen_logps"] for p in mixed] != pytest.approx(
        [first[p["id"]]["ref_chosen_logps"] for p in mixed], abs=1e-4
    )
