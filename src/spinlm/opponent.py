"""The opponent's side of iteration t: its samples y' and the reference log-probs stored with each pair.

`make_iteration_pairs` is called by the loop with the opponent p_{t-1} loaded as `model`. It samples one
reply y' per training prompt, builds the pairs (x, y real, y' generated) and stores the reference's
log-probs of both replies in `ref_chosen_logps` / `ref_rejected_logps`, so training reads them from the
pairs and holds a single model. Three references (`train.reference.kind`):

- `previous` (the paper): y' ~ p_{t-1} and log p_ref = log p_{t-1}.
- `alpha` (α-SPIN, Alami et al. 2024, arXiv 2404.04291): a KL penalty toward the base (SFT) model p_0 on
  top of SPIN's, which is the same as the geometric-mixture reference
  log p_ref = α·log p_0 + (1 − α)·log p_{t-1} (`spinlm.loss.mix_reference_logps`). Both replies are scored by
  the opponent AND the base; the pair stores `opponent_*_logps`, `base_*_logps` and the mixture as `ref_*`.
  α = 0 is `previous`; α = 1 a fixed base reference.
- `fictitious` (fictitious play over the last h = `reference.history` iterates): each prompt is assigned
  one iterate s in {max(0, t−h), ..., t−1} (uniformly, from a hash of seed, t and the prompt's index);
  y' ~ p_s and log p_ref = log p_s, the same iterate for the sample and the reference. Iterate 0 is the
  starting model `model.name_or_path`, iterate s ≥ 1 is `run_dir/iteration_s/model`. Each pair stores
  `opponent_iteration` = s. Each iterate's group is generated into its own shard folder
  `iteration_t/generations/iterate_s/`, so an interrupted run resumes per group (with one iterate, as for
  `previous` and `alpha`, the shards sit in `iteration_t/generations/` directly).

Every pair stores `opponent_iteration` (which iterate sampled y') and `reference_iteration` (whose
log-probs are the reference, before the α mixture).

Memory: at most one model on the accelerator at any time. The opponent p_{t-1} is owned by the loop (it is
trained in place next) and does all of its own work first: it generates and scores its prompts, and
re-scores the mixed-in pairs. Then each other checkpoint needed (the base for `alpha` at t ≥ 2, the older
iterates for `fictitious`) is loaded alone, one at a time: the opponent is moved to CPU memory, the other
model is loaded on the opponent's device, used (generation and scoring) and freed, and the opponent moves
back (`_with_checkpoint`). On a CPU-only machine "moving to CPU" is a no-op, so there the two models share
host memory for the duration of that scoring; under QLoRA (`train.lora.load_in_4bit`) every iterate is
loaded in 4-bit like the opponent, which cannot be moved, so two 4-bit models share the GPU meanwhile.
When the needed iterate is p_{t-1} itself (the base at t = 1) no second model is loaded at all.

Mixing earlier iterations' pairs into iteration t (`train.mix_previous`, the official recipe mixes the
previous iteration's): the pairs keep their texts, `id`, `iteration` and `opponent_iteration`, and are
re-scored by the current opponent p_{t-1} (`reference_iteration` = t − 1), because the loss at iteration t
is defined against p_{t-1} (the official code also scores all mixed data with its one reference model).
Under `alpha` their stored base scores are reused: the base never changes. Scores are computed once here
and reused for every epoch.

    pairs = make_iteration_pairs(opponent, tokenizer, train_examples, cfg, t, run_dir, accelerator)

Tests: `.venv/bin/python -m pytest -q tests/test_references.py tests/test_schedules.py` (the references on
the tiny model, and mixing); docs/paper.md ("Where else") maps each reference to its function and test.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from spinlm.config import SpinConfig
from spinlm.data import Example
from spinlm.generation import generate_responses
from spinlm.io import read_jsonl
from spinlm.logps import score_logps
from spinlm.loss import mix_reference_logps
from spinlm.modeling import load_model
from spinlm.pairs import build_pairs, chosen_text, rejected_text
from spinlm.resume import base_model_dir

T = TypeVar("T")

# Columns only `alpha` pairs have: dropped from a mixed-in pair under another kind (a --force resume).
_ALPHA_COLUMNS = (
    "opponent_chosen_logps",
    "opponent_rejected_logps",
    "base_chosen_logps",
    "base_rejected_logps",
)


def opponent_window(cfg: SpinConfig, t: int) -> list[int]:
    """Iterates the opponent of iteration t comes from: [t−1], or the last `history` (fictitious play)."""
    ref = cfg.train.reference
    h = ref.history if ref.kind == "fictitious" else 1
    return list(range(max(0, t - h), t))


def assign_iterates(n: int, cfg: SpinConfig, t: int) -> list[int]:
    """The opponent iterate of each of n prompts: uniform over the window, fixed by (seed, t, index)."""
    window = opponent_window(cfg, t)
    if len(window) == 1:
        return [window[0]] * n
    return [
        window[random.Random((cfg.seed * 1_000_003 + t) * 1_000_033 + i).randrange(len(window))]
        for i in range(n)
    ]


def iterate_path(cfg: SpinConfig, run_dir: Path, s: int) -> str | Path:
    """Checkpoint of iterate s: the starting model for s = 0 (its safetensors conversion for a GGUF start,
    `run_dir/base_model`), else `run_dir/iteration_s/model`."""
    if s == 0:
        assert cfg.model.name_or_path is not None
        return base_model_dir(run_dir) or cfg.model.name_or_path
    return Path(run_dir) / f"iteration_{s}" / "model"


def mixed_pairs(run_dir: Path, t: int, cfg: SpinConfig) -> list[dict]:
    """Pairs of earlier iterations mixed into iteration t (window, fraction), to be re-scored."""
    mixed: list[dict] = []
    for s in range(max(1, t - cfg.train.mix_previous.window), t):
        rows = [r for r in read_jsonl(run_dir / f"iteration_{s}" / "pairs.jsonl") if r["iteration"] == s]
        rng = random.Random(cfg.seed * 7919 + t * 31 + s)
        keep = sorted(rng.sample(range(len(rows)), round(cfg.train.mix_previous.fraction * len(rows))))
        mixed += [rows[i] for i in keep]
    return mixed


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _with_checkpoint(opponent: Any, path: str | Path, cfg: SpinConfig, work: Callable[[Any], T]) -> T:
    """Run `work(model)` with checkpoint `path` as the only model on the accelerator, then free it.

    The opponent waits in CPU memory meanwhile (a no-op when it already lives on the CPU) and is moved back
    to its device afterwards. `work` must not keep a reference to the model it is given.
    """
    device = next(opponent.parameters()).device
    qlora = cfg.train.lora.enabled and cfg.train.lora.load_in_4bit  # loaded as the loop loads the opponent
    offload = device.type != "cpu" and not qlora  # a 4-bit model cannot be moved with .to()
    if offload:
        opponent.to("cpu")
        _free_memory()
    model = load_model(path, cfg.model, device=device, load_in_4bit=qlora)
    try:
        return work(model)
    finally:
        del model
        _free_memory()
        if offload:
            opponent.to(device)


def _score_pairs(
    model: Any, tokenizer: Any, pairs: list[dict], cfg: SpinConfig, desc: str, accelerator: Any = None
) -> list[tuple[float, float]]:
    """(log p(real | x), log p(generated | x)) under `model` for each pair, in order.

    Under the training's mixed precision (`accelerator.autocast()`, a no-op under fp32): the trainer's
    policy runs under that autocast, so at step 0 (policy = reference) log p/p_ref is 0 up to rounding that
    depends on the batch shape. On SmolLM2 under bf16 (benchmarks/bf16_reference.py) the mean |log-ratio|
    at step 0 was 0.088 nats per sequence scored this way, 0.43 with fp32 reference scores."""
    if not pairs:
        return []
    prompts = [p["prompt"] for p in pairs]
    tc = cfg.train
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()

    def score(responses: list[str], side: str) -> list[float]:
        return score_logps(
            model,
            tokenizer,
            prompts,
            responses,
            tc.max_length,
            cfg.eval.batch_size,
            tc.length_normalize,
            desc=f"{desc} {side}",
            packed=tc.padding_free,
        )

    with autocast:
        real = score([chosen_text(p) for p in pairs], "real")
        generated = score([rejected_text(p) for p in pairs], "generated")
    return list(zip(real, generated))


def make_iteration_pairs(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    cfg: SpinConfig,
    t: int,
    run_dir: Path,
    accelerator: Any = None,
    timings: dict[str, float] | None = None,
    label: str | None = None,
) -> list[dict]:
    """All training pairs of iteration t with reference log-probs (`model` is the opponent p_{t-1}).

    `timings` (optional) gets the seconds spent generating (`generate`) and scoring (`score`) added;
    `label` follows "generate" / "score" in the progress lines (default " {t}", and " (iterate s)" after
    "score"); `spinlm generate` passes "" for plain "generate" / "score real" lines."""
    name = f" {t}" if label is None else label

    def where(s: int) -> str:
        return f" (iterate {s})" if label is None else ""

    clock = timings if timings is not None else {}
    run_dir = Path(run_dir)
    it_dir = run_dir / f"iteration_{t}"
    kind = cfg.train.reference.kind
    window = opponent_window(cfg, t)
    assigned = assign_iterates(len(examples), cfg, t)
    fresh: list[dict | None] = [None] * len(examples)
    # (pairs, their (real, generated) log-probs under the iterate that is their reference), one per scoring.
    scored: list[tuple[list[dict], list[tuple[float, float]]]] = []

    def score(m: Any, group: list[dict], desc: str) -> list[tuple[float, float]]:
        return timed(clock, "score", _score_pairs, m, tokenizer, group, cfg, desc, accelerator)

    def play(m: Any, s: int) -> None:
        """Iterate s (loaded as m) samples y' for its prompts and scores both replies of those pairs."""
        idx = [i for i, a in enumerate(assigned) if a == s]
        single = len(window) == 1
        start = time.perf_counter()
        gens = generate_responses(
            m,
            tokenizer,
            [examples[i].prompt for i in idx],
            cfg.generation,
            seed=cfg.seed * 1000 + t + (0 if single else 1_000_000 * (s + 1)),
            shard_dir=it_dir / "generations" if single else it_dir / "generations" / f"iterate_{s}",
            desc=f"generate{name}" if single else f"generate{name} (iterate {s})",
            accelerator=accelerator,
        )
        clock["generate"] = clock.get("generate", 0.0) + time.perf_counter() - start
        group = build_pairs([examples[i] for i in idx], gens, iteration=t)
        for i, p in zip(idx, group):
            p["id"] = f"{t}-{i}"
            p["opponent_iteration"] = s
            p["reference_iteration"] = s
            fresh[i] = p
        scored.append((group, score(m, group, f"score{name}{where(s)}")))

    # 1. The opponent p_{t-1}, resident: its own prompts, then the mixed-in pairs of earlier iterations.
    play(model, t - 1)
    mixed = mixed_pairs(run_dir, t, cfg)
    for p in mixed:
        p.setdefault("opponent_iteration", p["iteration"] - 1)
        p["reference_iteration"] = t - 1
        if kind != "alpha":
            for col in _ALPHA_COLUMNS:
                p.pop(col, None)
    scored.append((mixed, score(model, mixed, f"score {t} (mixed)")))

    # 2. Older iterates (fictitious play), each loaded alone, for the prompts assigned to it.
    for s in window:
        if s != t - 1 and s in assigned:
            _with_checkpoint(model, iterate_path(cfg, run_dir, s), cfg, functools.partial(play, s=s))

    pairs = [p for p in fresh if p is not None] + mixed
    for group, scores in scored:
        for p, (real, generated) in zip(group, scores):
            key = "opponent" if kind == "alpha" else "ref"
            p[f"{key}_chosen_logps"], p[f"{key}_rejected_logps"] = real, generated
    if kind == "alpha":
        timed(clock, "score", _add_alpha_reference, model, tokenizer, pairs, cfg, t, run_dir, accelerator)
    return pairs


def timed(clock: dict[str, float], stage: str, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args), its wall time added to clock[stage]."""
    start = time.perf_counter()
    try:
        return fn(*args)
    finally:
        clock[stage] = clock.get(stage, 0.0) + time.perf_counter() - start


def _add_alpha_reference(
    model: Any, tokenizer: Any, pairs: list[dict], cfg: SpinConfig, t: int, run_dir: Path, accelerator: Any
) -> None:
    """Base-model scores of every pair (reused when stored), then ref = α·base + (1 − α)·opponent."""
    need = [p for p in pairs if "base_chosen_logps" not in p or "base_rejected_logps" not in p]
    if t - 1 == 0:  # the opponent p_0 IS the base model: its scores are the base scores
        base_scores = [(p["opponent_chosen_logps"], p["opponent_rejected_logps"]) for p in need]
    elif need:
        base_scores = _with_checkpoint(
            model,
            iterate_path(cfg, run_dir, 0),
            cfg,
            lambda m: _score_pairs(m, tokenizer, need, cfg, f"score {t} (base)", accelerator),
        )
    else:
        base_scores = []
    for p, (real, generated) in zip(need, base_scores):
        p["base_chosen_logps"], p["base_rejected_logps"] = real, generated

    alpha = cfg.train.reference.alpha
    for side in ("chosen", "rejected"):
        opponent = torch.tensor([p[f"opponent_{side}_logps"] for p in pairs], dtype=torch.float64)
        base = torch.tensor([p[f"base_{side}_logps"] for p in pairs], dtype=torch.float64)
        for p, v in zip(pairs, mix_reference_logps(opponent, base, alpha).tolist()):
            p[f"ref_{side}_logps"] = v
