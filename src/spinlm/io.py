"""Crash-safe files: every write goes to a temporary name and is renamed into place, so a file either
exists whole or not at all; a stage is marked done by a marker file written after all its outputs.

    atomic_write_text(path, text)      path.tmp + fsync + os.replace (+ fsync of the folder)
    write_json / write_jsonl           the same, for JSON and JSON lines
    append_jsonl / read_jsonl_tolerant logs only: a torn last line left by a kill is skipped when read
    trim_log(path, step)               drop log rows past a trainer checkpoint (no repeats on resume)
    mark_done / is_done                `.STAGE.done` markers
    save_checkpoint(path, write)       a model folder written beside / inside `path`, moved in file by file:
                                       only spin's own files are replaced, nothing else there is deleted
    claim_output_dir / check_output_file   before any work: refuse a foreign non-empty folder, check writable
    fault_point(event)                 a test hook: SIGKILL this process at the n-th `event` (see below)

A full disk, an unwritable folder or a file standing where a folder should be becomes a one-line `SpinError`
naming the path; the temporary file is removed and the earlier version of the file is left untouched.

Fault injection: `SPIN_FAULT_AFTER=event:n[,event:n...]` makes the process kill itself with SIGKILL (no
cleanup, no exception handlers: as `kill -9` or a lost machine) at the n-th occurrence of `event`. The events
are `write` (inside `atomic_write_text`, after the temporary file is complete but before the rename),
`stage` (right after a stage marker), `shard` (after a generation shard is on disk), `train_step` (after an
optimizer step is logged, before its checkpoint is saved) and `checkpoint_swap` (half way through replacing
the trainer checkpoint). tests/test_faults.py uses it to kill real `spinlm run` processes in every phase.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from spinlm.errors import SpinError

FAULT_ENV = "SPIN_FAULT_AFTER"
_fault_counts: Counter[str] = Counter()


def fault_point(event: str) -> None:
    """SIGKILL this process at the n-th `event` when SPIN_FAULT_AFTER asks for it (a no-op otherwise)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    _fault_counts[event] += 1
    for item in spec.split(","):
        name, _, n = item.strip().partition(":")
        if name == event and n.strip().isdigit() and _fault_counts[event] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)


def os_error_message(path: Path | str | None, e: OSError, verb: str = "write") -> SpinError:
    """The one-line SpinError for an OSError met while writing (`verb`) `path` (default: e.filename)."""
    where = path if path is not None else (e.filename or "a file")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpinError(
            f"no space left on device while writing {where}", hint="free disk space, then rerun to resume"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SpinError(f"cannot {verb} {where}: permission denied", hint="choose a writable output_dir")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return SpinError(
            f"cannot {verb} {where}: a file stands where a folder is needed",
            hint="choose an output_dir whose parents are folders",
        )
    return SpinError(f"cannot {verb} {where}: {e.strerror or e}")


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: not every file system lets a folder be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
        fault_point("write")
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise os_error_message(path, e) from e
    _fsync_dir(path.parent)


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
        raise os_error_message(Path(path), e) from e


def read_jsonl_tolerant(path: Path) -> list[dict[str, Any]]:
    """Read a log written by `append_jsonl`, skipping a torn last line left by a kill."""
    rows: list[dict[str, Any]] = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def trim_log(path: Path, last_step: int) -> None:
    """Keep only the rows of a training log with `step <= last_step` (none when 0), rewritten atomically.

    Called when training resumes from the checkpoint of `last_step`: rows logged after that checkpoint by
    the stopped process are logged again by the resumed one, so keeping them would repeat them.
    """
    path = Path(path)
    if not path.exists():
        return
    if last_step <= 0:
        path.unlink()
        return
    rows = [
        r for r in read_jsonl_tolerant(path) if isinstance(r, dict) and int(r.get("step", 0)) <= last_step
    ]
    write_jsonl(path, rows)


def mark_done(stage_dir: Path, stage: str) -> None:
    atomic_write_text(Path(stage_dir) / f".{stage}.done", "ok\n")
    fault_point("stage")


def is_done(stage_dir: Path, stage: str) -> bool:
    return (Path(stage_dir) / f".{stage}.done").exists()


def check_writable(path: Path) -> None:
    """Fail early, before any work, if the run folder cannot be created or written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise os_error_message(path, e) from e


SPIN_MARKER = ".spinlm"  # in every output folder spin claims (`claim_output_dir`)
SAVE_TMP = ".spinlm-save.tmp"  # a checkpoint is written here inside an existing folder, then moved in
_RUN_ROOT = {"config.yaml", "summary.json", "report.html", "plots", "tensorboard", ".lock", SPIN_MARKER}
_WEIGHT_FILES = re.compile(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")


def is_spin_output(path: Path) -> bool:
    """Whether folder `path` was written by spin: its marker, or a run folder or `spinlm train` output of
    before the marker (config.yaml with a run's files, only a run's files, or a train_log.jsonl)."""
    path = Path(path)
    if (path / SPIN_MARKER).exists() or (path / "train_log.jsonl").exists():
        return True
    run_files = ("summary.json", ".lock", "iteration_0")
    if (path / "config.yaml").exists() and any((path / name).exists() for name in run_files):
        return True
    return all(p.name in _RUN_ROOT or p.name.startswith("iteration_") for p in path.iterdir())


def claim_output_dir(path: Path, force: bool = False, what: str = "output folder") -> None:
    """Before any work: refuse an existing non-empty folder spin did not write (unless `force`), check
    that the folder can be written, and mark it as spin's. Nothing already in it is ever deleted."""
    path = Path(path)
    if path.is_dir() and not force and not is_spin_output(path) and any(path.iterdir()):
        raise SpinError(
            f"the {what} {path} is not empty and was not written by spin",
            hint="choose a new or empty folder, or pass --force to write into it (spin never deletes "
            "files it did not write)",
        )
    check_writable(path)
    if not (path / SPIN_MARKER).exists():
        atomic_write_text(path / SPIN_MARKER, "written by spinlm; its files here may be replaced by spinlm\n")


def check_output_file(path: Path, what: str = "output file") -> None:
    """Before any work: the file `path` can be written (its folder is created), and is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise SpinError(f"the {what} {path} is a folder", hint="give a file name, e.g. pairs.jsonl")
    check_writable(path.parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise SpinError(f"cannot write {path}: permission denied", hint="choose a writable path")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give the files in `folder` the user's umask (safetensors writes its files with mode 0600)."""
    mode = 0o666 & ~_umask()
    for f in Path(folder).iterdir():
        if f.is_file():
            os.chmod(f, mode)


def save_checkpoint(path: Path, write: Callable[[Path], None]) -> None:
    """Write a checkpoint with `write(folder)` and put it at `path`, replacing only the files it writes.

    A new `path` is written whole as `path.tmp` and renamed into place (atomic). Into an existing folder the
    checkpoint is written to `path/.spinlm-save.tmp`, then its files are moved in (config.json last) and
    stale weight shards of an earlier save are removed: every other file in `path` is left alone.
    """
    path = Path(path).absolute()
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        apply_umask(tmp)
        tmp.rename(path)
        return
    tmp = path / SAVE_TMP
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    apply_umask(tmp)
    names = sorted((p.name for p in tmp.iterdir()), key=lambda n: n == "config.json")
    for old in path.iterdir():
        if old.is_file() and _WEIGHT_FILES.fullmatch(old.name) and old.name not in names:
            old.unlink()
    for name in names:
        os.replace(tmp / name, path / name)
    tmp.rmdir()
    _fsync_dir(path)


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
