"""Pairs stage: chosen = the dataset's reply y, rejected = the opponent's sample y', plus the opponent's
log-probabilities of both, computed once per iteration.

Pairs are saved as `iteration_t/pairs.jsonl` in TRL's conversational preference format
(`prompt` / `chosen` / `rejected` message lists), so any TRL trainer reads them; the opponent's scores sit in
`ref_chosen_logps` / `ref_rejected_logps`, the column names TRL's `DPOTrainer` uses for precomputed reference
log-probs. Storing them is what lets `spin train` hold a single model in memory (the official code keeps a
second full model and scores it at every step).

A pair whose sample equals the real reply contributes exactly zero gradient (both log-ratios cancel); such
pairs are kept, counted and reported as `identical_pairs`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from spin.data import Example, Message
from spin.generate import Generation
from spin.loss import sequence_logps
from spin.modeling import Encoded, encode, encode_response, render_prompt


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
    """(N,) log p(response | prompt) for a collated batch, in fp32."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits  # (N, T, V)
    return sequence_logps(logits, input_ids, batch["loss_mask"].to(device), length_normalize)


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
    for b in tqdm(
        range(0, len(order), batch_size),
        desc=desc,
        leave=False,
        disable=True if len(order) <= batch_size else None,
    ):
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
