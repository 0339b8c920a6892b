"""Tests for spinlm.tasks: the built-in tasks' data generators and their (exact) metrics."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from spinlm import tasks
from spinlm.data import Example, Message
from spinlm.errors import SpinError
from spinlm.tasks import GENERATOR_TASKS, TASK_NAMES, distribution_metrics, get_task, grammar_distribution


def _ex(content: str, response: str = "", reference: str | None = None) -> Example:
    return Example(prompt=[{"role": "user", "content": content}], response=response, reference=reference)


# --- lookup ------------------------------------------------------------------------------------------------


def test_get_task_returns_each_builtin() -> None:
    assert TASK_NAMES == ("addition", "grammar", "word_problems", "gsm8k")
    for name in TASK_NAMES:
        task = get_task(name)
        assert task.name == name and (task.make_examples is None) == (name == "gsm8k")
    assert get_task("addition").primary_metric == "exact_match"
    assert get_task("grammar").primary_metric == "neg_kl"


def test_get_task_unknown_name_raises_and_lists_choices() -> None:
    with pytest.raises(SpinError, match="unknown task 'gsm9k'.*addition, grammar"):
        get_task("gsm9k")


@pytest.mark.parametrize("name", ["addition", "grammar"])  # the character-level toys' limits
def test_examples_are_short_ascii_single_user_turns(name: str) -> None:
    make = get_task(name).make_examples
    assert make is not None
    for ex in make(300, 0):
        assert len(ex.prompt) == 1 and ex.prompt[0]["role"] == "user"
        text = ex.prompt[0]["content"]
        assert text.isascii() and ex.response.isascii()
        assert 1 <= len(text) <= 20 and 1 <= len(ex.response) <= 24


@pytest.mark.parametrize("name", GENERATOR_TASKS)
def test_deterministic_for_a_seed_and_seeds_differ(name: str) -> None:
    make = get_task(name).make_examples
    assert make is not None
    assert make(50, 7) == make(50, 7)
    assert make(50, 7) != make(50, 8)
    assert make(0, 7) == []


# --- addition ----------------------------------------------------------------------------------------------


def test_addition_references_are_correct_sums_and_prompts_distinct() -> None:
    examples = tasks.make_addition_examples(500, 3)
    d = tasks.ADDITION_MAX_DIGITS
    for ex in examples:
        text = ex.prompt[0]["content"]
        assert text.endswith("=")
        a, b = text[:-1].split("+")
        assert len(a) == len(b) == d  # zero-padded to a fixed width
        assert ex.reference == ex.response == f"{int(a) + int(b):0{d + 1}d}"
    assert len({ex.prompt[0]["content"] for ex in examples}) == 500
    # Operands are uniform in 0..10^d - 1: each leading digit (0 included) about 1/10 of the time.
    leading = Counter(ex.prompt[0]["content"][0] for ex in examples)
    assert set(leading) == set("0123456789") and min(leading.values()) > 500 / 10 * 0.5


def test_addition_small_space_covers_every_problem_then_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "ADDITION_MAX_DIGITS", 1)  # 10 x 10 = 100 possible problems
    examples = tasks.make_addition_examples(150, 0)
    prompts = [ex.prompt[0]["content"] for ex in examples]
    assert len(set(prompts[:100])) == 100  # all distinct while possible
    assert prompts[100:] == prompts[:50]
    assert {len(ex.response) for ex in examples} == {2}  # "3+4=" -> "07", "9+9=" -> "18"


def test_addition_exact_match_arithmetic() -> None:
    examples = [
        _ex("1+2=", "3", "3"),
        _ex("10+5=", "15", "15"),
        _ex("9+9=", "18", "18"),
        _ex("0+0=", "0", "0"),
    ]
    generations = ["3", " 15\n", "81", "0"]  # right, right after stripping, wrong, right -> 3/4
    score = get_task("addition").score
    assert score(examples, generations) == {"exact_match": 0.75}
    assert score(examples, generations, None)["exact_match"] == 0.75
    with pytest.raises(ValueError):
        score(examples, generations[:3])


# --- grammar: the data distribution ------------------------------------------------------------------------


def test_grammar_distributions_sum_to_one_with_several_answers_and_varied_lengths() -> None:
    all_lengths: set[int] = set()
    for key in tasks.GRAMMAR_KEYS:
        dist = grammar_distribution(key)
        assert math.isclose(sum(dist.values()), 1.0, abs_tol=1e-12)
        assert len(dist) == 2 * tasks.GRAMMAR_MAX_REPEAT >= 4
        assert all(p > 0 for p in dist.values())
        lengths = {len(y) for y in dist}
        assert len(lengths) >= 4
        all_lengths |= lengths
    assert min(all_lengths) == 1 and max(all_lengths) == 16
    assert 10 <= len(tasks.GRAMMAR_KEYS) <= 30


def test_grammar_distribution_closed_form() -> None:
    # w = 2/3, g(k) = 2^-k / (1 - 2^-4) = (8, 4, 2, 1) / 15, so p(u^k) = (16, 8, 4, 2) / 45, p(v^k) = (8, 4, 2, 1) / 45.
    dist = grammar_distribution("ab|c")
    expected = {"ab": 16, "abab": 8, "ababab": 4, "abababab": 2, "c": 8, "cc": 4, "ccc": 2, "cccc": 1}
    assert dist.keys() == expected.keys()
    for y, num in expected.items():
        assert math.isclose(dist[y], num / 45, rel_tol=1e-12)


@pytest.mark.parametrize("bad", ["ab", "AB|c", "abcde|f", "a|b|c", "a|aa", "ab|abab"])
def test_grammar_distribution_rejects_bad_or_ambiguous_keys(bad: str) -> None:
    with pytest.raises(SpinError):
        grammar_distribution(bad)


def test_grammar_examples_empirical_frequencies_match_p_data() -> None:
    n = 16000
    examples = tasks.make_grammar_examples(n, 0)
    by_key: dict[str, Counter[str]] = {}
    for ex in examples:
        assert ex.reference is None and ex.meta == {"key": ex.prompt[0]["content"]}
        by_key.setdefault(ex.meta["key"], Counter())[ex.response] += 1
    # Keys uniform: each ~ n / 16 = 1000 (sd ~ 30).
    assert set(by_key) == set(tasks.GRAMMAR_KEYS)
    assert all(abs(sum(c.values()) - n / len(by_key)) < 150 for c in by_key.values())
    # Pearson chi-square of replies given the key, summed over keys: dof = 16 * (8 - 1) = 112 (sd = sqrt(224) ~ 15).
    chi2, dof = 0.0, 0
    for key, counts in by_key.items():
        dist = grammar_distribution(key)
        assert set(counts) <= set(dist)
        m = sum(counts.values())
        chi2 += sum((counts[y] - m * p) ** 2 / (m * p) for y, p in dist.items())
        dof += len(dist) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)


# --- grammar: the metrics ----------------------------------------------------------------------------------

HALF_HALF = {"a": 0.5, "b": 0.5}


def _fake_distribution(text: str) -> dict[str, float]:
    return {"x": HALF_HALF, "y": HALF_HALF}[text]


def _fake_logp(model: dict[str, dict[str, float]], calls: list[int]) -> tasks.LogpFn:
    def logp_fn(prompts: list[list[Message]], responses: list[str]) -> list[float]:
        calls.append(len(responses))
        return [math.log(model[p[-1]["content"]][r]) for p, r in zip(prompts, responses)]

    return logp_fn


def test_kl_and_tv_exact_against_hand_computed_case() -> None:
    # Prompt "x": p_data = {a: 0.5, b: 0.5}; model q = {a: 0.25, b: 0.5} and 0.25 outside the support.
    #   KL = 0.5 * ln(0.5 / 0.25) + 0.5 * ln(0.5 / 0.5) = 0.5 * ln 2 = 0.34657...
    #   TV = 1/2 (|0.5 - 0.25| + |0.5 - 0.5| + (1 - 0.75)) = 1/2 (0.25 + 0 + 0.25) = 0.25
    calls: list[int] = []
    logp_fn = _fake_logp({"x": {"a": 0.25, "b": 0.5}}, calls)
    examples = [_ex("x", "a"), _ex("x", "b")]
    metrics = distribution_metrics(examples, ["a", "b"], logp_fn, _fake_distribution)
    assert math.isclose(metrics["kl_data_model"], 0.5 * math.log(2), rel_tol=1e-12)
    assert math.isclose(metrics["kl_data_model"], 0.34657359, rel_tol=1e-7)
    assert math.isclose(metrics["neg_kl"], -0.5 * math.log(2), rel_tol=1e-12)
    assert math.isclose(metrics["tv_exact"], 0.25, rel_tol=1e-12)
    assert calls == [2]  # one call, over the support of the one distinct prompt


def test_kl_and_tv_exact_average_over_distinct_prompts() -> None:
    # "x" as above (KL = 0.5 ln 2, TV = 0.25), seen 3 times; "y" with a perfect model (KL = 0, TV = 0), once.
    # Each distinct prompt weighs the same: KL = (0.5 ln 2 + 0) / 2 = 0.25 ln 2, TV = (0.25 + 0) / 2 = 0.125.
    calls: list[int] = []
    logp_fn = _fake_logp({"x": {"a": 0.25, "b": 0.5}, "y": HALF_HALF}, calls)
    examples = [_ex("x"), _ex("y"), _ex("x"), _ex("x")]
    metrics = distribution_metrics(examples, ["a", "a", "a", "a"], logp_fn, _fake_distribution)
    assert math.isclose(metrics["kl_data_model"], 0.25 * math.log(2), rel_tol=1e-12)
    assert math.isclose(metrics["tv_exact"], 0.125, rel_tol=1e-12)
    assert calls == [4]  # one call: 2 distinct prompts x 2 support strings


def test_kl_is_infinite_when_the_model_misses_part_of_the_support() -> None:
    def logp_fn(prompts: list[list[Message]], responses: list[str]) -> list[float]:
        return [0.0 if r == "a" else -math.inf for r in responses]  # q = {a: 1, b: 0}

    metrics = distribution_metrics([_ex("x")], ["a"], logp_fn, _fake_distribution)
    assert metrics["kl_data_model"] == math.inf and metrics["neg_kl"] == -math.inf
    assert math.isclose(metrics["tv_exact"], 0.5)  # 1/2 (0.5 + 0.5 + 0)


def test_tv_samples_valid_rate_and_stderr_on_hand_made_generations() -> None:
    # "x": generations a, a, a, c -> p_hat = {a: 0.75, c: 0.25}; p_data = {a: 0.5, b: 0.5}
    #   TV = 1/2 (|0.75 - 0.5| + |0 - 0.5| + 0.25 [c, outside the support]) = 1/2 (0.25 + 0.5 + 0.25) = 0.5
    # "y": generations a, b -> p_hat = p_data, TV = 0.
    # tv_samples = (0.5 + 0) / 2 = 0.25; stderr = std([0.5, 0], ddof=1) / sqrt(2) = 0.35355 / 1.41421 = 0.25
    # valid_rate = 5 of 6 generations in the support.
    examples = [_ex("x"), _ex("x"), _ex("y"), _ex("x"), _ex("x"), _ex("y")]
    generations = ["a", "a", "a", " c\n", "a", "b"]
    metrics = distribution_metrics(examples, generations, None, _fake_distribution)
    assert metrics.keys() == {"tv_samples", "tv_samples_stderr", "valid_rate"}  # no logp_fn: samples only
    assert math.isclose(metrics["tv_samples"], 0.25, rel_tol=1e-12)
    assert math.isclose(metrics["tv_samples_stderr"], 0.25, rel_tol=1e-12)
    assert math.isclose(metrics["valid_rate"], 5 / 6, rel_tol=1e-12)
    single = distribution_metrics(examples[:2], generations[:2], None, _fake_distribution)
    assert single["tv_samples"] == 0.5 and math.isnan(single["tv_samples_stderr"])  # 1 prompt: no stderr


def test_grammar_score_with_the_true_distribution_as_model() -> None:
    examples = tasks.make_grammar_examples(400, 1)

    def logp_fn(prompts: list[list[Message]], responses: list[str]) -> list[float]:
        return [math.log(grammar_distribution(p[-1]["content"])[r]) for p, r in zip(prompts, responses)]

    task = get_task("grammar")
    generations = [ex.response for ex in examples]  # the data are samples from p_data itself
    metrics = task.score(examples, generations, logp_fn)
    assert set(metrics) == {
        "kl_data_model",
        "neg_kl",
        "tv_exact",
        "tv_samples",
        "tv_samples_stderr",
        "valid_rate",
    }
    assert abs(metrics["kl_data_model"]) < 1e-12 and abs(metrics["tv_exact"]) < 1e-12
    assert metrics[task.primary_metric] == -metrics["kl_data_model"]
    assert metrics["valid_rate"] == 1.0
    assert 0 < metrics["tv_samples"] < 0.3  # ~25 samples a prompt: small but positive (biased upward)
    assert set(task.score(examples, generations)) == {"tv_samples", "tv_samples_stderr", "valid_rate"}


# --- GSM8K-style replies ---------------------------------------------------------------------------------


def test_word_problems_are_gsm8k_style_and_seeded() -> None:
    from spinlm.tasks import (
        calculator_checks,
        ends_with_final_answer,
        final_answer,
        make_word_problem_examples,
    )

    examples = make_word_problem_examples(200, 3)
    assert examples == make_word_problem_examples(200, 3)
    assert len({e.prompt[0]["content"] for e in examples}) == 200  # distinct questions
    for e in examples:
        assert ends_with_final_answer(e.response) and final_answer(e.response) == e.reference
        assert calculator_checks(e.response) and all(calculator_checks(e.response))


def test_gsm8k_metrics_by_hand() -> None:
    from spinlm.tasks import gsm8k_metrics

    examples = [_ex("q1", "4 + 3 = <<4+3=7>>7\n#### 7", "7"), _ex("q2", "#### 1,200", None)]
    generations = [
        "4 + 3 = <<4+3=7>>7 and <<2*2=5>>5\n#### 7\nThe answer is: 7",  # right, but not ending in ####
        "So $1,200.\n#### 1200",  # right (the gold number comes from the real reply), ends in ####
    ]
    m = gsm8k_metrics(examples, generations)
    # exact match 2/2; answer line last in 1 of 2; annotations: 4+3=7 right, 2*2=5 wrong -> 1/2, 2 in 2 replies
    assert m == {
        "answer_exact_match": 1.0,
        "final_answer_rate": 0.5,
        "calc_accuracy": 0.5,
        "calc_per_reply": 1.0,
    }


def test_calculator_checks_evaluate_arithmetic_only() -> None:
    from spinlm.tasks import calculator_checks

    assert calculator_checks("<<12/60=0.2>> <<0.2*50=10>> <<3x4=12>> <<1,000+1=1,001>>") == [True] * 4
    assert calculator_checks("<<2+2=5>> <<__import__('os')=1>> <<1/0=1>> <<=3>>") == [False] * 4
