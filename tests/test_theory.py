"""spinlm.loss against the theory of the SPIN paper (Chen et al. 2024, arXiv 2401.01335, Section 5).

Everything here is exact, not sampled: a *tabular* policy p_θ(y|x) = softmax(θ[x])_y over a small finite set
of K responses per prompt, and the population loss

    L(θ; p_t) = Σ_x q(x) Σ_{y, y'} p_data(y|x) p_t(y'|x) ℓ( β log p_θ(y|x)/p_t(y|x) − β log p_θ(y'|x)/p_t(y'|x) )

evaluated by calling `spinlm.loss.spin_loss` on all (x, y, y') triples at once, weighted by q(x)·p_data·p_t.
So the code under test is the real loss, and the expectations are exact sums.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from spinlm.loss import LOSS_TYPES, spin_loss

DTYPE = torch.float64
# ℓ(0) and ℓ'(0) for each loss: ℓ(t) = log(1+e^−t), max(0, 1−t), e^−t
ELL_AT_0 = {"sigmoid": 0.6931471805599453, "hinge": 1.0, "exponential": 1.0}
ELL_PRIME_AT_0 = {"sigmoid": -0.5, "hinge": -1.0, "exponential": -1.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These tensors have ~100 elements: waking a second intra-op thread per op costs more than the op
    (ms per call on a busy 2-core box), and L-BFGS makes thousands of calls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dist(*rows: list[float]) -> torch.Tensor:
    """(P, K) rows normalised to distributions."""
    t = torch.tensor(rows, dtype=DTYPE)
    return t / t.sum(dim=-1, keepdim=True)


# Three prompts, five responses each; q(x) the prompt distribution.
Q = torch.tensor([0.5, 0.3, 0.2], dtype=DTYPE)
P_DATA = _dist([0.40, 0.25, 0.15, 0.12, 0.08], [0.05, 0.10, 0.20, 0.30, 0.35], [0.2, 0.2, 0.2, 0.2, 0.2])
P_T = _dist([0.10, 0.15, 0.20, 0.25, 0.30], [0.30, 0.25, 0.20, 0.15, 0.10], [0.50, 0.05, 0.15, 0.10, 0.20])


def population_loss(
    log_p: torch.Tensor, p_t: torch.Tensor, p_data: torch.Tensor, q: torch.Tensor, beta: float, loss_type: str
) -> torch.Tensor:
    """Exact E_{x~q, y~p_data, y'~p_t} ℓ(β log p_θ(y|x)/p_t(y|x) − β log p_θ(y'|x)/p_t(y'|x)).

    log_p: (..., P, K) log p_θ, optionally with leading batch dims (many policies at once); returns (...).
    """
    n_prompts, k = log_p.shape[-2:]
    x, y, y_gen = (
        i.reshape(-1) for i in torch.meshgrid(*(torch.arange(n) for n in (n_prompts, k, k)), indexing="ij")
    )
    policy_real = log_p[..., x, y]  # (..., P·K·K) the real reply y of each triple (x, y, y')
    log_p_t = p_t.log()
    out = spin_loss(
        policy_real_logps=policy_real,
        policy_generated_logps=log_p[..., x, y_gen],  # (..., P·K·K) the generated reply y'
        opponent_real_logps=log_p_t[x, y].expand_as(policy_real),
        opponent_generated_logps=log_p_t[x, y_gen].expand_as(policy_real),
        beta=beta,
        loss_type=loss_type,
    )
    weights = q[x] * p_data[x, y] * p_t[x, y_gen]  # (P·K·K,) sums to 1
    return (weights * out.losses).sum(dim=-1)


def _grad_at(theta: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    theta = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(theta.log_softmax(dim=-1)), theta)
    return grad


def _lbfgs(param0: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """argmin of a smooth convex objective by L-BFGS in float64, started at param0."""
    param = param0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [param],
        lr=1.0,
        max_iter=1000,
        tolerance_grad=1e-13,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(param)
        loss.backward()
        return loss

    opt.step(closure)
    return param.detach()


def _minimise(loss_fn: Callable[[torch.Tensor], torch.Tensor], theta0: torch.Tensor) -> torch.Tensor:
    """The policy softmax(θ*) with θ* = argmin_θ loss_fn(log_softmax(θ)) (strictly convex up to θ + c)."""
    return _lbfgs(theta0, lambda theta: loss_fn(theta.log_softmax(dim=-1))).softmax(dim=-1)


def _tv(p: torch.Tensor, r: torch.Tensor) -> float:
    """Total variation distance, the largest over prompts."""
    return float(0.5 * (p - r).abs().sum(dim=-1).max())


def closed_form_update(p_t: torch.Tensor, p_data: torch.Tensor, exponent: float) -> torch.Tensor:
    """p_{t+1}(y|x) ∝ p_t(y|x) · (p_data(y|x)/p_t(y|x))^exponent; Theorem 5.4 has exponent = 1/β."""
    unnorm = p_t * (p_data / p_t) ** exponent
    return unnorm / unnorm.sum(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------
# Theorem 5.2: p_t = p_data is the fixed point of self-play, for any convex decreasing ℓ
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 1.0, 4.0])
def test_fixed_point_gradient_vanishes_iff_opponent_is_data(loss_type: str, beta: float) -> None:
    """At θ = θ_t every pair has z = 0, so ∇_θ L = β ℓ'(0) q(x) (p_data(.|x) − p_t(.|x)) for softmax logits:
    zero when the opponent already is p_data (Theorem 5.2's fixed point), nonzero otherwise."""
    # p_t = p_data: θ_t = log p_data is a stationary point.
    at_data = _grad_at(P_DATA.log(), lambda lp: population_loss(lp, P_DATA, P_DATA, Q, beta, loss_type))
    assert at_data.abs().max() < 1e-6

    # p_t ≠ p_data: the gradient at θ_t is exactly β ℓ'(0) q (p_data − p_t), not zero.
    off_data = _grad_at(P_T.log(), lambda lp: population_loss(lp, P_T, P_DATA, Q, beta, loss_type))
    expected = beta * ELL_PRIME_AT_0[loss_type] * Q[:, None] * (P_DATA - P_T)
    torch.testing.assert_close(off_data, expected, atol=1e-12, rtol=1e-9)
    assert off_data.abs().max() > 1e-2 * beta


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fixed_point_is_global_minimum_iff_opponent_is_data(loss_type: str) -> None:
    """Theorem 5.2, both directions. If p_t = p_data, E z = 0 for *every* θ, so by Jensen L(θ) ≥ ℓ(0) = L(θ_t):
    θ_t is a global minimum. If p_t ≠ p_data, a small step against the gradient goes below ℓ(0)."""
    beta = 0.8
    generator = torch.Generator().manual_seed(0)
    theta_t = P_DATA.log()
    loss_at_t = population_loss(theta_t.log_softmax(-1), P_DATA, P_DATA, Q, beta, loss_type)
    assert float(loss_at_t) == pytest.approx(ELL_AT_0[loss_type], abs=1e-12)
    # 500 random policies, near and far: (500, P, K) logits
    scale = 3 * torch.rand(500, 1, 1, generator=generator, dtype=DTYPE)
    thetas = theta_t + scale * torch.randn(500, *theta_t.shape, generator=generator, dtype=DTYPE)
    losses = population_loss(thetas.log_softmax(-1), P_DATA, P_DATA, Q, beta, loss_type)  # (500,)
    assert losses.shape == (500,) and bool((losses >= ELL_AT_0[loss_type] - 1e-12).all())
    assert float(losses.min()) < ELL_AT_0[loss_type] + 1e-3  # some come close: the bound is tight

    theta_t = P_T.log()
    grad = _grad_at(theta_t, lambda lp: population_loss(lp, P_T, P_DATA, Q, beta, loss_type))
    stepped = (theta_t - 0.1 * grad).log_softmax(-1)
    assert float(population_loss(stepped, P_T, P_DATA, Q, beta, loss_type)) < ELL_AT_0[loss_type] - 1e-4


# ---------------------------------------------------------------------------------------------------------
# Theorem 5.4: with the logistic loss, the minimiser is p_{t+1} ∝ p_t (p_data/p_t)^{1/β}
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0, 5.0])
def test_closed_form_update_logistic(beta: float) -> None:
    """The exact minimiser over all (full-support) policies equals Theorem 5.4's closed form, for every β > 0.

    Why it holds for every β here: the population loss depends on p only through f(y) = β log p(y)/p_t(y),
    and for the logistic loss E ℓ(f(y) − f(y')) over y ~ p_data, y' ~ p_t is minimised exactly by the
    Bayes-optimal discriminator f* = log(p_data/p_t) + c(x) (unique up to c(x) since ℓ is strictly convex
    and p_data p_t > 0 on every pair). Solving β log p/p_t = f* gives p ∝ p_t (p_data/p_t)^{1/β}: a valid
    full-support distribution for *every* β > 0, and a tabular softmax reaches any such distribution. So the
    theorem's condition ("p_t (p_data/p_t)^{1/β} lies in the model class") is always met by this class.
    β = 1 is the special case p_{t+1} = p_data; β < 1 overshoots past p_data (see the iteration test).
    The condition does bite for restricted classes (test_closed_form_needs_reachability) and when p_data
    has zeros (the target then has zeros, which no finite logits reach: the infimum is not attained).
    """

    def loss_fn(log_p: torch.Tensor) -> torch.Tensor:
        return population_loss(log_p, P_T, P_DATA, Q, beta, "sigmoid")

    minimiser = _minimise(loss_fn, P_T.log())
    target = closed_form_update(P_T, P_DATA, 1.0 / beta)
    assert _tv(minimiser, target) < 1e-3
    # and it beats θ_t (loss ℓ(0) = log 2) strictly, as Theorem 5.2 says it must when p_t ≠ p_data
    assert float(loss_fn(minimiser.log())) < ELL_AT_0["sigmoid"] - 1e-3
    if beta == 1.0:
        assert _tv(minimiser, P_DATA) < 1e-3


def test_closed_form_is_specific_to_the_logistic_loss() -> None:
    """For ℓ(t) = e^−t the loss factorises, E_{p_data} e^{−f} · E_{p_t} e^{f}, and is minimised by
    f* = ½ log(p_data/p_t): the update is p_t (p_data/p_t)^{1/(2β)}, not Theorem 5.4's 1/β."""
    beta = 0.5
    minimiser = _minimise(lambda lp: population_loss(lp, P_T, P_DATA, Q, beta, "exponential"), P_T.log())
    assert _tv(minimiser, closed_form_update(P_T, P_DATA, 1.0 / (2 * beta))) < 1e-3
    assert _tv(minimiser, closed_form_update(P_T, P_DATA, 1.0 / beta)) > 0.05


def test_closed_form_needs_reachability() -> None:
    """Theorem 5.4 assumes p_t (p_data/p_t)^{1/β} lies in the model class. Take the one-parameter exponential
    family p_w(y) ∝ p_t(y) e^{w·φ(y)} through p_t: the target is in it iff log(p_data/p_t) is affine in φ.
    When it is, the minimiser over w is the closed form; when it is not, it is not (but still the minimiser)."""
    beta = 2.0
    phi = torch.arange(5, dtype=DTYPE)  # (K,) one feature per response
    p_t = P_T[:1]  # (1, K) one prompt
    q = torch.ones(1, dtype=DTYPE)
    reachable = p_t * torch.exp(0.7 * phi)
    reachable = reachable / reachable.sum()  # log(p_data/p_t) = 0.7 φ + c: in span{1, φ}
    unreachable = P_DATA[:1]  # log(P_DATA/P_T) is not affine in φ

    def restricted_log_p(w: torch.Tensor) -> torch.Tensor:
        return (p_t.log() + w * phi).log_softmax(dim=-1)  # (1, K) log p_w

    for p_data, in_class in ((reachable, True), (unreachable, False)):

        def loss_of_w(w: torch.Tensor, p_data: torch.Tensor = p_data) -> torch.Tensor:
            return population_loss(restricted_log_p(w), p_t, p_data, q, beta, "sigmoid")

        w = _lbfgs(torch.zeros(1, dtype=DTYPE), loss_of_w)  # the global minimiser within the class
        gap = _tv(restricted_log_p(w).exp(), closed_form_update(p_t, p_data, 1.0 / beta))
        assert (gap < 1e-3) if in_class else (gap > 0.02), (in_class, gap)


@pytest.mark.parametrize(
    ("beta", "behaviour"),
    [(0.75, "converges"), (1.5, "converges"), (4.0, "converges"), (0.5, "oscillates"), (0.4, "diverges")],
)
def test_iterating_exact_spin_steps_converges_iff_beta_above_half(beta: float, behaviour: str) -> None:
    """Corollary of Theorem 5.4: log p_{t+1} − log p_data = (1 − 1/β)(log p_t − log p_data) + c, so the exact
    self-play iteration contracts to p_data iff |1 − 1/β| < 1, i.e. β > 1/2. At β = 1/2 it flips
    p → p_data²/p and back forever; below 1/2 it moves away from p_data. Each step here is a numerical
    minimisation of the real loss, not the closed form."""
    p = P_T.clone()
    distances = [_tv(p, P_DATA)]
    steps = 4 if behaviour == "converges" else 2
    for _ in range(steps):
        opponent = p

        def loss_fn(log_p: torch.Tensor, opponent: torch.Tensor = opponent) -> torch.Tensor:
            return population_loss(log_p, opponent, P_DATA, Q, beta, "sigmoid")

        p = _minimise(loss_fn, opponent.log())  # the exact SPIN step against the current opponent
        distances.append(_tv(p, P_DATA))
    if behaviour == "converges":
        assert distances[-1] < 0.5 * distances[0] and distances[-1] < distances[-2]
    elif behaviour == "oscillates":
        assert _tv(p, P_T) < 1e-3 and distances[1] > 0.1  # p_2 = p_0 ≠ p_data
    else:
        assert distances[2] > distances[1] > distances[0]
