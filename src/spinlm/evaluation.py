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
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from spinlm.answers import compile_answer_pattern, extract_answer
from spinlm.config import SpinConfig, scheduled
from spinlm.data import Example, Message
from spinlm.generation import generate_responses
from spinlm.io import write_jsonl
from spinlm.logps import score_logps
from spinlm.loss import TIE_RTOL, reward_wins, tie_rtol
from spinlm.modeling import render_prompt
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


def reward_metrics(
    policy_real: list[float],
    policy_generated: list[float],
    ref_real: list[float],
    ref_generated: list[float],
    beta: float,
    rtol: float = TIE_RTOL["full"],
) -> dict[str, float]:
    """Held-out reward accuracy (ties 1/2, up to float rounding: spinlm.loss.reward_wins, as in training)
    and margins of the implicit rewards beta * log p/p_ref."""
    real = [beta * (p - r) for p, r in zip(policy_real, ref_real)]
    gen = [beta * (p - r) for p, r in zip(policy_generated, ref_generated)]
    scale = torch.tensor(
        [beta * (abs(a) + abs(b)) for a, b in zip(ref_real, ref_generated)], dtype=torch.float64
    )
    wins = reward_wins(
        torch.tensor(real, dtype=torch.float64), torch.tensor(gen, dtype=torch.float64), scale, rtol
    ).tolist()
    n = max(len(real), 1)
    return {
        "discriminability": sum(wins) / n,
        "reward_margin": sum(a - b for a, b in zip(real, gen)) / n,
        "reward_real": sum(real) / n,
        "reward_generated": sum(gen) / n,
    }


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
    start = time.perf_counter()
    prompts = [ex.prompt for ex in examples]
    real = [ex.response for ex in examples]
    tcfg, ecfg = cfg.train, cfg.eval

    def logps(ps: list[list[Message]], rs: list[str], desc: str) -> list[float]:
        return score_logps(
            model, tokenizer, ps, rs, tcfg.max_length, ecfg.batch_size, tcfg.length_normalize, desc
        )

    sampled = generate_responses(
        model,
        tokenizer,
        prompts,
        cfg.generation,
        seed=cfg.seed + 100_003 * (iteration + 1),
        desc="eval samples",
    )
    own = [g.text for g in sampled]
    state = EvalState(own, logps(prompts, real, "eval real"), logps(prompts, own, "eval samples"))

    n = max(len(examples), 1)
    lengths = [g.num_tokens for g in sampled]
    real_tokens = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in real]
    metrics: dict[str, float | None] = {
        "loglik_real": sum(state.logps_real) / n,
        "loglik_real_per_token": sum(state.logps_real) / max(sum(real_tokens), 1),
        "gen_len_mean": statistics.fmean(lengths) if lengths else 0.0,
        "gen_len_std": statistics.pstdev(lengths) if len(lengths) > 1 else 0.0,
        "gen_finished_rate": sum(g.finished for g in sampled) / n,
        "gen_len_w1": wasserstein_1(lengths, real_tokens),
        "identical_to_real": sum(a == b for a, b in zip(own, real)) / n,
        "discriminability": None,
        "reward_margin": None,
        "reward_real": None,
        "reward_generated": None,
    }
    if previous is not None:
        # p_t against p_{t-1} on (real, sample of p_{t-1}): the main player's view of the last game.
        policy_prev_gen = logps(prompts, previous.generations, "eval opponent samples")
        beta = float(scheduled(tcfg.beta, max(iteration, 1)))
        rtol = tie_rtol(next(model.parameters()).dtype)
        metrics.update(
            reward_metrics(
                state.logps_real, policy_prev_gen, previous.logps_real, previous.logps_generated, beta, rtol
            )
        )

    # Task metrics: greedy answers for deterministic tasks, the samples for distributional ones.
    answers = own
    if ecfg.greedy and cfg.task != "grammar":
        greedy = generate_responses(
            model, tokenizer, prompts, cfg.generation, seed=cfg.seed, greedy=True, desc="eval greedy"
        )
        answers = [g.text for g in greedy]
    rows = _task_metrics(metrics, examples, answers, own, cfg, lambda ps, rs: logps(ps, rs, "eval support"))
    if answers_path is not None and rows:
        write_jsonl(answers_path, rows)

    samples = [
        {"prompt": render_prompt(tokenizer, p), "real": r, "generated": g}
        for p, r, g in list(zip(prompts, real, answers))[: ecfg.num_samples]
    ]
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    metrics["seconds_eval"] = time.perf_counter() - start  # this stage's wall time
    return metrics, state, samples


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
