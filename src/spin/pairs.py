"""Pairs stage: chosen = the dataset's reply y, rejected = the opponent's sample y', plus the opponent's
log-probabilities of both, computed once per iteration.

Pairs are saved as `iteration_t/pairs.jsonl` in TRL's conversational preference format
(`prompt` / `chosen` / `rejected` message lists), so any TRL trainer reads them; the opponent's scores sit in
`ref_chosen_logps` / `ref_rejected_logps`, the column names TRL's `DPOTrainer` uses for precomputed reference
log-probs. Storing them is what lets `spin train` hold a single model in memory (the official code keeps a
second full model and scores it at every step).

A pair whose sample equals the real reply contributes exactly zero gradient (both log-ratios cancel); such
pairs are kept, counted and reported as `identical_pairs`.

`forward_logps` (scoring and training share it) projects only the M positions that predict a response token
through the LM head (transformers' boolean `logits_to_keep`, where the model supports it), and turns the
(M, V) logits into log-probs in fp32 chunk by chunk, keeping no (M, V) fp32 copy for the backward pass.
With a 150k-token vocabulary the logits are the largest activation of a small model; the values are the
same as `spin.loss.sequence_logps` on full logits (tests/test_train.py checks both, with gradients).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from spin.data import Example, Message
from spin.errors import SpinError
from spin.generate import Generation
from spin.loss import sequence_token_counts
from spin.modeling import Encoded, encode, encode_response, render_prompt
from spin.progress import track


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
    """(N,) log p(response | prompt) for a collated batch, in fp32 (= `spin.loss.sequence_logps`)."""
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
        key = json.dumps(p, sort_keys=True)
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


def build_pairs(examples: Sequence[Example], generations: Sequence[Generation], iteration: int) -> list[dict]:
    """One pair per example: (prompt, chosen = real reply, rejected = the opponent's sample)."""
    return [
        {
            "id": f"{iteration}-{i}",
            "iteration": iteration,
            "prompt": ex.prompt,
            "chosen": [{"role": "assistant", "content": ex.response}],
            "rejected": [{"role": "assistant", "content": g.text}],
            "rejected_finished": g.finished,
        }
        for i, (ex, g) in enumerate(zip(examples, generations))
    ]


def add_reference_logps(
    pairs: list[dict], chosen_logps: Sequence[float], rejected_logps: Sequence[float]
) -> list[dict]:
    for p, c, r in zip(pairs, chosen_logps, rejected_logps):
        p["ref_chosen_logps"] = c
        p["ref_rejected_logps"] = r
    return pairs


def chosen_text(pair: dict) -> str:
    return str(pair["chosen"][-1]["content"])


def rejected_text(pair: dict) -> str:
    return str(pair["rejected"][-1]["content"])


def pair_stats(pairs: Sequence[dict]) -> dict[str, float]:
    n = max(len(pairs), 1)
    identical = sum(chosen_text(p) == rejected_text(p) for p in pairs)
    unfinished = sum(not p.get("rejected_finished", True) for p in pairs)
    return {
        "pairs": len(pairs),
        "identical_pairs": identical,
        "identical_fraction": identical / n,
        "unfinished_generations": unfinished,
    }


IDENTICAL_WARNING_FRACTION = 0.5


def identical_pairs_warning(stats: dict[str, float], iteration: int) -> str | None:
    """A warning when most pairs are identical (sample == real reply), else None.

    Such pairs give exactly zero gradient, so the update comes from the few others, and Adam / RMSProp scale
    those few gradients up to full-size steps. Measured (docs/results.md, "SPIN vs SFT"): from a model that
    reproduced its SFT replies, 999 of 1000 identical pairs and AdamW at lr 1e-3 took held-out exact match
    from 1.0 to 0.9 in one iteration, and to 0.14 by iteration 3.
    """
    if stats["pairs"] == 0 or stats["identical_fraction"] < IDENTICAL_WARNING_FRACTION:
        return None
    return (
        f"iteration {iteration}: {stats['identical_pairs']} of {stats['pairs']} pairs "
        f"({stats['identical_fraction']:.0%}) have a generated reply equal to the real one and give no "
        "gradient; the model already reproduces much of its SFT data (SPIN's fixed point is p = p_data). "
        "The few other pairs drive the whole update (Adam / RMSProp scale it up): consider stopping here "
        "or lowering train.learning_rate for this iteration"
    )


PAIR_KEYS = ("prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps")


def read_pairs_file(path: Path) -> list[dict]:
    """The pairs of a `spin generate` file, every row checked: a one-line SpinError names the file, line and
    field of an empty file, a line that is not JSON, a missing column or a value of the wrong type."""
    from spin.data import jsonl_rows

    hint = "write pairs with `spin generate`"
    path = Path(path)
    if not path.is_file():
        raise SpinError(f"pairs file not found: {path}", hint=hint)
    rows = []
    for where, _, row in jsonl_rows(path):
        if not isinstance(row, dict):
            raise SpinError(f"{where}: a pair must be a JSON object; got {type(row).__name__}", hint=hint)
        missing = [k for k in PAIR_KEYS if k not in row]
        if missing:
            raise SpinError(f"{where}: the pair lacks {', '.join(missing)}", hint=hint)
        _check_pair(row, where, hint)
        rows.append(row)
    if not rows:
        raise SpinError(f"{path} holds no pairs (the file is empty)", hint=hint)
    return rows


def _check_pair(row: dict, where: str, hint: str) -> None:
    prompt = row["prompt"]
    ok = isinstance(prompt, list) and bool(prompt) and all(_is_message(m) for m in prompt)
    if not ok:
        raise SpinError(
            f"{where}: 'prompt' must be a non-empty list of {{role, content}} messages", hint=hint
        )
    for side in ("chosen", "rejected"):
        value = row[side]
        if not (isinstance(value, list) and value and _is_message(value[-1])):
            raise SpinError(f"{where}: '{side}' must be a list ending with an assistant message", hint=hint)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        value = row[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise SpinError(f"{where}: '{key}' must be a finite number; got {value!r}", hint=hint)


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
