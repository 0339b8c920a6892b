"""The statistics and unit logic of the SPIN vs continued SFT benchmark (issue 27), on small fake inputs:
benchmarks/spin_vs_sft_report.py (exact McNemar, bootstrap, metrics from per-question vectors, the tables
from seed files) and benchmarks/real_spin_vs_sft.py (units, data layout, plateau rule, result files)."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import real_spin_vs_sft as bench  # noqa: E402
import spin_vs_sft_report as rep  # noqa: E402

from spinlm.data import Example  # noqa: E402
from spinlm.errors import SpinError  # noqa: E402
from spinlm.evaluation import EvalDetails, EvalState, wasserstein_1  # noqa: E402
from spinlm.tasks import gsm8k_metrics  # noqa: E402

# --- exact McNemar ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (0, 0, 1.0),  # no discordant pair: no evidence either way
        (5, 0, 2 / 2**5),  # 2 * P[X <= 0], X ~ Bin(5, 1/2)
        (1, 4, 2 * (1 + 5) / 2**5),  # 2 * (C(5,0) + C(5,1)) / 32 = 0.375
        (10, 2, 2 * (1 + 12 + 66) / 2**12),  # 0.03857...
        (3, 3, 1.0),  # 2 * 42/64 > 1: capped
    ],
)
def test_mcnemar_exact_by_hand(b: int, c: int, p: float) -> None:
    assert rep.mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)
    assert rep.mcnemar_exact(c, b) == pytest.approx(p, rel=1e-12)  # two-sided: symmetric


def test_paired_counts() -> None:
    spin = np.array([1, 1, 1, 0, 0, 1], dtype=float)
    sft = np.array([1, 0, 0, 0, 1, 0], dtype=float)
    got = rep.paired_counts(spin, sft)
    assert (got["spin_only"], got["sft_only"], got["both"], got["neither"]) == (3, 1, 1, 1)
    assert got["p"] == pytest.approx(2 * (1 + 4) / 16)


# --- bootstrap --------------------------------------------------------------------------------------------


def test_bootstrap_interval_is_deterministic_with_a_seed_and_brackets_the_mean() -> None:
    rng = random.Random(1)
    values = np.array([rng.random() for _ in range(200)])

    def mean(idx: np.ndarray) -> float:
        return float(values[idx].mean())

    a = rep.bootstrap_ci(mean, len(values), draws=500, seed=7)
    b = rep.bootstrap_ci(mean, len(values), draws=500, seed=7)
    c = rep.bootstrap_ci(mean, len(values), draws=500, seed=8)
    assert a == b and a != c
    assert a is not None and a[0] < values.mean() < a[1]
    # The percentile interval of a mean of 200 uniforms: about +-1.96 * 0.289 / sqrt(200) = +-0.040.
    assert 0.06 < a[1] - a[0] < 0.10


def test_bootstrap_degenerate_and_undefined() -> None:
    ones = np.ones(10)
    assert rep.bootstrap_ci(lambda idx: float(ones[idx].mean()), 10, draws=50) == (1.0, 1.0)
    assert rep.bootstrap_ci(lambda idx: None, 10, draws=50) is None


def test_loglik_difference_is_paired() -> None:
    tokens = np.array([10.0, 20.0, 30.0, 40.0])
    sft = np.array([-12.0, -25.0, -33.0, -41.0])
    diff, ci = rep.loglik_difference(sft + 1.0, sft, tokens, seed=0)  # SPIN better by 1 nat per question
    assert diff == pytest.approx(4 / 100)
    assert ci is not None and ci[0] <= diff <= ci[1] and ci[0] > 0  # every resample is better


# --- metrics from per-question vectors ------------------------------------------------------------------


def test_w1_equals_the_evaluation_metric() -> None:
    rng = random.Random(0)
    for n, m in [(7, 7), (250, 250), (13, 40)]:
        a = [rng.randrange(1, 300) for _ in range(n)]
        b = [rng.randrange(1, 300) for _ in range(m)]
        assert rep.w1(np.array(a), np.array(b)) == pytest.approx(wasserstein_1(a, b), abs=1e-12)


def questions(correct: str, loglik: list[float], wins: str | None = None) -> dict:
    n = len(correct)
    return {
        "correct": correct,
        "final": "1" * n,
        "calc_right": [1] * n,
        "calc_total": [2] * n,
        "sample_final": "0" * (n - 1) + "1",
        "sample_calc_right": [0] * n,
        "sample_calc_total": [0] * n,
        "sample_tokens": [10 + i for i in range(n)],
        "loglik": loglik,
        "wins": wins,
    }


def test_metric_values_by_hand() -> None:
    q = questions("1100", [-10.0, -20.0, -30.0, -40.0], wins="1h01")
    real = np.array([10.0, 10.0, 20.0, 60.0])
    got = rep.metrics_from_vectors(rep.vectors(q), real)
    assert got["answer_exact_match"] == 0.5
    assert got["final_answer_rate"] == 1.0
    assert got["sample_final_answer_rate"] == 0.25
    assert got["calc_accuracy"] == 0.5  # 4 right of 8 annotations
    assert got["sample_calc_accuracy"] is None  # no annotation at all
    assert got["loglik_real_per_token"] == pytest.approx(-100 / 100)
    assert got["discriminability"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert got["gen_len_w1"] == pytest.approx(wasserstein_1([10, 11, 12, 13], [10, 10, 20, 60]))
    sub = rep.metrics_from_vectors(rep.vectors(q), real, np.array([0, 0, 3]))  # a resample
    assert sub["answer_exact_match"] == pytest.approx(2 / 3)
    assert sub["loglik_real_per_token"] == pytest.approx(-60 / 80)


def test_question_vectors_reproduce_the_gsm8k_metrics() -> None:
    """The benchmark's compact per-question record gives back what gsm8k_metrics computes on the whole set."""
    ex = [
        Example(
            prompt=[{"role": "user", "content": f"q{i}"}],
            response=f"a <<2*3=6>>6\n#### {i}",
            reference=str(i),
        )
        for i in range(4)
    ]
    greedy = ["x <<2*3=6>>\n#### 0", "#### 7", "1 <<1+1=3>>3 then 1", "<<4/2=2>>\n#### 3"]
    samples = ["#### 5", "no answer", "<<1+2=3>> <<2+2=5>>\n#### 2", "#### 3\nmore"]
    details = EvalDetails(greedy, [5, 9, 14, 3], [8, 8, 8, 8], [1.0, 0.5, 0.0, 1.0])
    state = EvalState(samples, [-1.23456, -2.0, -3.0, -4.0], [0.0] * 4)
    q = bench.question_vectors(ex, details, state)
    assert q["wins"] == "1h01" and q["loglik"][0] == -1.235
    got = rep.metrics_from_vectors(rep.vectors(json.loads(json.dumps(q))), np.array(details.real_tokens))
    on_greedy, on_samples = gsm8k_metrics(ex, greedy), gsm8k_metrics(ex, samples)
    assert got["answer_exact_match"] == on_greedy["answer_exact_match"] == 0.5
    assert got["final_answer_rate"] == on_greedy["final_answer_rate"]
    assert got["calc_accuracy"] == pytest.approx(on_greedy["calc_accuracy"])
    assert got["sample_final_answer_rate"] == on_samples["final_answer_rate"]
    assert got["sample_calc_accuracy"] == pytest.approx(on_samples["calc_accuracy"])
    assert got["gen_len_w1"] == wasserstein_1(details.sample_tokens, details.real_tokens)


# --- the tables from seed files -------------------------------------------------------------------------

SETTINGS = {
    "prompts": 8,
    "eval_size": 4,
    "max_new_tokens": 16,
    "iterations": 1,
    "precision": "fp32",
    "gen_dtype": "model",
}


def evaluation(correct: str, loglik: list[float], wins: str | None) -> dict:
    q = questions(correct, loglik, wins)
    metrics = rep.metrics_from_vectors(rep.vectors(q), np.array([10.0, 10.0, 10.0, 10.0]))
    return {"iteration": 1, "metrics": metrics, "questions": q, "seconds": {"total": 5.0}}


def seed_file(method: str, correct: str, loglik: list[float]) -> dict:
    return {
        "settings": SETTINGS,
        "commits": {method: {"commit": "abc", "dirty": False}},
        "real_tokens": [10, 10, 10, 10],
        "evals": {
            "start": evaluation("1000", [-20.0] * 4, None),
            f"{method}_1": evaluation(correct, loglik, "1100"),
        },
        "seconds": {f"{method}_1": {"train": 60.0, "total": 90.0}, f"eval_{method}_1": {"total": 5.0}},
        "training": {method: [{"iteration": 1}]},
    }


def test_tables_from_fake_seed_files(tmp_path: Path) -> None:
    write = lambda name, obj: (tmp_path / name).write_text(json.dumps(obj))  # noqa: E731
    # seed 0 complete (merged), seed 1 with only its SPIN unit so far.
    merged = rep.merge_partials(seed_file("spin", "1110", [-10.0] * 4), seed_file("sft", "1001", [-12.0] * 4))
    write("seed0.json", merged)
    write("seed0-spin.json", seed_file("spin", "0000", [-99.0] * 4))  # stale partial: ignored
    write("seed1-spin.json", seed_file("spin", "1111", [-8.0] * 4))
    seeds = rep.load_seeds(tmp_path)
    assert list(seeds) == [0, 1] and seeds[0]["complete"] and not seeds[1]["complete"]
    text = rep.markdown(tmp_path)
    # exact match of SPIN at iteration 1: seeds 0.75 and 1.0 -> mean 0.875 (0.750..1.000); SFT only seed 0.
    assert "| 1 | SPIN | 0.875 (0.750..1.000) | -0.900 (-1.000..-0.800) |" in text
    assert "| 1 | continued SFT | 0.500 (n=1) | -1.200 (n=1) |" in text
    assert "| 0 | start (both) | 0.250 (0.250..0.250) |" in text
    # paired, seed 0 only: SPIN right & SFT wrong on questions 1, 2; the reverse on question 3.
    assert f"| 1 | 0 | 0.750 / 0.500 | 2 | 1 | {rep.mcnemar_exact(2, 1):.3g} | +0.2000 " in text
    assert "\n| 1 | 1 |" not in text  # seed 1 has no SFT yet: no paired row
    # the other metrics' paired differences: log-lik. per token -1.0 vs -1.2 on every question, so every
    # resample gives +0.2 and the interval, [0.2, 0.2], excludes 0.
    assert "| 1 | 0 | +0.200 [+0.200, +0.200]* |" in text
    assert "| 1 | 60 | " not in text and "| 90 | 60 | 5 | 5 |" in text
    assert "beta1" not in text


def test_a_variant_is_reported_beside_both_methods(tmp_path: Path) -> None:
    write = lambda name, obj: (tmp_path / name).write_text(json.dumps(obj))  # noqa: E731
    merged = rep.merge_partials(seed_file("spin", "1110", [-10.0] * 4), seed_file("sft", "1001", [-12.0] * 4))
    write("seed0.json", merged)
    write("seed0-spin-beta1.json", seed_file("spin-beta1", "1011", [-11.0] * 4))
    write("seed7-spin-beta1.json", seed_file("spin-beta1", "1111", [-1.0] * 4))  # no such seed: ignored
    seeds = rep.load_seeds(tmp_path)
    assert list(seeds) == [0] and seeds[0]["complete"]  # the variant's file is not a seed of its own
    text = rep.markdown(tmp_path)
    assert "SPIN (beta1), seeds [0]" in text
    assert "| 1 | SPIN (beta1) | 0.750 | -1.100 |" in text
    # against SFT ("1001"): variant right & SFT wrong on question 2; the reverse on none.
    assert f"| 1 | 0 | 0.750 / 0.500 | 1 | 0 | {rep.mcnemar_exact(1, 0):.3g} | +0.1000 " in text
    # against SPIN ("1110"): variant right on 3 (SPIN wrong), SPIN right on 1 (variant wrong).
    assert f"| 1 | 0 | 0.750 / 0.750 | 1 | 1 | {rep.mcnemar_exact(1, 1):.3g} | -0.1000 " in text
    assert "exact match SPIN (beta1) / SFT" in text
    png = rep.plot(tmp_path, tmp_path / "plot.png")
    assert png is not None and png.stat().st_size > 0


# --- the benchmark's unit logic -------------------------------------------------------------------------


def test_metric_difference_is_paired_and_undefined_where_a_metric_is() -> None:
    real = np.array([10.0, 10.0, 10.0, 10.0])
    a, b = (
        rep.vectors(questions("1100", [-10.0] * 4, "1100")),
        rep.vectors(questions("1000", [-20.0] * 4, None)),
    )
    value, ci = rep.metric_difference("loglik_real_per_token", a, b, real)
    assert value == pytest.approx(1.0) and ci == pytest.approx(
        (1.0, 1.0)
    )  # the same +10 nats on every question
    value, ci = rep.metric_difference("final_answer_rate", a, b, real)
    assert value == pytest.approx(a["final"].mean() - b["final"].mean())
    assert ci is not None and ci[0] <= value <= ci[1]
    assert rep.metric_difference("discriminability", a, b, real) == (None, None)  # b has no opponent


def test_parse_unit() -> None:
    assert bench.parse_unit("warmup") == ("warmup", None, None)
    assert bench.parse_unit("seed12-sft") == ("seed", 12, "sft")
    assert bench.parse_unit("seed3") == ("seed", 3, None)
    with pytest.raises(SpinError):
        bench.parse_unit("seed-spin")
    assert bench.parse_unit("seed2-spin-beta1") == ("seed", 2, "spin-beta1")
    assert bench.variant_of("spin-mix") == "mix" and bench.variant_of("spin") is None
    for bad in ("seed2-sft-beta1", "seed2-spin-nosuch"):
        with pytest.raises(SpinError, match="variant"):
            bench.parse_unit(bad)


def test_variants_override_only_the_spin_config(tmp_path: Path) -> None:
    s = settings(tmp_path)
    data, run = tmp_path / "train.jsonl", tmp_path / "run"
    plain = bench.spin_config(s, 0, "m", data, run)
    beta1 = bench.spin_config(s, 0, "m", data, run, overrides=bench.VARIANTS["beta1"])
    mix = bench.spin_config(s, 0, "m", data, run, overrides=bench.VARIANTS["mix"])
    assert (plain.train.beta, beta1.train.beta, mix.train.beta) == (0.1, 1.0, 0.1)
    assert (plain.train.mix_previous.window, mix.train.mix_previous.window) == (0, 1)
    assert beta1.train.learning_rate == plain.train.learning_rate and beta1.generation == plain.generation


def settings(tmp_path: Path, **kw: object) -> bench.Settings:
    args = ["--unit", "plan", "--out", str(tmp_path / "out"), "--docs", str(tmp_path / "docs")]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return bench.parse_args(args)


def test_layout_parts_are_disjoint_fixed_and_exclude_test_questions(tmp_path: Path) -> None:
    s = settings(tmp_path, prompts=5, game_pool=20, warmup_val=10)
    train = [{"question": f"q{i}", "answer": "#### 1"} for i in range(100)]
    parts = bench.layout(train, {"q3", "q50"}, s)
    game, val, warm = (set(parts[k]) for k in ("game", "validation", "warmup"))
    assert (len(game), len(val), len(warm)) == (20, 10, 68)
    assert not (game & val or game & warm or val & warm)
    assert {3, 50}.isdisjoint(game | val | warm)
    assert bench.layout(train, {"q3", "q50"}, s) == parts  # the same for every call (and seed)
    a, b = bench.seed_rows(parts, s, 0), bench.seed_rows(parts, s, 1)
    assert len(a) == len(set(a)) == 6 and set(a) <= game and a != b
    with pytest.raises(SpinError):
        bench.layout(train, set(), settings(tmp_path, prompts=30, game_pool=20))


def test_plateau_rule() -> None:
    rule = bench.Plateau(tol=0.01, patience=2)
    assert rule.add(0, 2.0) == (True, False)
    assert rule.add(10, 1.5) == (True, False)
    assert rule.add(20, 1.495) == (False, False)  # better by 0.3%: not an improvement
    assert rule.add(30, 1.2) == (True, False)  # the count restarts
    assert rule.add(40, 1.3) == (False, False)
    assert rule.add(50, 1.19) == (False, True)  # 2 in a row: stop, keep step 30
    assert rule.best_step == 30 and rule.best == 1.2


def test_compact_json_round_trips_and_keeps_vectors_on_one_line() -> None:
    obj = {"a": [1, 2, 3], "b": {"c": "0101", "d": [{"e": 1.5}]}, "f": None, "g": []}
    text = bench.dumps_compact(obj)
    assert json.loads(text) == obj
    assert '"a": [1, 2, 3]' in text


def test_merge_seed_writes_the_seed_file_once_both_units_exist(tmp_path: Path) -> None:
    s = settings(tmp_path)
    s.docs.mkdir(parents=True)
    (s.docs / "seed4-spin.json").write_text(json.dumps(seed_file("spin", "1111", [-1.0] * 4)))
    assert bench.merge_seed(s, 4) == s.docs / "seed4-spin.json"  # the other method has not run yet
    (s.docs / "seed4-sft.json").write_text(json.dumps(seed_file("sft", "0000", [-2.0] * 4)))
    path = bench.merge_seed(s, 4)
    assert path == s.docs / "seed4.json" and not (s.docs / "seed4-spin.json").exists()
    merged = json.loads(path.read_text())
    assert set(merged["evals"]) == {"start", "spin_1", "sft_1"} and set(merged["commits"]) == {"spin", "sft"}
    assert rep.load_seeds(s.docs)[4]["complete"]


def test_settings_that_change_results_are_refused(tmp_path: Path) -> None:
    s = settings(tmp_path, prompts=8)
    s.out.mkdir(parents=True)
    bench.check_settings(s)
    bench.check_settings(settings(tmp_path, prompts=8, threads=1))  # threads change nothing
    with pytest.raises(SpinError, match="prompts"):
        bench.check_settings(settings(tmp_path, prompts=9))
    # a result file made with another recipe is refused too, even with a fresh run folder
    s.docs.mkdir(parents=True)
    (s.docs / "seed0.json").write_text(json.dumps({"settings": bench.recipe(s) | {"beta": 0.5}}))
    (s.out / "settings.json").unlink()
    with pytest.raises(SpinError, match="beta"):
        bench.check_settings(s)


def test_prior_rates_scale_with_precision() -> None:
    fp32, bf16 = bench.PRIOR_RATES["fp32"], bench.PRIOR_RATES["bf16"]
    assert all(1.5 < fp32[k] / bf16[k] < 2.5 for k in fp32)  # docs/results/cost.md: fp32 ~2-2.5x slower
    assert math.isclose(bench.PRIOR_RATES["bf16"]["score"], 0.9e-3)
