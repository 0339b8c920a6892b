"""Tests for spinlm.data: every source and format, turns, column mapping, answers, splits, limits, bad inputs."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest

from spinlm.config import DataConfig
from spinlm.data import (
    DataStats,
    Example,
    Message,
    apply_prompt_limit,
    load_sft_examples,
    prompt_key,
    split_holdout,
)
from spinlm.errors import SpinError

GSM8K = Path(__file__).resolve().parents[1] / "../shared/data/gsm8k/train.jsonl"

SYSTEM = {"role": "system", "content": "Be brief."}
U1, A1 = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}
U2, A2 = {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}
CHAT = {"messages": [SYSTEM, U1, A1, U2, A2]}


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _load(path: Path, **kw: Any) -> tuple[list[Example], DataStats]:
    return load_sft_examples(DataConfig(path=str(path), **kw))


def _user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


# --- formats and turns ---------------------------------------------------------------------------------------


def test_messages_first_turn_is_the_paper_setting(tmp_path: Path) -> None:
    examples, stats = _load(_jsonl(tmp_path / "rows.jsonl", [CHAT, {"messages": [U2, A2]}]))
    assert [e.prompt for e in examples] == [[SYSTEM, U1], [U2]]
    assert [e.response for e in examples] == ["Hello.", "4"]
    assert examples[0].reference is None and examples[0].meta["row"] == 1 and examples[1].meta["row"] == 2
    assert (stats.rows_read, stats.examples, stats.format) == (2, 2, "messages")
    assert stats.source.endswith("rows.jsonl")


def test_messages_all_turns_gives_one_example_per_reply(tmp_path: Path) -> None:
    examples, _ = _load(_jsonl(tmp_path / "rows.jsonl", [CHAT]), turns="all")
    assert [e.prompt for e in examples] == [[SYSTEM, U1], [SYSTEM, U1, A1, U2]]
    assert [e.response for e in examples] == ["Hello.", "4"]
    assert [e.meta["turn"] for e in examples] == [0, 1]


def test_sharegpt_format(tmp_path: Path) -> None:
    conv = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi?"},
        {"from": "gpt", "value": "Hello."},
    ]
    conv += [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]
    examples, stats = _load(_jsonl(tmp_path / "rows.jsonl", [{"conversations": conv}]), turns="all")
    assert stats.format == "sharegpt"
    assert [e.prompt for e in examples] == [[SYSTEM, U1], [SYSTEM, U1, A1, U2]]


def test_prompt_completion_string_and_conversational(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Hi?", "completion": "Hello."},
        {"prompt": [SYSTEM, U1, A1, U2], "completion": [A2]},
        {"prompt": "2+2?", "response": "4"},
    ]
    examples, stats = _load(_jsonl(tmp_path / "rows.jsonl", rows), turns="all")
    assert stats.format == "prompt_completion"
    assert [(e.prompt, e.response) for e in examples] == [
        ([U1], "Hello."),
        ([SYSTEM, U1, A1, U2], "4"),
        ([U2], "4"),
    ]


def test_alpaca_format_joins_input(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Add.", "input": "2 and 2", "output": "4"},
        {"instruction": "Greet.", "input": "", "output": "Hello."},
        {"instruction": "Count.", "output": "1 2 3", "system": "Be brief."},
    ]
    examples, stats = _load(_jsonl(tmp_path / "rows.jsonl", rows))
    assert stats.format == "alpaca"
    assert [e.prompt for e in examples] == [
        _user("Add.\n\n2 and 2"),
        _user("Greet."),
        [SYSTEM, *_user("Count.")],
    ]


def test_system_prompt_is_prepended_only_when_missing(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "rows.jsonl", [CHAT, {"messages": [U2, A2]}])
    examples, _ = _load(path, system_prompt="You are SPIN.")
    assert examples[0].prompt == [SYSTEM, U1]
    assert examples[1].prompt == [{"role": "system", "content": "You are SPIN."}, U2]


def test_format_override_picks_the_columns(tmp_path: Path) -> None:
    row = {"messages": [U1, A1], "prompt": "2+2?", "response": "4"}
    path = _jsonl(tmp_path / "rows.jsonl", [row])
    assert _load(path)[0][0].response == "Hello."
    examples, stats = _load(path, format="prompt_completion")
    assert (examples[0].response, stats.format) == ("4", "prompt_completion")


# --- sources ---------------------------------------------------------------------------------------------------


def test_json_file_list_or_data_key(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text(json.dumps([CHAT]), encoding="utf-8")
    (tmp_path / "dict.json").write_text(json.dumps({"data": [CHAT]}), encoding="utf-8")
    for name in ("list.json", "dict.json"):
        examples, _ = _load(tmp_path / name)
        assert examples[0].prompt == [SYSTEM, U1]


def test_parquet_file(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([CHAT, {"messages": [U2, A2]}]), tmp_path / "rows.parquet")
    examples, stats = _load(tmp_path / "rows.parquet")
    assert [e.prompt for e in examples] == [[SYSTEM, U1], [U2]] and stats.rows_read == 2


def test_csv_file(tmp_path: Path) -> None:
    with (tmp_path / "rows.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["question", "answer"], ["Hi?", "Hello."], ["2+2?", "It is\n#### 4"]])
    examples, _ = _load(
        tmp_path / "rows.csv",
        columns={"prompt": "question", "response": "answer"},
        answer_pattern=r"####\s*(.+)$",
    )
    assert [(e.prompt, e.response, e.reference) for e in examples] == [
        ([U1], "Hello.", None),
        ([U2], "It is\n#### 4", "4"),
    ]


def test_save_to_disk_folder_dataset_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list([CHAT]).save_to_disk(str(tmp_path / "ds"))
    examples, stats = _load(tmp_path / "ds")
    assert examples[0].prompt == [SYSTEM, U1] and "row 1" not in stats.source
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"messages": [U2, A2]}])}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert _load(tmp_path / "dd")[0][0].response == "4"
    with pytest.raises(SpinError, match=r"dd: no split 'test' here; splits: train; set data.split"):
        _load(tmp_path / "dd", split="test")


def test_hub_id_failure_is_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("no network here")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        SpinError,
        match=r"could not load dataset 'someone/sft' \(not a local file/folder; as a Hub id: no network",
    ):
        load_sft_examples(DataConfig(path="someone/sft"))


# --- columns, answers, sampling, duplicates ---------------------------------------------------------------------


def test_column_mapping_and_answer_pattern(tmp_path: Path) -> None:
    rows = [
        {"question": "Sum?", "answer": "2 + 70 = 72\n#### 72"},
        {"question": "Big?", "answer": "so\n####  1,234 \n"},
        {"question": "None?", "answer": "no marker here"},
    ]
    cfg = DataConfig(
        path=str(_jsonl(tmp_path / "gsm.jsonl", rows)), columns={"prompt": "question", "response": "answer"}
    )
    cfg.answer_pattern = r"####\s*(.+)$"
    examples, stats = load_sft_examples(cfg)
    assert [e.reference for e in examples] == ["72", "1234", None]
    assert examples[0].prompt == _user("Sum?") and stats.missing_reference == 1


def test_max_samples_is_a_deterministic_random_subset(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "rows.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(30)])
    cfg = DataConfig(path=str(path), max_samples=5)
    first, stats = load_sft_examples(cfg, seed=1)
    again, _ = load_sft_examples(cfg, seed=1)
    other, _ = load_sft_examples(cfg, seed=2)
    assert first == again and first != other and len(first) == 5
    assert [e.meta["row"] for e in first] == sorted(e.meta["row"] for e in first)  # file order kept
    assert (stats.rows_read, stats.examples) == (30, 5)


@pytest.mark.parametrize(("policy", "kept"), [("keep", 3), ("drop", 2)])
def test_duplicate_prompts_are_counted(tmp_path: Path, policy: str, kept: int) -> None:
    rows = [
        {"prompt": "q", "completion": "a"},
        {"prompt": "q", "completion": "b"},
        {"prompt": "r", "completion": "c"},
    ]
    examples, stats = _load(_jsonl(tmp_path / "rows.jsonl", rows), duplicates=policy)
    assert len(examples) == kept == stats.examples and stats.duplicates_found == 1
    assert stats.duplicates_dropped == (1 if policy == "drop" else 0)
    assert stats.to_dict()["duplicates_found"] == 1


# --- held-out split and prompt limit ----------------------------------------------------------------------------


def test_split_holdout_is_disjoint_by_prompt_and_deterministic() -> None:
    examples = [Example(_user(f"q{i % 10}"), f"a{i}") for i in range(30)]  # 10 prompts, 3 replies each
    train, held = split_holdout(examples, 3, seed=0)
    held_keys = {prompt_key(e.prompt) for e in held}
    assert len(held_keys) == 3 and len(held) == 9 and len(train) == 21
    assert held_keys.isdisjoint(prompt_key(e.prompt) for e in train)
    assert split_holdout(examples, 3, seed=0) == (train, held)
    assert split_holdout(list(reversed(examples)), 3, seed=0)[1] == list(reversed(held))  # order-independent
    assert split_holdout(examples, 0, seed=0) == (examples, [])
    with pytest.raises(SpinError, match=r"data.eval_size=10 .* only 10 distinct prompts"):
        split_holdout(examples, 10, seed=0)


def _words(messages: list[Message]) -> int:
    return sum(len(m["content"].split()) for m in messages)


def test_prompt_limit_truncate_drops_oldest_turns_then_keeps_the_end() -> None:
    history = [SYSTEM, _user("one two three")[0], {"role": "assistant", "content": "four five"}]
    examples = [
        Example(_user("short"), "r"),
        Example([*history, *_user("six seven")], "r"),  # 9 words: drop the old turn, keep system + last
        Example(_user("a b c d e f g h"), "r"),  # 8 words in one message: keep the last 4
    ]
    stats = DataStats()
    out = apply_prompt_limit(examples, _words, 4, "truncate", stats)
    assert [e.prompt for e in out] == [_user("short"), [SYSTEM, *_user("six seven")], _user("e f g h")]
    assert (stats.prompts_truncated, stats.prompts_dropped, stats.examples) == (2, 0, 3)
    assert out[1].meta["prompt_truncated"] is True
    too_long_system = [Example([{"role": "system", "content": "x " * 9}, *_user("hi")], "r")]
    assert apply_prompt_limit(too_long_system, _words, 4, "truncate", stats) == []
    assert stats.prompts_dropped == 1


def test_long_prompts_dropped_are_counted() -> None:
    examples = [Example(_user("short"), "r"), Example(_user("far too long a prompt"), "r", None)]
    stats = DataStats(missing_reference=2)
    out = apply_prompt_limit(examples, _words, 3, "drop", stats)
    assert out == examples[:1] and (stats.prompts_dropped, stats.examples, stats.missing_reference) == (
        1,
        1,
        1,
    )
    with pytest.raises(SpinError, match=r"data.long_prompts 'cut'"):
        apply_prompt_limit(examples, _words, 3, "cut", stats)


# --- bad inputs: one test each ---------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpinError, match=r"data file not found: .*missing\.jsonl \(check data.path"):
        _load(tmp_path / "missing.jsonl")


def test_bad_json_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(CHAT) + "\n\n" + '{"messages": [\n', encoding="utf-8")
    with pytest.raises(SpinError, match=r"rows\.jsonl:3: not valid JSON \(.* at column \d+\); each line"):
        _load(path)


def test_bad_json_file_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "rows.json").write_text('[\n{"prompt": "q",\n "completion": }\n]', encoding="utf-8")
    with pytest.raises(SpinError, match=r"rows\.json:3: not valid JSON"):
        _load(tmp_path / "rows.json")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"messages": [U1, {"role": "assistant", "content": 7}]},
            r"field 'messages\[1\]\.content' must be a string; got a number",
        ),
        ({"messages": "Hi?"}, r"field 'messages' must be a list of messages; got a string"),
        ({"messages": [U1, ["assistant", "x"]]}, r"field 'messages\[1\]' must be an object"),
        (
            {"messages": [U1, {"role": "bot", "content": "x"}]},
            r"field 'messages\[1\]\.role' has unknown role 'bot'",
        ),
        (
            {"prompt": 3, "completion": "x"},
            r"field 'prompt' must be a string or a list of messages; got a number",
        ),
        (
            {"prompt": "q", "completion": [U1]},
            r"field 'completion' must be a string or \[one assistant message\]",
        ),
        ({"instruction": "q", "input": 1, "output": "x"}, r"field 'input' must be a string; got a number"),
        ({"messages": [U1, A1], "system": ["x"]}, r"field 'system' must be a string; got a list"),
        (["q", "a"], r"a row must be an object .*; got a list"),
    ],
)
def test_wrong_types(tmp_path: Path, row: Any, message: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("\n" + json.dumps(row) + "\n", encoding="utf-8")  # line 2: blank lines count
    with pytest.raises(SpinError, match=rf"rows\.jsonl:2: {message}"):
        _load(path)


def test_missing_fields_list_columns_and_suggest_mapping(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "rows.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": "q2", "answer": "a2"}]
    )
    with pytest.raises(
        SpinError,
        match=r"rows\.jsonl:2: no field 'completion' or 'response' .*columns found: prompt, answer; .*data\.columns",
    ):
        _load(path)
    path = _jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        SpinError,
        match=r"gsm\.jsonl:1: cannot tell the data format from the columns found \(question, answer\).*data\.columns",
    ):
        _load(path)
    with pytest.raises(SpinError, match=r"gsm\.jsonl:1: no column 'query' \(mapped to 'prompt'\)"):
        _load(path, columns={"prompt": "query", "response": "answer"})


def test_reversed_column_mapping(tmp_path: Path) -> None:
    with pytest.raises(
        SpinError,
        match=r"data.columns key 'question' is not one of messages, .*; it maps {canonical: your column}",
    ):
        _load(_jsonl(tmp_path / "rows.jsonl", [CHAT]), columns={"question": "prompt"})


def test_empty_response(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "rows.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": "q2", "completion": "  "}]
    )
    with pytest.raises(
        SpinError, match=r"rows\.jsonl:2: field 'completion' \(the real response\) is empty; .*remove the row"
    ):
        _load(path)


def test_no_assistant_reply(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "rows.jsonl", [{"messages": [SYSTEM, U1]}])
    with pytest.raises(
        SpinError, match=r"rows\.jsonl:1: field 'messages' has no assistant reply following a user message"
    ):
        _load(path)


def test_no_usable_rows(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(SpinError, match=r"rows\.jsonl: no usable rows"):
        _load(path)


def test_non_utf8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    first = (json.dumps(CHAT) + "\n").encode()
    path.write_bytes(first + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    offset = len(first) + len(b'{"prompt": "caf')
    with pytest.raises(
        SpinError, match=rf"rows\.jsonl:2: not valid UTF-8 \(bad byte at offset {offset} of the file\)"
    ):
        _load(path)


def test_unsupported_file_type_and_json_shape(tmp_path: Path) -> None:
    (tmp_path / "rows.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(SpinError, match=r"rows\.txt: unsupported file type '\.txt'; use one of \.jsonl"):
        _load(tmp_path / "rows.txt")
    (tmp_path / "rows.json").write_text('{"rows": []}', encoding="utf-8")
    with pytest.raises(SpinError, match=r"rows\.json: expected a JSON list of rows"):
        _load(tmp_path / "rows.json")


def test_unknown_format_override(tmp_path: Path) -> None:
    cfg = DataConfig(path=str(_jsonl(tmp_path / "rows.jsonl", [CHAT])))
    cfg.format = "xml"  # DataConfig rejects it at build time; the loader checks again
    with pytest.raises(SpinError, match=r"unknown data.format 'xml'; use one of auto, messages"):
        load_sft_examples(cfg)


# --- the real GSM8K training file -------------------------------------------------------------------------------


def test_gsm8k_train_file() -> None:
    if not GSM8K.is_file():
        pytest.skip(f"GSM8K train file not found at {GSM8K.resolve()} (shared data not present)")
    cfg = DataConfig(
        path=str(GSM8K), columns={"prompt": "question", "response": "answer"}, answer_pattern=r"####\s*(.+)$"
    )
    examples, stats = load_sft_examples(cfg)
    assert (stats.rows_read, stats.examples, stats.missing_reference) == (7473, 7473, 0)
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", e.reference or "") for e in examples)
    assert examples[0].reference == "72" and examples[0].prompt[0]["role"] == "user"
