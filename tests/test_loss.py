"""Tests for spinlm.loss: hand-computed arithmetic, sequence log-probs vs a naive loop, and TRL's DPO loss.

The TRL tests run TRL's own `DPOTrainer._compute_loss` (the only place TRL 1.x computes the DPO loss: there is
no standalone `dpo_loss` any more) on a minimal stand-in for the trainer, so the comparison is against TRL's
code, not a retyped formula: SPIN's loss is DPO's with real = chosen, generated = rejected and the opponent
as the reference model.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from spinlm.logps import sequence_logps, sequence_token_counts
from spinlm.loss import LOSS_TYPES, SpinLossOutput, mix_reference_logps, spin_loss

# ---------------------------------------------------------------------------------------------------------
# spin_loss on three numbers, computed by hand (β = 0.5)
#
#   policy_real    = [-1, -2, -3]    opponent_real      = [-1, -3, -2]   -> real log-ratio      = [0,  1, -1]
#   policy_gen     = [-2, -4, -1]    opponent_generated = [-2, -3, -4]   -> generated log-ratio = [0, -1,  3]
#   real_rewards      = β·[0, 1, -1] = [0,  0.5, -0.5]
#   generated_rewards = β·[0, -1, 3] = [0, -0.5,  1.5]
#   z = margins = real_rewards − generated_rewards = [0, 1, -2]
# ---------------------------------------------------------------------------------------------------------
BETA = 0.5
POLICY_REAL = [-1.0, -2.0, -3.0]
POLICY_GENERATED = [-2.0, -4.0, -1.0]
OPPONENT_REAL = [-1.0, -3.0, -2.0]
OPPONENT_GENERATED = [-2.0, -3.0, -4.0]

# ℓ(z) for z = [0, 1, -2]:
#   sigmoid     −log σ(z) = log(1 + e^−z): log 2 = 0.693147, log(1 + e^−1) = 0.313262, log(1 + e^2) = 2.126928
#   hinge       max(0, 1 − z):             1, 0, 3
#   exponential e^−z:                      1, e^−1 = 0.367879, e^2 = 7.389056
EXPECTED_LOSSES = {
    "sigmoid": [0.693147, 0.313262, 2.126928],
    "hinge": [1.0, 0.0, 3.0],
    "exponential": [1.0, 0.367879, 7.389056],
}
# dℓ(z)/d policy_real_logps = β·ℓ'(z):
#   sigmoid     ℓ'(z) = −σ(−z): −0.5·[0.5, 0.268941, 0.880797] = [−0.25, −0.134471, −0.440399]
#   hinge       ℓ'(z) = −1[1 − z > 0] (torch's relu'(0) = 0, so z = 1 gives 0): [−0.5, 0, −0.5]
#   exponential ℓ'(z) = −e^−z: −0.5·[1, 0.367879, 7.389056] = [−0.5, −0.183940, −3.694528]
EXPECTED_GRADS = {
    "sigmoid": [-0.25, -0.134471, -0.440399],
    "hinge": [-0.5, 0.0, -0.5],
    "exponential": [-0.5, -0.183940, -3.694528],
}


def _hand_inputs(
    requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy_real, policy_generated, opponent_real, opponent_generated), each (3,)."""
    return (
        torch.tensor(POLICY_REAL, requires_grad=requires_grad),
        torch.tensor(POLICY_GENERATED, requires_grad=requires_grad),
        torch.tensor(OPPONENT_REAL, requires_grad=requires_grad),
        torch.tensor(OPPONENT_GENERATED, requires_grad=requires_grad),
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_spin_loss_hand_computed(loss_type: str) -> None:
    out = spin_loss(*_hand_inputs(), beta=BETA, loss_type=loss_type)
    assert isinstance(out, SpinLossOutput)
    assert out.losses.shape == (3,)  # per example, not reduced
    torch.testing.assert_close(out.losses, torch.tensor(EXPECTED_LOSSES[loss_type]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.real_rewards, torch.tensor([0.0, 0.5, -0.5]))
    torch.testing.assert_close(out.generated_rewards, torch.tensor([0.0, -0.5, 1.5]))
    torch.testing.assert_close(out.margins, torch.tensor([0.0, 1.0, -2.0]))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_spin_loss_hand_computed_gradients(loss_type: str) -> None:
    policy_real, policy_generated, opponent_real, opponent_generated = _hand_inputs(requires_grad=True)
    out = spin_loss(policy_real, policy_generated, opponent_real, opponent_generated, BETA, loss_type)
    out.losses.sum().backward()
    expected = torch.tensor(EXPECTED_GRADS[loss_type])
    assert policy_real.grad is not None and policy_generated.grad is not None
    torch.testing.assert_close(policy_real.grad, expected, atol=1e-6, rtol=0)
    # z is antisymmetric in (real, generated) and in (policy, opponent): the other three gradients follow.
    torch.testing.assert_close(policy_generated.grad, -expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(opponent_real.grad, -expected, atol=1e-6, rtol=0)
    # Rewards are for logging: no graph behind them.
    assert not out.real_rewards.requires_grad and not out.generated_rewards.requires_grad


def test_spin_loss_sigmoid_is_stable_for_large_margins() -> None:
    # −log σ(z) computed naively as −log(1/(1+e^−z)) gives inf at z = −200 in fp32; logsigmoid gives 200.
    z = torch.tensor([-200.0, 200.0])
    out = spin_loss(z, torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=1.0)
    torch.testing.assert_close(out.losses, torch.tensor([200.0, 0.0]))


def test_spin_loss_rejects_bad_arguments() -> None:
    args = _hand_inputs()
    with pytest.raises(ValueError, match="sigmoid, hinge, exponential"):
        spin_loss(*args, beta=0.1, loss_type="ipo")
    for bad_beta in (0.0, -0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="beta"):
            spin_loss(*args, beta=bad_beta)
    with pytest.raises(ValueError, match="opponent_generated_logps"):
        spin_loss(args[0], args[1], args[2], torch.zeros(4), beta=0.1)


# ---------------------------------------------------------------------------------------------------------
# sequence_logps against a naive per-sequence loop
# ---------------------------------------------------------------------------------------------------------
def _padded_batch(generator: torch.Generator, vocab: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (5, 9) and loss_mask (5, 9): left padding, right padding, prompts, one row with no response."""
    # (left pad, prompt, response, right pad) lengths per row; each row sums to 9
    layout = [(0, 3, 6, 0), (2, 2, 5, 0), (0, 4, 2, 3), (1, 1, 4, 3), (3, 6, 0, 0)]
    input_ids = torch.randint(0, vocab, (len(layout), 9), generator=generator)
    loss_mask = torch.zeros(len(layout), 9, dtype=torch.long)
    for row, (left, prompt, response, _right) in enumerate(layout):
        loss_mask[row, left + prompt : left + prompt + response] = 1
    return input_ids, loss_mask


def _naive_sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Sum of log_softmax(logits[b, t−1])[labels[b, t]] over response positions t, one token at a time, fp64."""
    sums, means = [], []
    for b in range(logits.shape[0]):
        total, count = 0.0, 0
        for t in range(1, logits.shape[1]):
            if loss_mask[b, t]:
                total += torch.log_softmax(logits[b, t - 1].double(), dim=-1)[labels[b, t]].item()
                count += 1
        sums.append(total)
        means.append(total / count if count else 0.0)
    return torch.tensor([sums, means], dtype=torch.float64)


def test_sequence_logps_matches_naive_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    input_ids, loss_mask = _padded_batch(generator)
    logits = 3 * torch.randn(*input_ids.shape, 11, generator=generator)
    expected_sum, expected_mean = _naive_sequence_logps(logits, input_ids, loss_mask)

    got_sum = sequence_logps(logits, input_ids, loss_mask)
    got_mean = sequence_logps(logits, input_ids, loss_mask, length_normalize=True)
    assert got_sum.shape == (5,) and got_sum.dtype == torch.float32
    torch.testing.assert_close(got_sum.double(), expected_sum, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got_mean.double(), expected_mean, atol=1e-5, rtol=1e-6)
    assert got_sum[4] == 0 and got_mean[4] == 0  # the row without a response scores nothing, no 0/0
    torch.testing.assert_close(sequence_token_counts(loss_mask), torch.tensor([6, 5, 2, 4, 0]))

    # A bool mask, and HF-style labels with -100 off the response, change nothing.
    hf_labels = input_ids.masked_fill(loss_mask == 0, -100)
    torch.testing.assert_close(sequence_logps(logits, hf_labels, loss_mask.bool()), got_sum)


def test_sequence_logps_gradient_only_reaches_response_predictions() -> None:
    generator = torch.Generator().manual_seed(1)
    input_ids, loss_mask = _padded_batch(generator)
    logits = torch.randn(*input_ids.shape, 11, generator=generator, requires_grad=True)
    sequence_logps(logits, input_ids, loss_mask).sum().backward()
    assert logits.grad is not None
    touched = logits.grad.abs().sum(dim=-1) > 0  # (B, T)
    # logits[:, t] gets a gradient iff it predicts a response token, i.e. loss_mask[:, t + 1] == 1
    predicts_response = torch.zeros_like(touched)
    predicts_response[:, :-1] = loss_mask[:, 1:].bool()
    assert torch.equal(touched, predicts_response)


def test_sequence_logps_bf16_logits_give_fp32() -> None:
    generator = torch.Generator().manual_seed(2)
    input_ids, loss_mask = _padded_batch(generator, vocab=50)
    logits = (4 * torch.randn(*input_ids.shape, 50, generator=generator)).bfloat16()
    got = sequence_logps(logits, input_ids, loss_mask)
    assert got.dtype == torch.float32
    # Same as upcasting first: the softmax runs in fp32, not bf16 (whose 8-bit mantissa is off by ~1e-2 here).
    expected_sum, _ = _naive_sequence_logps(logits.float(), input_ids, loss_mask)
    torch.testing.assert_close(got.double(), expected_sum, atol=1e-5, rtol=1e-6)
    bf16_only = torch.log_softmax(logits, dim=-1).float()  # what a bf16 log_softmax would give
    sloppy = torch.stack(
        [
            sum(
                (bf16_only[b, t - 1, input_ids[b, t]] for t in range(1, 9) if loss_mask[b, t]),
                torch.tensor(0.0),
            )
            for b in range(5)
        ]
    )
    assert (sloppy.double() - expected_sum).abs().max() > 1e-3  # so the fp32 check above is not vacuous


def test_sequence_logps_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        sequence_logps(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="loss_mask"):
        sequence_logps(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4))


# ---------------------------------------------------------------------------------------------------------
# mix_reference_logps (α-SPIN)
# ---------------------------------------------------------------------------------------------------------
def test_mix_reference_logps_arithmetic_and_endpoints() -> None:
    current = torch.tensor([-2.0, -10.0, -4.0])
    base = torch.tensor([-6.0, -2.0, -4.0])
    # α = 0.25: 0.25·base + 0.75·current = [−1.5 − 1.5, −0.5 − 7.5, −1 − 3] = [−3, −8, −4]
    torch.testing.assert_close(mix_reference_logps(current, base, 0.25), torch.tensor([-3.0, -8.0, -4.0]))
    torch.testing.assert_close(mix_reference_logps(current, base, 0.0), current)  # vanilla SPIN
    torch.testing.assert_close(mix_reference_logps(current, base, 1.0), base)  # fixed base reference
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="alpha"):
            mix_reference_logps(current, base, bad)


def test_mixture_normaliser_cancels_in_spin_loss() -> None:
    """log p_ref is unnormalised; its per-prompt log Z(x) shifts real and generated alike, so z is unchanged."""
    generator = torch.Generator().manual_seed(3)
    policy_real, policy_gen, cur_real, cur_gen, base_real, base_gen = -5 * torch.rand(
        6, 4, generator=generator
    )
    ref_real = mix_reference_logps(cur_real, base_real, 0.3)
    ref_gen = mix_reference_logps(cur_gen, base_gen, 0.3)
    log_z = torch.tensor([-0.1, -2.0, -0.7, -5.0])  # any per-prompt constant
    a = spin_loss(policy_real, policy_gen, ref_real, ref_gen, beta=0.2)
    b = spin_loss(policy_real, policy_gen, ref_real - log_z, ref_gen - log_z, beta=0.2)
    torch.testing.assert_close(a.losses, b.losses)


# ---------------------------------------------------------------------------------------------------------
# Equivalence with TRL's DPO loss (real = chosen, generated = rejected, opponent = reference model)
# ---------------------------------------------------------------------------------------------------------
def _trl_dpo_loss(
    policy: Any, reference: Any, inputs: dict[str, torch.Tensor], beta: float, loss_type: str
) -> tuple[float, dict[str, list[float]]]:
    """Run TRL's `DPOTrainer._compute_loss` on a stand-in trainer holding only what that method reads.

    Returns TRL's batch loss (the mean over pairs) and the metrics it logged. `inputs` has the chosen rows
    first, then the rejected rows, as TRL's collator builds them.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    metrics: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    trainer = SimpleNamespace(
        model=policy,
        ref_model=reference,
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        f_divergence_type="reverse_kl",  # plain DPO
        ld_alpha=None,
        use_weighting=False,
        precompute_ref_logps=False,
        aux_loss_enabled=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t
        ),
        _metrics=metrics,
        _total_train_tokens=0,
        _tp_size=1,
    )
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)  # type: ignore[arg-type]
    mode = "train" if policy.training else "eval"
    return float(loss), metrics[mode]


class _FixedLogpsLM(torch.nn.Module):
    """Stands in for a causal LM patched by TRL's `add_fused_lm_head`: its per-token log-probs are given."""

    is_gradient_checkpointing = False

    def __init__(self, per_token_logps: torch.Tensor) -> None:
        super().__init__()
        self.per_token_logps = per_token_logps  # (N, T-1)
        self.eval()

    def forward(self, *, labels: torch.Tensor, **_: Any) -> SimpleNamespace:
        log_probs = self.per_token_logps.masked_fill(labels[:, 1:] == -100, 0.0)  # fused head: 0 off-label
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


@pytest.mark.parametrize("beta", [0.1, 0.5, 3.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])  # the two losses TRL's DPO shares with SPIN
def test_spin_loss_equals_trl_dpo_loss_on_random_logps(loss_type: str, beta: float) -> None:
    generator = torch.Generator().manual_seed(4)
    batch = 8
    # One-token responses, so each row's sequence log-prob is its single per-token log-prob; spread wide so
    # that z covers both saturated tails of the sigmoid and both sides of the hinge.
    policy_logps = -30 * torch.rand(2 * batch, generator=generator)  # (2B,) [real; generated]
    opponent_logps = policy_logps + 4 * torch.randn(2 * batch, generator=generator)  # (2B,)
    policy_real, policy_generated = policy_logps.chunk(2)  # (B,) each
    opponent_real, opponent_generated = opponent_logps.chunk(2)
    ours = spin_loss(policy_real, policy_generated, opponent_real, opponent_generated, beta, loss_type)

    def trl_on(rows: torch.Tensor) -> tuple[float, dict[str, list[float]]]:
        inputs = {
            "input_ids": torch.zeros(len(rows), 2, dtype=torch.long),
            "attention_mask": torch.ones(len(rows), 2, dtype=torch.long),
            "completion_mask": torch.tensor([[0, 1]] * len(rows)),
        }
        return _trl_dpo_loss(
            _FixedLogpsLM(policy_logps[rows, None]),
            _FixedLogpsLM(opponent_logps[rows, None]),
            inputs,
            beta,
            loss_type,
        )

    # Per pair (TRL only returns a batch mean) ...
    for i in range(batch):
        trl_loss, _ = trl_on(torch.tensor([i, batch + i]))
        assert trl_loss == pytest.approx(ours.losses[i].item(), rel=1e-5, abs=1e-5)
    # ... and the whole batch, with TRL's logged rewards.
    trl_loss, metrics = trl_on(torch.arange(2 * batch))
    assert trl_loss == pytest.approx(ours.losses.mean().item(), rel=1e-5, abs=1e-5)
    assert metrics["rewards/chosen"][0] == pytest.approx(ours.real_rewards.mean().item(), rel=1e-5, abs=1e-5)
    assert metrics["rewards/rejected"][0] == pytest.approx(
        ours.generated_rewards.mean().item(), rel=1e-5, abs=1e-5
    )
    assert metrics["rewards/margins"][0] == pytest.approx(ours.margins.mean().item(), rel=1e-5, abs=1e-5)
    # The inputs were not degenerate: the real reply wins some pairs and loses others.
    assert (ours.margins > 0).any() and (ours.margins < 0).any() and ours.losses.std() > 0.1


def _tiny_llama(seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=37,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    with torch.random.fork_rng():  # seeded weights without touching other tests' global RNG
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def test_sequence_logps_and_spin_loss_equal_trl_dpo_end_to_end() -> None:
    """Tiny random Llamas as policy and opponent; TRL scores the tokens with its own fused LM head."""
    from trl.trainer.utils import add_fused_lm_head

    policy, opponent = _tiny_llama(seed=5), _tiny_llama(seed=6)
    generator = torch.Generator().manual_seed(7)
    batch, length = 3, 10
    input_ids = torch.randint(0, 37, (2 * batch, length), generator=generator)  # (2B, T) [real; generated]
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row, (prompt, response) in enumerate([(3, 7), (4, 3), (2, 5), (3, 4), (4, 6), (2, 8)]):
        completion_mask[row, prompt : prompt + response] = 1
        attention_mask[row, prompt + response :] = 0  # right padding, as TRL's collator pads

    with torch.no_grad():  # ours: full logits, then sequence_logps
        policy_logps = sequence_logps(
            policy(input_ids, attention_mask=attention_mask).logits, input_ids, completion_mask
        )
        opponent_logps = sequence_logps(
            opponent(input_ids, attention_mask=attention_mask).logits, input_ids, completion_mask
        )
    policy_real, policy_generated = policy_logps.chunk(2)  # (B,) each
    opponent_real, opponent_generated = opponent_logps.chunk(2)
    ours = spin_loss(policy_real, policy_generated, opponent_real, opponent_generated, beta=0.7)

    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(opponent)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    trl_loss, metrics = _trl_dpo_loss(policy, opponent, inputs, beta=0.7, loss_type="sigmoid")
    assert trl_loss == pytest.approx(ours.losses.mean().item(), rel=1e-5, abs=1e-6)
    assert metrics["logps/chosen"][0] == pytest.approx(policy_logps[:batch].mean().item(), rel=1e-5)
    assert metrics["logps/rejected"][0] == pytest.approx(policy_logps[batch:].mean().item(), rel=1e-5)
    assert metrics["rewards/margins"][0] == pytest.approx(ours.margins.mean().item(), rel=1e-4, abs=1e-6)
