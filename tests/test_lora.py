"""LoRA through peft: the reference of iteration t is the merged iteration-(t-1) model, not the base.

- Two iterations of `spinlm.loop.run` with `train.lora.enabled=true`: iteration 2's stored reference
  log-probs are those of the merged iteration-1 checkpoint (rescored here), and differ from the base's;
  every checkpoint is a full model `from_pretrained` loads, with no adapter weights left in it.
- One `train_iteration` with LoRA: only adapter parameters require (and receive) gradients, the trainable
  count is r * (in + out) per adapted linear layer, and the merged model computes what the adapted one did.
- QLoRA (4-bit base) needs a GPU: on CPU it is a clear SpinError.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from spinlm.config import ModelConfig
from spinlm.errors import SpinError
from spinlm.logps import collate, encode_all, forward_logps, score_logps
from spinlm.modeling import load_model, load_tokenizer
from spinlm.trainer import train_iteration

CPU = torch.device("cpu")


def _score(model: Any, tokenizer: Any, pairs: list[dict], side: str, max_length: int) -> torch.Tensor:
    prompts = [p["prompt"] for p in pairs]
    responses = [p[side][-1]["content"] for p in pairs]
    return torch.tensor(score_logps(model, tokenizer, prompts, responses, max_length, 32))


def test_lora_reference_is_previous_merged_iteration(make_config, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from spinlm.loop import run

    cfg: Any = make_config(
        "train.lora.enabled=true",
        "train.lora.r=4",
        "train.lora.alpha=8",
        "train.learning_rate=1e-2",
        "data.num_examples=32",
        "data.eval_size=8",
        "eval.num_samples=0",
    )
    run(cfg)
    out = Path(cfg.output_dir)
    tokenizer = load_tokenizer(tiny_model_dir, ModelConfig())
    base_keys = set(load_file(str(tiny_model_dir / "model.safetensors")))
    for t in (1, 2):
        ckpt = out / f"iteration_{t}" / "model"
        assert set(load_file(str(ckpt / "model.safetensors"))) == base_keys  # merged: no lora_A / lora_B
        assert not (ckpt / "adapter_config.json").exists()

    pairs = [json.loads(line) for line in (out / "iteration_2" / "pairs.jsonl").read_text().splitlines()]
    it1 = AutoModelForCausalLM.from_pretrained(str(out / "iteration_1" / "model"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    for side, key in (("chosen", "ref_chosen_logps"), ("rejected", "ref_rejected_logps")):
        stored = torch.tensor([p[key] for p in pairs])
        assert torch.allclose(stored, _score(it1, tokenizer, pairs, side, cfg.train.max_length), atol=1e-4)
        # The base model would score them differently: training moved the merged weights.
        assert (stored - _score(base, tokenizer, pairs, side, cfg.train.max_length)).abs().max() > 1e-2


def test_lora_trains_only_adapters_and_merges_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    from test_train import make_pairs, train_cfg

    tokenizer = load_tokenizer(tiny_model_dir, ModelConfig())
    model = load_model(tiny_model_dir, ModelConfig(), device=CPU)
    pairs = make_pairs(tokenizer, model, 16, seed=2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    linear_shapes = [
        (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    ]
    r = 4
    cfg = train_cfg(optimizer="adamw", learning_rate=1e-2)
    cfg.lora.enabled, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = True, r, 8, 0.0

    # Ids in a batch to compare the adapted model at the last step with the merged one afterwards.
    check = collate(
        encode_all(tokenizer, [p["prompt"] for p in pairs], ["7+7=14"] * len(pairs), 48),
        tokenizer.pad_token_id,
    )
    trainable: set[str] = set()
    got_grad: set[str] = set()
    adapted: list[torch.Tensor] = []

    def on_step(step: int) -> None:
        # `model` is the caller's object: peft injected the adapters into it.
        for name, p in model.named_parameters():
            if p.requires_grad:
                trainable.add(name)
                if step == 1:
                    p.register_post_accumulate_grad_hook(lambda _, name=name: got_grad.add(name))
        if step == 2:
            model.eval()
            with torch.no_grad():
                adapted.append(forward_logps(model, check))
            model.train()

    result = train_iteration(
        model, tokenizer, pairs, cfg, iteration=1, run_seed=0, log_dir=tmp_path, on_step=on_step
    )
    assert result.steps == 2
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), sorted(trainable)
    assert got_grad == trainable  # every adapter got a gradient at step 2, nothing else could
    assert result.trainable_parameters == sum(r * (i + o) for i, o in linear_shapes)

    # After training `model` is the plain merged model: base keys only, adapted linears moved, rest untouched.
    merged = model.state_dict()
    assert set(merged) == set(start)
    linear = {k for k in start if k.endswith("proj.weight")}
    assert all(torch.equal(merged[k], start[k]) for k in set(start) - linear)
    assert all(not torch.equal(merged[k], start[k]) for k in linear)
    with torch.no_grad():
        assert torch.allclose(forward_logps(model, check), adapted[0], atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_qlora_needs_a_gpu(tiny_model_dir: Path) -> None:
    with pytest.raises(SpinError, match="needs a CUDA GPU"):
        load_model(tiny_model_dir, ModelConfig(), device=CPU, load_in_4bit=True)
