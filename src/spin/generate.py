"""Generate stage: the opponent p_t samples one response y' ~ p_t(.|x) per prompt.

What it does: renders every prompt with the training chat template, sorts prompts by length (so a batch
pads little), cuts the sorted list into fixed shards, generates each shard in left-padded batches and writes
it to `DIR/shard_XXXXX.jsonl` atomically as soon as it is done. Results come back in input order.

Resuming: a shard file on disk is final, so a stopped run regenerates only the missing shards. Each shard is
sampled from its own seed (run seed, shard index), so the responses do not depend on how many processes
generate or where a run was stopped.

Data parallel: under `accelerate launch --num_processes N`, process r generates shards r, r+N, ...; after a
barrier every process reads all shards, so each prompt gets exactly one response, in order.

Departure from the paper: the paper's simplified loop samples one prompt at a time; the responses are the
same distribution, only faster.

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
from tqdm.auto import tqdm

from spin.config import GenerationConfig
from spin.data import Message
from spin.io import atomic_write_text, read_jsonl
from spin.modeling import encode, render_prompt

log = logging.getLogger(__name__)


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


def _generate_batch(
    model: Any, tokenizer: Any, batch_ids: list[list[int]], cfg: GenerationConfig, greedy: bool
) -> list[Generation]:
    """One left-padded `model.generate` call; returns the decoded continuations."""
    pad_id = tokenizer.pad_token_id
    width = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)  # (B, T) left padded
    attention = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for i, ids in enumerate(batch_ids):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention[i, width - len(ids) :] = 1
    device = next(model.parameters()).device
    sample = not greedy and cfg.temperature > 0
    kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": cfg.max_new_tokens}
    if sample:
        # Plain temperature sampling unless asked otherwise: transformers 5 would apply top_k=50 by default.
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if cfg.stop_strings:
        kwargs.update(stop_strings=cfg.stop_strings, tokenizer=tokenizer)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
    new_tokens = out[:, width:].tolist()  # (B, N) generated ids, padded after EOS
    results = []
    for row in new_tokens:
        finished = tokenizer.eos_token_id in row
        if finished:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        text = tokenizer.decode(row, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, cfg.stop_strings)
        results.append(Generation(text=text, num_tokens=len(row), finished=finished or stopped))
    return results


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
    """One response per prompt, in input order (see the module docstring for sharding and resume)."""
    prompt_ids = [encode(tokenizer, render_prompt(tokenizer, p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompt_ids[i]))  # longest first: OOM shows early
    shards = [order[s : s + cfg.shard_size] for s in range(0, len(order), cfg.shard_size)]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if shard_dir is not None:
        shard_dir.mkdir(parents=True, exist_ok=True)

    results: dict[int, Generation] = {}
    mine = [s for s in range(len(shards)) if s % world == rank]
    todo = [s for s in mine if shard_dir is None or not (shard_dir / f"shard_{s:05d}.jsonl").exists()]
    if len(todo) < len(mine):
        log.info("%s: %d of %d shards already on disk, resuming", desc, len(mine) - len(todo), len(mine))
    n_todo = sum(len(shards[s]) for s in todo)
    bar = tqdm(
        total=n_todo,
        desc=desc,
        unit="prompt",
        leave=False,
        disable=True if n_todo == 0 or rank != 0 else None,
    )  # None: off when not a terminal
    start, tokens = time.perf_counter(), 0
    for s in todo:
        torch.manual_seed(_shard_seed(seed, s))
        shard_results: list[tuple[int, Generation]] = []
        idx = shards[s]
        for b in range(0, len(idx), cfg.batch_size):
            batch = idx[b : b + cfg.batch_size]
            gens = _generate_batch(model, tokenizer, [prompt_ids[i] for i in batch], cfg, greedy)
            shard_results += list(zip(batch, gens))
            tokens += sum(g.num_tokens for g in gens)
            bar.update(len(batch))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(prompts_s=f"{bar.n / elapsed:.1f}", tokens_s=f"{tokens / elapsed:.0f}")
        if shard_dir is not None:
            lines = [
                json.dumps({"index": i, "text": g.text, "num_tokens": g.num_tokens, "finished": g.finished})
                for i, g in shard_results
            ]
            atomic_write_text(shard_dir / f"shard_{s:05d}.jsonl", "\n".join(lines) + "\n")
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
