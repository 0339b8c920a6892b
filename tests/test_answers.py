"""Answer extraction (spinlm.answers): presets, line-by-line regexes, number normalisation, and the per-answer
file a run keeps so a user can see why a reply scored 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spinlm.answers import compile_answer_pattern, extract_answer, find_answer, normalize_answer
from spinlm.config import DataConfig
from spinlm.data import Example, load_sft_examples
from spinlm.errors import SpinError
from spinlm.evaluation import answer_rows

SMOLLM_STYLE = "Natalia sold 48 + 24 = 72 clips.\n#### 72\nThe answer is: 72"


@pytest.mark.parametrize("pattern", ["gsm8k", r"####\s*(.+)$", r"####\s*(.+)"])
def test_gsm8k_answer_is_the_number_after_the_marker_not_the_lines_after_it(pattern: str) -> None:
    compiled = compile_answer_pattern(pattern)
    assert extract_answer("#### 3\nThe answer is: 3", compiled) == "3"
    assert extract_answer(SMOLLM_STYLE, compiled) == "72"
    assert extract_answer("So 72.\n#### 72\nThe answer is: 72", compiled) == "72"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234", "1234"),
        ("$1,234.50", "1234.5"),
        ("72.", "72"),
        (" 72.0 ", "72"),
        ("-3", "-3"),
        ("abc", "abc"),
    ],
)
def test_numbers_are_normalised(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_last_number_preset_and_fallback() -> None:
    last = compile_answer_pattern("last_number")
    assert extract_answer("first 3, then -5.", last) == "-5"
    assert extract_answer("it costs $12,000.", last) == "12000"
    # A generation without the marker is scored on its last number; the gold side needs the marker.
    gsm8k = compile_answer_pattern("gsm8k")
    assert extract_answer("The answer is 8.", gsm8k) == "8"
    assert find_answer("The answer is 8.", gsm8k) is None
    assert extract_answer("no digits", gsm8k) is None


def test_bad_patterns_are_one_line_errors_at_config_time() -> None:
    with pytest.raises(SpinError, match=r"data.answer_pattern '\(x' is not a valid regex"):
        DataConfig(answer_pattern="(x")
    with pytest.raises(SpinError, match=r"needs a \(group\) around the answer"):
        DataConfig(answer_pattern="####")


def test_gold_answers_with_the_preset(tmp_path: Path) -> None:
    rows = [
        {"question": "Sum?", "answer": "2 + 70 = 72\n#### 72"},
        {"question": "Big?", "answer": "so\n#### $1,234.00\nThe answer is: 1234"},
        {"question": "None?", "answer": "no marker here 5"},
    ]
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = DataConfig(
        path=str(path), columns={"prompt": "question", "response": "answer"}, answer_pattern="gsm8k"
    )
    examples, stats = load_sft_examples(cfg)
    assert [e.reference for e in examples] == ["72", "1234", None] and stats.missing_reference == 1


def test_answer_rows_show_what_was_extracted() -> None:
    examples = [
        Example([{"role": "user", "content": "q1"}], "#### 3", reference="3"),
        Example([{"role": "user", "content": "q2"}], "#### 4", reference="4"),
        Example([{"role": "user", "content": "q3"}], "free text", reference=None),
    ]
    rows = answer_rows(examples, ["#### 3\nThe answer is: 3", "I think 5", "x"], "gsm8k")
    assert [(r["prompt"], r["extracted"], r["correct"]) for r in rows] == [
        ("q1", "3", True),
        ("q2", "5", False),
    ]
    assert rows[1]["answer"] == "I think 5" and rows[1]["reference"] == "4"
