"""The stages of one SPIN iteration, each owning its done-marker, its barrier and its resume logic.

`spinlm.loop.run` calls them in order for iteration t (t = 0 only evaluates the starting model):

    pairs = make_pairs(game, t, model)             # opponent p_{t-1}: y' per prompt + reference log-probs
    model, path = train(game, t, model, pairs)     # main player p_t, trained in place, saved, reloaded
    metrics, state = evaluate(game, t, model, ...) # held-out distance of p_t to the data
    publish(game, t, metrics)                      # model card, optional Hub push

A stage that finds its marker (`iteration_t/.STAGE.done`) reads its outputs back instead of redoing the
work; inside, generation resumes per shard and training from its trainer checkpoint. Rank 0 writes, every
rank waits at the stage's barrier, so all processes leave a stage with the same files on disk.

`Game` is what every stage reads: the config, the accelerator, the tokenizer and the examples (built once
by `spinlm.loop.setup`).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spinlm.cards import write_model_card
from spinlm.config import SpinConfig
from spinlm.data import Example
from spinlm.evaluation import EvalState, evaluate_model
from spinlm.io import is_done, mark_done, read_json, read_jsonl, write_json, write_jsonl
from spinlm.logging_utils import IterationLogger, print_iteration
from spinlm.modeling import load_model
from spinlm.opponent import make_iteration_pairs
from spinlm.pairs import identical_pairs_warning, pair_stats
from spinlm.resume import CHECKPOINT, train_finished
from spinlm.trainer import train_iteration

log = logging.getLogger("spinlm")


@dataclass
class Game:
    """One run's fixed inputs, shared by every stage of every iteration."""

    cfg: SpinConfig
    accelerator: Any
    run_dir: Path
    tokenizer: Any
    train_examples: list[Example]
    held_out: list[Example]
    primary: str  # the metric the stopping rule and the report lead with
    loggers: IterationLogger

    @property
    def main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def it_dir(self, t: int) -> Path:
        path = self.run_dir / f"iteration_{t}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def load(self, path: str | Path) -> Any:
        """A checkpoint on this process's device; QLoRA: in 4-bit for every stage, so the reference scores
        the very weights training starts from."""
        qlora = self.cfg.train.lora.enabled and self.cfg.train.lora.load_in_4bit
        return load_model(path, self.cfg.model, device=self.accelerator.device, load_in_4bit=qlora)


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


def make_pairs(game: Game, t: int, model: Any) -> list[dict]:
    """Pairs stage (`.pairs.done`): the opponent p_{t-1} (`model`) samples one reply per training prompt and
    scores both replies; pairs.jsonl and pair_stats.json. Returns the pairs (read back on resume)."""
    it_dir = game.it_dir(t)
    if not is_done(it_dir, "pairs"):
        clock: dict[str, float] = {}
        pairs = make_iteration_pairs(
            model, game.tokenizer, game.train_examples, game.cfg, t, game.run_dir, game.accelerator, clock
        )
        if game.main:
            add_seconds(it_dir, clock)
            write_jsonl(it_dir / "pairs.jsonl", pairs)
            write_json(it_dir / "pair_stats.json", pair_stats(pairs))
            mark_done(it_dir, "pairs")
        game.accelerator.wait_for_everyone()
    pairs = list(read_jsonl(it_dir / "pairs.jsonl"))
    if game.main and (warning := identical_pairs_warning(pair_stats(pairs), t)):
        log.warning(warning)
    return pairs


def train(game: Game, t: int, model: Any, pairs: list[dict]) -> tuple[Any, Path]:
    """Train stage (`.train.done`): the main player p_t, initialised from p_{t-1} (`model`, trained in
    place), saved to iteration_t/model. Returns that checkpoint reloaded, and its folder, so a resumed run
    and an uninterrupted one go on with the same weights."""
    it_dir = game.it_dir(t)
    if not train_finished(it_dir):
        start = time.perf_counter()
        train_iteration(
            model,
            game.tokenizer,
            pairs,
            game.cfg.train,
            iteration=t,
            run_seed=game.cfg.seed,
            log_dir=it_dir,
            checkpoint_dir=it_dir / CHECKPOINT,
            accelerator=game.accelerator,
            writer=game.loggers.writer(t),
            save_dir=it_dir / "model",
        )
        if game.main:
            add_seconds(it_dir, {"train": time.perf_counter() - start})
    if game.main and not is_done(it_dir, "train"):
        # Also reached when a process died after saving the model but before writing the marker.
        shutil.rmtree(it_dir / CHECKPOINT, ignore_errors=True)
        mark_done(it_dir, "train")
    game.accelerator.wait_for_everyone()
    del model
    game.accelerator.free_memory()
    return game.load(it_dir / "model"), it_dir / "model"


def evaluate(
    game: Game, t: int, model: Any, model_path: str | Path, state: EvalState | None, started: float
) -> tuple[dict[str, Any], EvalState]:
    """Eval stage (`.eval.done`): metrics.json, eval_state.json, samples.jsonl, answers.jsonl of p_t on the
    held-out examples; `started` (perf_counter) is when this process began the iteration."""
    it_dir = game.it_dir(t)
    # Every rank decides before rank 0 can write the marker (evaluation has no collective to hold it):
    # a lagging rank that saw the marker would skip the barrier below and desynchronise the others.
    done = is_done(it_dir, "eval")
    game.accelerator.wait_for_everyone()
    if done:
        metrics, state = (
            read_json(it_dir / "metrics.json"),
            EvalState(**read_json(it_dir / "eval_state.json")),
        )
    else:
        cfg, answers = game.cfg, it_dir / "answers.jsonl" if game.main else None
        metrics, state, samples = evaluate_model(
            model, game.tokenizer, game.held_out, cfg, t, state, answers_path=answers
        )
        if t >= 1:
            metrics.update({f"pairs_{k}": v for k, v in read_json(it_dir / "pair_stats.json").items()})
        if cfg.eval.lm_eval_tasks:  # optional benchmarks (spinlm[lmeval]); iteration 0 fails fast on a typo
            from spinlm.lm_eval_hook import run_lm_eval  # lm-eval imports in seconds: only when asked for

            e = cfg.eval
            args = (e.lm_eval_tasks, e.lm_eval_include_path, e.lm_eval_limit, e.batch_size)
            metrics.update(run_lm_eval(model_path, *args, model=model, tokenizer=game.tokenizer))
        metrics["seconds"] = time.perf_counter() - started
        metrics.update({f"seconds_{k}": v for k, v in read_seconds(it_dir).items()})
        if game.main:
            write_json(it_dir / "eval_state.json", state.to_dict())
            write_jsonl(it_dir / "samples.jsonl", samples)
            write_json(it_dir / "metrics.json", metrics)
            game.loggers.log_metrics(t, metrics)
            mark_done(it_dir, "eval")
        game.accelerator.wait_for_everyone()
    if game.main:
        print_iteration(t, metrics, game.primary)
    return metrics, state


def publish(game: Game, t: int, metrics: dict[str, Any]) -> None:
    """Publish stage (`.publish.done`, iterations ≥ 1): the model card in iteration_t/model and, with
    `push_to_hub`, the push of the model and its pairs (a failed push is retried on resume)."""
    it_dir = game.it_dir(t)
    if t >= 1 and game.main and not is_done(it_dir, "publish"):
        write_model_card(it_dir / "model", game.cfg, t, metrics)
        if game.cfg.push_to_hub:
            from spinlm.hub import push_iteration  # huggingface_hub's upload API: only when pushing

            push_iteration(game.run_dir, t, game.cfg.push_to_hub)
        mark_done(it_dir, "publish")
    game.accelerator.wait_for_everyone()
