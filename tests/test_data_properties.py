"""Property test of spinlm.data's loader on malformed rows: well-formed Examples or a SpinError, nothing else."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spinlm.config import DataConfig
from spinlm.data import CANONICAL_COLUMNS, load_sft_examples
from spinlm.errors import SpinError

KEYS = [*CANONICAL_COLUMNS, "role", "content", "from", "value", "question", "answer"]
ROLES = ["user", "assistant", "system", "human", "gpt", "tool", "", "USER"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.sampled_from(KEYS), kids, max_size=3),
    max_leaves=8,
)
text = st.text(max_size=6)
words = st.text(min_size=1, max_size=6).filter(lambda t: t.strip() != "")
message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": text})
sharegpt = st.fixed_dictionaries({"from": st.sampled_from(ROLES), "value": text})


def _chat(user: str, reply: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


valid_rows = st.one_of(
    st.builds(_chat, words, words),
    st.builds(lambda p, c: {"prompt": p, "completion": c}, words, words),
    st.builds(lambda i, o: {"instruction": i, "output": o}, words, words),
)
messy_rows = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(message | sharegpt | json_values, max_size=4)}),
    st.fixed_dictionaries({"conversations": st.lists(sharegpt | message | json_values, max_size=4)}),
    st.fixed_dictionaries(
        {"prompt": text | st.lists(message, max_size=3) | json_values, "completion": text | json_values}
    ),
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=4),
    json_values,
)
lines = st.lists(
    st.one_of(
        valid_rows.map(lambda r: json.dumps(r).encode()),  # listed twice: runs that succeed are common too
        valid_rows.map(lambda r: json.dumps(r, ensure_ascii=False).encode()),
        messy_rows.map(lambda r: json.dumps(r, ensure_ascii=False).encode()),
        st.binary(max_size=12),  # random bytes: bad UTF-8, bad JSON, or by chance a JSON value
    ),
    max_size=6,
)


def _is_well_formed(ex: Any) -> bool:
    prompt = ex.prompt
    return (
        isinstance(ex.response, str)
        and ex.response.strip() != ""
        and isinstance(prompt, list)
        and len(prompt) > 0
        and all(isinstance(m, dict) and set(m) == {"role", "content"} for m in prompt)
        and all(
            isinstance(m["content"], str) and m["role"] in ("system", "user", "assistant") for m in prompt
        )
        and prompt[-1]["role"] == "user"
    )


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=lines,
    fmt=st.sampled_from(["auto", "auto", "messages", "sharegpt", "prompt_completion", "alpaca"]),
    turns=st.sampled_from(["first", "all"]),
    duplicates=st.sampled_from(["keep", "drop"]),
)
def test_loader_returns_well_formed_examples_or_spin_error(
    rows: list[bytes], fmt: str, turns: str, duplicates: str
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_bytes(b"".join(line + b"\n" for line in rows))
        cfg = DataConfig(path=str(path), format=fmt, turns=turns, duplicates=duplicates)
        try:
            examples, stats = load_sft_examples(cfg)
        except SpinError as e:
            assert str(e) and "\n" not in str(e)  # one line, as the CLI prints it
            return
        assert examples and stats.examples == len(examples) and stats.rows_read >= 1
        assert all(_is_well_formed(ex) for ex in examples)
