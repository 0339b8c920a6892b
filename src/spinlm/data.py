"""Data stage: load an SFT dataset and normalise it to `Example`s (a prompt conversation + the real reply).

SPIN needs only an SFT set: prompts x and the dataset's replies y ~ p_data(.|x). Every iteration the
opponent writes its own reply y' to each prompt and the main player learns to prefer y over y'. This module
turns any common SFT layout into that contract, with one code path for every source and format:

- sources: a local .jsonl / .json (a list of rows or {"data": [...]}) / .parquet / .csv file, a `datasets`
  `save_to_disk` folder (a Dataset, or a DatasetDict read at `data.split`), a Hub dataset id, or a local
  copy of a Hub dataset repository (both through `datasets.load_dataset`, with `data.subset` as its
  configuration name). Nothing is ever unpickled.
- formats (auto-detected from the columns after `data.columns` renames them; `data.format` forces one):
  `messages` (OpenAI / UltraChat: [{role, content}], optional system message), `sharegpt`
  (`conversations` of {from: human|gpt|system, value}), `prompt_completion` (TRL: `prompt` string or
  message list + `completion`/`response` string or one assistant message), `alpaca` (`instruction`,
  optional `input` joined with a blank line, `output`). Any row may carry a `system` column.

Departures from the paper. The paper trains on the first turn of 50k UltraChat conversations:
`data.turns=first` does exactly that (prompt = everything before the first assistant reply that follows
a user message); `data.turns=all` makes one Example per such reply, the conversation so far as its prompt
(`turns` only applies to conversation formats; prompt/completion and alpaca rows give one example each).
The paper does not say how it handles bad rows; here every malformed row is a `SpinError` naming the file,
row (1-based line for .jsonl/.csv) and field, an empty real reply included: it would silently become the
chosen side of a pair. Duplicate prompts are kept or dropped (`data.duplicates`), counted either way.
With `data.answer_pattern` set (a preset such as `gsm8k`, or a regex), `reference` is the answer found in the
reply by `spinlm.answers.find_answer`, normalised as generations are; rows without a match get None.

    examples, stats = load_sft_examples(cfg.data, seed=cfg.seed)
    examples = apply_prompt_limit(examples, count_tokens, cfg.data.max_prompt_tokens, cfg.data.long_prompts, stats)
    train, held_out = split_holdout(examples, cfg.data.eval_size, cfg.seed)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from spinlm.answers import compile_answer_pattern, find_answer
from spinlm.config import DataConfig
from spinlm.errors import SpinError

Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": str}


@dataclass(frozen=True)
class Example:
    """One SFT example: the conversation up to the reply (`prompt`) and the dataset's reply (`response`).

    `response` is y ~ p_data(.|x) in the paper: the *real* answer, the chosen side of every SPIN pair.
    `reference` is an optional gold answer for a task metric (for GSM8K, the number after `####`).
    """

    prompt: list[Message]
    response: str
    reference: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


FORMATS = ("messages", "sharegpt", "prompt_completion", "alpaca")
CANONICAL_COLUMNS = (
    "messages", "conversations", "prompt", "completion", "response", "instruction", "input", "output", "system",
)  # fmt: skip
FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
_MAP_HINT = (
    "map your columns with data.columns (e.g. {prompt: question, response: answer}) or set data.format"
)
Row = tuple[str, int, Any]  # (where, 1-based row or line number, raw row)


@dataclass
class DataStats:
    """What loading did to the data; every row that was dropped or changed is counted here."""

    rows_read: int = 0
    examples: int = 0
    duplicates_found: int = 0
    duplicates_dropped: int = 0
    prompts_truncated: int = 0
    prompts_dropped: int = 0
    missing_reference: int = 0
    format: str = ""
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompt_key(messages: list[Message]) -> str:
    """A stable string key for a prompt (for duplicates, hold-out splits and caches)."""
    return json.dumps([[m["role"], m["content"]] for m in messages], separators=(",", ":"))


# --------------------------------------------------------------------------------------------------------
# Loading


def load_sft_examples(cfg: DataConfig, seed: int = 0) -> tuple[list[Example], DataStats]:
    """Read `cfg.path`, validate every row, normalise to Examples; then duplicates and `max_samples`.

    `max_samples` keeps a random subset of that many examples (rows, with turns=first) chosen with
    `seed`, in file order. Raises SpinError for anything wrong with the data (see the module docstring).
    """
    _check_settings(cfg)
    pattern = compile_answer_pattern(cfg.answer_pattern)
    source, rows = _open_source(cfg)
    stats = DataStats(source=source)
    fmt = None if cfg.format == "auto" else cfg.format
    examples: list[Example] = []
    for where, number, raw in rows:
        stats.rows_read += 1
        row = _map_columns(raw, cfg.columns, where)
        if fmt is None:
            fmt = _detect_format(set(row) | set(cfg.columns), where, raw)
        examples += _row_examples(row, where, number, fmt, cfg, pattern)
    if not examples:
        raise SpinError(f"{source}: no usable rows (the dataset is empty); point data.path at one with rows")
    stats.format = fmt or ""
    examples = _dedupe(examples, cfg.duplicates, stats)
    if cfg.max_samples is not None and cfg.max_samples < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), cfg.max_samples))
        examples = [examples[i] for i in keep]
    stats.examples = len(examples)
    if pattern is not None:
        stats.missing_reference = sum(ex.reference is None for ex in examples)
    return examples, stats


def _check_settings(cfg: DataConfig) -> None:
    if not cfg.path:
        raise SpinError("data.path is not set; point it at a data file, a dataset folder or a Hub id")
    if cfg.format not in ("auto", *FORMATS):
        raise SpinError(f"unknown data.format {cfg.format!r}; use one of auto, {', '.join(FORMATS)}")
    for canon, src in cfg.columns.items():
        if canon not in CANONICAL_COLUMNS:
            names = ", ".join(CANONICAL_COLUMNS)
            raise SpinError(
                f"data.columns key {canon!r} is not one of {names}; it maps {{canonical: your column}}"
            )
        if not isinstance(src, str):
            raise SpinError(f"data.columns.{canon} must be a column name (a string); got {src!r}")


def _map_columns(raw: Any, columns: dict[str, str], where: str) -> dict[str, Any]:
    """The row under canonical column names (`columns` maps canonical name -> dataset column)."""
    if not isinstance(raw, dict):
        raise SpinError(f"{where}: a row must be an object holding the dataset's columns; got {_kind(raw)}")
    if not columns:
        return raw
    sources = set(columns.values())
    row = {k: v for k, v in raw.items() if k not in sources}
    row.update({canon: raw[src] for canon, src in columns.items() if src in raw})
    return row


def _detect_format(names: set[str], where: str, raw: dict[str, Any]) -> str:
    """The format from the canonical names a row has (or that data.columns maps onto)."""
    if "messages" in names:
        return "messages"
    if "conversations" in names:
        return "sharegpt"
    if "prompt" in names and ("completion" in names or "response" in names):
        return "prompt_completion"
    if "instruction" in names and "output" in names:
        return "alpaca"
    raise SpinError(
        f"{where}: cannot tell the data format from the columns found ({_columns(raw)}); expected messages, "
        f"conversations, prompt + completion/response, or instruction + output; {_MAP_HINT}"
    )


# --------------------------------------------------------------------------------------------------------
# Sources: each yields (where, number, raw row); `where` is "file:line" for line-based files.


def _open_source(cfg: DataConfig) -> tuple[str, Iterator[Row]]:
    assert cfg.path is not None
    path = Path(cfg.path).expanduser()
    if path.is_file():
        readers = {".jsonl": jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows, ".csv": _csv_rows}
        suffix = path.suffix.lower()
        if suffix not in readers:
            raise SpinError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_TYPES)}")
        return str(path), readers[suffix](path)
    subset = f", subset {cfg.subset}" if cfg.subset else ""
    if path.is_dir() and _is_saved_dataset(path):
        label = f"{path} (split {cfg.split})"
        return label, _dataset_rows(_load_folder(path, cfg.split), label)
    if path.is_dir():  # a local copy of a Hub dataset repository: datasets reads it as it reads the Hub
        label = f"{path} (split {cfg.split}{subset})"
        return label, _dataset_rows(_load_hub(cfg, str(path)), label)
    if _looks_like_path(cfg.path):
        raise SpinError(f"data file not found: {cfg.path} (check data.path; Hub ids look like 'owner/name')")
    label = f"{cfg.path} (split {cfg.split}{subset})"
    return label, _dataset_rows(_load_hub(cfg, cfg.path), label)


def _looks_like_path(text: str) -> bool:
    return text.lower().endswith(FILE_TYPES) or text.startswith(("/", ".", "~")) or text.count("/") > 1


def _decode(data: bytes, path: Path, lineno: int = 0, offset: int = 0) -> str:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = lineno or data.count(b"\n", 0, e.start) + 1
        msg = f"not valid UTF-8 (bad byte at offset {offset + e.start} of the file); re-save it as UTF-8"
        raise SpinError(f"{path}:{line}: {msg}") from e


def _parse_json(text: str, path: Path, lineno: int = 0) -> Any:
    what = "each line of a .jsonl file must be one JSON object" if lineno else "fix the file"
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        msg = f"not valid JSON ({e.msg} at column {e.colno}); {what}"
        raise SpinError(f"{path}:{lineno or e.lineno}: {msg}") from e
    except (ValueError, RecursionError) as e:  # e.g. an integer too long to convert, absurd nesting
        raise SpinError(f"{path}:{lineno or 1}: not valid JSON ({_short(e)}); {what}") from e


def jsonl_rows(path: Path) -> Iterator[Row]:
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            text = _decode(raw, path, lineno, offset)
            offset += len(raw)
            if text.strip():
                yield f"{path}:{lineno}", lineno, _parse_json(text, path, lineno)


def _json_rows(path: Path) -> Iterator[Row]:
    value = _parse_json(_decode(path.read_bytes(), path), path)
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise SpinError(f'{path}: expected a JSON list of rows or {{"data": [...]}}; got {_kind(value)}')
    for i, row in enumerate(value, 1):
        yield f"{path} row {i}", i, row


def _csv_rows(path: Path) -> Iterator[Row]:
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    text = _decode(path.read_bytes(), path)
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey="_extra_fields")
    try:
        for row in reader:
            yield f"{path}:{reader.line_num}", reader.line_num, row
    except csv.Error as e:
        raise SpinError(f"{path}:{reader.line_num}: not valid CSV ({e}); fix the file") from e


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield f"{path} row {number}", number, row
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise SpinError(f"{path}: not a readable parquet file ({_short(e)}); re-export it") from e


def _is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a `datasets` save_to_disk folder (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_folder(path: Path, split: str) -> Any:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # any failure of a third-party loader is a data problem for the user
        raise SpinError(f"{path}: not a readable `datasets` folder ({_short(e)}); re-save it") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SpinError(f"{path}: no split '{split}' here; splits: {', '.join(ds)}; set data.split")
        ds = ds[split]
    return ds


def _load_hub(cfg: DataConfig, source: str) -> Any:
    """`source` (a Hub id, or a local copy of a Hub dataset repository) through datasets.load_dataset.

    `data.subset` is passed as `name=`: a dataset with several configurations (openai/gsm8k: main,
    socratic) and no default stops with "Config name is missing" without it.
    """
    import datasets

    try:
        return datasets.load_dataset(source, name=cfg.subset, split=cfg.split, revision=cfg.revision)
    except Exception as e:
        text = " ".join(str(e).split())
        configs = re.search(r"available configs: (\[[^\]]*\])", text)
        if configs:  # datasets names the configurations on its second line; _short would drop it
            raise SpinError(
                f"dataset '{source}' has several configurations and data.subset does not pick one of them",
                hint=f"set data.subset to one of {configs.group(1)}",
            ) from e
        if Path(source).is_dir():
            raise SpinError(
                f"could not load dataset '{source}' (a local dataset folder: {_short(e)})",
                hint="check data.path, data.subset and data.split",
            ) from e
        raise SpinError(
            f"could not load dataset '{source}' (not a local file/folder; as a Hub id: {_short(e)})",
            hint="check data.path, data.subset, data.split and data.revision, and the network",
        ) from e


def _dataset_rows(ds: Any, label: str) -> Iterator[Row]:
    number = 0
    for batch in ds.iter(batch_size=1024):
        names = list(batch)
        for i in range(len(batch[names[0]]) if names else 0):
            number += 1
            yield f"{label} row {number}", number, {k: batch[k][i] for k in names}


# --------------------------------------------------------------------------------------------------------
# Rows -> Examples


def _row_examples(
    row: dict[str, Any], where: str, number: int, fmt: str, cfg: DataConfig, pattern: re.Pattern[str] | None
) -> list[Example]:
    def name(canon: str) -> str:  # the user's column name, for messages
        return cfg.columns.get(canon, canon)

    if fmt in ("messages", "sharegpt"):
        col = "messages" if fmt == "messages" else "conversations"
        conv = _conversation(_field(row, col, where, fmt, cfg.columns), where, name(col))
        targets = _turns(conv, cfg.turns, where, name(col))
    elif fmt == "prompt_completion":
        targets = [_prompt_completion(row, where, cfg.columns)]
    else:
        targets = [_alpaca(row, where, cfg.columns)]
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise SpinError(f"{where}: field '{name('system')}' must be a string; got {_kind(system)}")
    system = system or cfg.system_prompt
    out = []
    for turn, (prompt, response, label) in enumerate(targets):
        if not response.strip():
            msg = "it would be the chosen side of SPIN pairs; fill it in or remove the row"
            raise SpinError(f"{where}: field '{label}' (the real response) is empty; {msg}")
        if not prompt[-1]["content"].strip():
            raise SpinError(
                f"{where}: the user message before '{label}' is empty; fill it in or drop the row"
            )
        if system and not any(m["role"] == "system" for m in prompt):
            prompt = [{"role": "system", "content": system}, *prompt]
        meta = {"source": cfg.path, "row": number, "turn": turn}
        out.append(Example(prompt, response, find_answer(response, pattern), meta))
    return out


def _field(row: dict[str, Any], canon: str, where: str, fmt: str, columns: dict[str, str]) -> Any:
    if canon in row:
        return row[canon]
    what = f"column '{columns[canon]}' (mapped to '{canon}')" if canon in columns else f"field '{canon}'"
    raise SpinError(f"{where}: no {what} for format {fmt}; columns found: {_columns(row)}; {_MAP_HINT}")


def _conversation(value: Any, where: str, label: str) -> list[Message]:
    if not isinstance(value, list):
        raise SpinError(f"{where}: field '{label}' must be a list of messages; got {_kind(value)}")
    if not value:
        raise SpinError(
            f"{where}: field '{label}' is an empty list of messages; fill it in or remove the row"
        )
    return [_message(item, where, f"{label}[{i}]") for i, item in enumerate(value)]


def _message(item: Any, where: str, label: str) -> Message:
    """A {role, content} (or sharegpt {from, value}) message, with role aliases normalised."""
    if not isinstance(item, dict):
        raise SpinError(f"{where}: field '{label}' must be an object {{role, content}}; got {_kind(item)}")
    sharegpt = "from" in item and "role" not in item
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    role, content = item.get(role_key), item.get(content_key)
    if not isinstance(role, str):
        raise SpinError(f"{where}: field '{label}.{role_key}' must be a string; got {_kind(role)}")
    if role.lower() not in _ROLES:
        raise SpinError(
            f"{where}: field '{label}.{role_key}' has unknown role {role[:40]!r}; use system, user or assistant "
            "(sharegpt: system, human or gpt)"
        )
    if not isinstance(content, str):
        raise SpinError(f"{where}: field '{label}.{content_key}' must be a string; got {_kind(content)}")
    return {"role": _ROLES[role.lower()], "content": content}


def _turns(conv: list[Message], turns: str, where: str, label: str) -> list[tuple[list[Message], str, str]]:
    """(prompt, reply, field label) for the first (or every) assistant reply that follows a user message."""
    targets = [
        i for i in range(1, len(conv)) if (conv[i - 1]["role"], conv[i]["role"]) == ("user", "assistant")
    ]
    if not targets:
        raise SpinError(
            f"{where}: field '{label}' has no assistant reply following a user message; every row needs at "
            "least one user -> assistant exchange (fix or remove the row)"
        )
    if turns == "first":
        targets = targets[:1]
    return [(conv[:i], conv[i]["content"], f"{label}[{i}].content") for i in targets]


def _prompt_completion(
    row: dict[str, Any], where: str, columns: dict[str, str]
) -> tuple[list[Message], str, str]:
    name = columns.get("prompt", "prompt")
    value = _field(row, "prompt", where, "prompt_completion", columns)
    if isinstance(value, str):
        prompt: list[Message] = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        prompt = _conversation(value, where, name)
        if prompt[-1]["role"] != "user":
            raise SpinError(f"{where}: field '{name}' must end with a user message; got {prompt[-1]['role']}")
    else:
        raise SpinError(f"{where}: field '{name}' must be a string or a list of messages; got {_kind(value)}")
    key = "completion" if "completion" in row else "response"
    name = columns.get(key, key)
    if key not in row:
        raise SpinError(
            f"{where}: no field 'completion' or 'response' for format prompt_completion; columns found: "
            f"{_columns(row)}; {_MAP_HINT}"
        )
    value = row[key]
    if isinstance(value, str):
        return prompt, value, name
    if isinstance(value, list):
        reply = _conversation(value, where, name)
        if len(reply) == 1 and reply[0]["role"] == "assistant":
            return prompt, reply[0]["content"], f"{name}[0].content"
    raise SpinError(
        f"{where}: field '{name}' must be a string or [one assistant message]; got {_kind(value)}"
    )


def _alpaca(row: dict[str, Any], where: str, columns: dict[str, str]) -> tuple[list[Message], str, str]:
    values = {c: _field(row, c, where, "alpaca", columns) for c in ("instruction", "output")}
    values["input"] = row.get("input")
    for c, v in values.items():
        if not isinstance(v, str) and not (c == "input" and v is None):
            raise SpinError(f"{where}: field '{columns.get(c, c)}' must be a string; got {_kind(v)}")
    text = "\n\n".join(v for v in (values["instruction"], values["input"]) if v and v.strip())
    return [{"role": "user", "content": text}], values["output"], columns.get("output", "output")


def _dedupe(examples: list[Example], policy: str, stats: DataStats) -> list[Example]:
    seen: set[str] = set()
    out = []
    for ex in examples:
        key = prompt_key(ex.prompt)
        if key in seen:
            stats.duplicates_found += 1
            if policy == "drop":
                stats.duplicates_dropped += 1
                continue
        seen.add(key)
        out.append(ex)
    return out


def _kind(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "an object", bytes: "bytes"})
    return names.get(type(value), type(value).__name__)


def _columns(row: dict[str, Any]) -> str:
    names = [str(k).replace("\n", "\\n") for k in row]
    return ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "") or "none"


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0][:200] if text else "") or type(e).__name__


# --------------------------------------------------------------------------------------------------------
# Prompt length limit and held-out split


def apply_prompt_limit(
    examples: list[Example],
    count_tokens: Callable[[list[Message]], int],
    max_tokens: int,
    policy: str,
    stats: DataStats,
) -> list[Example]:
    """Drop or truncate prompts longer than `max_tokens` (as measured by `count_tokens`), counting both.

    truncate: drop the oldest non-system messages first (never the leading system message; the kept history
    starts at a user message); if the last user message alone is still too long, cut the START of its
    content and keep the end (the question usually comes last). A prompt that cannot fit even then (the
    system message alone is too long) is dropped and counted as dropped. Updates `stats.examples`.
    """
    if policy not in ("truncate", "drop"):
        raise SpinError(f"unknown data.long_prompts {policy!r}; use truncate or drop")
    out = []
    for ex in examples:
        if count_tokens(ex.prompt) <= max_tokens:
            out.append(ex)
            continue
        prompt = _truncate(ex.prompt, count_tokens, max_tokens) if policy == "truncate" else None
        if prompt is None:
            stats.prompts_dropped += 1
            if ex.reference is None and stats.missing_reference > 0:
                stats.missing_reference -= 1
            continue
        stats.prompts_truncated += 1
        out.append(replace(ex, prompt=prompt, meta={**ex.meta, "prompt_truncated": True}))
    stats.examples = len(out)
    return out


def _truncate(
    prompt: list[Message], count_tokens: Callable[[list[Message]], int], max_tokens: int
) -> list[Message] | None:
    system = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    rest = list(prompt[len(system) :])
    if not rest or rest[-1]["role"] != "user":
        return None
    while len(rest) > 1:
        rest = rest[1:]
        while len(rest) > 1 and rest[0]["role"] != "user":
            rest = rest[1:]
        if count_tokens(system + rest) <= max_tokens:
            return system + rest
    text = rest[0]["content"]

    def fits(start: int) -> bool:
        return count_tokens(system + [{"role": "user", "content": text[start:]}]) <= max_tokens

    lo, hi = 0, len(text)  # invariant: fits(hi), not fits(lo) (the whole message was checked above)
    if not fits(hi):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    kept = text[hi:].lstrip()  # a cut mid-text starts cleanly
    return system + [{"role": "user", "content": kept}] if kept else None


def split_holdout(examples: list[Example], eval_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held_out): `eval_size` distinct prompts held out, with every example that has them.

    Prompts are ranked by sha256(seed, prompt), so a prompt's side depends only on the seed and the prompt
    itself, not on the order of the data or on which other prompts are present. Held-out prompts are
    never seen in training.
    """
    if eval_size <= 0:
        return list(examples), []
    keys = [prompt_key(ex.prompt) for ex in examples]
    distinct = list(dict.fromkeys(keys))
    if eval_size >= len(distinct):
        raise SpinError(
            f"data.eval_size={eval_size} leaves no prompts to train on: the data has only {len(distinct)} "
            "distinct prompts; lower data.eval_size"
        )
    ranked = sorted(distinct, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest())
    held = set(ranked[:eval_size])
    train = [ex for ex, k in zip(examples, keys) if k not in held]
    held_out = [ex for ex, k in zip(examples, keys) if k in held]
    return train, held_out
