"""The three references of `train.reference` on the tiny model: previous, α-SPIN mixture, fictitious play.

The iterates p_1 and p_2 are the tiny SFT model p_0 with fixed random noise added to every weight, so their
log-probs differ from p_0's and, under greedy decoding, p_1 answers every prompt with an empty reply while
p_0 and p_2 write digits: which iterate produced a sample can be read off the sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spinlm.config import SpinConfig

SMALL = ("data.num_examples=16", "data.eval_size=4")


def _noisy_copy(src: Path, dst: Path, scale: float, seed: int) -> Path:
    from spinlm.config import ModelConfig
    from spinlm.modeling import load_model, load_tokenizer, save_model

    model = load_model(src, ModelConfig(), device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
    save_model(model, load_tokenizer(src, ModelConfig()), dst)
    return dst


@pytest.fixture(scope="module")
def iterates(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """{s: checkpoint of iterate s}: p_0 the tiny SFT model, p_1 and p_2 noisy copies of it."""
    root = tmp_path_factory.mktemp("iterates")
    return {
        0: tiny_model_dir,
        1: _noisy_copy(tiny_model_dir, root / "p1", scale=1.0, seed=1),
        2: _noisy_copy(tiny_model_dir, root / "p2", scale=0.3, seed=2),
    }


def _setup(make_config, iterates: dict[int, Path], t: int, *overrides: str):
    """(cfg, tokenizer, train examples, opponent p_{t-1}); run_dir/iteration_s/model links to p_s, s < t."""
    from spinlm.loop import load_examples
    from spinlm.modeling import load_model, load_tokenizer

    cfg = make_config(*SMALL, *overrides)
    assert isinstance(cfg, SpinConfig)
    run_dir = Path(cfg.output_dir)
    for s in range(1, t):
        (run_dir / f"iteration_{s}").mkdir(parents=True, exist_ok=True)
        (run_dir / f"iteration_{s}" / "model").symlink_to(iterates[s])
    tok = load_tokenizer(iterates[0], cfg.model)
    train, _, _ = load_examples(cfg, tok)
    return cfg, tok, train, load_model(iterates[t - 1], cfg.model)


def _scores(model_dir: Path, cfg: SpinConfig, tok, pairs: list[dict]) -> tuple[list[float], list[float]]:
    """(real, generated) log-probs of the pairs under the checkpoint, recomputed independently."""
    from spinlm.logps import score_logps
    from spinlm.modeling import load_model

    model = load_model(model_dir, cfg.model)
    prompts = [p["prompt"] for p in pairs]

    def score(side: str) -> list[float]:
        texts = [p[side][-1]["content"] for p in pairs]
        return score_logps(model, tok, prompts, texts, cfg.train.max_length, 4)

    return score("chosen"), score("rejected")


def test_alpha_zero_equals_previous(make_config, iterates: dict[int, Path]) -> None:
    from spinlm.opponent import make_iteration_pairs

    cfg, tok, train, opponent = _setup(make_config, iterates, 2)
    previous = make_iteration_pairs(opponent, tok, train, cfg, 2, Path(cfg.output_dir))
    cfg_a = make_config(*SMALL, "train.reference.kind=alpha", "train.reference.alpha=0.0")
    alpha = make_iteration_pairs(opponent, tok, train, cfg_a, 2, Path(cfg.output_dir))
    assert [p["rejected"] for p in alpha] == [p["rejected"] for p in previous]  # same samples (same shards)
    for a, p in zip(alpha, previous):
        assert a["ref_chosen_logps"] == p["ref_chosen_logps"]
        assert a["ref_rejected_logps"] == p["ref_rejected_logps"]
        assert a["opponent_iteration"] == p["opponent_iteration"] == a["reference_iteration"] == 1
        assert a["base_chosen_logps"] != pytest.approx(a["opponent_chosen_logps"], abs=1e-3)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_alpha_reference_is_the_geometric_mixture(
    make_config, iterates: dict[int, Path], alpha: float
) -> None:
    from spinlm.opponent import make_iteration_pairs

    cfg, tok, train, opponent = _setup(
        make_config, iterates, 2, "train.reference.kind=alpha", f"train.reference.alpha={alpha}"
    )
    pairs = make_iteration_pairs(opponent, tok, train, cfg, 2, Path(cfg.output_dir))
    assert len(pairs) == len(train) == 16
    opp_real, opp_gen = _scores(iterates[1], cfg, tok, pairs)
    base_real, base_gen = _scores(iterates[0], cfg, tok, pairs)
    assert [p["opponent_chosen_logps"] for p in pairs] == pytest.approx(opp_real, abs=1e-4)
    assert [p["opponent_rejected_logps"] for p in pairs] == pytest.approx(opp_gen, abs=1e-4)
    assert [p["base_chosen_logps"] for p in pairs] == pytest.approx(base_real, abs=1e-4)
    assert [p["base_rejected_logps"] for p in pairs] == pytest.approx(base_gen, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(opp_real, base_real)) > 1.0  # the two models really differ
    for p in pairs:
        for side in ("chosen", "rejected"):
            mixed = alpha * p[f"base_{side}_logps"] + (1 - alpha) * p[f"opponent_{side}_logps"]
            assert p[f"ref_{side}_logps"] == pytest.approx(mixed, abs=1e-9)
    if alpha == 1.0:
        assert [p["ref_chosen_logps"] for p in pairs] == [p["base_chosen_logps"] for p in pairs]


def test_alpha_at_iteration_one_needs_no_second_model(make_config, iterates: dict[int, Path]) -> None:
    """At t = 1 the opponent is the base: its scores are stored as the base scores, nothing is loaded."""
    from spinlm.opponent import make_iteration_pairs

    cfg, tok, train, opponent = _setup(
        make_config, iterates, 1, "train.reference.kind=alpha", "train.reference.alpha=0.3"
    )
    pairs = make_iteration_pairs(opponent, tok, train, cfg, 1, Path(cfg.output_dir))
    for p in pairs:
        assert p["base_chosen_logps"] == p["opponent_chosen_logps"] == pytest.approx(p["ref_chosen_logps"])


def test_opponent_window_is_clipped_at_p0_and_assignment_is_deterministic(make_config) -> None:
    from spinlm.opponent import assign_iterates, opponent_window

    previous = make_config("train.reference.kind=alpha")
    fictitious = make_config("train.reference.kind=fictitious", "train.reference.history=3")
    assert [opponent_window(previous, t) for t in (1, 2, 5)] == [[0], [1], [4]]
    assert [opponent_window(fictitious, t) for t in (1, 2, 5)] == [[0], [0, 1], [2, 3, 4]]
    draws = assign_iterates(300, fictitious, 5)
    assert draws == assign_iterates(300, fictitious, 5) and draws != assign_iterates(300, fictitious, 6)
    assert draws[:50] == assign_iterates(50, fictitious, 5)  # a prompt's draw depends on its index only
    assert {s: draws.count(s) for s in (2, 3, 4)} == pytest.approx({2: 100, 3: 100, 4: 100}, abs=30)
    assert assign_iterates(5, previous, 3) == [2] * 5


@pytest.mark.parametrize(("t", "history", "window"), [(2, 2, [0, 1]), (3, 2, [1, 2])])
def test_fictitious_play_samples_and_scores_with_the_assigned_iterate(
    make_config, iterates: dict[int, Path], t: int, history: int, window: list[int]
) -> None:
    from spinlm.generation import generate_responses
    from spinlm.modeling import load_model
    from spinlm.opponent import assign_iterates, make_iteration_pairs, opponent_window

    cfg, tok, train, opponent = _setup(
        make_config,
        iterates,
        t,
        "train.reference.kind=fictitious",
        f"train.reference.history={history}",
        "generation.temperature=0",  # greedy: a sample identifies the model that wrote it
    )
    run_dir = Path(cfg.output_dir)
    assert opponent_window(cfg, t) == window  # clipped at p_0
    pairs = make_iteration_pairs(opponent, tok, train, cfg, t, run_dir)
    used = [p["opponent_iteration"] for p in pairs]
    assert used == assign_iterates(len(train), cfg, t) and sorted(set(used)) == window
    assert all(p["reference_iteration"] == p["opponent_iteration"] for p in pairs)

    greedy = {}
    for s in window:
        group = [p for p in pairs if p["opponent_iteration"] == s]
        real, generated = _scores(iterates[s], cfg, tok, group)
        assert [p["ref_chosen_logps"] for p in group] == pytest.approx(real, abs=1e-4)
        assert [p["ref_rejected_logps"] for p in group] == pytest.approx(generated, abs=1e-4)
        model = load_model(iterates[s], cfg.model)
        greedy[s] = [
            g.text for g in generate_responses(model, tok, [e.prompt for e in train], cfg.generation, 0)
        ]
        assert [p["rejected"][0]["content"] for p in group] == [
            greedy[s][int(p["id"].split("-")[1])] for p in group
        ]
        assert (run_dir / f"iteration_{t}" / "generations" / f"iterate_{s}" / "shard_00000.jsonl").exists()
    assert greedy[window[0]] != greedy[window[1]]  # the check above can tell the iterates apart

    # Resume: a lost shard of one iterate is regenerated by that iterate, the other's shards are reused.
    (run_dir / f"iteration_{t}" / "generations" / f"iterate_{window[0]}" / "shard_00000.jsonl").unlink()
    again = make_iteration_pairs(opponent, tok, train, cfg, t, run_dir)
    assert [p["rejected"] for p in again] == [p["rejected"] for p in pairs]


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ("train.reference.kind=alpha", "train.reference.alpha=0.5"),
        ("train.reference.kind=fictitious", "train.reference.history=2"),
    ],
    ids=["alpha", "fictitious"],
)
def test_run_plays_two_iterations_with_each_reference(
    make_config, overrides: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`spinlm.loop.run` end to end (`previous` is tests/test_end_to_end.py); iteration 2 is the telling one."""
    from spinlm.loop import run

    monkeypatch.setattr("spinlm.report.write_report", lambda run_dir: None)  # plots: tests/test_end_to_end.py
    cfg = make_config(*SMALL, "eval.num_samples=0", *overrides)
    assert isinstance(cfg, SpinConfig)
    summary = run(cfg)
    assert [it["iteration"] for it in summary["iterations"]] == [0, 1, 2]
    it2 = Path(cfg.output_dir) / "iteration_2"
    pairs = [json.loads(line) for line in (it2 / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 16 and (it2 / "model" / "model.safetensors").exists()
    if cfg.train.reference.kind == "alpha":
        for p in pairs:
            mixed = 0.5 * p["base_rejected_logps"] + 0.5 * p["opponent_rejected_logps"]
            assert p["ref_rejected_logps"] == pytest.approx(mixed, abs=1e-9)
    else:
        assert sorted({p["opponent_iteration"] for p in pairs}) == [0, 1]
        assert sorted(d.name for d in (it2 / "generations").iterdir()) == ["iterate_0", "iterate_1"]


@pytest.fixture
def fresh_accelerator_state():
    """accelerate's state is a per-process singleton fixed at the first Accelerator; reset it around a test
    that needs another mixed precision, so the tests before and after keep theirs."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_bf16_training_scores_the_reference_under_its_autocast(
    make_config, iterates: dict[int, Path], fresh_accelerator_state
) -> None:
    """train.precision=bf16: the stored reference log-probs are the opponent's under bf16 autocast, as the
    policy computes them in training (so log p/p_ref starts at 0), not its fp32 log-probs."""
    from spinlm.logps import score_logps
    from spinlm.opponent import make_iteration_pairs
    from spinlm.trainer import make_accelerator

    cfg, tok, train, opponent = _setup(make_config, iterates, 1, "train.precision=bf16")
    accelerator = make_accelerator(cfg.train)
    assert accelerator.mixed_precision == "bf16"
    pairs = make_iteration_pairs(opponent, tok, train, cfg, 1, Path(cfg.output_dir), accelerator)
    prompts = [p["prompt"] for p in pairs]
    real = [p["chosen"][-1]["content"] for p in pairs]

    def score() -> list[float]:  # the same batches as the pairs stage: the same numbers, bit for bit
        return score_logps(opponent, tok, prompts, real, cfg.train.max_length, cfg.eval.batch_size)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = score()
    fp32 = score()
    assert [p["ref_chosen_logps"] for p in pairs] == bf16
    assert max(abs(a - b) for a, b in zip(bf16, fp32)) > 1e-4  # autocast really changes the numbers
