"""Evaluate stage: how far is p_t from p_data, measured on held-out prompts after every iteration.

Iteration 0 is the starting model. For iteration t >= 1 the main player p_t is scored against its opponent
p_{t-1} on held-out pairs (real reply y, a sample y' of p_{t-1}):

- `discriminability`: the held-out reward accuracy P[r(y) > r(y')] with r = beta * log p_t/p_{t-1}, ties
  (rewards equal up to float rounding, `spinlm.loss.reward_wins`, as in training's reward accuracy) counted
  as 1/2. 1.0: p_t tells its opponent's samples from the data perfectly; 0.5: it cannot, which is
  the game's fixed point p_t = p_data (paper, Theorem 5.2).
- `reward_margin`: mean r(y) - r(y'); `reward_real`, `reward_generated`.
- `loglik_real` (and per token): log p_t(y|x) of the held-out real replies; it should rise as p_t -> p_data.
- generation length statistics of p_t's own samples (`gen_len_w1`: the earth mover's distance between the
  token lengths of its samples and of the real replies), a few sample generations, and the task metric
  (built-in tasks; `answer_exact_match` when the data has gold answers, e.g. GSM8K, found by
  `data.answer_pattern`, see spinlm.answers). Every greedy answer, what was extracted from it and whether it
  counted go to `answers.jsonl` (`iteration_t/answers.jsonl` in a run).

The held-out samples of p_t and p_t's log-probs on them are kept (`EvalState`), so the next iteration's
evaluation needs no second model in memory.

Cost. Generation is batched by the engines (`spinlm.generation`: rows leave a batch at their end of turn), and
the temperature-1 and greedy passes share one copy of the weights in `generation.dtype`. The up to three
replies scored per prompt (the real one, p_t's sample, p_{t-1}'s sample) share their prompt: with
`score_shared_prompt` the prompt runs once, the three replies after it in one row whose attention mask lets
each reply see the prompt and itself only (transformers models on SDPA; others score each reply with its
prompt, `spinlm.logps.score_logps`). Same log-probs up to float rounding, ~1/3 fewer positions for GSM8K.
`evaluate_model_details` also returns what each metric is a mean of, per example (`EvalDetails`), with
the seconds and work of each phase.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from spinlm.answers import compile_answer_pattern, extract_answer
from spinlm.attention import SEGMENT_ATTENTION
from spinlm.config import SpinConfig, scheduled
from spinlm.data import Example, Message
from spinlm.generation import generate_responses, generation_model
from spinlm.io import write_jsonl
from spinlm.logps import TokenLogps, encode_all, lm_head_takes_mask, score_logps
from spinlm.loss import TIE_RTOL, reward_wins, tie_rtol
from spinlm.modeling import Encoded, render_prompt
from spinlm.progress import track
from spinlm.tasks import TASK_NAMES, get_task, gsm8k_metrics


@dataclass
class EvalState:
    """What the next iteration's evaluation needs from this model (saved as eval_state.json)."""

    generations: list[str]  # this model's sampled held-out replies
    logps_real: list[float]  # log p_t(y|x) of the real replies
    logps_generated: list[float]  # log p_t(y'|x) of its own samples

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wasserstein_1(a: list[int], b: list[int]) -> float | None:
    """Earth mover's distance between two samples of lengths (tokens): the mean gap between their
    quantile functions. 0 when the model's replies are as long as the data's, in distribution."""
    if not a or not b:
        return None
    xs, ys = sorted(a), sorted(b)
    grid = 1000  # quantiles at (k + 1/2) / grid: exact for equal sizes dividing the grid, close otherwise
    q = [(k + 0.5) / grid for k in range(grid)]
    return sum(abs(xs[int(p * len(xs))] - ys[int(p * len(ys))]) for p in q) / grid


@dataclass
class EvalDetails:
    """Per held-out example, in input order, what the aggregate metrics are computed from, so two models can
    be compared example by example or bootstrapped over examples; and the cost of each phase."""

    answers: list[str]  # the replies the task metric scored: greedy ones under eval.greedy, else the samples
    sample_tokens: list[int]  # tokens of each temperature-1 sample, end of turn included (gen_len_*)
    real_tokens: list[int]  # tokens of each real reply + end of turn (loglik_real_per_token's denominators)
    wins: list[float] | None  # discriminability per example: 1, 1/2 (a tie) or 0; None without a previous
    seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per phase
    work: dict[str, int] = field(default_factory=dict)  # generated tokens, scored positions per phase


def pair_wins(
    policy_real: list[float],
    policy_generated: list[float],
    ref_real: list[float],
    ref_generated: list[float],
    beta: float,
    rtol: float = TIE_RTOL["full"],
) -> list[float]:
    """Per pair: 1 where the real reply's reward beta * log p/p_ref is higher than the sample's, 0 where
    lower, 1/2 for a tie up to float rounding (`spinlm.loss.reward_wins`, as in training)."""
    real = torch.tensor([beta * (p - r) for p, r in zip(policy_real, ref_real)], dtype=torch.float64)
    gen = torch.tensor([beta * (p - r) for p, r in zip(policy_generated, ref_generated)], dtype=torch.float64)
    scale = torch.tensor(
        [beta * (abs(a) + abs(b)) for a, b in zip(ref_real, ref_generated)], dtype=torch.float64
    )
    return [float(w) for w in reward_wins(real, gen, scale, rtol).tolist()]


def reward_metrics(
    policy_real: list[float],
    policy_generated: list[float],
    ref_real: list[float],
    ref_generated: list[float],
    beta: float,
    rtol: float = TIE_RTOL["full"],
) -> dict[str, float]:
    """Held-out reward accuracy (ties 1/2, up to float rounding: `pair_wins`) and margins of the implicit
    rewards beta * log p/p_ref."""
    real = [beta * (p - r) for p, r in zip(policy_real, ref_real)]
    gen = [beta * (p - r) for p, r in zip(policy_generated, ref_generated)]
    wins = pair_wins(policy_real, policy_generated, ref_real, ref_generated, beta, rtol)
    n = max(len(real), 1)
    return {
        "discriminability": sum(wins) / n,
        "reward_margin": sum(a - b for a, b in zip(real, gen)) / n,
        "reward_real": sum(real) / n,
        "reward_generated": sum(gen) / n,
    }


# --- scoring several replies after one prompt ------------------------------------------------------------


def shared_prompt_supported(model: Any) -> bool:
    """Whether `score_shared_prompt` can run `model`: a transformers model on SDPA attention (or spinlm's
    sdpa_segments), which takes a custom boolean (B, 1, L, L) mask as it is (masking_utils returns a 4D
    mask unchanged)."""
    inner = model
    for _ in range(4):  # peft / wrappers: the transformers model inside
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        else:
            break
    attention = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    if attention not in ("sdpa", SEGMENT_ATTENTION):  # sdpa_segments: plain SDPA given a mask
        return False
    modules = {sys.modules.get(c.__module__) for c in type(inner).__mro__}
    return any(hasattr(m, "create_causal_mask") for m in modules if m is not None)


def _tree_rows(trees: list[tuple[list[int], list[list[int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, L) rows `prompt + reply_1 + ... + reply_K`, one per tree, with the (B, 1, L, L)
    boolean mask (a prompt token sees the prompt before it; a reply token the prompt and its own reply
    before it; a padding token itself), position ids (each reply continues from the prompt's end) and
    `branch` (B, L): 0 prompt, k reply k, -1 padding."""
    width = max(len(p) + sum(len(r) for r in rs) for p, rs in trees)
    input_ids = torch.full((len(trees), width), pad_id, dtype=torch.long)  # (B, L)
    position_ids = torch.zeros((len(trees), width), dtype=torch.long)  # (B, L)
    branch = torch.full((len(trees), width), -1, dtype=torch.long)  # (B, L)
    for b, (prompt, replies) in enumerate(trees):
        at = len(prompt)
        input_ids[b, :at] = torch.tensor(prompt)
        position_ids[b, :at] = torch.arange(at)
        branch[b, :at] = 0
        for k, reply in enumerate(replies, start=1):
            n = len(reply)
            input_ids[b, at : at + n] = torch.tensor(reply, dtype=torch.long)
            position_ids[b, at : at + n] = torch.arange(len(prompt), len(prompt) + n)
            branch[b, at : at + n] = k
            at += n
    idx = torch.arange(width)
    causal = idx[None, :, None] >= idx[None, None, :]  # (1, L, L): query i sees key j <= i
    key, query = branch[:, None, :], branch[:, :, None]  # (B, 1, L), (B, L, 1)
    mask = causal & (key >= 0) & (query >= 0) & ((key == 0) | (key == query))  # (B, L, L)
    mask |= torch.eye(width, dtype=torch.bool)[None]  # padding rows see themselves (no all-masked row)
    return {"input_ids": input_ids, "position_ids": position_ids, "mask": mask[:, None], "branch": branch}


def _targets(trees: list[tuple[list[int], list[list[int]]]], width: int) -> tuple[list, list, list]:
    """For every reply token: the (row, position) whose logits predict it and the token. A reply's first
    token is predicted at the prompt's last position (shared by the K replies), token j at the reply's
    position j - 1. Returns (row, position, reply index k - 1) per scored token and the target ids."""
    where, owner, targets = [], [], []
    for b, (prompt, replies) in enumerate(trees):
        at = len(prompt)
        for k, reply in enumerate(replies):
            for j, token in enumerate(reply):
                where.append(b * width + (len(prompt) - 1 if j == 0 else at + j - 1))
                owner.append((b, k))
                targets.append(token)
            at += len(reply)
    return where, owner, targets


@torch.no_grad()
def _tree_logps(model: Any, trees: list[tuple[list[int], list[list[int]]]], pad_id: int) -> list[list[float]]:
    """log p(reply_k | prompt) of every tree's replies (fp32 sums), in one forward pass."""
    rows = _tree_rows(trees, pad_id)
    device = next(model.parameters()).device
    width = rows["input_ids"].shape[1]
    where, owner, targets = _targets(trees, width)
    inputs = {
        "input_ids": rows["input_ids"].to(device),
        "position_ids": rows["position_ids"].to(device),
        "attention_mask": rows["mask"].to(device),
        "use_cache": False,
    }
    flat = torch.tensor(where, dtype=torch.long, device=device)  # (M,) row * L + position, with repeats
    if lm_head_takes_mask(model):
        keep = torch.zeros(len(trees) * width, dtype=torch.bool, device=device)
        keep[flat] = True  # each predicting position once, even when K first tokens share it
        logits = model(logits_to_keep=keep.view(len(trees), width), **inputs).logits  # (U, V)
        rank = keep.long().cumsum(0) - 1  # flat position -> its row in the kept logits (row-major)
        logits = logits[rank[flat]]  # (M, V)
    else:
        logits = model(**inputs).logits.flatten(0, 1)[flat]  # (M, V)
    token_logps = TokenLogps.apply(logits, torch.tensor(targets, device=device))  # (M,) fp32
    k_max = max(len(rs) for _, rs in trees)
    slot = torch.tensor([b * k_max + k for b, k in owner], dtype=torch.long, device=device)
    sums = token_logps.new_zeros(len(trees) * k_max).index_add(0, slot, token_logps)
    return sums.view(len(trees), k_max).tolist()


def score_shared_prompt(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[Message]],
    reply_sets: Sequence[Sequence[str]],
    max_length: int,
    batch_size: int,
    length_normalize: bool = False,
    desc: str = "score",
    packed: bool = True,
) -> tuple[list[list[float]], int]:
    """log p(reply | prompt) for K sets of replies to the same prompts: one list per set, in input order
    (= `score_logps` on each set, up to float rounding), and the number of positions run.

    Each prompt runs once, its K replies after it in the same row (`_tree_rows`), so K prompts' worth of
    positions become one. Replies are encoded exactly as `score_logps` encodes them (`encode_all`: the same
    end of turn and cut at `max_length`). `batch_size` counts sequences, as in `score_logps`: a batch holds
    batch_size // K prompts, longest first. A model `shared_prompt_supported` refuses is scored set by set
    (`score_logps`, sequences `packed` without padding where the model allows)."""
    sets = [list(r) for r in reply_sets]
    if not shared_prompt_supported(model):
        out = [
            score_logps(model, tokenizer, prompts, r, max_length, batch_size, length_normalize, desc, packed)
            for r in sets
        ]
        positions = sum(len(e.input_ids) for r in sets for e in encode_all(tokenizer, prompts, r, max_length))
        return out, positions
    encoded: list[list[Encoded]] = [encode_all(tokenizer, prompts, r, max_length) for r in sets]
    trees = []
    for i in range(len(prompts)):
        p = encoded[0][i].prompt_len
        trees.append((encoded[0][i].input_ids[:p], [enc[i].input_ids[p:] for enc in encoded]))
        assert all(enc[i].input_ids[:p] == trees[-1][0] for enc in encoded), "one prompt, one encoding"
    order = sorted(range(len(trees)), key=lambda i: -(len(trees[i][0]) + sum(map(len, trees[i][1]))))
    per_batch = max(1, batch_size // max(len(sets), 1))
    out = [[0.0] * len(prompts) for _ in sets]
    was_training = model.training
    model.eval()
    starts = range(0, len(order), per_batch)
    for s in track(starts, len(starts), desc, unit="batch", enabled=len(order) > per_batch):
        idx = order[s : s + per_batch]
        for i, values in zip(idx, _tree_logps(model, [trees[i] for i in idx], tokenizer.pad_token_id)):
            for k, v in enumerate(values):
                n = len(trees[i][1][k])
                out[k][i] = v / max(n, 1) if length_normalize else v
    model.train(was_training)
    return out, sum(len(p) + sum(map(len, rs)) for p, rs in trees)


# --- the evaluation -------------------------------------------------------------------------------------


def evaluate_model(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    cfg: SpinConfig,
    iteration: int,
    previous: EvalState | None,
    accelerator: Any = None,
    answers_path: Path | None = None,
) -> tuple[dict[str, float | None], EvalState, list[dict[str, str]]]:
    """Metrics of the model at `iteration` on the held-out `examples`; see the module docstring.

    With `answers_path`, every scored answer is written there (`answer_rows`), so a user can see why a
    reply did or did not count.
    """
    metrics, state, samples, _ = evaluate_model_details(
        model, tokenizer, examples, cfg, iteration, previous, accelerator, answers_path
    )
    return metrics, state, samples


def _timed_generation(
    model: Any, tokenizer: Any, prompts: list[list[Message]], cfg: SpinConfig, seed: int, greedy: bool
) -> tuple[list[Any], float, int]:
    """generate_responses with its wall seconds and generated tokens."""
    t0 = time.perf_counter()
    desc = "eval greedy" if greedy else "eval samples"
    out = generate_responses(model, tokenizer, prompts, cfg.generation, seed=seed, greedy=greedy, desc=desc)
    return out, time.perf_counter() - t0, sum(g.num_tokens for g in out)


def _sample_metrics(
    sampled: list[Any], real: list[str], real_tokens: list[int], logps_real: list[float]
) -> dict:
    """Log-likelihood of the real replies and how the temperature-1 samples compare with them."""
    n = max(len(real), 1)
    lengths = [g.num_tokens for g in sampled]
    return {
        "loglik_real": sum(logps_real) / n,
        "loglik_real_per_token": sum(logps_real) / max(sum(real_tokens), 1),
        "gen_len_mean": statistics.fmean(lengths) if lengths else 0.0,
        "gen_len_std": statistics.pstdev(lengths) if len(lengths) > 1 else 0.0,
        "gen_finished_rate": sum(g.finished for g in sampled) / n,
        "gen_len_w1": wasserstein_1(lengths, real_tokens),
        "identical_to_real": sum(g.text == r for g, r in zip(sampled, real)) / n,
        "discriminability": None,
        "reward_margin": None,
        "reward_real": None,
        "reward_generated": None,
    }


def evaluate_model_details(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    cfg: SpinConfig,
    iteration: int,
    previous: EvalState | None,
    accelerator: Any = None,
    answers_path: Path | None = None,
) -> tuple[dict[str, float | None], EvalState, list[dict[str, str]], EvalDetails]:
    """`evaluate_model`, plus the per-example values and per-phase cost (`EvalDetails`)."""
    start = time.perf_counter()
    prompts = [ex.prompt for ex in examples]
    real = [ex.response for ex in examples]
    tcfg, ecfg = cfg.train, cfg.eval
    seconds: dict[str, float] = {}
    work: dict[str, int] = {}
    gen_model = generation_model(model, cfg.generation)  # one copy in generation.dtype for both passes
    sample_seed = cfg.seed + 100_003 * (iteration + 1)
    sampled, seconds["generate_samples"], work["generated_samples"] = _timed_generation(
        gen_model, tokenizer, prompts, cfg, sample_seed, greedy=False
    )
    own = [g.text for g in sampled]

    # Real replies, own samples and (from iteration 1) the opponent's samples: one prompt pass for all.
    t0 = time.perf_counter()
    sets = [real, own] + ([previous.generations] if previous is not None else [])
    score_args = (tcfg.max_length, ecfg.batch_size, tcfg.length_normalize, "eval score", tcfg.padding_free)
    scored, work["scored_positions"] = score_shared_prompt(model, tokenizer, prompts, sets, *score_args)
    seconds["score"] = time.perf_counter() - t0
    state = EvalState(own, scored[0], scored[1])

    real_tokens = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in real]
    metrics: dict[str, float | None] = _sample_metrics(sampled, real, real_tokens, state.logps_real)
    wins = None
    if previous is not None:
        # p_t against p_{t-1} on (real, sample of p_{t-1}): the main player's view of the last game.
        beta = float(scheduled(tcfg.beta, max(iteration, 1)))
        rtol = tie_rtol(next(model.parameters()).dtype)
        args = (state.logps_real, scored[2], previous.logps_real, previous.logps_generated, beta, rtol)
        metrics.update(reward_metrics(*args))
        wins = pair_wins(*args)

    # Task metrics: greedy answers for deterministic tasks, the samples for distributional ones.
    answers = own
    if ecfg.greedy and cfg.task != "grammar":
        greedy, seconds["generate_greedy"], work["generated_greedy"] = _timed_generation(
            gen_model, tokenizer, prompts, cfg, cfg.seed, greedy=True
        )
        answers = [g.text for g in greedy]
    del gen_model

    def logp_fn(ps: list[list[Message]], rs: list[str]) -> list[float]:  # for the task scorer (grammar)
        return score_logps(model, tokenizer, ps, rs, *score_args[:3], "eval support", tcfg.padding_free)

    rows = _task_metrics(metrics, examples, answers, own, cfg, logp_fn)
    if answers_path is not None and rows:
        write_jsonl(answers_path, rows)

    samples = [
        {"prompt": render_prompt(tokenizer, p), "real": r, "generated": g}
        for p, r, g in list(zip(prompts, real, answers))[: ecfg.num_samples]
    ]
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    seconds["total"] = time.perf_counter() - start
    metrics["seconds_eval"] = seconds["total"]  # this stage's wall time
    lengths = [g.num_tokens for g in sampled]
    return metrics, state, samples, EvalDetails(answers, lengths, real_tokens, wins, seconds, work)


def _task_metrics(
    metrics: dict[str, float | None],
    examples: list[Example],
    answers: list[str],
    samples: list[str],
    cfg: SpinConfig,
    logp_fn: Any,
) -> list[dict[str, Any]]:
    """Add the task's metrics to `metrics` (in place); returns the answer rows (`answer_rows`).

    GSM8K-style tasks (`word_problems`, `gsm8k`) are scored on the greedy `answers` and, prefixed `sample_`,
    their format and calculator metrics also on the temperature-1 `samples`: how close the model's own
    samples are to the data is what SPIN changes."""

    task = get_task(cfg.task) if cfg.task in TASK_NAMES else None
    gsm8k_like = task is not None and task.score is gsm8k_metrics
    pattern = cfg.data.answer_pattern or ("gsm8k" if gsm8k_like else None)
    rows = answer_rows(examples, answers, pattern, exact=task is not None and not gsm8k_like)
    if task is not None:
        metrics.update(task.score(examples, answers, logp_fn))
    elif rows:
        metrics["answer_exact_match"] = sum(r["correct"] for r in rows) / len(rows)
    if gsm8k_like:
        on_samples = gsm8k_metrics(examples, samples)
        metrics.update({f"sample_{k}": on_samples[k] for k in ("final_answer_rate", "calc_accuracy")})
    return rows


def answer_rows(
    examples: list[Example], answers: list[str], pattern: str | None, exact: bool = False
) -> list[dict[str, Any]]:
    """One row per example with a gold answer: prompt, reference, the model's answer, what was extracted
    from it and whether it counts. `exact` (built-in tasks): the stripped answer itself is compared."""
    compiled = compile_answer_pattern(pattern)
    rows = []
    for i, (ex, answer) in enumerate(zip(examples, answers)):
        if ex.reference is None:
            continue
        extracted = answer.strip() if exact else extract_answer(answer, compiled)
        reference = ex.reference.strip() if exact else ex.reference
        rows.append(
            {
                "index": i,
                "prompt": ex.prompt[-1]["content"],
                "reference": reference,
                "answer": answer,
                "extracted": extracted,
                "correct": extracted == reference,
            }
        )
    return rows


def primary_metric(cfg: SpinConfig, examples: list[Example]) -> str:
    """The metric the stopping rule and the report lead with (higher is better)."""

    if cfg.task in TASK_NAMES:
        return get_task(cfg.task).primary_metric
    if any(ex.reference is not None for ex in examples):
        return "answer_exact_match"
    return "loglik_real"
