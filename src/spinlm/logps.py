"""Sequence log-probabilities log p(y|x): collation, the forward pass training and scoring share, and the
reference formula on full logits. The SPIN loss itself is in `spinlm.loss` (pure formulas on (B,) log-probs).

    log p_θ(y|x) = Σ_j log p_θ(y_j | x, y_<j)          (the paper's Section 3; summed over the reply's tokens)

- `encode_all` / `collate`: prompt + reply token ids (`spinlm.modeling.encode_response`, the chat template's
  rendering) right-padded into (N, T) `input_ids`, `attention_mask` and a `loss_mask` that is 1 on the reply.
- `forward_logps`: what training (`spinlm.trainer`), reference scoring (`spinlm.opponent`) and evaluation run.
  Padding-free (`train.padding_free`, on by default): the batch's sequences are packed back to back,
  `position_ids` restarting at every sequence and no attention mask, so no position is spent on padding
  (39-44% of trained positions on SmolLM2 / GSM8K were). Under an attention that runs each sequence on its
  own (`attends_per_sequence`: spinlm's `sdpa_segments`, which `load_model` gives SDPA models on CPU, or
  flash-attention) the whole batch is one row, with the sequences' offsets (`segment_kwargs`): no filler and
  no attention across sequences. Under plain SDPA / eager, transformers builds a block-diagonal causal mask
  from the position ids and attends over whole rows, so rows are kept no longer than the padded width
  (`pack_rows`, first-fit decreasing; `pack_batch`) and ~20% of positions stay filler. Same log-probs as the
  padded batch up to float rounding (tests: tiny model and SmolLM2, both attentions, within 1e-5 relative in
  fp32). Models that do not build their mask that way (`can_pack`) run the padded batch.
  It projects only the M positions that predict a reply token through the LM head (transformers' boolean
  `logits_to_keep`, where the model supports it) and turns the (M, V) logits into fp32 log-probs chunk by
  chunk (`TokenLogps`), keeping no (M, V) fp32 copy for the backward pass. With a 49k-150k-token vocabulary
  the logits are the largest activation of a small model.
- `sequence_logps`: the same quantity from full (B, T, V) logits, the readable reference implementation
  (tests/test_train.py checks that `forward_logps` equals it, with gradients).
- `score_logps`: `forward_logps` without gradients over many (prompt, reply) pairs, batched by length.

Departs from the paper: nothing; `length_normalize=True` (off by default) averages instead of sums.

    batch = collate(encode_all(tokenizer, prompts, replies, max_length=512), tokenizer.pad_token_id)
    logps = forward_logps(model, batch)  # (N,) fp32
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from spinlm.attention import SEGMENT_ATTENTION
from spinlm.data import Message, prompt_key
from spinlm.modeling import Encoded, encode, encode_response, render_prompt
from spinlm.progress import track


def _check_token_shapes(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> None:
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2] or loss_mask.shape != logits.shape[:2]:
        raise ValueError(
            f"labels {tuple(labels.shape)} and loss_mask {tuple(loss_mask.shape)} must both be "
            f"(B, T) = {tuple(logits.shape[:2])}, the first two dims of logits"
        )


def sequence_token_counts(loss_mask: Tensor) -> Tensor:
    """(B,) int64: how many tokens `sequence_logps` scores per row, i.e. loss_mask[:, 1:].sum(-1).

    Position 0 is never scored (nothing predicts it), so a mask that is 1 there does not count it.
    """
    if loss_mask.ndim != 2:
        raise ValueError(f"loss_mask must be (B, T), got shape {tuple(loss_mask.shape)}")
    return loss_mask[:, 1:].bool().sum(dim=1)  # (B,)


def sequence_logps(
    logits: Tensor, labels: Tensor, loss_mask: Tensor, length_normalize: bool = False
) -> Tensor:
    """(B,) fp32 log p(response | prompt) = Σ over response tokens of log p(token | everything before it).

    logits: (B, T, V) from a causal LM run on input_ids (B, T); labels: (B, T), normally input_ids itself;
    loss_mask: (B, T) bool/int, 1 on response tokens, 0 on prompt and padding (left or right).
    logits[:, t] predicts labels[:, t + 1], so the scored positions are loss_mask[:, 1:].
    With length_normalize, returns the mean over the scored tokens instead (0 for a row with none).

    Memory: only the M scored positions go through the softmax, in fp32, via `F.cross_entropy` on an
    (M, V) slice; no fp32 copy of the whole (B, T, V) logits and no separate log_softmax + gather.
    (The boolean selection costs one host-device sync per call on GPU.)
    """
    _check_token_shapes(logits, labels, loss_mask)
    mask = loss_mask[:, 1:].bool()  # (B, T-1): which next-token predictions are response tokens
    targets = labels[:, 1:][mask]  # (M,) the response tokens, M = mask.sum()
    picked = logits[:, :-1][mask].float()  # (M, V) their predicting logits, upcast to fp32
    token_logps = -F.cross_entropy(picked, targets, reduction="none")  # (M,) log p(token | prefix)
    per_token = token_logps.new_zeros(mask.shape).masked_scatter(mask, token_logps)  # (B, T-1), 0 off-mask
    logps = per_token.sum(dim=1)  # (B,)
    if length_normalize:
        logps = logps / sequence_token_counts(loss_mask).clamp(min=1).to(logps.dtype)  # (B,)
    return logps


def collate(encoded: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad sequences to the longest in the batch; loss_mask is 1 on response tokens only."""
    width = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)  # (N, T)
    loss_mask = torch.zeros((len(encoded), width), dtype=torch.bool)  # (N, T) response tokens
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        attention_mask[i, :n] = 1
        loss_mask[i, e.prompt_len : n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def forward_logps(
    model: Any, batch: dict[str, torch.Tensor], length_normalize: bool = False, packed: bool = True
) -> torch.Tensor:
    """(N,) log p(response | prompt) for a collated batch, in fp32 (= `sequence_logps` below).

    With `packed` (and a model that `can_pack`), the batch's sequences run packed into rows without padding
    (`pack_batch`); otherwise as the right-padded (N, T) batch with its attention mask."""
    device = next(model.parameters()).device
    n = batch["input_ids"].shape[0]
    if packed and can_pack(model):
        one_row = attends_per_sequence(model)  # then one row of everything: no filler, no cross-attention
        rows = pack_batch(batch, capacity=int(batch["attention_mask"].sum()) if one_row else None)
        inputs = {"position_ids": rows["position_ids"].to(device), "use_cache": False}  # no mask: packing
        if one_row:
            inputs.update(segment_kwargs(rows["position_ids"], device))
    else:
        rows = _padded_rows(batch)
        inputs = {"attention_mask": batch["attention_mask"].to(device)}
    input_ids = rows["input_ids"].to(device)  # (R, L)
    scored = rows["scored"].to(device)  # (R, L-1): position t predicts a response token at t+1
    owner = rows["owner"].to(device)[scored]  # (M,) which sequence each scored token belongs to
    if lm_head_takes_mask(model):
        keep = torch.zeros_like(input_ids, dtype=torch.bool)  # (R, L) positions whose logits are needed
        keep[:, :-1] = scored
        logits = model(input_ids=input_ids, logits_to_keep=keep, **inputs).logits  # (M, V)
    else:
        logits = model(input_ids=input_ids, **inputs).logits[:, :-1][scored]  # (M, V)
    targets = input_ids[:, 1:][scored]  # (M,) in the same row-major order as the logits
    token_logps = TokenLogps.apply(logits, targets)  # (M,) fp32
    logps = token_logps.new_zeros(n).index_add(0, owner, token_logps)  # (N,) summed per sequence
    if length_normalize:
        counts = sequence_token_counts(batch["loss_mask"]).clamp(min=1).to(device=device, dtype=logps.dtype)
        logps = logps / counts
    return logps


def _padded_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The collated batch as it is: one row per sequence, `owner` the row index."""
    input_ids = batch["input_ids"]  # (N, T)
    n, t = input_ids.shape
    owner = torch.arange(n)[:, None].expand(n, max(t - 1, 0))  # (N, T-1)
    return {"input_ids": input_ids, "scored": batch["loss_mask"][:, 1:].bool(), "owner": owner}


def segment_kwargs(position_ids: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """The flash-attention keywords (`cu_seq_lens_q/k`, `max_length_q/k`) for one packed row (1, L): where
    each sequence starts (its position id is 0), then L; read by `sdpa_segments` and flash-attention."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()  # (S,) offsets, starting with 0
    bounds = [*starts, position_ids.shape[1]]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)  # (S+1,)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the sequence indices of each row, every row's total length <= `capacity` (a
    longer sequence gets a row of its own). With `capacity` = the padded width, packing never makes a row
    longer than the padded batch's, so attention (quadratic in the row length) never costs more."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def row_capacity(lengths: Sequence[int], width: int, attention_cost: float) -> int:
    """The row capacity for `pack_rows` with the least estimated compute, among the padded width T,
    1.25T ... 2T and one row of everything: an (R, L) layout costs R·L·(1 + attention_cost·L), a
    position's linear layers plus its attention over the row (dense under the block-diagonal mask, so
    quadratic in L). `attention_cost`: attention FLOPs per (query, key) over linear FLOPs per token
    (`attention_cost(model)`). Longer rows leave less filler and cost more attention."""

    def cost(capacity: int) -> float:
        rows = pack_rows(lengths, capacity)
        longest = max(sum(lengths[i] for i in row) for row in rows)
        return len(rows) * longest * (1.0 + attention_cost * longest)

    candidates = [width * k // 4 for k in range(4, 9)] + [sum(lengths)]
    return min(candidates, key=lambda c: (cost(c), c))


def attention_cost(model: Any) -> float:
    """Attention FLOPs per (query, key) pair over linear FLOPs per token, from the model's config:
    4·heads·head_dim·layers (QKᵀ and the weighted sum) over 2·parameters."""
    config = _unwrap(model).config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    params = sum(p.numel() for p in _unwrap(model).parameters())
    return 4 * heads * head_dim * config.num_hidden_layers / (2 * params)


def pack_batch(batch: dict[str, torch.Tensor], capacity: int | None = None) -> dict[str, torch.Tensor]:
    """A right-padded (N, T) batch re-laid as (R, L) rows of whole sequences back to back, no padding
    between them: `position_ids` restart at 0 for every sequence, which transformers (no attention mask,
    no cache) turns into a block-diagonal causal mask, so each sequence attends only to itself. A row
    shorter than the longest ends in filler (token 0, its own position run, never scored). Rows hold at
    most `capacity` tokens (default: T, the padded width).

    Returns input_ids, position_ids (R, L); scored (R, L-1), 1 where position t predicts a response token
    of the same sequence; owner (R, L-1), the sequence index of the token at t+1 (-1 for filler)."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()  # (N,) real tokens per sequence (right padding)
    rows = pack_rows(lengths, capacity or batch["input_ids"].shape[1])
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (R, L)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (R, L)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (R, L)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)  # (R, L) sequence of each token
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            input_ids[r, at : at + n] = batch["input_ids"][i, :n]
            position_ids[r, at : at + n] = torch.arange(n)
            loss_mask[r, at : at + n] = batch["loss_mask"][i, :n]
            owner[r, at : at + n] = i
            at += n
        position_ids[r, at:] = torch.arange(width - at)  # filler: a run of its own
    same = owner[:, 1:] == owner[:, :-1]  # (R, L-1) t and t+1 in one sequence: never across a boundary
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "scored": loss_mask[:, 1:] & same,
        "owner": owner[:, 1:],
    }


class TokenLogps(torch.autograd.Function):
    """log softmax(logits)[target] per row in fp32, `CHUNK_BYTES` of fp32 logits at a time.

    Forward keeps only the logits (their dtype) and the (M,) log-sum-exp; backward rebuilds the softmax one
    chunk at a time: d logp / d logits = onehot(target) - softmax(logits). Peak extra memory is one chunk,
    instead of two (M, V) fp32 tensors (the upcast and cross-entropy's saved log-softmax).
    """

    CHUNK_BYTES = 2**27  # 128 MiB of fp32 per chunk

    @staticmethod
    def _chunk(logits: torch.Tensor) -> int:
        return max(1, TokenLogps.CHUNK_BYTES // (4 * max(1, logits.shape[-1])))

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        m = logits.shape[0]
        out = torch.empty(m, dtype=torch.float32, device=logits.device)  # (M,)
        lse = torch.empty(m, dtype=torch.float32, device=logits.device)  # (M,)
        step = TokenLogps._chunk(logits)
        for s in range(0, m, step):
            x = logits[s : s + step].float()  # (c, V), transient
            lse[s : s + step] = torch.logsumexp(x, dim=-1)
            out[s : s + step] = x.gather(-1, targets[s : s + step, None]).squeeze(-1) - lse[s : s + step]
        ctx.save_for_backward(logits, targets, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)  # (M, V) in the logits' dtype
        step = TokenLogps._chunk(logits)
        for s in range(0, logits.shape[0], step):
            g_out = grad_out[s : s + step, None].float()  # (c, 1)
            g = torch.exp(logits[s : s + step].float() - lse[s : s + step, None]).mul_(-g_out)  # -softmax * g
            g.scatter_add_(-1, targets[s : s + step, None], g_out)  # + onehot(target) * g
            grad[s : s + step] = g
        return grad, None


def _unwrap(model: Any) -> Any:
    """The transformers model inside DDP / DeepSpeed (.module), torch.compile (._orig_mod), peft."""
    inner = model
    for _ in range(8):
        if isinstance(getattr(inner, "module", None), torch.nn.Module):
            inner = inner.module
        elif isinstance(getattr(inner, "_orig_mod", None), torch.nn.Module):
            inner = inner._orig_mod
        elif hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        else:
            break
    return inner


def lm_head_takes_mask(model: Any) -> bool:
    """Whether the model's forward accepts a boolean (N, T) `logits_to_keep` (transformers 5 models do)."""
    cls = type(_unwrap(model))
    if cls not in _SLICES_LOGITS:
        _SLICES_LOGITS[cls] = _slices_logits(cls)
    return _SLICES_LOGITS[cls]


# Attention implementations that honour packed position_ids: sdpa / eager / flex through the block-diagonal
# mask transformers' masking_utils builds from them, flash-attention through its varlen path, spinlm's
# sdpa_segments through the sequences' offsets.
PACKING_ATTENTION = (
    "sdpa",
    "eager",
    "flex_attention",
    "flash_attention_2",
    "flash_attention_3",
    SEGMENT_ATTENTION,
)
# Those that attend within each sequence of a row rather than over the row under a mask, so a whole
# micro-batch in one row costs no attention across sequences. Flash-attention reads packing from a single
# row only (transformers' `_is_packed_sequence` wants batch size 1), so it must get one row.
PER_SEQUENCE_ATTENTION = ("flash_attention_2", "flash_attention_3", SEGMENT_ATTENTION)


def attends_per_sequence(model: Any) -> bool:
    """Whether the model's attention runs each packed sequence on its own (`PER_SEQUENCE_ATTENTION`):
    `forward_logps` then packs a whole batch into one row."""
    config = getattr(_unwrap(model), "config", None)
    return getattr(config, "_attn_implementation", None) in PER_SEQUENCE_ATTENTION


def can_pack(model: Any) -> bool:
    """Whether the model runs sequences packed into one row correctly: a transformers model whose module
    builds its attention mask with `masking_utils.create_causal_mask` (which reads packing from
    position_ids) and an attention implementation that honours it. Others run padded batches."""
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    if getattr(config, "_attn_implementation", None) not in PACKING_ATTENTION:
        return False
    cls = type(inner)
    if cls not in _PACKS:
        modules = {sys.modules.get(c.__module__) for c in cls.__mro__}
        _PACKS[cls] = any(hasattr(m, "create_causal_mask") for m in modules if m is not None)
    return _PACKS[cls]


_PACKS: dict[type, bool] = {}
_SLICES_LOGITS: dict[type, bool] = {}


def _slices_logits(cls: type) -> bool:
    forward = getattr(cls, "forward", None)
    if forward is None or "logits_to_keep" not in inspect.signature(forward).parameters:
        return False
    try:  # the boolean form goes through transformers' slice_logits_to_keep; older code slices ints only
        return "slice_logits_to_keep" in inspect.getsource(forward)
    except (OSError, TypeError):
        return False


def encode_all(
    tokenizer: Any, prompts: Sequence[list[Message]], responses: Sequence[str], max_length: int
) -> list[Encoded]:
    cache: dict[str, list[int]] = {}
    out = []
    for p, r in zip(prompts, responses):
        key = prompt_key(p)
        if key not in cache:
            cache[key] = encode(tokenizer, render_prompt(tokenizer, p))
        out.append(encode_response(tokenizer, p, r, max_length, prompt_ids=cache[key]))
    return out


@torch.no_grad()
def score_logps(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[Message]],
    responses: Sequence[str],
    max_length: int,
    batch_size: int,
    length_normalize: bool = False,
    desc: str = "score",
    packed: bool = True,
) -> list[float]:
    """log p(response | prompt) for each pair, batched by length (and packed, see `forward_logps`); results
    in input order."""
    encoded = encode_all(tokenizer, prompts, responses, max_length)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    out = [0.0] * len(encoded)
    was_training = model.training
    model.eval()
    starts = range(0, len(order), batch_size)
    for b in track(starts, len(starts), desc, unit="batch", enabled=len(order) > batch_size):
        idx = order[b : b + batch_size]
        batch = collate([encoded[i] for i in idx], tokenizer.pad_token_id)
        logps = forward_logps(model, batch, length_normalize, packed)
        for i, v in zip(idx, logps.tolist()):
            out[i] = v
    model.train(was_training)
    return out
