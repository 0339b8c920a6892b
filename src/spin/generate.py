"""Generate stage: the opponent p_t samples one response y' ~ p_t(.|x) per prompt, fast and at scale.

What it does: renders every prompt with the training chat template, sorts prompts by length (longest first,
so a batch pads little and an out-of-memory error shows at once), cuts the sorted list into fixed shards,
generates each shard and writes it to `DIR/shard_XXXXX.jsonl` atomically as soon as it is done. Results come
back in input order.

Three engines (`generation.engine`):

- `refill` (spin's own loop): a left-padded batch over a dynamic KV cache where a row that finishes (end of
  turn, stop string, max_new_tokens) is dropped at once and, when a quarter of the slots are free, the next
  prompts are prefilled and merged into the batch. So no step is spent on finished rows and the batch stays
  full: continuous batching without paged attention. Needs a decoder whose cache is plain full attention
  (Llama, Qwen2, Mistral without sliding window, ...); other models fall back to `generate`.
- `generate`: Hugging Face `model.generate` on left-padded batches of `batch_size` sorted prompts; every row
  runs until the longest in its batch ends. Works for every model `generate` supports.
- `continuous`: transformers' continuous batching (`model.generate_batch`, paged attention). It runs on CPU
  and its greedy outputs equal one-at-a-time greedy outputs there (tested), but on CPU it is several times
  slower than `generate` (Python scheduling per step, attention masks over the whole paged cache), and it
  cannot use spin's sampler: its samples come from its own seeded RNG, so they differ from the other two
  engines' for the same seed. Stop strings are applied after the fact (the tokens after a stop are wasted).
- `auto` (default): times each supported engine once per process on a probe of the prompts (one batch
  of them, the real settings) and uses the fastest (with fewer than 4 batches of prompts it does not measure
  and uses `refill` where supported); the choice and the timings are logged,
  cached per (model shape, device, dtype, settings) and written to `DIR/engine.json`, so a resumed run keeps
  the engine it started with. Under several processes rank 0's choice is used everywhere.

Sampling: `refill` and `generate` share one sampler. A token is drawn by the Gumbel-max trick,
argmax(filtered_logits / T + G), with G computed by an integer hash of (seed, prompt index, step, token id)
instead of a stateful RNG. So a prompt's sample depends only on the seed, its index and the model: not on
batch size, batch composition, engine (of these two), shard or number of processes, and the same seed gives
the same responses on the same hardware (float rounding differs with batch shape, which can flip a rare
near-tie). temperature 0 is greedy; top_k 0 and top_p 1 disable those filters (transformers' default
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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, StoppingCriteria

from spin.config import GenerationConfig
from spin.data import Message
from spin.errors import SpinError
from spin.io import atomic_write_text, fault_point, read_jsonl
from spin.modeling import encode, render_prompt

log = logging.getLogger(__name__)

ENGINES = ("refill", "generate", "continuous")
PROBE_MIN_BATCHES = 4  # auto measures only when there are at least this many batches of prompts
REFILL_FRACTION = 4  # refill when >= batch_size / 4 slots are free: one prefill call per many finished rows
_ENGINE_CACHE: dict[tuple, tuple[str, str]] = {}  # auto's choice per process: key -> (engine, reason)


@dataclass(frozen=True)
class Generation:
    text: str  # the response content, special tokens and everything after the stop removed
    num_tokens: int  # generated tokens including the end-of-turn token when present
    finished: bool  # ended by end of turn / stop string (False: cut at max_new_tokens)


def _shard_seed(seed: int, shard: int) -> int:
    return (seed * 1_000_003 + shard * 7919 + 17) % (2**31 - 1)


def _cut_at_stop(text: str, stop_strings: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


# ------------------------------------------------------------------------------------------------------
# Sampling: stateless Gumbel-max, so a sample depends on (seed, prompt index, step) and not on the batch.

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (good avalanche) on int64 tensors holding values in [0, 2^32).

    Products stay below 2^59, so int64 never overflows."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


class Sampler:
    """Temperature / top-k / top-p sampling with counter-based noise; `None` sampler = greedy."""

    def __init__(self, cfg: GenerationConfig, seed: int) -> None:
        self.temperature, self.top_k, self.top_p = cfg.temperature, cfg.top_k, cfg.top_p
        s = torch.tensor([(seed ^ (seed >> 32)) & _M32], dtype=torch.int64)
        self.seed_hash = _mix32(_mix32(s))

    def filtered(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits / T with the tokens outside top-k / top-p set to -inf (float32)."""
        x = logits.float() / self.temperature
        if 0 < self.top_k < x.shape[-1]:
            kth = torch.topk(x, self.top_k, dim=-1).values[:, -1:]  # (B, 1) k-th largest
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p < 1.0:
            # Keep the smallest set of top tokens whose mass reaches top_p (the token crossing it included).
            sorted_x, order = torch.sort(x, dim=-1, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= self.top_p
            x = x.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        return x

    def noise(self, keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
        """(B, V) standard Gumbel noise, a pure function of (seed, key, step, token id)."""
        dev = keys.device
        h = _mix32(_mix32(self.seed_hash.to(dev) ^ (keys & _M32)) ^ (steps & _M32))  # (B,) one per row/step
        tok = torch.arange(vocab, device=dev, dtype=torch.int64) * 0x9E3779B1 & _M32  # (V,) spread ids
        bits = _mix32(h[:, None] ^ tok[None, :])  # (B, V) in [0, 2^32); one round: h is already mixed
        u = ((bits >> 8).float() + 0.5) / float(1 << 24)  # (B, V) uniform in (0, 1), exact in float32
        return -torch.log(-torch.log(u))

    def perturbed(self, logits: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """argmax of this over the vocabulary is an exact sample from the filtered softmax."""
        return self.filtered(logits) + self.noise(keys, steps, logits.shape[-1])

    def pick(self, logits: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return self.perturbed(logits, keys, steps).argmax(dim=-1)


@dataclass(frozen=True)
class _Spec:
    """Everything an engine needs besides the model and the prompts."""

    tokenizer: Any
    max_new_tokens: int
    batch_size: int
    eos_ids: frozenset[int]
    pad_id: int
    stop_strings: tuple[str, ...]
    sampler: Sampler | None  # None: greedy
    cfg: GenerationConfig
    seed: int

    def stopped(self, rows: list[list[int]]) -> list[bool]:
        """Whether each row's text contains a stop string (one batched decode; only with stop strings)."""
        if not self.stop_strings:
            return [False] * len(rows)
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [any(s in t for s in self.stop_strings) for t in texts]


def _finish(spec: _Spec, row: list[int]) -> Generation:
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


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _left_pad(batch: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) left-padded ids and attention mask."""
    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


# ------------------------------------------------------------------------------------------------------
# Engine 1: refill. A dynamic-cache batch that drops finished rows and prefills new prompts into free slots.


def _refill_supported(model: Any) -> bool:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # noqa: BLE001 - an exotic config: not ours to run
        return False
    return len(layers) > 0 and all(type(layer) is DynamicLayer for layer in layers)


def _refill_engine(
    model: Any, prompt_ids: list[list[int]], keys: list[int], spec: _Spec, on_done: Callable[[int], None]
) -> list[list[int]]:
    from transformers import DynamicCache

    dev = _device(model)
    out: list[list[int]] = [[] for _ in prompt_ids]
    queue = deque(range(len(prompt_ids)))
    key_t = torch.tensor(keys, dtype=torch.int64, device=dev)  # (N,) sampler key of each prompt
    rows: list[int] = []  # prompt index of each active row
    cache: Any = None
    mask = pos = last = torch.empty(0, dtype=torch.long, device=dev)  # (B, L), (B,), (B,)

    def pick(logits: torch.Tensor, idx: list[int]) -> torch.Tensor:  # logits (B, V) -> (B,) token ids
        if spec.sampler is None:
            return logits.argmax(dim=-1)
        steps = torch.tensor([len(out[i]) for i in idx], dtype=torch.int64, device=dev)
        return spec.sampler.pick(logits, key_t[idx], steps)

    while queue or rows:
        free = spec.batch_size - len(rows)
        if queue and (not rows or free >= max(1, spec.batch_size // REFILL_FRACTION)):
            new = [queue.popleft() for _ in range(min(free, len(queue)))]
            ids, new_mask = _left_pad([prompt_ids[i] for i in new], spec.pad_id, dev)  # (Bn, Ln)
            new_pos = (new_mask.cumsum(-1) - 1).clamp(min=0)  # positions restart at each row's first token
            new_cache = DynamicCache(config=model.config)
            logits = model(
                input_ids=ids,
                attention_mask=new_mask,
                position_ids=new_pos,
                past_key_values=new_cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]  # (Bn, V)
            tokens = pick(logits, new)
            if rows:  # merge: left-pad the shorter cache so both have length L, then stack the rows
                width = max(mask.shape[1], new_mask.shape[1])
                for old_layer, new_layer in zip(cache.layers, new_cache.layers):
                    for name in ("keys", "values"):
                        a, b = (
                            getattr(old_layer, name),
                            getattr(new_layer, name),
                        )  # (B, H, La, D), (Bn, H, Ln, D)
                        a = torch.nn.functional.pad(a, (0, 0, width - a.shape[2], 0))
                        b = torch.nn.functional.pad(b, (0, 0, width - b.shape[2], 0))
                        setattr(old_layer, name, torch.cat([a, b]))
                mask = torch.cat(
                    [
                        torch.nn.functional.pad(mask, (width - mask.shape[1], 0)),
                        torch.nn.functional.pad(new_mask, (width - new_mask.shape[1], 0)),
                    ]
                )
                pos, last = torch.cat([pos, new_mask.sum(-1)]), torch.cat([last, tokens])
            else:
                cache, mask, pos, last = new_cache, new_mask, new_mask.sum(-1), tokens
            fresh = len(rows)  # rows before `fresh` got no token this round (theirs is already in `out`)
            rows += new
        else:
            fresh = 0
            mask = torch.nn.functional.pad(mask, (0, 1), value=1)  # (B, L + 1): the fed token is real
            logits = model(
                input_ids=last[:, None],
                attention_mask=mask,
                position_ids=pos[:, None],
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]  # (B, V)
            pos = pos + 1
            last = pick(logits, rows)
        # Rows fresh.. got a new token (the last one of each row in `last`); only they can have finished.
        new_tokens = last[fresh:].tolist()
        for i, t in zip(rows[fresh:], new_tokens):
            out[i].append(t)
        stopped = spec.stopped([out[i] for i in rows[fresh:]])
        done = {
            fresh + j
            for j, (i, t) in enumerate(zip(rows[fresh:], new_tokens))
            if t in spec.eos_ids or len(out[i]) >= spec.max_new_tokens or stopped[j]
        }
        keep = [j for j in range(len(rows)) if j not in done]
        if len(keep) < len(rows):
            for j in sorted(done):
                on_done(len(out[rows[j]]))
            rows = [rows[j] for j in keep]
            if not rows:
                cache = None
                continue
            sel = torch.tensor(keep, device=dev)
            first = int(mask[sel].any(0).float().argmax())  # leading columns now padding in every row
            for layer in cache.layers:
                layer.keys = layer.keys[sel, :, first:]
                layer.values = layer.values[sel, :, first:]
            mask, pos, last = mask[sel, first:], pos[sel], last[sel]
    return out


# ------------------------------------------------------------------------------------------------------
# Engine 2: Hugging Face `generate` on left-padded batches, with spin's sampler as a logits processor.


class _NoisyLogits(LogitsProcessor):
    """LogitsProcessor: filtered logits / T + Gumbel noise, so generate's greedy argmax is a sample."""

    def __init__(self, sampler: Sampler, keys: torch.Tensor, width: int) -> None:
        self.sampler, self.keys, self.width = sampler, keys, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        steps = torch.full_like(self.keys, input_ids.shape[1] - self.width)  # rows are never reordered
        return self.sampler.perturbed(scores, self.keys, steps)


class _StopText(StoppingCriteria):
    """StoppingCriteria: a row is done once its generated text contains a stop string."""

    def __init__(self, spec: _Spec, width: int) -> None:
        self.spec, self.width = spec, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        hit = self.spec.stopped(input_ids[:, self.width :].tolist())
        return torch.tensor(hit, dtype=torch.bool, device=input_ids.device)


def hf_generation_config(spec: _Spec) -> Any:
    """The complete transformers GenerationConfig for `generate`: greedy argmax over spin's processed
    logits, and every model-default processor that spin does not know about neutralised."""
    from transformers import GenerationConfig as HFGenerationConfig

    return HFGenerationConfig(
        # Greedy argmax over _NoisyLogits' output, which is the sample; with do_sample=False transformers
        # applies none of its warpers (temperature, top-k (default 50!), top-p): spin's sampler does that.
        do_sample=False,
        max_new_tokens=spec.max_new_tokens,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_length=0,
        num_beams=1,
        eos_token_id=sorted(spec.eos_ids),
        pad_token_id=spec.pad_id,
    )


def _generate_engine(
    model: Any, prompt_ids: list[list[int]], keys: list[int], spec: _Spec, on_done: Callable[[int], None]
) -> list[list[int]]:
    from transformers import LogitsProcessorList, StoppingCriteriaList

    dev = _device(model)
    out: list[list[int]] = []
    for b in range(0, len(prompt_ids), spec.batch_size):
        batch = prompt_ids[b : b + spec.batch_size]
        ids, mask = _left_pad(batch, spec.pad_id, dev)  # (B, T)
        width = ids.shape[1]
        processors = LogitsProcessorList()
        if spec.sampler is not None:
            key_t = torch.tensor(keys[b : b + spec.batch_size], dtype=torch.int64, device=dev)
            processors.append(_NoisyLogits(spec.sampler, key_t, width))
        stopping = StoppingCriteriaList([_StopText(spec, width)] if spec.stop_strings else [])
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=hf_generation_config(spec),
            logits_processor=processors,
            stopping_criteria=stopping,
        )[:, width:].tolist()  # (B, N): padded after a row ends
        for row in generated:
            end = next((i + 1 for i, t in enumerate(row) if t in spec.eos_ids), len(row))
            out.append(row[:end])
            on_done(end)
    return out


# ------------------------------------------------------------------------------------------------------
# Engine 3: transformers' continuous batching (paged attention).


def _continuous_supported(model: Any) -> bool:
    config = getattr(model, "config", None)
    return (
        config is not None
        and not getattr(config, "is_encoder_decoder", False)
        and callable(getattr(model, "generate_batch", None))
        and bool(getattr(model, "_supports_attention_backend", False))
    )


def _continuous_engine(
    model: Any, prompt_ids: list[list[int]], keys: list[int], spec: _Spec, on_done: Callable[[int], None]
) -> list[list[int]]:
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    dev = _device(model)
    sample = spec.sampler is not None
    gen_cfg = HFGenerationConfig(
        do_sample=sample,
        max_new_tokens=spec.max_new_tokens,
        temperature=spec.cfg.temperature if sample else None,
        top_k=spec.cfg.top_k if sample else None,  # 0 disables (None would let the default of 50 in)
        top_p=spec.cfg.top_p if sample else None,
        eos_token_id=sorted(spec.eos_ids),
        pad_token_id=spec.pad_id,
    )
    seed = _shard_seed(spec.seed, keys[0] if keys else 0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        seed -= torch.distributed.get_rank()  # it seeds with seed + rank; undo so ranks sample alike
    cb: dict[str, Any] = {"seed": seed, "max_requests_per_batch": spec.batch_size}
    if dev.type == "cpu":
        # Left alone it sizes the paged cache from free memory: 90% of the machine's RAM on CPU.
        page = 32
        longest = max(len(p) for p in prompt_ids) + spec.max_new_tokens
        cb.update(
            page_size=page, num_blocks=spec.batch_size * (-(-longest // page) + 1), max_batch_tokens=1024
        )
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # it reseeds the global RNG
        results = model.generate_batch(
            prompt_ids,
            generation_config=gen_cfg,
            continuous_batching_config=ContinuousBatchingConfig(**cb),
            warmup=dev.type == "cuda",
        )
    ordered = list(results.values())  # returned in input order
    if len(ordered) != len(prompt_ids) or any(r.error is not None for r in ordered):
        raise RuntimeError("continuous batching lost or failed requests; use generation.engine=generate")
    out = [list(r.generated_tokens) for r in ordered]
    for row in out:
        on_done(len(row))
    return out


_ENGINE_FNS: dict[str, Callable[..., list[list[int]]]] = {
    "refill": _refill_engine,
    "generate": _generate_engine,
    "continuous": _continuous_engine,
}


def supported_engines(model: Any) -> list[str]:
    """The engines that can run `model`, in the order auto measures them."""
    ok = {"refill": _refill_supported(model), "generate": True, "continuous": _continuous_supported(model)}
    return [e for e in ENGINES if ok[e]]


def _choose_engine(model: Any, prompt_ids: list[list[int]], spec: _Spec, accelerator: Any) -> tuple[str, str]:
    """auto: time every supported engine once on a probe of the prompts; the fastest wins (cached)."""
    config, dev = getattr(model, "config", None), _device(model)
    key = (
        type(model).__name__,
        getattr(config, "hidden_size", None),
        getattr(config, "num_hidden_layers", None),
        getattr(config, "vocab_size", None),
        str(dev),
        str(next(model.parameters()).dtype),
        spec.sampler is None,
        spec.batch_size,
        spec.max_new_tokens,
    )
    if key not in _ENGINE_CACHE:
        candidates = supported_engines(model)
        if len(candidates) == 1:
            choice = (candidates[0], "the only engine this model supports")
        elif len(prompt_ids) < PROBE_MIN_BATCHES * spec.batch_size:
            # Timing three engines would cost more than the best one could save on so few prompts.
            choice = (candidates[0], f"default for fewer than {PROBE_MIN_BATCHES} batches of prompts")
        else:
            n = spec.batch_size  # one batch per engine: a few % of a real generation, once per process
            probe = [prompt_ids[round(i * (len(prompt_ids) - 1) / max(n - 1, 1))] for i in range(n)]
            with torch.inference_mode():  # warm-up: first-call costs must not count against one engine
                _generate_engine(model, probe[:1], [0], _replace_max_new(spec, 2), lambda _: None)
            times: dict[str, float] = {}
            for engine in candidates:
                start = time.perf_counter()
                try:
                    with torch.inference_mode():
                        _ENGINE_FNS[engine](model, probe, list(range(n)), spec, lambda _: None)
                except Exception as e:  # noqa: BLE001 - an engine that fails here is just not chosen
                    log.warning(
                        "engine %s failed on the probe, not using it: %s: %s", engine, type(e).__name__, e
                    )
                    continue
                times[engine] = time.perf_counter() - start
            best = min(times, key=lambda e: times[e])
            timing = ", ".join(f"{e} {t:.2f}s" for e, t in times.items())
            choice = (best, f"fastest on a probe of {n} prompts ({timing})")
        _ENGINE_CACHE[key] = choice
    engine, reason = _ENGINE_CACHE[key]
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        engine, reason = broadcast_object_list([engine, reason], from_process=0)  # one engine everywhere
    return engine, reason


def _replace_max_new(spec: _Spec, max_new_tokens: int) -> _Spec:
    from dataclasses import replace

    return replace(spec, max_new_tokens=max_new_tokens)


def _resolve_engine(
    model: Any, prompt_ids: list[list[int]], spec: _Spec, shard_dir: Path | None, accelerator: Any, desc: str
) -> str:
    engine = spec.cfg.engine
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
    engine, reason = _choose_engine(model, prompt_ids, spec, accelerator)
    log.info("%s: engine %s: %s", desc, engine, reason)
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


# ------------------------------------------------------------------------------------------------------


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
) -> list[Generation]:
    """One response per prompt, in input order (see the module docstring for engines, sharding, resume)."""
    prompt_ids = [encode(tokenizer, render_prompt(tokenizer, p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompt_ids[i]))  # longest first: OOM shows early
    shards = [order[s : s + cfg.shard_size] for s in range(0, len(order), cfg.shard_size)]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if shard_dir is not None:
        shard_dir.mkdir(parents=True, exist_ok=True)
    sampler = None if greedy or cfg.temperature == 0 else Sampler(cfg, seed)
    spec = _Spec(
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
    mine = [s for s in range(len(shards)) if s % world == rank]
    todo = [s for s in mine if shard_dir is None or not (shard_dir / f"shard_{s:05d}.jsonl").exists()]
    if len(todo) < len(mine):
        log.info("%s: %d of %d shards already on disk, resuming", desc, len(mine) - len(todo), len(mine))
    # Every process takes part in choosing (the choice is broadcast), even one with nothing left to do.
    engine = _resolve_engine(model, prompt_ids, spec, shard_dir, accelerator, desc) if prompts else "generate"
    n_todo = sum(len(shards[s]) for s in todo)
    bar = tqdm(
        total=n_todo,
        desc=desc,
        unit="prompt",
        leave=False,
        disable=True if n_todo == 0 or rank != 0 else None,
    )  # None: off when not a terminal
    start, tokens = time.perf_counter(), 0

    def on_done(num_tokens: int) -> None:  # one prompt finished: progress in prompts/s and tokens/s
        nonlocal tokens
        tokens += num_tokens
        bar.update(1)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(prompts_s=f"{bar.n / elapsed:.1f}", tokens_s=f"{tokens / elapsed:.0f}", refresh=False)

    for s in todo:
        idx = shards[s]
        with torch.inference_mode():
            rows = _ENGINE_FNS[engine](model, [prompt_ids[i] for i in idx], idx, spec, on_done)
        shard_results = [(i, _finish(spec, row)) for i, row in zip(idx, rows)]
        if shard_dir is not None:
            lines = [
                json.dumps({"index": i, "text": g.text, "num_tokens": g.num_tokens, "finished": g.finished})
                for i, g in shard_results
            ]
            atomic_write_text(shard_dir / f"shard_{s:05d}.jsonl", "\n".join(lines) + "\n")
            fault_point("shard")  # test hook (spin.io): a kill with this shard final on disk
        results.update(shard_results)
        if on_shard is not None:
            on_shard(s)
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
