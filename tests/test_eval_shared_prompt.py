"""Evaluation scores the real reply, p_t's sample and p_{t-1}'s sample after one shared prompt pass
(`spinlm.evaluation.score_shared_prompt`): the same log-probs as scoring each with its prompt, and the same
metrics as before; `evaluate_model_details` returns what the metrics are means of."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import spinlm.evaluation as ev
from spinlm.data import Example
from spinlm.logps import score_logps
from spinlm.modeling import load_model, load_tokenizer
from spinlm.tasks import get_task


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    from spinlm.config import ModelConfig

    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    return load_model(str(tiny_model_dir), cfg), load_tokenizer(str(tiny_model_dir), cfg)


def _data(n: int = 12) -> tuple[list[Example], list[Any], list[list[str]]]:
    make = get_task("addition").make_examples
    assert make is not None
    examples = make(n, 3)
    prompts = [e.prompt for e in examples]
    real = [e.response for e in examples]
    other = [examples[(i + 1) % n].response * (1 + i % 3) for i in range(n)]  # longer, varied lengths
    other[0] = ""  # an empty reply: only its end of turn is scored
    third = [r[: len(r) // 2] for r in real]
    return examples, prompts, [real, other, third]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize(("max_length", "normalize", "batch"), [(64, False, 4), (20, True, 16)])
def test_shared_prompt_scores_equal_separate_scoring(
    tiny: tuple[Any, Any], k: int, max_length: int, normalize: bool, batch: int
) -> None:
    model, tok = tiny
    assert ev.shared_prompt_supported(model)
    _, prompts, sets = _data()
    got, positions = ev.score_shared_prompt(model, tok, prompts, sets[:k], max_length, batch, normalize)
    for replies, values in zip(sets[:k], got):
        want = score_logps(model, tok, prompts, replies, max_length, batch, normalize)
        assert values == pytest.approx(want, abs=1e-4)
    # the prompt ran once per example, not k times
    separate = sum(len(e.input_ids) for r in sets[:k] for e in ev.encode_all(tok, prompts, r, max_length))
    prompt = sum(e.prompt_len for e in ev.encode_all(tok, prompts, sets[0], max_length))
    assert positions == separate - (k - 1) * prompt


def test_unsupported_models_are_scored_set_by_set(
    tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok = tiny
    _, prompts, sets = _data(6)
    shared, _ = ev.score_shared_prompt(model, tok, prompts, sets, 64, 8)
    monkeypatch.setattr(ev, "shared_prompt_supported", lambda m: False)
    separate, _ = ev.score_shared_prompt(model, tok, prompts, sets, 64, 8)
    for a, b in zip(shared, separate):
        assert a == pytest.approx(b, abs=1e-4)


def test_evaluation_metrics_unchanged_and_details(
    tiny: tuple[Any, Any], make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shared-prompt scoring gives the metrics that scoring each set separately gives; the details are the
    per-example values behind them."""
    model, tok = tiny
    examples, _, sets = _data(10)
    cfg = make_config("generation.max_new_tokens=8")
    previous = ev.EvalState(sets[1], [-30.0 - i for i in range(10)], [-20.0 - 2 * i for i in range(10)])
    metrics, state, _, details = ev.evaluate_model_details(model, tok, examples, cfg, 2, previous)
    monkeypatch.setattr(ev, "shared_prompt_supported", lambda m: False)
    again, state2, _ = ev.evaluate_model(model, tok, examples, cfg, 2, previous)
    for key, value in metrics.items():
        if key != "seconds_eval" and value is not None:
            assert again[key] == pytest.approx(value, abs=1e-4), key
    assert state.generations == state2.generations
    assert details.wins is not None and sum(details.wins) / 10 == metrics["discriminability"]
    assert sum(state.logps_real) / sum(details.real_tokens) == pytest.approx(metrics["loglik_real_per_token"])
    assert ev.wasserstein_1(details.sample_tokens, details.real_tokens) == metrics["gen_len_w1"]
    assert len(details.answers) == 10 and details.work["scored_positions"] > 0
    assert set(details.seconds) >= {"generate_samples", "score", "generate_greedy", "total"}
