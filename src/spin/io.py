"""Crash-safe files: every write goes to a temporary name and is renamed into place, so a file either
exists whole or not at all; a stage is marked done by a marker file written after all its outputs.

A full disk or an unwritable folder becomes a one-line `SpinError` naming the path.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from spin.errors import SpinError


def _os_error(path: Path, e: OSError) -> SpinError:
    if e.errno == errno.ENOSPC:
        return SpinError(
            f"no space left on device while writing {path}", hint="free disk space, then rerun to resume"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SpinError(f"cannot write {path}: permission denied", hint="choose a writable output_dir")
    return SpinError(f"cannot write {path}: {e.strerror or e}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via `path.tmp` + fsync + rename (POSIX-atomic)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise _os_error(path, e) from None


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one line (for logs only: a torn last line is skipped by `read_jsonl_tolerant`)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=_jsonable) + "\n")
    except OSError as e:
        raise _os_error(Path(path), e) from None


def read_jsonl_tolerant(path: Path) -> list[dict[str, Any]]:
    """Read a log written by `append_jsonl`, skipping a torn last line left by a kill."""
    rows: list[dict[str, Any]] = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def mark_done(stage_dir: Path, stage: str) -> None:
    atomic_write_text(Path(stage_dir) / f".{stage}.done", "ok\n")


def is_done(stage_dir: Path, stage: str) -> bool:
    return (Path(stage_dir) / f".{stage}.done").exists()


def check_writable(path: Path) -> None:
    """Fail early, before any work, if the run folder cannot be created or written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise _os_error(path, e) from None


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
