"""Answer extraction for exact-match scoring: the gold answer in a dataset reply and the answer in a generation.

`data.answer_pattern` is a preset name or a regex whose first group is the answer:

    gsm8k        the number after `####` ("So 72.\\n#### 72\\nThe answer is: 72" -> "72")
    last_number  the last number in the text
    REGEX        e.g. 'Answer:\\s*(.+)': searched line by line (`.` and `$` stop at a line end), and the
                 group is cut to its first line

The extracted text is normalised (`normalize_answer`): surrounding whitespace, `$`, thousands commas and a
trailing `.` are removed, and a number is written canonically ("1,234.50" -> "1234.5", "72.0" -> "72"), so the
gold answer and a generation compare as a user means. A generation in which the pattern finds nothing is
scored on its last number (models often end with "The answer is 72" without the dataset's marker).

    pattern = compile_answer_pattern("gsm8k")
    extract_answer("#### 3\\nThe answer is: 3", pattern)   # "3"
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from spinlm.errors import SpinError

_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?"
ANSWER_PRESETS: dict[str, str] = {
    "gsm8k": rf"####\s*({_NUMBER})",
    "last_number": rf"(?s:.*)(?<![\d.,$-])({_NUMBER})",
}
_NUMBER_RE = re.compile(_NUMBER)
_CANONICAL_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def compile_answer_pattern(pattern: str | None) -> re.Pattern[str] | None:
    """A preset name or a regex with a group, compiled line by line (MULTILINE, no DOTALL); None if unset."""
    if not pattern:
        return None
    source = ANSWER_PRESETS.get(pattern, pattern)
    try:
        compiled = re.compile(source, re.MULTILINE)
    except re.error as e:
        raise SpinError(
            f"data.answer_pattern {pattern!r} is not a valid regex ({e})",
            hint=f"use a preset ({', '.join(ANSWER_PRESETS)}) or a regex such as 'Answer:\\s*(.+)'",
        ) from e
    if compiled.groups < 1:
        raise SpinError(
            f"data.answer_pattern {pattern!r} needs a (group) around the answer",
            hint=f"e.g. '####\\s*(.+)', or a preset: {', '.join(ANSWER_PRESETS)}",
        )
    return compiled


def normalize_answer(text: str) -> str:
    """First line, stripped; `$`, thousands commas and a trailing `.` removed; numbers written canonically."""
    lines = text.strip().splitlines()
    value = lines[0].strip() if lines else ""
    value = value.replace("$", "").strip().rstrip(".").strip()
    plain = re.sub(r"(?<=\d),(?=\d)", "", value)
    if _CANONICAL_NUMBER.fullmatch(plain):
        try:
            number = Decimal(plain)
        except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
            return plain
        if number == number.to_integral_value():
            return str(int(number))
        return format(number.normalize(), "f")
    return value


def find_answer(text: str, pattern: re.Pattern[str] | None) -> str | None:
    """The pattern's first group in `text`, normalised; None when it does not match (the gold side)."""
    if pattern is None:
        return None
    match = pattern.search(text)
    if match is None or match.group(1) is None:
        return None
    return normalize_answer(match.group(1)) or None


def extract_answer(text: str, pattern: re.Pattern[str] | str | None) -> str | None:
    """The answer in a generation: the pattern's group, else the last number in the text (normalised)."""
    compiled = compile_answer_pattern(pattern) if isinstance(pattern, str) else pattern
    found = find_answer(text, compiled)
    if found is not None:
        return found
    numbers = _NUMBER_RE.findall(text)
    return normalize_answer(numbers[-1]) if numbers else None
