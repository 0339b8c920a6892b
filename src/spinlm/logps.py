"""Sequence log-probabilities log p(y|x): collation, the forward pass training and scoring share, and the
reference formula on full logits. The SPIN loss itself is in `spinlm.loss` (pure formulas on (B,) log-probs).

    log p_θ(y|x) = Σ_j log p_θ(y_j | x, y_<j)          (the paper's Section 3; summed over the reply's tokens)

- `encode_all` / `collate`: prompt + reply token ids (`spinlm.modeling.encode_response`, the chat template's
  rendering) right-padded into (N, T) `input_ids`, `attention_mask` and a `loss_mask` that is 1 on the reply.
- `forward_logps`: what training (`spinlm.trainer`), reference scoring (`spinlm.opponent`) and evaluation run.
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
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

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


def forward_logps(model: Any, batch: dict[str, torch.Tensor], length_normalize: bool = False) -> torch.Tensor:
    """(N,) log p(response | prompt) for a collated batch, in fp32 (= `sequence_logps` below)."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)  # (N, T)
    attention_mask = batch["attention_mask"].to(device)  # (N, T)
    loss_mask = batch["loss_mask"].to(device).bool()  # (N, T)
    scored = loss_mask[:, 1:]  # (N, T-1): token t+1 is a response token, predicted at position t
    if lm_head_takes_mask(model):
        keep = torch.zeros_like(loss_mask)  # (N, T) positions whose logits are needed
        keep[:, :-1] = scored
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep
        ).logits  # (M, V)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][scored]  # (M, V)
    targets = input_ids[:, 1:][scored]  # (M,) in the same row-major order as the logits
    token_logps = TokenLogps.apply(logits, targets)  # (M,) fp32
    per_token = token_logps.new_zeros(scored.shape).masked_scatter(scored, token_logps)  # (N, T-1)
    logps = per_token.sum(dim=1)  # (N,)
    if length_normalize:
        logps = logps / sequence_token_counts(loss_mask).clamp(min=1).to(logps.dtype)
    return logps


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


def lm_head_takes_mask(model: Any) -> bool:
    """Whether the model's forward accepts a boolean (N, T) `logits_to_keep` (transformers 5 models do)."""
    inner = model
    for _ in range(8):  # DDP / DeepSpeed (.module), torch.compile (._orig_mod), peft (.get_base_model())
        if isinstance(getattr(inner, "module", None), torch.nn.Module):
            inner = inner.module
        elif isinstance(getattr(inner, "_orig_mod", None), torch.nn.Module):
            inner = inner._orig_mod
        elif hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        else:
            break
    cls = type(inner)
    if cls not in _SLICES_LOGITS:
        _SLICES_LOGITS[cls] = _slices_logits(cls)
    return _SLICES_LOGITS[cls]


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
) -> list[float]:
    """log p(response | prompt) for each pair, batched by length; results in input order."""
    encoded = encode_all(tokenizer, prompts, responses, max_length)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    out = [0.0] * len(encoded)
    was_training = model.training
    model.eval()
    starts = range(0, len(order), batch_size)
    for b in track(starts, len(starts), desc, unit="batch", enabled=len(order) > batch_size):
        idx = order[b : b + batch_size]
        logps = forward_logps(
            model, collate([encoded[i] for i in idx], tokenizer.pad_token_id), length_normalize
        )
        for i, v in zip(idx, logps.tolist()):
            out[i] = v
    model.train(was_training)
    return out
