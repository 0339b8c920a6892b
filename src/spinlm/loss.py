"""The SPIN loss and the α-SPIN reference, as pure tensor functions of sequence log-probs (`spinlm.logps`).

What it does
------------
SPIN (Chen et al., ICML 2024, arXiv 2401.01335) trains p_θ to tell the real reply y ~ p_data(.|x) apart
from the reply y' ~ p_θt(.|x) its previous iterate (the *opponent*) generated for the same prompt x:

    L_SPIN(θ, θ_t) = E_{x, y ~ p_data, y' ~ p_θt} [ ℓ( β log p_θ(y|x)/p_θt(y|x) − β log p_θ(y'|x)/p_θt(y'|x) ) ]

(the paper's end-to-end objective, Eq. (4.7) in v3; the paper writes λ where we write β). In code:

    z = β·((log p_θ(y|x) − log p_θt(y|x)) − (log p_θ(y'|x) − log p_θt(y'|x)))      # (B,)
    loss = ℓ(z)                                                                     # (B,), no reduction

It is DPO's loss with the real reply as "chosen", the generated one as "rejected", and the opponent as the
reference model (tests/test_loss.py runs TRL's DPO loss to check exactly that).

- `spin_loss`: per-example ℓ(z) plus the implicit rewards β·log p_θ/p_θt of both replies (detached).
- log p(y|x) = Σ_t log p(y_t | x, y_<t) over the response tokens comes from `spinlm.logps`.
- `mix_reference_logps`: the α-SPIN reference log p_base^α · p_t^(1−α) (Alami et al. 2024, arXiv 2404.04291).

How it departs from the paper
-----------------------------
- ℓ is any convex, decreasing loss in the paper; its experiments (and Theorem 5.4) use the logistic
  ℓ(t) = log(1 + exp(−t)), our `"sigmoid"` (computed as −logsigmoid(t) for stability). We also offer `"hinge"`
  ℓ(t) = max(0, 1 − t) (the official SPIN code's second option) and `"exponential"` ℓ(t) = exp(−t), another
  convex decreasing member of the family (it can overflow for very negative z: keep β·margins moderate).
  Theorem 5.2 (the fixed point p_θt = p_data) holds for all three; the closed-form update of Theorem 5.4
  is specific to the logistic loss (for the exponential loss the exponent is 1/(2β), not 1/β: see
  tests/test_theory.py).
- Losses come back per example, unreduced: the trainer decides how to average (and over how many devices).
- `spinlm.logps.forward_logps(length_normalize=True)` averages instead of sums the token log-probs. The paper
  does not (log p(y|x) is a sum by the chain rule); it is off by default and only there to experiment with.
- `mix_reference_logps` is not in the SPIN paper: it is the geometric-mixture reference of α-SPIN.
  α = 0 gives back vanilla SPIN, α = 1 a fixed (DPO-like) base reference.

How to run
----------
    from spinlm.logps import sequence_logps
    from spinlm.loss import spin_loss
    # input_ids, attention_mask, loss_mask: (2B, T), the B real rows then the B generated rows
    logps = sequence_logps(model(input_ids, attention_mask=attention_mask).logits, input_ids, loss_mask)
    with torch.no_grad():
        opp = sequence_logps(opponent(input_ids, attention_mask=attention_mask).logits, input_ids, loss_mask)
    out = spin_loss(*logps.chunk(2), *opp.chunk(2), beta=0.1)
    out.losses.mean().backward()

Tests: `.venv/bin/python -m pytest -q tests/test_loss.py tests/test_theory.py`; docs/paper.md maps each
equation of the paper to the function and test above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "hinge", "exponential")


@dataclass(frozen=True)
class SpinLossOutput:
    """Per-example SPIN losses and implicit rewards; nothing is reduced over the batch."""

    losses: Tensor  # (B,) ℓ(z) per example, NO reduction; carries the gradient
    real_rewards: Tensor  # (B,) β·(log p_θ(y|x) − log p_ref(y|x)) for the real reply y, detached
    generated_rewards: Tensor  # (B,) β·(log p_θ(y'|x) − log p_ref(y'|x)) for the generated reply y', detached

    @property
    def margins(self) -> Tensor:
        """(B,) real − generated reward: the z inside ℓ(z), detached. Positive means the real reply wins."""
        return self.real_rewards - self.generated_rewards


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0 (the paper's λ), got {beta!r}")


def spin_loss(
    policy_real_logps: Tensor,
    policy_generated_logps: Tensor,
    opponent_real_logps: Tensor,
    opponent_generated_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> SpinLossOutput:
    """SPIN loss ℓ(z) per example (paper Eq. (4.7)), with z the difference of the two implicit rewards.

    All four inputs are (B,) sequence log-probs log p(reply|prompt), summed over the reply's tokens
    (`sequence_logps`): the policy p_θ being trained and the opponent p_θt (the previous iterate, or any
    reference, e.g. `mix_reference_logps`), each on the real reply y and on the generated reply y'.
    `beta` is the paper's λ: the strength of the KL regularisation of the opponent's update.
    """
    _check_beta(beta)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid options: {', '.join(LOSS_TYPES)}")
    shape = policy_real_logps.shape
    for name, t in (
        ("policy_generated_logps", policy_generated_logps),
        ("opponent_real_logps", opponent_real_logps),
        ("opponent_generated_logps", opponent_generated_logps),
    ):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, policy_real_logps has {tuple(shape)}")

    # z = β log p_θ(y|x)/p_θt(y|x) − β log p_θ(y'|x)/p_θt(y'|x), the argument of ℓ; all shapes (B,)
    z = beta * (
        (policy_real_logps - opponent_real_logps) - (policy_generated_logps - opponent_generated_logps)
    )
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(z)  # ℓ(t) = log(1 + exp(−t)), the paper's logistic loss
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - z)  # ℓ(t) = max(0, 1 − t)
    else:
        losses = torch.exp(-z)  # ℓ(t) = exp(−t)

    # Implicit rewards (the main player f_{t+1}(x, y) = β log p_θ(y|x)/p_θt(y|x)), for logging only.
    real_rewards = beta * (policy_real_logps - opponent_real_logps).detach()  # (B,)
    generated_rewards = beta * (policy_generated_logps - opponent_generated_logps).detach()  # (B,)
    return SpinLossOutput(losses=losses, real_rewards=real_rewards, generated_rewards=generated_rewards)


def mix_reference_logps(current_logps: Tensor, base_logps: Tensor, alpha: float) -> Tensor:
    """α-SPIN reference (Alami et al. 2024): log p_ref = α·log p_base + (1 − α)·log p_t, elementwise.

    current_logps: (B,) log p_t(y|x) under the current opponent; base_logps: (B,) log p_base(y|x) under the
    base (SFT) model; returns (B,). p_ref ∝ p_base^α · p_t^(1−α) is a geometric mixture, unnormalised: its
    normaliser Z(x) depends on the prompt only, so it cancels in SPIN's z, where the real and the generated
    reply share their prompt. α = 0 is vanilla SPIN (reference = opponent), α = 1 a fixed base reference.
    """
    if not (isinstance(alpha, int | float) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1] (0: vanilla SPIN, 1: the base model), got {alpha!r}")
    if current_logps.shape != base_logps.shape:
        raise ValueError(
            f"current_logps {tuple(current_logps.shape)} and base_logps {tuple(base_logps.shape)} differ"
        )
    return alpha * base_logps + (1.0 - alpha) * current_logps  # (B,)


# Relative tolerance below which two rewards count as a tie. The opponent's log-probs (scored once per
# iteration) and the policy's (the training forward) come from passes with different batch shapes, so they
# differ by float rounding even when the policy IS the opponent (every pair at step 1): measured on CPU in
# fp32, 3e-5 nats on log-probs of -600 (5e-8 relative). Without it, step 1's reward accuracy is noise (a
# SmolLM2-135M run logged 0.75 at step 1). Half precision: a guess 100x fp32's, not measured (no GPU here).
TIE_RTOL = {"full": 1e-5, "half": 1e-3}


def tie_rtol(dtype: torch.dtype, mixed_precision: str = "no") -> float:
    """TIE_RTOL for a model computing in `dtype` (or under bf16 / fp16 autocast)."""
    half = dtype in (torch.float16, torch.bfloat16) or mixed_precision in ("bf16", "fp16")
    return TIE_RTOL["half" if half else "full"]


def reward_wins(real: Tensor, generated: Tensor, scale: Tensor, rtol: float) -> Tensor:
    """(B,) 1 where the real reply's reward is higher, 0 where lower, 1/2 for a tie: rewards closer than
    `rtol * scale` (scale: the magnitude they are computed from, beta * (|ref real| + |ref generated|))."""
    diff = real - generated
    tie = diff.abs() <= rtol * scale
    return torch.where(tie, torch.full_like(diff, 0.5), (diff > 0).to(diff.dtype))
