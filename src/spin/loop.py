"""The game: T iterations of generate -> pairs -> train -> evaluate, in one function (`run`).

    for t in 1..T:
        opponent p_{t-1}  := the last checkpoint (frozen)
        y'                ~ p_{t-1}(.|x) for every training prompt x              (generation.py)
        pairs             := (x, y real, y' generated) + p_{t-1}'s log-probs        (pairs.py)
        main player p_t   := p_{t-1} trained on the SPIN loss, saved                 (train.py)
        metrics           := held-out distance of p_t to the data                   (evaluate.py)
        stop early if p_t can no longer tell its samples from the data

Run folder: `config.yaml`, `summary.json`, `report.html` at the root; `iteration_t/` holds `generations/`
shards, `pairs.jsonl`, `model/` (a Hugging Face checkpoint), `train_log.jsonl`, `metrics.json`,
`samples.jsonl`, `answers.jsonl` (every scored answer), `eval_state.json`. Every stage writes its outputs
atomically and then a `.STAGE.done` marker, so `spin run` on an existing folder resumes after the last
finished stage (and, inside generation and training, after the last finished shard or trainer checkpoint).
Before anything runs, the folder is locked (`.lock`), a changed config is refused and a killed process's
leftovers are repaired (spin.resume); `config.yaml` is written only once the model's tokenizer and the data have loaded.

The same model object is the opponent (it generates and scores) and then the main player (it is trained in
place), so at most one model is ever in memory. Iteration numbering: iteration 0 is the starting model;
iteration t is the model after t SPIN rounds, trained with the schedules' t-th entries.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from spin.config import SpinConfig, config_to_yaml, scheduled
from spin.data import Example
from spin.errors import SpinError
from spin.evaluation import EvalState, evaluate_model, primary_metric
from spin.io import (
    atomic_write_text,
    claim_output_dir,
    is_done,
    mark_done,
    read_json,
    read_jsonl,
    write_json,
    write_jsonl,
)
from spin.memory import limit_heap_growth
from spin.modeling import (
    encode,
    load_model,
    load_tokenizer,
    render_prompt,
    resolve_source,
    save_model,
)
from spin.opponent import make_iteration_pairs
from spin.pairs import identical_pairs_warning, pair_stats
from spin.resume import BASE_MODEL, CHECKPOINT, RunLock, check_resume_config, tidy_run_folder, train_finished
from spin.trainer import make_accelerator, train_iteration

log = logging.getLogger("spin")


def load_examples(cfg: SpinConfig, tokenizer: Any) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """Training and held-out examples, with data statistics (counts of dropped / truncated rows)."""
    from spin.tasks import get_task

    if cfg.data.path is None:
        assert cfg.task is not None  # validated by SpinConfig
        task = get_task(cfg.task)
        assert task.make_examples is not None
        examples = task.make_examples(cfg.data.num_examples + cfg.data.eval_size, cfg.seed)
        stats: dict[str, Any] = {"source": f"builtin:{cfg.task}", "examples": len(examples)}
        train, held_out = examples[cfg.data.eval_size :], examples[: cfg.data.eval_size]
        return train, held_out, stats
    from spin.data import apply_prompt_limit, load_sft_examples, split_holdout

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


def read_seconds(it_dir: Path) -> dict[str, float]:
    """Wall seconds per stage of an iteration so far (`timings.json`: generate, score, train)."""
    path = it_dir / "timings.json"
    return {k: float(v) for k, v in read_json(path).items()} if path.exists() else {}


def add_seconds(it_dir: Path, seconds: dict[str, float]) -> None:
    """Add stage times to `timings.json` (a resumed stage adds the time of its second part)."""
    totals = read_seconds(it_dir)
    for k, v in seconds.items():
        totals[k] = totals.get(k, 0.0) + v
    write_json(it_dir / "timings.json", totals)


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
    non-empty folder that is not a spin run is refused (unless `force`); spin never deletes its files.
    """
    if cfg.model.name_or_path is None:
        raise SpinError(
            "model.name_or_path is not set", hint="give the starting SFT model's folder or Hub id"
        )
    limit_heap_growth()  # CPU: resident memory follows the live tensors (spin.memory)
    from spin.runtime import apply_settings

    apply_settings(cfg)  # torch threads and progress lines
    run_dir = Path(cfg.output_dir)
    accelerator = accelerator or make_accelerator(cfg.train)
    if accelerator.is_main_process:  # a foreign non-empty folder is refused before any work
        claim_output_dir(run_dir, force, what="output_dir")
    with RunLock(run_dir, enabled=accelerator.is_main_process):
        return _play(cfg, force, accelerator, run_dir, cfg.model.name_or_path)


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


def _play(cfg: SpinConfig, force: bool, accelerator: Any, run_dir: Path, start: str) -> dict[str, Any]:
    from spin.logging_utils import IterationLogger, print_iteration

    main = accelerator.is_main_process
    if main:
        check_resume_config(run_dir, cfg, force)
        tidy_run_folder(run_dir)
    accelerator.wait_for_everyone()
    start = start_checkpoint(cfg, run_dir, accelerator)

    tokenizer = load_tokenizer(start, cfg.model)
    train_examples, held_out, data_stats = load_examples(cfg, tokenizer)
    if main:  # only once the inputs are known to be good: a bad input leaves an existing folder untouched
        atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
    primary = primary_metric(cfg, held_out or train_examples)
    loggers = IterationLogger(run_dir, cfg.report_to, enabled=main)
    log.info(
        "%d training prompts, %d held out; primary metric: %s", len(train_examples), len(held_out), primary
    )

    model_path: str | Path = start
    # QLoRA: every stage uses the 4-bit model, so the reference scores the weights training starts from.
    qlora = cfg.train.lora.enabled and cfg.train.lora.load_in_4bit
    history: list[dict[str, Any]] = []
    stop_reason: str | None = None
    state: EvalState | None = None
    for t in range(cfg.train.iterations + 1):
        it_dir = run_dir / f"iteration_{t}"
        it_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        model = load_model(model_path, cfg.model, device=accelerator.device, load_in_4bit=qlora)
        if t >= 1:
            if not is_done(it_dir, "pairs"):
                # Opponent p_{t-1}: one sample per training prompt, then the reference log-probs of both sides.
                clock: dict[str, float] = {}
                pairs = make_iteration_pairs(
                    model, tokenizer, train_examples, cfg, t, run_dir, accelerator, timings=clock
                )
                if main:
                    add_seconds(it_dir, clock)
                    write_jsonl(it_dir / "pairs.jsonl", pairs)
                    write_json(it_dir / "pair_stats.json", pair_stats(pairs))
                    mark_done(it_dir, "pairs")
                accelerator.wait_for_everyone()
            pairs = list(read_jsonl(it_dir / "pairs.jsonl"))
            if main and (warning := identical_pairs_warning(pair_stats(pairs), t)):
                log.warning(warning)
            if not train_finished(it_dir):
                # Main player p_t, initialised from p_{t-1} (the same weights), trained in place.
                start_train = time.perf_counter()
                train_iteration(
                    model,
                    tokenizer,
                    pairs,
                    cfg.train,
                    iteration=t,
                    run_seed=cfg.seed,
                    log_dir=it_dir,
                    checkpoint_dir=it_dir / CHECKPOINT,
                    accelerator=accelerator,
                    writer=loggers.writer(t),
                    save_dir=it_dir / "model",
                )
                if main:
                    add_seconds(it_dir, {"train": time.perf_counter() - start_train})
            if main and not is_done(it_dir, "train"):
                # Also reached when a process died after saving the model but before writing the marker.
                shutil.rmtree(it_dir / CHECKPOINT, ignore_errors=True)
                mark_done(it_dir, "train")
            accelerator.wait_for_everyone()
            # Reload what was saved, so a resumed run and an uninterrupted one evaluate the same weights.
            del model
            accelerator.free_memory()
            model_path = it_dir / "model"
            model = load_model(model_path, cfg.model, device=accelerator.device, load_in_4bit=qlora)
        # Every rank decides before rank 0 can write the marker (evaluation has no collective to hold it):
        # a lagging rank that saw the marker would skip the barrier below and desynchronise the others.
        eval_done = is_done(it_dir, "eval")
        accelerator.wait_for_everyone()
        if eval_done:
            metrics = read_json(it_dir / "metrics.json")
            state = EvalState(**read_json(it_dir / "eval_state.json"))
        else:
            answers = it_dir / "answers.jsonl" if main else None
            metrics, state, samples = evaluate_model(
                model, tokenizer, held_out, cfg, t, state, answers_path=answers
            )
            if t >= 1:
                metrics.update({f"pairs_{k}": v for k, v in read_json(it_dir / "pair_stats.json").items()})
            if cfg.eval.lm_eval_tasks:  # optional benchmarks (spin[lmeval]); iteration 0 fails fast on a typo
                from spin.lm_eval_hook import run_lm_eval

                e = cfg.eval
                args = (e.lm_eval_tasks, e.lm_eval_include_path, e.lm_eval_limit, e.batch_size)
                metrics.update(run_lm_eval(model_path, *args, model=model, tokenizer=tokenizer))
            metrics["seconds"] = time.perf_counter() - t0
            metrics.update({f"seconds_{k}": v for k, v in read_seconds(it_dir).items()})
            if main:
                write_json(it_dir / "eval_state.json", state.to_dict())
                write_jsonl(it_dir / "samples.jsonl", samples)
                write_json(it_dir / "metrics.json", metrics)
                loggers.log_metrics(t, metrics)
                if t >= 1:
                    from spin.cards import write_model_card

                    write_model_card(it_dir / "model", cfg, t, metrics)
                    if cfg.push_to_hub:  # before the marker: a failed push is retried on resume
                        from spin.hub import push_iteration

                        push_iteration(run_dir, t, cfg.push_to_hub)
                mark_done(it_dir, "eval")
            accelerator.wait_for_everyone()
        history.append(metrics)
        if main:
            print_iteration(t, metrics, primary)
        del model
        if t >= 1 and (stop_reason := should_stop(history, primary, cfg)):
            log.info("stopping after iteration %d: %s", t, stop_reason)
            break
    if stop_reason is None:
        stop_reason = f"played all {cfg.train.iterations} iterations"
    summary = _summary(run_dir, cfg, primary, data_stats, stop_reason)
    if main:
        from spin.report import write_report

        write_json(run_dir / "summary.json", summary)
        loggers.close()
        write_report(run_dir)
    accelerator.wait_for_everyone()
    return summary


__all__ = ["run", "load_examples", "should_stop", "scheduled"]
