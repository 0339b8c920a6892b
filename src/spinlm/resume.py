"""Resuming a run folder: refuse a changed config, repair what a kill left behind, one run per folder.

`spinlm run` on an existing folder continues where it stopped (loop.py's stage markers `.pairs.done`,
`.train.done`, `.eval.done`; inside generation the shard files; inside training the trainer checkpoint).

- `check_resume_config`: if the folder's `config.yaml` differs from the new config in a field that changes
  results (model, data, sampling, training), the run is refused with the list of differing fields; `--force`
  overrides. Fields that only change bookkeeping (logging, how many iterations to play, stopping) may
  change freely.
- `tidy_run_folder`: a killed process may leave `*.tmp` files and folders (a write that never reached its
  rename) and, if it died half way through replacing a trainer checkpoint, `trainer_checkpoint.tmp` /
  `.old` instead of `trainer_checkpoint`. The complete one is put back in place and the rest removed.
- `train_finished`: the trained model is renamed into `iteration_t/model` whole, so its presence means the
  stage finished even if the process died before writing `.train.done`.
- `RunLock`: an exclusive `flock` on `RUN_DIR/.lock`, so two `spinlm run` on one folder cannot interleave
  their writes; the kernel drops it when the holder dies, even by SIGKILL.

Safety of what resuming loads: model weights are safetensors only (`modeling.load_model` passes
`use_safetensors=True`; the trainer checkpoint's model is `model.safetensors`). The optimizer state and RNG
states in the trainer checkpoint are torch files, which accelerate's `load_state` reads with
`torch.load(weights_only=True)` (tensors and plain containers only, no arbitrary pickled objects);
tests/test_resume.py checks this.
"""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from spinlm.config import SpinConfig
from spinlm.errors import SpinError
from spinlm.io import os_error_message

# Dotted prefixes that do not change any result already on disk.
HARMLESS = (
    "output_dir",
    "report_to",
    "push_to_hub",
    "train.iterations",
    "train.logging_steps",
    "train.save_steps",
    "eval.stop",
    "eval.num_samples",
    "eval.lm_eval",
    "generation.engine",
    "threads",
    "progress_seconds",
    "generation.vllm",  # engine options (memory, parallelism); absent from runs started before they existed
)
CHECKPOINT = "trainer_checkpoint"
BASE_MODEL = "base_model"  # RUN_DIR/base_model: a GGUF starting model converted once to safetensors


def base_model_dir(run_dir: Path) -> Path | None:
    """RUN_DIR/base_model once its conversion finished (`.base_model.done`), else None."""
    return Path(run_dir) / BASE_MODEL if (Path(run_dir) / f".{BASE_MODEL}.done").exists() else None


# What spin writes at a run's root.
ROOT_FILES = ("config.yaml", "summary.json", "report.html", ".spinlm", BASE_MODEL)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key != "data.columns":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names of result-changing fields whose values differ."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(HARMLESS)]


def check_resume_config(run_dir: Path, cfg: SpinConfig, force: bool) -> None:
    """Refuse to resume `run_dir` with a config that would change its results (unless `force`)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return
    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SpinError(
            f"cannot read the config of the run in {run_dir} ({path}: {first})",
            hint="use another output_dir, or delete that config.yaml to adopt the folder",
        ) from e
    if not isinstance(old, dict):
        old = {}
    new = cfg.to_dict()
    diff = config_differences(old, new)
    if diff and not force:
        shown = ", ".join(f"{k} ({_get(old, k)!r} -> {_get(new, k)!r})" for k in diff[:6])
        more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
        raise SpinError(
            f"{run_dir} holds a run with a different config: {shown}{more}",
            hint="use another output_dir, or pass --force to resume with the new values",
        )


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)  # type: ignore[assignment]
    return d


def recover_checkpoint(checkpoint_dir: Path) -> None:
    """Put back a complete trainer checkpoint if a kill interrupted its replacement.

    The trainer writes `NAME.tmp` (trainer_state.json last), renames `NAME` to `NAME.old`, renames `NAME.tmp`
    to `NAME` and deletes `NAME.old`. A folder holding trainer_state.json is complete; the newest complete
    one wins.
    """
    checkpoint_dir = Path(checkpoint_dir)
    tmp = checkpoint_dir.with_name(checkpoint_dir.name + ".tmp")
    old = checkpoint_dir.with_name(checkpoint_dir.name + ".old")
    if not (checkpoint_dir / "trainer_state.json").exists():
        for candidate in (tmp, old):  # tmp is newer than old
            if (candidate / "trainer_state.json").exists():
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
                candidate.rename(checkpoint_dir)
                break
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale, ignore_errors=True)


def tidy_run_folder(run_dir: Path) -> None:
    """Repair trainer checkpoints and remove the `*.tmp` leftovers of killed writes (call under RunLock).

    Only spin's own: a user's `notes.tmp` next to the iteration folders is not touched."""
    run_dir = Path(run_dir)
    for it_dir in sorted(run_dir.glob("iteration_*")):
        recover_checkpoint(it_dir / CHECKPOINT)
    # Only spin's own leftovers: inside iteration folders and plots/, and the root files spin writes.
    ours = [p for d in [*run_dir.glob("iteration_*"), run_dir / "plots"] for p in d.rglob("*.tmp")]
    ours += [run_dir / f"{name}.tmp" for name in ROOT_FILES if (run_dir / f"{name}.tmp").exists()]
    for tmp in sorted(ours, key=lambda p: len(p.parts), reverse=True):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def train_finished(it_dir: Path) -> bool:
    """Whether iteration `it_dir`'s training finished: its marker, or its saved model (renamed in whole)."""
    it_dir = Path(it_dir)
    if (it_dir / ".train.done").exists():
        return True
    model = it_dir / "model"
    weights = list(model.glob("*.safetensors")) + list(model.glob("*.safetensors.index.json"))
    return (model / "config.json").exists() and bool(weights)


class RunLock:
    """An exclusive, non-blocking lock on `run_dir/.lock` for the duration of a run (a no-op if disabled)."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / ".lock"
        self.enabled = enabled
        self._file: Any = None

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self

        try:
            self._file = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        except OSError as e:
            raise os_error_message(self.path, e) from e
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._file.close()
            self._file = None
            raise SpinError(
                f"another spinlm run is using {self.path.parent}",
                hint="wait for it to finish or stop it, or choose another output_dir",
            ) from e
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
