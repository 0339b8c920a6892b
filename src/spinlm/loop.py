"""The game: T iterations of generate -> pairs -> train -> evaluate -> publish (`run`).

    for t in 1..T:
        opponent p_{t-1}  := the last checkpoint (frozen)
        y'                ~ p_{t-1}(.|x) for every training prompt x       (stages.make_pairs, generation.py)
        pairs             := (x, y real, y' generated) + p_{t-1}'s log-probs (opponent.py, pairs.py)
        main player p_t   := p_{t-1} trained on the SPIN loss, saved        (stages.train, trainer.py)
        metrics           := held-out distance of p_t to the data          (stages.evaluate, evaluation.py)
        model card, Hub push                                                (stages.publish)
        stop early if p_t can no longer tell its samples from the data

Run folder: `config.yaml`, `summary.json`, `report.html` at the root; `iteration_t/` holds `generations/`
shards, `pairs.jsonl`, `model/` (a Hugging Face checkpoint), `train_log.jsonl`, `metrics.json`,
`samples.jsonl`, `answers.jsonl` (every scored answer), `eval_state.json`, `timings.json`. Every stage
writes its outputs atomically and then a `.STAGE.done` marker, so `spinlm run` on an existing folder resumes
after the last finished stage (and, inside generation and training, after the last finished shard or
trainer checkpoint); spinlm.stages says how each stage resumes. Before anything runs, the folder is locked
(`.lock`), a changed config is refused and a killed process's leftovers are repaired (spinlm.resume);
`config.yaml` is written only once the model's tokenizer and the data have loaded.

The same model object is the opponent (it generates and scores) and then the main player (it is trained in
place), so at most one model is ever in memory. Iteration numbering: iteration 0 is the starting model;
iteration t is the model after t SPIN rounds, trained with the schedules' t-th entries.

    summary = run(load_config("recipes/cpu-tiny.yaml"))
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from spinlm import stages
from spinlm.config import SpinConfig, config_to_yaml, scheduled
from spinlm.data import Example, apply_prompt_limit, load_sft_examples, split_holdout
from spinlm.errors import SpinError
from spinlm.evaluation import EvalState, primary_metric
from spinlm.io import atomic_write_text, claim_output_dir, is_done, mark_done, read_json, write_json
from spinlm.logging_utils import IterationLogger
from spinlm.memory import release_free_memory
from spinlm.modeling import encode, load_model, load_tokenizer, render_prompt, resolve_source, save_model
from spinlm.resume import BASE_MODEL, RunLock, check_resume_config, tidy_run_folder
from spinlm.runtime import apply_settings
from spinlm.stages import Game
from spinlm.tasks import get_task
from spinlm.trainer import make_accelerator

log = logging.getLogger("spinlm")


def load_examples(cfg: SpinConfig, tokenizer: Any) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """Training and held-out examples, with data statistics (counts of dropped / truncated rows)."""
    if cfg.data.path is None:
        assert cfg.task is not None  # validated by SpinConfig
        task = get_task(cfg.task)
        assert task.make_examples is not None
        examples = task.make_examples(cfg.data.num_examples + cfg.data.eval_size, cfg.seed)
        stats: dict[str, Any] = {"source": f"builtin:{cfg.task}", "examples": len(examples)}
        train, held_out = examples[cfg.data.eval_size :], examples[: cfg.data.eval_size]
        return train, held_out, stats
    examples, data_stats = load_sft_examples(cfg.data, seed=cfg.seed)
    examples = apply_prompt_limit(
        examples,
        lambda m: len(encode(tokenizer, render_prompt(tokenizer, m))),
        cfg.data.max_prompt_tokens,
        cfg.data.long_prompts,
        data_stats,
    )
    if not examples:
        raise SpinError(
            f"no usable rows left in {cfg.data.path} after the prompt-length limit",
            hint="raise data.max_prompt_tokens or set data.long_prompts=truncate",
        )
    train, held_out = split_holdout(examples, cfg.data.eval_size, cfg.seed)
    return train, held_out, data_stats.to_dict()


def _summary(run_dir: Path, cfg: SpinConfig, primary: str, data_stats: dict, stop_reason: str | None) -> dict:
    iterations = []
    for t in range(cfg.train.iterations + 1):
        path = run_dir / f"iteration_{t}" / "metrics.json"
        if path.exists():
            iterations.append({"iteration": t, "metrics": read_json(path)})
    return {
        "primary_metric": primary,
        "stop_reason": stop_reason,
        "data": data_stats,
        "config": cfg.to_dict(),
        "iterations": iterations,
    }


def should_stop(history: list[dict[str, Any]], primary: str, cfg: SpinConfig) -> str | None:
    """The stopping rule: discriminability near 1/2, or no improvement of the primary metric."""
    stop = cfg.eval.stop
    last = history[-1]
    d = last.get("discriminability")
    if stop.discriminability_band > 0 and d is not None and abs(d - 0.5) <= stop.discriminability_band:
        return (
            f"discriminability {d:.3f} is within {stop.discriminability_band} of 0.5: the model can no "
            f"longer tell its own samples from the data"
        )
    values = [h.get(primary) for h in history]
    if stop.patience > 0 and len(values) > stop.patience and all(v is not None for v in values):
        numbers = [float(v) for v in values if v is not None]
        best_before = max(numbers[: -stop.patience])
        if max(numbers[-stop.patience :]) <= best_before + stop.min_delta:
            return f"{primary} has not improved on {best_before:.4g} for {stop.patience} iteration(s)"
    return None


def run(cfg: SpinConfig, force: bool = False, accelerator: Any = None) -> dict[str, Any]:
    """Play the whole game; returns the summary (also written to `output_dir/summary.json`).

    On an existing run folder: refuse a config that would change its results (unless `force`), repair what
    a killed process left, and continue after the last finished stage. One run per folder at a time. A
    non-empty folder that is not a spinlm run is refused (unless `force`); spin never deletes its files.
    """
    if cfg.model.name_or_path is None:
        raise SpinError(
            "model.name_or_path is not set", hint="give the starting SFT model's folder or Hub id"
        )
    apply_settings(cfg)  # torch threads and progress lines
    run_dir = Path(cfg.output_dir)
    accelerator = accelerator or make_accelerator(cfg.train)
    if accelerator.is_main_process:  # a foreign non-empty folder is refused before any work
        claim_output_dir(run_dir, force, what="output_dir")
    with RunLock(run_dir, enabled=accelerator.is_main_process):
        return _play(cfg, force, accelerator, run_dir)


def start_checkpoint(cfg: SpinConfig, run_dir: Path, accelerator: Any) -> str:
    """The folder (or Hub id) the game starts from: `model.name_or_path`, or for a GGUF start its plain
    safetensors conversion `RUN_DIR/base_model/`, written once (dequantizing costs ~20 s per load)."""
    assert cfg.model.name_or_path is not None
    if resolve_source(cfg.model.name_or_path, cfg.model).gguf_file is None:
        return cfg.model.name_or_path
    base = run_dir / BASE_MODEL
    if accelerator.is_main_process and not is_done(run_dir, BASE_MODEL):
        log.info("converting the GGUF model %s to safetensors in %s", cfg.model.name_or_path, base)
        tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model)
        save_model(load_model(cfg.model.name_or_path, cfg.model, device=accelerator.device), tokenizer, base)
        mark_done(run_dir, BASE_MODEL)
    accelerator.wait_for_everyone()
    return str(base)


def setup(cfg: SpinConfig, force: bool, accelerator: Any, run_dir: Path) -> tuple[Game, str, dict]:
    """Check or repair the folder, convert a GGUF start, load tokenizer and data, write config.yaml.

    Returns the game, the starting checkpoint and the data statistics."""
    if accelerator.is_main_process:
        check_resume_config(run_dir, cfg, force)
        tidy_run_folder(run_dir)
    accelerator.wait_for_everyone()
    start = start_checkpoint(cfg, run_dir, accelerator)
    tokenizer = load_tokenizer(start, cfg.model)
    train_examples, held_out, data_stats = load_examples(cfg, tokenizer)
    if not held_out:  # every iteration is measured on held-out prompts; none would fail deep in evaluation
        raise SpinError(
            "data.eval_size is 0: spinlm run evaluates every iteration on held-out prompts",
            hint="set data.eval_size to at least 1 (spinlm eval scores a whole file instead)",
        )
    # config.yaml only once the inputs are known to be good: a bad input leaves a folder as is.
    if accelerator.is_main_process:
        atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
    primary = primary_metric(cfg, held_out or train_examples)
    loggers = IterationLogger(run_dir, cfg.report_to, enabled=accelerator.is_main_process)
    log.info(
        "%d training prompts, %d held out; primary metric: %s", len(train_examples), len(held_out), primary
    )
    game = Game(cfg, accelerator, run_dir, tokenizer, train_examples, held_out, primary, loggers)
    return game, start, data_stats


def _play(cfg: SpinConfig, force: bool, accelerator: Any, run_dir: Path) -> dict[str, Any]:
    game, start, data_stats = setup(cfg, force, accelerator, run_dir)
    model_path: str | Path = start
    history: list[dict[str, Any]] = []
    state: EvalState | None = None
    stop_reason = f"played all {cfg.train.iterations} iterations"
    for t in range(cfg.train.iterations + 1):
        started = time.perf_counter()
        model = game.load(model_path)
        if t >= 1:
            pairs = stages.make_pairs(game, t, model)  # the opponent p_{t-1} samples and scores
            release_free_memory()  # CPU: the sampler's and scorer's freed heap goes back (spinlm.memory)
            model, model_path = stages.train(game, t, model, pairs)  # the main player p_t, saved and reloaded
        metrics, state = stages.evaluate(game, t, model, model_path, state, started)
        stages.publish(game, t, metrics)
        history.append(metrics)
        del model
        if t >= 1 and (reason := should_stop(history, game.primary, cfg)):
            log.info("stopping after iteration %d: %s", t, reason)
            stop_reason = reason
            break
    return finish(game, data_stats, stop_reason)


def finish(game: Game, data_stats: dict, stop_reason: str) -> dict[str, Any]:
    """summary.json and report.html (rank 0); returns the summary."""
    summary = _summary(game.run_dir, game.cfg, game.primary, data_stats, stop_reason)
    if game.main:
        from spinlm.report import write_report  # matplotlib (~0.5 s to import): only once a run ends

        write_json(game.run_dir / "summary.json", summary)
        game.loggers.close()
        write_report(game.run_dir)
    game.accelerator.wait_for_everyone()
    return summary


__all__ = ["run", "load_examples", "should_stop", "scheduled", "setup", "finish"]
