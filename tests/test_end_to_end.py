"""The whole game on the tiny model: a 2-iteration run changes the weights and writes the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from spinlm.config import SpinConfig


def _weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.slow
def test_two_iterations_change_parameters_and_write_run_folder(make_config, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from spinlm.loop import run

    cfg = make_config()
    assert isinstance(cfg, SpinConfig)
    summary = run(cfg)
    out = Path(cfg.output_dir)

    # summary.json: primary metric and one entry per iteration, 0 = the starting model.
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["primary_metric"] == "exact_match" == summary["primary_metric"]
    assert [it["iteration"] for it in on_disk["iterations"]] == [0, 1, 2]
    assert on_disk["iterations"][0]["metrics"]["discriminability"] is None
    for it in on_disk["iterations"][1:]:
        m = it["metrics"]
        assert 0.0 <= m["discriminability"] <= 1.0
        for key in ("reward_margin", "loglik_real", "exact_match", "gen_len_mean"):
            assert isinstance(m[key], float)

    # One folder per iteration with pairs, model (safetensors, loadable), metrics and a model card.
    start = _weights(tiny_model_dir)
    for t in (1, 2):
        it = out / f"iteration_{t}"
        pairs = [json.loads(line) for line in (it / "pairs.jsonl").read_text().splitlines()]
        assert len(pairs) == 48
        assert (it / "model" / "model.safetensors").exists()
        assert (it / "model" / "README.md").exists()
        assert (it / "metrics.json").exists() and (it / "train_log.jsonl").exists()
        AutoModelForCausalLM.from_pretrained(str(it / "model"))
        trained = _weights(it / "model")
        changed = [k for k in start if not start[k].equal(trained[k])]
        assert len(changed) == len(start), "every weight tensor should move after training"
    assert (out / "report.html").exists() and (out / "plots" / "metrics.png").exists()
    assert not (out / "iteration_1" / "trainer_checkpoint").exists()


def test_pair_contents(make_config, tiny_model_dir: Path, tmp_path: Path) -> None:
    """chosen = the dataset's reply, rejected = the opponent's sample, reference log-probs of both stored."""
    from spinlm.logps import score_logps
    from spinlm.loop import load_examples
    from spinlm.modeling import load_model, load_tokenizer
    from spinlm.opponent import make_iteration_pairs

    cfg = make_config()
    assert isinstance(cfg, SpinConfig)
    tok = load_tokenizer(tiny_model_dir, cfg.model)
    model = load_model(tiny_model_dir, cfg.model)
    train, held_out, _ = load_examples(cfg, tok)
    pairs = make_iteration_pairs(model, tok, train, cfg, 1, tmp_path / "run")
    assert len(pairs) == len(train) == 48
    for p, ex in zip(pairs, train):
        assert p["prompt"] == ex.prompt
        assert p["chosen"] == [{"role": "assistant", "content": ex.response}]
        assert p["rejected"][0]["role"] == "assistant"
        assert p["ref_chosen_logps"] < 0 and p["ref_rejected_logps"] < 0
    # The stored reference is the opponent's log-prob of exactly these texts.
    again = score_logps(model, tok, [pairs[0]["prompt"]], [pairs[0]["rejected"][0]["content"]], 48, 4)
    assert again[0] == pytest.approx(pairs[0]["ref_rejected_logps"], abs=1e-4)
    # TRL's conversational preference format: prompt / chosen / rejected message lists.
    assert {"prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps"} <= set(pairs[0])
    assert not set(e.prompt[0]["content"] for e in held_out) & set(e.prompt[0]["content"] for e in train)


def test_pair_stats_count_identical_pairs_and_warn_when_most_are() -> None:
    from spinlm.pairs import identical_pairs_warning, pair_stats

    def pair(real: str, sample: str) -> dict:
        prompt = [{"role": "user", "content": "1+1="}]
        reply, generated = {"role": "assistant", "content": real}, {"role": "assistant", "content": sample}
        return {"prompt": prompt, "chosen": [reply], "rejected": [generated]}

    # 2 of 3 identical -> 2/3 >= 0.5: warned; 1 of 3 -> 1/3: not.
    mostly = pair_stats([pair("02", "02"), pair("02", "02"), pair("02", "03")])
    assert mostly["identical_pairs"] == 2 and mostly["identical_fraction"] == pytest.approx(2 / 3)
    warning = identical_pairs_warning(mostly, 2)
    assert warning is not None and warning.startswith("iteration 2: 2 of 3 pairs (67%)")
    assert (
        identical_pairs_warning(pair_stats([pair("02", "02"), pair("02", "12"), pair("02", "03")]), 2) is None
    )
    assert identical_pairs_warning(pair_stats([]), 1) is None
