"""Generate stage: the opponent p_t samples one response y' ~ p_t(.|x) per prompt, fast and at scale.

What it does: renders every prompt with the training chat template, sorts prompts by length (longest first,
so a batch pads little and an out-of-memory error shows at once; identical prompts side by side), cuts the
sorted list into fixed shards, generates each shard and writes it to `DIR/shard_XXXXX.jsonl` atomically as
soon as it is done. Results come back in input order.

Four engines (`generation.engine`, implemented in `spinlm.engines`, vLLM in `spinlm.vllm_engine`):

- `refill` (spin's own loop): a left-padded batch of up to `batch_size` rows over a KV cache. A row that
  finishes (end of turn, stop string, max_new_tokens) stops counting at once; when half the slots are free,
  finished rows are dropped and the next prompts prefilled into their place (identical prompts prefilled
  once), in one cache copy; between those, each decode step writes its column in place. So the batch stays
  full and only the tail runs short: continuous batching without paged attention. Needs a decoder whose
  cache is plain full attention (Llama, Qwen2, Mistral without sliding window, ...).
- `generate`: Hugging Face `model.generate` on left-padded batches of `batch_size` sorted prompts; every row
  runs until the longest in its batch ends. Works for every model `generate` supports.
- `continuous`: transformers' continuous batching (`model.generate_batch`, paged attention). It runs on CPU
  and its greedy outputs equal one-at-a-time greedy outputs there (tested), but on CPU it is several times
  slower than `generate` (Python scheduling per step, attention masks over the whole paged cache), and it
  cannot use spin's sampler: its samples come from its own seeded RNG, so they differ from the other two
  engines' for the same seed. Stop strings are applied after the fact (the tokens after a stop are wasted).
- `vllm` (extra `spinlm[vllm]`): vLLM's offline engine, started from the model's checkpoint folder for one
  call and shut down before it returns; the same prompt ids and the same `_finish` cut, but vLLM's own
  seeded sampler (see `spinlm.vllm_engine` for what that changes, and for data / tensor parallelism).
- `auto` (default): vLLM when it is importable and the model is on a GPU, else `refill` where the model
  supports it, else `generate` (logged either way). A rule, not a measurement: timing the engines before
  every generation cost more than it saved (on 1,024 prompts of a 4.2M-parameter model it ran 9 probe
  batches for a 16-batch job, to keep the engine it would have used anyway); `benchmarks/real_generation.py`
  prints the table for a given model and machine. The choice is written to `DIR/engine.json`, so a resumed
  run keeps the engine it started with.

Sampling: `refill` and `generate` share one sampler. A token is drawn by inverse-CDF sampling:
the first token whose cumulative softmax(filtered_logits / T) reaches u, with u in (0, 1) computed by an
integer hash of (seed, prompt index, step) instead of a stateful RNG. So a prompt's sample depends only on the seed, its index and the model: not on
batch size, batch composition, engine (of these two), shard or number of processes, and the same seed gives
the same responses on the same hardware (float rounding differs with batch shape, which can move a rare
draw that falls next to a token boundary). temperature 0 is greedy; top_k 0 and top_p 1 disable those filters (transformers' default
top_k=50 is never applied); sampling defaults stored in the model's own generation_config (e.g. a repetition
penalty) are NOT applied: spin's settings are the whole specification.

Resuming: a shard file on disk is final, so a stopped run regenerates only the missing shards.

Data parallel: under `accelerate launch --num_processes N`, process r generates shards r, r+N, ...; after a
barrier every process reads all shards, so each prompt gets exactly one response, in order, and (sampler
above) the same response as a single-process run.

Departure from the paper: its simplified loop samples one prompt at a time; the responses follow the same
distribution, only faster (`python benchmarks/generation.py` measures it).

    responses = generate_responses(model, tokenizer, prompts, GenerationConfig(), seed=0, shard_dir=Path("gen"))
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spinlm.config import GenerationConfig
from spinlm.data import Message, prompt_key
from spinlm.engines import (
    Sampler,
    Spec,
    continuous_engine,
    continuous_supported,
    generate_engine,
    refill_engine,
    refill_supported,
)
from spinlm.errors import SpinError
from spinlm.io import atomic_write_text, fault_point, read_jsonl
from spinlm.modeling import DTYPES, encode, fast_bf16, render_prompt
from spinlm.progress import Progress
from spinlm.vllm_engine import VllmEngine, auto_choice, check_vllm, rank_zero_only

log = logging.getLogger(__name__)

ENGINES = ("refill", "generate", "continuous")
_LOGGED: set[tuple[str, str]] = set()  # (engine, reason) pairs already logged at INFO by this process


@dataclass(frozen=True)
class Generation:
    text: str  # the response content, special tokens and everything after the stop removed
    num_tokens: int  # generated tokens including the end-of-turn token when present
    finished: bool  # ended by end of turn / stop string (False: cut at max_new_tokens)


def _cut_at_stop(text: str, stop_strings: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _finish(spec: Spec, row: list[int]) -> Generation:
    """Raw generated ids -> Generation: cut after the first end of turn, or at the first stop string."""
    end = next((i + 1 for i, t in enumerate(row) if t in spec.eos_ids), None)
    row = row[:end] if end is not None else row
    decode = spec.tokenizer.decode
    text = decode(row, skip_special_tokens=True)
    stops = list(spec.stop_strings)

    def hit(k: int) -> bool:
        return _cut_at_stop(decode(row[:k], skip_special_tokens=True), stops)[1]

    if stops and hit(len(row)):
        # The shortest prefix whose text contains a stop (binary search: "contains" grows with the prefix),
        # so num_tokens counts the same tokens whether the engine stopped early or not.
        lo, hi = 1, len(row)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
        text = _cut_at_stop(decode(row[:lo], skip_special_tokens=True), stops)[0]
        return Generation(text=text, num_tokens=lo, finished=True)
    return Generation(text=text, num_tokens=len(row), finished=end is not None)


_ENGINE_FNS: dict[str, Callable[..., list[list[int]]]] = {
    "refill": refill_engine,
    "generate": generate_engine,
    "continuous": continuous_engine,
}


def supported_engines(model: Any) -> list[str]:
    """The engines that can run `model`, in the order auto measures them."""
    ok = {"refill": refill_supported(model), "generate": True, "continuous": continuous_supported(model)}
    return [e for e in ENGINES if ok[e]]


def _choose_engine(model: Any) -> tuple[str, str]:
    """auto on the HF engines: (engine, reason) by rule, with no timing runs: `refill` where the model
    supports it (spin's fastest CPU and non-vLLM engine in every measurement, docs/results/generation.md),
    else `generate`. `benchmarks/real_generation.py` times the engines when a user wants the table."""
    if refill_supported(model):
        return "refill", "default where the model supports it"
    return "generate", f"refill does not support {type(model).__name__}"


def _resolve_engine(
    model: Any, prompt_ids: list[list[int]], spec: Spec, shard_dir: Path | None, accelerator: Any, desc: str
) -> str:
    engine = spec.cfg.engine
    if engine == "vllm":  # spinlm.vllm_engine: loads the checkpoint folder itself, any causal LM vLLM knows
        check_vllm()
        return engine
    if engine != "auto":
        if engine not in supported_engines(model):
            raise SpinError(
                f"generation.engine={engine} does not support {type(model).__name__}",
                hint=f"use one of: auto, {', '.join(supported_engines(model))}",
            )
        return engine
    # The engine a stopped run started with (DIR/engine.json) wins, so a resumed run samples alike.
    saved = shard_dir / "engine.json" if shard_dir is not None else None
    distributed = accelerator is not None and accelerator.num_processes > 1
    previous = json.loads(saved.read_text())["engine"] if saved is not None and saved.exists() else None
    if distributed:  # rank 0's view; every rank has read before anyone writes (barrier below)
        from accelerate.utils import broadcast_object_list

        previous = broadcast_object_list([previous], from_process=0)[0]
    if previous is not None:
        log.info("%s: engine %s (chosen when this generation started, %s)", desc, previous, saved)
        return str(previous)
    choice = auto_choice(model)  # vLLM on a GPU when importable; None: the HF engines below
    engine, reason = choice if choice is not None else _choose_engine(model)
    # Once per distinct choice and process: a run makes several calls a stage, each with the same answer.
    level = logging.DEBUG if (engine, reason) in _LOGGED else logging.INFO
    _LOGGED.add((engine, reason))
    log.log(level, "%s: engine %s: %s", desc, engine, reason)
    if distributed:
        accelerator.wait_for_everyone()
    if saved is not None and (accelerator is None or accelerator.is_main_process):
        atomic_write_text(saved, json.dumps({"engine": engine, "reason": reason}) + "\n")
    return engine


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """End of turn: the tokenizer's EOS plus the model generation_config's (chat models often list several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, list) else ({extra} if isinstance(extra, int) else set())
    return frozenset(ids)


def _run_shards(
    run_engine: Callable[..., list[list[int]]],
    model: Any,
    prompt_ids: list[list[int]],
    shards: list[list[int]],
    todo: list[int],
    spec: Spec,
    shard_dir: Path | None,
    results: dict[int, Generation],
    on_done: Callable[[int], None],
    on_shard: Callable[[int], None] | None,
) -> None:
    """Generate shards `todo` with `run_engine`, each cut by `_finish`, written final and added to results."""
    for s in todo:
        idx = shards[s]
        with torch.inference_mode():
            rows = run_engine(model, [prompt_ids[i] for i in idx], idx, spec, on_done)
        shard_results = [(i, _finish(spec, row)) for i, row in zip(idx, rows)]
        if shard_dir is not None:
            lines = [
                json.dumps({"index": i, "text": g.text, "num_tokens": g.num_tokens, "finished": g.finished})
                for i, g in shard_results
            ]
            atomic_write_text(shard_dir / f"shard_{s:05d}.jsonl", "\n".join(lines) + "\n")
            fault_point("shard")  # test hook (spinlm.io): a kill with this shard final on disk
        results.update(shard_results)
        if on_shard is not None:
            on_shard(s)


# ------------------------------------------------------------------------------------------------------


def generation_model(model: Any, cfg: GenerationConfig) -> Any:
    """The model the engines sample from: `model` itself, or with `generation.dtype` set to another dtype
    than its weights' a copy of it in that dtype (same device, eval mode; freed when generation returns).

    A copy, not `model.to(dtype)`: casting an fp32 model to bf16 and back would lose its weights' low bits.
    Rebuilt from the config and the state dict (not `copy.deepcopy`, which can carry a trained model's stale
    state along). Only for full models: adapters (PEFT) and quantized weights are refused."""
    if cfg.dtype == "model" or cfg.engine == "vllm":
        return model
    first = next(model.parameters())
    if cfg.dtype == "auto":  # bf16 where it is fast, for a full fp32 model; else the model as it is
        adapter = hasattr(model, "peft_config") or getattr(model, "is_quantized", False)
        if adapter or first.dtype != torch.float32 or not fast_bf16(first.device):
            return model
    dtype = torch.bfloat16 if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    if first.dtype == dtype:
        return model
    if hasattr(model, "peft_config") or getattr(model, "is_quantized", False):
        raise SpinError(
            f"generation.dtype={cfg.dtype} needs a full model, not an adapter or quantized one",
            hint="set generation.dtype: model",
        )
    from transformers import AutoModelForCausalLM

    copy = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    copy.load_state_dict(model.state_dict())  # cast to `dtype` on load; tied embeddings stay tied
    copy.generation_config = model.generation_config
    return copy.to(first.device).eval()


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: list[list[Message]],
    cfg: GenerationConfig,
    seed: int,
    shard_dir: Path | None = None,
    greedy: bool = False,
    desc: str = "generate",
    accelerator: Any = None,
    on_shard: Callable[[int], None] | None = None,
    model_path: str | Path | None = None,
) -> list[Generation]:
    """One response per prompt, in input order (see the module docstring for engines, sharding, resume).

    `model_path`: the folder holding `model`'s weights, for the vLLM engine (default: the folder `load_model`
    loaded them from, while training has not changed them; else vLLM gets a temporary copy)."""
    model = generation_model(model, cfg)
    # Render and tokenize each distinct conversation once (built-in tasks repeat prompts many times).
    first: dict[str, int] = {}
    which = [first.setdefault(prompt_key(p), i) for i, p in enumerate(prompts)]
    encoded = {i: encode(tokenizer, render_prompt(tokenizer, prompts[i])) for i in first.values()}
    prompt_ids = [encoded[i] for i in which]
    # Longest first (an out-of-memory error shows at once), identical prompts side by side (refill runs them once).
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompt_ids[i]), prompt_ids[i]))
    shards = [order[s : s + cfg.shard_size] for s in range(0, len(order), cfg.shard_size)]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if shard_dir is not None:
        shard_dir.mkdir(parents=True, exist_ok=True)
    sampler = None if greedy or cfg.temperature == 0 else Sampler(cfg, seed)
    spec = Spec(
        tokenizer=tokenizer,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        eos_ids=_eos_ids(model, tokenizer),
        pad_id=tokenizer.pad_token_id,
        stop_strings=tuple(cfg.stop_strings),
        sampler=sampler,
        cfg=cfg,
        seed=seed,
    )

    results: dict[int, Generation] = {}
    # Every process takes part in choosing (the choice is broadcast), even one with nothing left to do.
    engine = _resolve_engine(model, prompt_ids, spec, shard_dir, accelerator, desc) if prompts else "generate"
    alone = engine == "vllm" and rank_zero_only(cfg.vllm, world)  # tensor parallel: rank 0 does every shard
    mine = [s for s in range(len(shards)) if (rank == 0 if alone else s % world == rank)]
    todo = [s for s in mine if shard_dir is None or not (shard_dir / f"shard_{s:05d}.jsonl").exists()]
    if len(todo) < len(mine):
        log.info("%s: %d of %d shards already on disk, resuming", desc, len(mine) - len(todo), len(mine))
    n_todo = sum(len(shards[s]) for s in todo)
    bar = Progress(n_todo, desc, unit="prompt", enabled=n_todo > 0 and rank == 0)
    start, tokens = time.perf_counter(), 0

    def on_done(num_tokens: int) -> None:  # one prompt finished: progress in prompts/s and tokens/s
        nonlocal tokens
        tokens += num_tokens
        bar.update(1)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(prompts_s=f"{bar.n / elapsed:.1f}", tokens_s=f"{tokens / elapsed:.0f}")

    run_engine = _ENGINE_FNS[engine] if engine != "vllm" else VllmEngine(model, spec, model_path, accelerator)
    if isinstance(run_engine, VllmEngine):
        run_engine.start(load=bool(todo))  # outside inference_mode: it moves the model to CPU memory
    try:
        _run_shards(run_engine, model, prompt_ids, shards, todo, spec, shard_dir, results, on_done, on_shard)
    finally:
        if isinstance(run_engine, VllmEngine):
            run_engine.close()  # its memory is free again before anything else (training) runs
    bar.close()

    if shard_dir is not None:
        if accelerator is not None:
            accelerator.wait_for_everyone()
        results = {}
        for s in range(len(shards)):
            for row in read_jsonl(shard_dir / f"shard_{s:05d}.jsonl"):
                results[row["index"]] = Generation(row["text"], row["num_tokens"], row["finished"])
    missing = [i for i in range(len(prompts)) if i not in results]
    if missing:  # only possible without a shard_dir under several processes
        raise RuntimeError(
            f"{len(missing)} prompts have no response; pass shard_dir when running distributed"
        )
    return [results[i] for i in range(len(prompts))]
