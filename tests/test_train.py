"""The trainer: one model in memory, the loss it optimises, and steps that do not depend on how they are cut.

- `test_trainer_holds_one_model`: no second network is loaded or copied while training (live parameters are
  counted at every step, `from_pretrained` / `deepcopy` are booby-trapped), each micro-step is ONE forward on
  the (2B, T) real + generated batch, and the logged loss equals `spinlm.loss.spin_loss` recomputed by hand
  (unpadded, one sequence at a time) on the same batch.
- Gradient accumulation: 2 micro-batches of 4 give the same SGD step as 1 batch of 8.
- Gradient checkpointing: same losses and weights as without.
- `precision: auto`: bf16 where bf16 is fast (a bf16 GPU, a CPU with AMX or AVX512-BF16), else fp32.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from spinlm.config import ModelConfig, TrainConfig
from spinlm.errors import SpinError
from spinlm.logps import score_logps
from spinlm.loss import spin_loss
from spinlm.modeling import encode_response, load_model, load_tokenizer
from spinlm.trainer import resolve_precision, train_iteration

CPU = torch.device("cpu")


def make_pairs(tokenizer: Any, model: Any, n: int, seed: int = 0) -> list[dict]:
    """`n` addition pairs: the real reply vs a corrupted one, reference log-probs = the model's + noise.

    The noise makes the policy differ from the reference at step 0, so the loss is not trivially log 2.
    """
    from spinlm.tasks import get_task

    make = get_task("addition").make_examples
    assert make is not None
    examples = make(n, seed)
    rng = random.Random(seed)
    rejected = [e.response[::-1] + str(rng.randint(0, 9)) for e in examples]
    prompts = [e.prompt for e in examples]
    real = score_logps(model, tokenizer, prompts, [e.response for e in examples], 48, 16)
    gen = score_logps(model, tokenizer, prompts, rejected, 48, 16)
    return [
        {
            "prompt": e.prompt,
            "chosen": [{"role": "assistant", "content": e.response}],
            "rejected": [{"role": "assistant", "content": r}],
            "ref_chosen_logps": c + rng.uniform(-2, 2),
            "ref_rejected_logps": g + rng.uniform(-2, 2),
        }
        for e, r, c, g in zip(examples, rejected, real, gen)
    ]


def train_cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "optimizer": "sgd",
        "learning_rate": 0.05,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "epochs": 1,
        "batch_size": 8,
        "max_length": 48,
        "save_steps": 0,
        "beta": 0.5,
    }
    base.update(kw)
    return TrainConfig(**base)


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def live_parameter_numel() -> int:
    """Elements of every nn.Parameter alive in this process (a second model would add its own)."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Parameter):
            seen[id(obj)] = obj.numel()
    return sum(seen.values())


def hand_logp(model: Any, tokenizer: Any, prompt: list[dict], response: str) -> torch.Tensor:
    """log p(response | prompt) of ONE unpadded sequence: log_softmax + gather, summed over response tokens."""
    enc = encode_response(tokenizer, prompt, response, 48)
    ids = torch.tensor([enc.input_ids])  # (1, T)
    logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]  # (T, V)
    targets = ids[0, enc.prompt_len :]  # the response tokens
    return (
        logp[enc.prompt_len - 1 : -1].gather(-1, targets[:, None]).sum()
    )  # predicted from the position before


@pytest.fixture
def tok_model(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_tokenizer(tiny_model_dir, ModelConfig()), load_model(
        tiny_model_dir, ModelConfig(), device=CPU
    )


def test_trainer_holds_one_model(
    tok_model: tuple[Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, PreTrainedModel

    tokenizer, model = tok_model
    pairs = make_pairs(tokenizer, model, 16)
    beta = 0.5
    # Expected loss of the first (and only) step, all 16 pairs at the starting weights, by hand.
    with torch.no_grad():
        model.eval()
        real = torch.stack(
            [hand_logp(model, tokenizer, p["prompt"], p["chosen"][0]["content"]) for p in pairs]
        )
        gen = torch.stack(
            [hand_logp(model, tokenizer, p["prompt"], p["rejected"][0]["content"]) for p in pairs]
        )
    ref_real = torch.tensor([p["ref_chosen_logps"] for p in pairs])
    ref_gen = torch.tensor([p["ref_rejected_logps"] for p in pairs])
    expected = spin_loss(real, gen, ref_real, ref_gen, beta=beta)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the trainer tried to build a second model")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(forbidden))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(forbidden))
    real_deepcopy = copy.deepcopy

    def deepcopy_no_modules(obj: Any, *args: Any) -> Any:
        if isinstance(obj, torch.nn.Module):
            forbidden()
        return real_deepcopy(obj, *args)

    monkeypatch.setattr(copy, "deepcopy", deepcopy_no_modules)

    forwards: list[tuple[int, ...]] = []
    model.register_forward_hook(
        lambda m, args, kw, out: forwards.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    before = live_parameter_numel()
    during: list[int] = []
    result = train_iteration(
        model,
        tokenizer,
        pairs,
        train_cfg(batch_size=16, beta=beta),
        iteration=1,
        run_seed=0,
        log_dir=tmp_path,
        on_step=lambda step: during.append(live_parameter_numel()),
    )
    assert result.steps == 1 and during == [before], (before, during)
    assert result.trainable_parameters == sum(p.numel() for p in model.parameters())
    # One forward per micro-step, real and generated together: on CPU load_model gives the model
    # sdpa_segments, so the 2B sequences run packed back to back in one row of all their tokens.
    assert model.config._attn_implementation == "sdpa_segments"
    tokens = sum(
        len(encode_response(tokenizer, p["prompt"], p[side][0]["content"], 48).input_ids)
        for p in pairs
        for side in ("chosen", "rejected")
    )
    assert forwards == [(1, tokens)]
    row = read_log(tmp_path / "train_log.jsonl")[0]
    assert row["loss"] == pytest.approx(expected.losses.mean().item(), rel=1e-5)
    assert row["rewards/real"] == pytest.approx(expected.real_rewards.mean().item(), rel=1e-5, abs=1e-6)
    assert row["rewards/generated"] == pytest.approx(
        expected.generated_rewards.mean().item(), rel=1e-5, abs=1e-6
    )
    accuracy = (expected.real_rewards > expected.generated_rewards).float().mean().item()
    assert row["rewards/accuracy"] == pytest.approx(accuracy)


def _run(tiny_model_dir: Path, tmp_path: Path, name: str, pairs: list[dict], **kw: Any) -> tuple[list, dict]:
    tokenizer = load_tokenizer(tiny_model_dir, ModelConfig())
    model = load_model(tiny_model_dir, ModelConfig(), device=CPU)
    train_iteration(
        model, tokenizer, pairs, train_cfg(**kw), iteration=1, run_seed=3, log_dir=tmp_path / name
    )
    return read_log(tmp_path / name / "train_log.jsonl"), weights(model)


def _assert_same(a: tuple[list, dict], b: tuple[list, dict], atol: float) -> None:
    log_a, w_a = a
    log_b, w_b = b
    assert len(log_a) == len(log_b) == 2
    for ra, rb in zip(log_a, log_b):
        for key in ("loss", "rewards/real", "rewards/generated", "rewards/margin"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), key
    moved = max((w_a[k] - w_b[k]).abs().max().item() for k in w_a)
    assert moved <= atol, moved


@pytest.fixture
def pairs16(tok_model: tuple[Any, Any]) -> list[dict]:
    tokenizer, model = tok_model
    return make_pairs(tokenizer, model, 16, seed=1)


def test_gradient_accumulation_matches_large_batch(
    tiny_model_dir: Path, tmp_path: Path, pairs16: list[dict]
) -> None:
    # No clipping: it would hide a wrongly scaled accumulated gradient. 16 pairs -> 2 optimizer steps.
    big = _run(tiny_model_dir, tmp_path, "1x8", pairs16, batch_size=8, max_grad_norm=0.0)
    accum = _run(
        tiny_model_dir,
        tmp_path,
        "2x4",
        pairs16,
        batch_size=4,
        gradient_accumulation_steps=2,
        max_grad_norm=0.0,
    )
    _assert_same(big, accum, atol=1e-6)
    # ... and the step really moved the weights (lr 0.05), so the comparison above means something.
    start = weights(load_model(tiny_model_dir, ModelConfig(), device=CPU))
    assert max((big[1][k] - start[k]).abs().max().item() for k in start) > 1e-3


def test_gradient_checkpointing_gives_same_training(
    tiny_model_dir: Path, tmp_path: Path, pairs16: list[dict]
) -> None:
    plain = _run(tiny_model_dir, tmp_path, "plain", pairs16)
    ckpt = _run(tiny_model_dir, tmp_path, "ckpt", pairs16, gradient_checkpointing=True)
    _assert_same(plain, ckpt, atol=1e-6)


def test_precision_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: bf16 where bf16 is fast (a bf16 GPU, a CPU with AMX or AVX512-BF16), fp32 on other CPUs;
    `SPINLM_CPU_BF16` overrides the CPU check either way."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("SPINLM_CPU_BF16")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolve_precision("auto") == "fp32"
    assert resolve_precision("bf16") == "bf16"  # asked for: bf16 even where it is slow
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("auto") == "bf16"  # AMX
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_precision("auto") == "bf16"  # AVX512-BF16 without AMX
    assert resolve_precision("fp32") == "fp32"
    monkeypatch.setenv("SPINLM_CPU_BF16", "0")
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setenv("SPINLM_CPU_BF16", "1")
    assert resolve_precision("auto") == "bf16"
    monkeypatch.delenv("SPINLM_CPU_BF16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto") == "fp32"  # a GPU without bf16 (fp16 only when asked for)
    assert resolve_precision("fp16") == "fp16"


def test_empty_pairs_is_an_error(tok_model: tuple[Any, Any], tmp_path: Path) -> None:
    tokenizer, model = tok_model
    with pytest.raises(SpinError, match="no training pairs"):
        train_iteration(model, tokenizer, [], train_cfg(), iteration=1, run_seed=0, log_dir=tmp_path)


@pytest.mark.parametrize("attention", ["sdpa_segments", "sdpa"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("masked_head", [True, False])
def test_forward_logps_matches_sequence_logps(
    tok_model: tuple[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
    masked_head: bool,
    packed: bool,
    attention: str,
) -> None:
    """The LM head on response positions only + chunked fp32 log-probs == full logits + `sequence_logps`,
    with the sequences packed without padding (sdpa_segments: one row, attention per sequence; sdpa: rows
    no wider than the padded batch, a block-diagonal mask) or as the padded batch; gradients too."""
    import spinlm.logps as pairs_mod
    from spinlm.logps import TokenLogps, collate, encode_all, forward_logps, sequence_logps

    tokenizer, model = tok_model
    model.set_attn_implementation(attention)
    assert pairs_mod.lm_head_takes_mask(model)  # a transformers 5 Llama
    monkeypatch.setattr(pairs_mod, "lm_head_takes_mask", lambda m: masked_head)
    monkeypatch.setattr(TokenLogps, "CHUNK_BYTES", 4 * len(tokenizer) * 7)  # 7 rows per chunk: many chunks
    prompts = [[{"role": "user", "content": "1+" * k + "1"}] for k in (1, 5, 2, 9)]
    batch = collate(encode_all(tokenizer, prompts, ["2", "6543", "", "10"], 48), tokenizer.pad_token_id)
    for normalize in (False, True):
        model.zero_grad()
        got = forward_logps(model, batch, normalize, packed)
        got.sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = sequence_logps(logits, batch["input_ids"], batch["loss_mask"], normalize)
        want.sum().backward()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got, want)
        for g, p in zip(grads, model.parameters()):
            assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)


def test_segment_attention_equals_block_diagonal_sdpa() -> None:
    """`sdpa_segments` on one packed row (GQA: 4 query heads, 2 key/value heads) == SDPA under the
    block-diagonal causal mask, forward and gradients; without offsets, or with a cache (fewer queries than
    keys), it is SDPA as it is."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from spinlm.attention import segment_sdpa

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9, 3]
    seq = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))  # (L,) sequence of each position
    pos = torch.cat([torch.arange(n) for n in lengths])  # (L,)
    q = torch.randn(1, 4, 18, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, 18, 8, generator=gen, requires_grad=True) for _ in range(2))
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    got, _ = segment_sdpa(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu)
    mask = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])  # (L, L) query sees key
    want, _ = sdpa_attention_forward(module, q, k, v, mask[None, None], scaling=0.3)
    assert got.shape == want.shape == (1, 18, 4, 8)
    assert torch.allclose(got, want, atol=1e-6)
    g_got = torch.autograd.grad(got.square().sum(), (q, k, v))
    g_want = torch.autograd.grad(want.square().sum(), (q, k, v))
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-5)
    plain, _ = segment_sdpa(module, q, k, v, mask[None, None], scaling=0.3)  # no offsets: plain SDPA
    assert torch.equal(plain, want)
    cached, _ = segment_sdpa(module, q[:, :, -1:], k, v, None, scaling=0.3, cu_seq_lens_q=cu)  # decoding
    assert torch.equal(cached, sdpa_attention_forward(module, q[:, :, -1:], k, v, None, scaling=0.3)[0])


def test_load_model_attends_per_sequence_on_cpu(tiny_model_dir: Path) -> None:
    """On CPU an SDPA model gets sdpa_segments, unless the config names an attention; a whole batch then
    packs into one row of its tokens (the offsets where each sequence starts), sdpa packs rows <= T."""
    from spinlm.logps import attends_per_sequence, collate, encode_all, pack_batch, segment_kwargs

    tokenizer = load_tokenizer(tiny_model_dir, ModelConfig())
    model = load_model(tiny_model_dir, ModelConfig(), device=CPU)
    assert model.config._attn_implementation == "sdpa_segments" and attends_per_sequence(model)
    chosen = load_model(tiny_model_dir, ModelConfig(attn_implementation="sdpa"), device=CPU)
    assert chosen.config._attn_implementation == "sdpa" and not attends_per_sequence(chosen)
    prompts = [[{"role": "user", "content": "1+" * k + "1"}] for k in (9, 1, 2)]
    batch = collate(encode_all(tokenizer, prompts, ["10", "2", "3"], 48), tokenizer.pad_token_id)
    lengths = batch["attention_mask"].sum(1).tolist()
    row = pack_batch(batch, capacity=sum(lengths))["position_ids"]  # (1, L), longest first
    kw = segment_kwargs(row, CPU)
    ordered = sorted(lengths, reverse=True)
    assert kw["cu_seq_lens_q"].tolist() == [0, ordered[0], ordered[0] + ordered[1], sum(lengths)]
    assert kw["max_length_q"] == max(lengths)


def test_pack_rows_first_fit_decreasing() -> None:
    """Rows never exceed the capacity (the padded width); a longer sequence gets a row of its own."""
    from spinlm.logps import pack_rows

    assert pack_rows([5, 3, 2, 4, 1], 6) == [[0, 4], [3, 2], [1]]  # 5+1, 4+2, 3
    assert pack_rows([7, 2], 6) == [[0], [1]]
    rows = pack_rows([random.Random(i).randint(1, 40) for i in range(50)], 40)
    assert sorted(i for r in rows for i in r) == list(range(50))


def test_row_capacity_weighs_filler_against_attention() -> None:
    """The first SmolLM2 micro-batch of benchmarks/real_training.py: 8 sequences, all longer than half the
    width (384), so rows of width 384 pair none of them (8 x 384 = 3,072 positions, 16% filler)."""
    from spinlm.logps import pack_rows, row_capacity

    lengths = [251, 255, 300, 310, 352, 364, 371, 384]  # 2,587 tokens
    a = 2.57e-4  # SmolLM2-135M: 4 * 9 heads * 64 * 30 layers / (2 * 134.5M parameters)
    # By hand: capacity 384 -> 8 rows x 384, cost 3,072 * (1 + a*384) = 3,375; capacity 672 (2T) -> first
    # fit decreasing 384+255, 371+300, 364+251, 352+310: 4 rows x 671, 2,684 * (1 + a*671) = 3,147; one row
    # of 2,587: 2,587 * (1 + a*2,587) = 4,307. The middle one is cheapest.
    assert row_capacity(lengths, 384, a) == 672
    assert [sorted(lengths[i] for i in r) for r in pack_rows(lengths, 672)] == [
        [255, 384],
        [300, 371],
        [251, 364],
        [310, 352],
    ]
    assert row_capacity(lengths, 384, 0.0) == sum(lengths)  # attention free: one row, no filler at all
    assert row_capacity(lengths, 384, 1e-2) == 384  # attention dear: rows no wider than the padded batch


def test_attention_cost_from_the_config() -> None:
    from spinlm.logps import attention_cost
    from spinlm.modeling import build_char_tokenizer, build_tiny_model

    model = build_tiny_model(build_char_tokenizer(), hidden_size=32, num_layers=2, num_heads=4)
    params = sum(p.numel() for p in model.parameters())
    # 4 heads x head_dim 8 x 2 layers, x4 (QK^T and the weighted sum, 2 FLOPs each), over 2 FLOPs a parameter
    assert attention_cost(model) == 4 * 4 * 8 * 2 / (2 * params)


def test_pack_batch_layout(tok_model: tuple[Any, Any]) -> None:
    """Packed rows hold every real token once, positions restart per sequence, nothing is scored across a
    boundary or on filler, and the packed batch has fewer positions than the padded one."""
    from spinlm.logps import collate, encode_all, pack_batch

    tokenizer, _ = tok_model
    prompts = [[{"role": "user", "content": "1+" * k + "1"}] for k in (9, 1, 2, 5, 1)]
    batch = collate(encode_all(tokenizer, prompts, ["10", "2", "", "6543", "2"], 48), tokenizer.pad_token_id)
    rows = pack_batch(batch)
    lengths = batch["attention_mask"].sum(1)
    assert rows["input_ids"].numel() < batch["input_ids"].numel()
    assert rows["input_ids"].shape[1] <= batch["input_ids"].shape[1]
    for i, n in enumerate(lengths.tolist()):
        r, t = (rows["owner"] == i).nonzero(as_tuple=True)  # positions t predicting a token of sequence i
        assert len(set(r.tolist())) == 1  # one row
        t = t + 1  # the tokens themselves: all n, or all but the first when i starts its row
        assert torch.equal(rows["input_ids"][r, t], batch["input_ids"][i, n - len(t) : n])
        assert torch.equal(rows["position_ids"][r, t], torch.arange(n - len(t), n))
        scored = rows["scored"][r, t - 1]  # exactly the reply's tokens, never the first of a sequence
        assert torch.equal(scored, batch["loss_mask"][i, n - len(t) : n] & (torch.arange(n - len(t), n) > 0))
    assert not rows["scored"][rows["owner"] == -1].any()


def test_forward_logps_falls_back_to_padding(
    tok_model: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attention implementation that ignores packed position_ids runs the padded batch."""
    import spinlm.logps as logps_mod
    from spinlm.logps import can_pack, collate, encode_all, forward_logps

    tokenizer, model = tok_model
    assert can_pack(model)
    with monkeypatch.context() as m:
        m.setattr(model.config, "_attn_implementation", "some_kernel")
        assert not can_pack(model)
    monkeypatch.setattr(logps_mod, "can_pack", lambda m: False)
    monkeypatch.setattr(logps_mod, "pack_batch", lambda b: pytest.fail("packed a model that cannot pack"))
    prompts = [[{"role": "user", "content": "1+" * k + "1"}] for k in (1, 5)]
    batch = collate(encode_all(tokenizer, prompts, ["2", "6"], 48), tokenizer.pad_token_id)
    with torch.no_grad():
        assert forward_logps(model, batch).shape == (2,)


def test_token_logps_bf16_logits() -> None:
    """bf16 logits: log-probs computed in fp32 from them, gradient returned in bf16."""
    from spinlm.logps import TokenLogps

    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(10, 50, generator=gen)).bfloat16().requires_grad_()
    targets = torch.randint(0, 50, (10,), generator=gen)
    got = TokenLogps.apply(logits, targets)
    ref_logits = logits.detach().float().requires_grad_()
    want = -torch.nn.functional.cross_entropy(ref_logits, targets, reduction="none")
    weights = torch.randn(10, generator=gen)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    assert got.dtype == torch.float32 and logits.grad is not None and logits.grad.dtype == torch.bfloat16
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(logits.grad.float(), ref_logits.grad, atol=1e-2)


def test_sft_train_stops_when_told(tok_model: tuple[Any, Any]) -> None:
    """`stop(step)` is asked every `check_every` steps, in eval mode; the first True ends training there."""
    from spinlm.tasks import get_task
    from spinlm.trainer import sft_train

    tok, model = tok_model
    model = copy.deepcopy(model)  # the fixture's model is shared
    make = get_task("addition").make_examples
    assert make is not None
    examples = make(64, 1)
    asked: list[tuple[int, bool]] = []

    def stop(step: int) -> bool:
        asked.append((step, model.training))
        return step >= 6

    before = [p.detach().clone() for p in model.parameters()]
    losses = sft_train(
        model,
        tok,
        [e.prompt for e in examples],
        [e.response for e in examples],
        steps=100,
        lr=1e-3,
        batch_size=8,
        seed=0,
        lr_scheduler="constant",
        stop=stop,
        check_every=3,
    )
    assert asked == [(3, False), (6, False)]  # asked at steps 3 and 6, never in train mode; stopped at 6
    assert len(losses) == 6 and not model.training
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_sft_train_under_bf16_computes_each_step_from_the_current_weights(tok_model: tuple[Any, Any]) -> None:
    """Each bf16 step's loss is the bf16-autocast loss of the weights the previous step left, also when the
    caller wraps the whole call in autocast: autocast caches each weight's bf16 copy until its outermost
    context exits, and an optimizer step does not invalidate it, so without `torch.clear_autocast_cache`
    every step would be computed from the first step's weights (benchmarks/bf16_drift.py was, once)."""
    from spinlm.logps import collate, encode_all, forward_logps
    from spinlm.trainer import sft_train

    tok, base = tok_model
    prompt, reply = [[{"role": "user", "content": "1+2"}]], ["3"]
    batch = collate(encode_all(tok, prompt, reply, 64), tok.pad_token_id)

    def bf16_loss(m: Any) -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logps = forward_logps(m, batch, length_normalize=False)
        return (-logps.sum() / batch["loss_mask"][:, 1:].sum()).item()

    def train(steps: int, wrap: bool = False) -> tuple[Any, list[float]]:
        model = copy.deepcopy(base)  # the fixture's model is shared
        kw: dict[str, Any] = {"lr": 1e-2, "batch_size": 1, "seed": 0, "lr_scheduler": "constant"}
        # (even a disabled autocast context keeps the cache: only leaving the outermost one clears it)
        outer = torch.autocast("cpu", dtype=torch.bfloat16) if wrap else contextlib.nullcontext()
        with outer:
            losses = sft_train(model, tok, prompt, reply, steps=steps, precision="bf16", **kw)
        return model, losses

    _, losses = train(3)
    two, _ = train(2)
    assert losses[2] == pytest.approx(bf16_loss(two), rel=1e-6)  # step 3 sees what steps 1-2 did
    assert (
        abs(losses[2] - losses[0]) > 1e-3
    )  # ... which moved the weights (a stale cast would give losses[0])
    assert train(3, wrap=True)[1] == losses  # the same under a caller's autocast


def test_step_one_accuracy_is_one_half_when_the_policy_is_the_reference(
    tok_model: tuple[Any, Any], tmp_path: Path
) -> None:
    # Reference log-probs scored in other batches than training's differ by float rounding only (here
    # simulated: 1e-7 relative); the policy IS the reference at step 1, so every pair is a tie: 1/2.
    tokenizer, model = tok_model
    model = copy.deepcopy(model)  # the fixture's model is shared
    pairs = make_pairs(tokenizer, model, 16)
    rng = random.Random(1)
    prompts = [p["prompt"] for p in pairs]
    for key, side in (("ref_chosen_logps", "chosen"), ("ref_rejected_logps", "rejected")):
        exact = score_logps(model, tokenizer, prompts, [p[side][-1]["content"] for p in pairs], 48, 16)
        for p, v in zip(pairs, exact):
            p[key] = v * (1 + rng.choice([-1e-7, 1e-7]))
    train_iteration(
        model, tokenizer, pairs, train_cfg(batch_size=4), iteration=1, run_seed=0, log_dir=tmp_path
    )
    rows = read_log(tmp_path / "train_log.jsonl")
    assert rows[0]["step"] == 1 and rows[0]["rewards/accuracy"] == 0.5
    assert abs(rows[0]["rewards/margin"]) < 1e-4
    assert any(r["rewards/accuracy"] != 0.5 for r in rows[1:])  # later steps do tell the replies apart


def test_reward_wins_counts_rounding_as_a_tie() -> None:
    from spinlm.loss import reward_wins, tie_rtol

    rtol = tie_rtol(torch.float32)
    scale = torch.tensor([100.0, 100.0, 100.0, 100.0])
    real = torch.tensor([1e-5, 0.5, -0.5, 0.0])
    generated = torch.tensor([0.0, 0.0, 0.0, 0.0])
    assert reward_wins(real, generated, scale, rtol).tolist() == [0.5, 1.0, 0.0, 0.5]
    assert tie_rtol(torch.float32, "bf16") > rtol == tie_rtol(torch.float32)
