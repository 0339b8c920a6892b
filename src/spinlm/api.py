"""The Python API: the same stages as the CLI, as functions.

import spinlm
summary = spinlm.run(spinlm.load_config("recipes/cpu-tiny.yaml"))          # the whole game
pairs = spinlm.generate("sft_model", "data.jsonl", "pairs.jsonl")        # one iteration's pairs
spinlm.train("sft_model", "pairs.jsonl", "iteration_1_model")            # one iteration of training
metrics = spinlm.evaluate("iteration_1_model", "test.jsonl")             # metrics on a whole file
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from spinlm.config import SpinConfig, load_config
from spinlm.errors import SpinError
from spinlm.evaluation import evaluate_model
from spinlm.io import check_output_file, claim_output_dir, write_json, write_jsonl
from spinlm.lm_eval_hook import run_lm_eval
from spinlm.loop import load_examples
from spinlm.loop import run as _run
from spinlm.modeling import load_model, load_tokenizer
from spinlm.opponent import make_iteration_pairs
from spinlm.pairs import read_pairs_file
from spinlm.runtime import apply_settings
from spinlm.trainer import TrainResult, make_accelerator, train_iteration

log = logging.getLogger("spinlm")


def _config(
    model: str | Path, dataset: str | None, overrides: list[str] | None, seed: int, **extra: Any
) -> SpinConfig:
    defaults: dict[str, Any] = {"model.name_or_path": str(model), "seed": seed, **extra}
    if dataset is not None and dataset.startswith("builtin:"):
        defaults["task"] = dataset.split(":", 1)[1]
    elif dataset is not None:
        defaults["data.path"] = str(dataset)
    return load_config(None, overrides, **defaults)


def _check_iteration(iteration: int) -> None:
    if iteration < 1:
        raise SpinError(
            f"--iteration must be >= 1 (got {iteration})",
            hint="1 is the first SPIN round; it picks the entries of the per-iteration schedules",
        )


def run(cfg: SpinConfig, force: bool = False) -> dict[str, Any]:
    """Play the whole game (see spinlm.loop.run); returns the summary."""
    return _run(cfg, force=force)


def generate(
    model: str | Path,
    dataset: str,
    output: str | Path,
    overrides: list[str] | None = None,
    seed: int = 0,
    iteration: int = 1,
) -> list[dict]:
    """Sample one response per prompt with `model`, score both sides, write pairs JSONL to `output`."""
    cfg = _config(model, dataset, overrides, seed, **{"data.eval_size": 0})
    apply_settings(cfg)
    _check_iteration(iteration)
    check_output_file(Path(output), "--output pairs file")  # before any work: a bad path loses nothing
    tokenizer = load_tokenizer(str(model), cfg.model)
    examples, _, _ = load_examples(cfg, tokenizer)
    accelerator = make_accelerator(cfg.train)
    opponent = load_model(str(model), cfg.model, device=accelerator.device)
    # The loop's own pairs stage code; its generation shards live in a scratch run folder.
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="spinlm-generate-") as scratch:
        pairs = make_iteration_pairs(
            opponent, tokenizer, examples, cfg, iteration, Path(scratch), accelerator, seconds, label=""
        )
    log.info(
        "generate: %d replies in %.1f s; score: both sides of %d pairs in %.1f s",
        len(pairs),
        seconds.get("generate", 0.0),
        len(pairs),
        seconds.get("score", 0.0),
    )
    write_jsonl(Path(output), pairs)
    return pairs


def train(
    model: str | Path,
    pairs: str | Path,
    output: str | Path,
    overrides: list[str] | None = None,
    seed: int = 0,
    iteration: int = 1,
    force: bool = False,
) -> TrainResult:
    """Train one SPIN iteration of `model` on a pairs file; save the checkpoint to `output`.

    `output` may be new, empty, or an earlier spin output; another non-empty folder is refused unless
    `force`. Only spin's own files there are replaced (the checkpoint and train_log.jsonl).
    """
    # The pairs file is this call's data: nothing else is read (data.* and the task do not apply).
    cfg = _config(model, str(pairs), overrides, seed)
    apply_settings(cfg)
    _check_iteration(iteration)
    rows = read_pairs_file(Path(pairs))
    out = Path(output)
    claim_output_dir(out, force, what="--output folder")
    tokenizer = load_tokenizer(str(model), cfg.model)
    accelerator = make_accelerator(cfg.train)
    main_player = load_model(str(model), cfg.model, device=accelerator.device)
    return train_iteration(
        main_player,
        tokenizer,
        rows,
        cfg.train,
        iteration=iteration,
        run_seed=cfg.seed,
        log_dir=out,
        accelerator=accelerator,
        save_dir=out,
    )


def evaluate(
    model: str | Path,
    dataset: str,
    overrides: list[str] | None = None,
    seed: int = 0,
    output: str | Path | None = None,
) -> dict[str, Any]:
    """The metrics `spinlm run` records for a model (as its iteration 0), on every example of `dataset`.

    A data file is scored whole (`data.eval_size` does not apply); a built-in task (`builtin:addition`) on
    the held-out examples a run with the same seed holds out. With `output`, a folder, metrics.json,
    samples.jsonl and answers.jsonl are written there.
    """
    cfg = _config(model, dataset, overrides, seed)
    apply_settings(cfg)
    if cfg.data.path is not None:
        cfg.data.eval_size = 0  # the whole file: nothing is held out of an evaluation
    out = Path(output) if output is not None else None
    if out is not None:
        claim_output_dir(out, what="--output folder")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(str(model), cfg.model)
    train_part, held_out, _ = load_examples(cfg, tokenizer)
    examples = held_out or train_part
    log.info("evaluating %s on %d examples of %s", model, len(examples), dataset)
    loaded = load_model(str(model), cfg.model)
    answers = out / "answers.jsonl" if out is not None else None
    metrics, _, samples = evaluate_model(loaded, tokenizer, examples, cfg, 0, None, answers_path=answers)
    if cfg.eval.lm_eval_tasks:
        e = cfg.eval
        args = (e.lm_eval_tasks, e.lm_eval_include_path, e.lm_eval_limit, e.batch_size)
        metrics.update(run_lm_eval(model, *args, model=loaded, tokenizer=tokenizer))
    metrics["seconds"] = time.perf_counter() - t0
    if out is not None:
        write_jsonl(out / "samples.jsonl", samples)
        write_json(out / "metrics.json", metrics)
    return metrics
