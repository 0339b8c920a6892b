"""The Python API: the same stages as the CLI, as functions.

import spin
summary = spin.run(spin.load_config("recipes/cpu-tiny.yaml"))          # the whole game
pairs = spin.generate("sft_model", "data.jsonl", "pairs.jsonl")        # one iteration's pairs
spin.train("sft_model", "pairs.jsonl", "iteration_1_model")            # one iteration of training
metrics = spin.evaluate("iteration_1_model", "data.jsonl")             # held-out metrics
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spin.config import SpinConfig, load_config
from spin.evaluate import evaluate_model
from spin.generate import generate_responses
from spin.io import read_jsonl, write_jsonl
from spin.loop import load_examples
from spin.loop import run as _run
from spin.modeling import load_model, load_tokenizer
from spin.pairs import add_reference_logps, build_pairs, chosen_text, rejected_text, score_logps
from spin.train import TrainResult, make_accelerator, train_iteration


def _config(
    model: str | Path, dataset: str | None, overrides: list[str] | None, seed: int, **extra: Any
) -> SpinConfig:
    defaults: dict[str, Any] = {"model.name_or_path": str(model), "seed": seed, **extra}
    if dataset is not None and dataset.startswith("builtin:"):
        defaults["task"] = dataset.split(":", 1)[1]
    elif dataset is not None:
        defaults["data.path"] = str(dataset)
    return load_config(None, overrides, **defaults)


def run(cfg: SpinConfig, force: bool = False) -> dict[str, Any]:
    """Play the whole game (see spin.loop.run); returns the summary."""
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
    tokenizer = load_tokenizer(str(model), cfg.model)
    examples, _, _ = load_examples(cfg, tokenizer)
    opponent = load_model(str(model), cfg.model)
    gens = generate_responses(
        opponent,
        tokenizer,
        [e.prompt for e in examples],
        cfg.generation,
        seed=cfg.seed * 1000 + iteration,
        desc="generate",
    )
    pairs = build_pairs(examples, gens, iteration)
    prompts = [p["prompt"] for p in pairs]
    t = cfg.train
    add_reference_logps(
        pairs,
        score_logps(
            opponent,
            tokenizer,
            prompts,
            [chosen_text(p) for p in pairs],
            t.max_length,
            cfg.eval.batch_size,
            t.length_normalize,
            "score real",
        ),
        score_logps(
            opponent,
            tokenizer,
            prompts,
            [rejected_text(p) for p in pairs],
            t.max_length,
            cfg.eval.batch_size,
            t.length_normalize,
            "score generated",
        ),
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
) -> TrainResult:
    """Train one SPIN iteration of `model` on a pairs file; save the checkpoint to `output`."""
    from spin.errors import SpinError

    cfg = _config(model, None, overrides, seed, task="addition")  # task only satisfies validation
    if not Path(pairs).is_file():
        raise SpinError(f"pairs file not found: {pairs}", hint="write one with `spin generate`")
    rows = list(read_jsonl(Path(pairs)))
    missing = [
        k
        for k in ("prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps")
        if k not in rows[0]
    ]
    if missing:
        raise SpinError(f"{pairs} row 1 lacks {', '.join(missing)}", hint="write pairs with `spin generate`")
    tokenizer = load_tokenizer(str(model), cfg.model)
    accelerator = make_accelerator(cfg.train)
    main_player = load_model(str(model), cfg.model, device=accelerator.device)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
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
    model: str | Path, dataset: str, overrides: list[str] | None = None, seed: int = 0
) -> dict[str, Any]:
    """Held-out metrics of one checkpoint (as iteration 0 of a run)."""
    cfg = _config(model, dataset, overrides, seed)
    tokenizer = load_tokenizer(str(model), cfg.model)
    _, held_out, _ = load_examples(cfg, tokenizer)
    metrics, _, _ = evaluate_model(load_model(str(model), cfg.model), tokenizer, held_out, cfg, 0, None)
    return metrics
