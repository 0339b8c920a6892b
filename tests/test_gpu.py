"""GPU tests (`pytest -m gpu`; every one skips without CUDA). `make gpu-check` runs them on the GPU machine.

- Greedy replies of the `refill` and `generate` engines on CUDA equal each other and the CPU's on the tiny
  model. Where two replies part, the two tokens they part at must be a near tie for the CUDA model (log-probs
  within `TIE_NATS`): float rounding differs between devices and batch shapes and may flip such a tie, and
  from there greedy replies go separate ways; anything else is a real difference.
- One `spinlm run` iteration on CUDA in bf16: the stored reference log-probs equal an independent
  computation (a fresh bf16 model, one unpadded sequence at a time, full logits, `sequence_logps`), and the
  run leaves no GPU memory allocated when it returns.
- GPU memory back to its baseline (after a warm-up step) after generation and after training, on a 134M
  model whose KV cache and optimizer state would each show as hundreds of MiB if kept.
- LoRA on CUDA: the saved checkpoints are merged full models (`from_pretrained` loads them, no adapter keys),
  with only the adapted linear layers moved.
- Resume after SIGKILL mid-training (`SPIN_FAULT_AFTER`, tests/test_faults.py's recipe): the finished folder
  has the reference run's files, every training step once, the same generations before the kill, and weights
  within float noise of the reference (CUDA's atomic adds make training not bitwise repeatable).
- One iteration under `accelerate launch` (one process) with configs/accelerate/fsdp.yaml, and with
  deepspeed_zero3.yaml where DeepSpeed imports: killed mid-training, the trainer checkpoint is the engine's
  own sharded layout (so the model was wrapped), the resumed run continues from it, and the saved model (the
  gathered full state dict) loads with `from_pretrained`, every tensor in its full shape and moved.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_faults import PROMPTS, STEPS, check_no_torn_files, listing, spin_run, write_recipe
from test_train import make_pairs, train_cfg
from test_train_distributed import _free_port

from spinlm.config import GenerationConfig, ModelConfig
from spinlm.generation import generate_responses
from spinlm.logps import encode_all, sequence_logps
from spinlm.modeling import encode, load_model, load_tokenizer, render_prompt
from spinlm.tasks import get_task

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_check import LEAK_MIB, settled_memory, warm_up  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
TIE_NATS = 1e-3  # fp32: a near tie; anything larger is a real difference between two greedy replies


def _allocated() -> int:
    """Bytes in live tensors on the GPU once garbage is collected (`gpu_check.settled_memory`)."""
    n = settled_memory(CUDA)
    assert n is not None
    return n


def _prompts(n: int, seed: int = 5) -> list[list[dict]]:
    make = get_task("addition").make_examples
    assert make is not None
    return [e.prompt for e in make(n, seed)]


def _greedy(model: Any, tok: Any, prompts: list[list[dict]], engine: str) -> list[str]:
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=12, batch_size=16, shard_size=10**6, engine=engine)
    return [g.text for g in generate_responses(model, tok, prompts, cfg, seed=0, greedy=True)]


@torch.no_grad()
def _split_gap(model: Any, tok: Any, prompt: list[dict], a: str, b: str) -> float:
    """|log p(a_k) - log p(b_k)| under `model` at the first character k where replies a and b part
    (character tokenizer: one token per character; a reply that ends there continues with end of turn)."""
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    ids = encode(tok, render_prompt(tok, prompt)) + encode(tok, a[:k])
    nxt = [encode(tok, s[k])[0] if k < len(s) else tok.eos_token_id for s in (a, b)]
    device = next(model.parameters()).device
    logps = model(torch.tensor([ids], device=device)).logits[0, -1].float().log_softmax(-1)
    return abs(logps[nxt[0]] - logps[nxt[1]]).item()


def _assert_same_or_near_tie(model: Any, tok: Any, prompts: list, got: list[str], want: list[str]) -> None:
    gaps = [_split_gap(model, tok, p, a, b) for p, a, b in zip(prompts, got, want) if a != b]
    assert all(g < TIE_NATS for g in gaps), gaps
    assert len(gaps) <= len(prompts) // 10, f"{len(gaps)} of {len(prompts)} replies differ"


def test_refill_and_generate_greedy_replies_equal_on_cuda_and_cpu(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(tiny_model_dir, ModelConfig())
    prompts = _prompts(48)
    on_cuda = load_model(tiny_model_dir, ModelConfig(dtype="float32"), device=CUDA)
    refill, generate = _greedy(on_cuda, tok, prompts, "refill"), _greedy(on_cuda, tok, prompts, "generate")
    _assert_same_or_near_tie(on_cuda, tok, prompts, refill, generate)
    on_cpu = load_model(tiny_model_dir, ModelConfig(dtype="float32"), device=CPU)
    _assert_same_or_near_tie(on_cuda, tok, prompts, refill, _greedy(on_cpu, tok, prompts, "refill"))
    assert any(refill), "greedy replies should not all be empty"


def test_one_iteration_on_cuda_in_bf16_stores_the_reference_logps(make_config, tiny_model_dir: Path) -> None:
    from spinlm.loop import run

    tok = load_tokenizer(tiny_model_dir, ModelConfig())
    model = load_model(tiny_model_dir, ModelConfig(dtype="bfloat16"), device=CUDA)
    warm_up(model, tok)  # cuBLAS workspaces exist before the baseline; `model` stays: it is the reference
    baseline = _allocated()
    torch.cuda.reset_peak_memory_stats()
    cfg: Any = make_config("train.iterations=1", "model.dtype=bfloat16", "train.precision=bf16")
    run(cfg)
    assert torch.cuda.max_memory_allocated() > baseline  # the run used the GPU
    assert _allocated() - baseline <= LEAK_MIB * 2**20, "the run left GPU memory allocated"

    pairs = [
        json.loads(x) for x in (Path(cfg.output_dir) / "iteration_1" / "pairs.jsonl").read_text().splitlines()
    ]
    model.eval()
    for p in pairs:
        for side in ("chosen", "rejected"):
            enc = encode_all(tok, [p["prompt"]], [p[side][-1]["content"]], cfg.train.max_length)[0]
            ids = torch.tensor([enc.input_ids], device=CUDA)  # (1, T): no padding, no packing
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, enc.prompt_len :] = True
            with torch.no_grad():
                expected = sequence_logps(model(ids).logits, ids, mask).item()
            n = len(enc.input_ids) - enc.prompt_len
            # bf16: batched / packed vs single sequences round differently, by far less than 0.05 nats a token.
            assert abs(p[f"ref_{side}_logps"] - expected) <= 0.05 * n + 1e-3, (side, p, expected)


def test_gpu_memory_returns_to_baseline_after_generation_and_training(tmp_path: Path) -> None:
    from spinlm.modeling import build_char_tokenizer, build_tiny_model
    from spinlm.trainer import train_iteration

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=1024, num_layers=8, num_heads=8, max_positions=512)
    model = model.to(device=CUDA, dtype=torch.bfloat16)
    warm_up(model, tok)
    baseline = _allocated()
    torch.cuda.reset_peak_memory_stats()
    cfg = GenerationConfig(max_new_tokens=96, batch_size=64, shard_size=10**6, engine="refill")
    generate_responses(model.eval(), tok, _prompts(64), cfg, seed=0)
    generated_peak = torch.cuda.max_memory_allocated() - baseline
    after_generation = _allocated() - baseline

    torch.cuda.reset_peak_memory_stats()
    pairs = make_pairs(tok, model, 32, seed=3)
    train_iteration(
        model, tok, pairs, train_cfg(optimizer="adamw", learning_rate=1e-4, precision="bf16"), 1, 0, tmp_path
    )
    trained_peak = torch.cuda.max_memory_allocated() - baseline
    after_training = _allocated() - baseline
    mib = [x / 2**20 for x in (generated_peak, after_generation, trained_peak, after_training)]
    # The stages really held memory (KV cache; gradients and AdamW state of 134M parameters), then let it go.
    assert generated_peak > 64 * 2**20 and trained_peak > 512 * 2**20, mib
    assert after_generation <= LEAK_MIB * 2**20 and after_training <= LEAK_MIB * 2**20, mib


def test_lora_on_cuda_saves_merged_full_models(make_config, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from spinlm.loop import run

    cfg: Any = make_config(
        "train.iterations=1",
        "train.precision=bf16",  # as every in-process run here: accelerate's state keeps the first one's
        "train.lora.enabled=true",
        "train.lora.r=4",
        "train.learning_rate=1e-2",
        "data.num_examples=32",
        "eval.num_samples=0",
    )
    run(cfg)
    ckpt = Path(cfg.output_dir) / "iteration_1" / "model"
    start, saved = (
        load_file(str(tiny_model_dir / "model.safetensors")),
        load_file(str(ckpt / "model.safetensors")),
    )
    assert set(saved) == set(start) and not (ckpt / "adapter_config.json").exists()
    moved = {k for k in start if not torch.equal(start[k].to(saved[k].dtype), saved[k])}  # bf16 saved
    assert moved and all(k.endswith("proj.weight") for k in moved), sorted(moved)
    AutoModelForCausalLM.from_pretrained(str(ckpt))


def _launch(config: str, recipe: Path, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """`accelerate launch --config_file configs/accelerate/CONFIG.yaml --num_processes 1 -m spinlm.cli run`."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SPIN_FAULT_AFTER", None)
    if fault:
        env["SPIN_FAULT_AFTER"] = fault
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(REPO / "configs" / "accelerate" / f"{config}.yaml"), "--num_processes", "1"]
    cmd += [
        f"--main_process_port={_free_port()}",
        "-m",
        "spinlm.cli",
        "run",
        str(recipe),
        "train.iterations=1",
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)  # ~30 s expected


# Files only the engine's own sharded trainer state has: accelerate's FSDP SHARDED_STATE_DICT folders, and
# DeepSpeed's per-rank ZeRO files. Their presence shows the model was wrapped by that engine.
SHARDED_STATE = {"fsdp": "*fsdp*", "deepspeed_zero3": "*zero_pp_rank_*"}


@pytest.mark.parametrize("config", list(SHARDED_STATE))
def test_one_iteration_under_accelerate_launch(config: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    if config.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not importable (make gpu-wheels carries a wheel of it)")
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "run.yaml", tiny_model_dir, run_dir)
    killed = _launch(config, recipe, fault="train_step:3")
    assert killed.returncode != 0, killed.stderr[-3000:]
    checkpoint = run_dir / "iteration_1" / "trainer_checkpoint"
    found = sorted(p.name for p in checkpoint.rglob("*"))
    assert list(checkpoint.rglob(SHARDED_STATE[config])), (found, killed.stderr[-3000:])

    done = _launch(config, recipe)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "resuming training at step 2" in done.stderr
    it = run_dir / "iteration_1"
    assert [json.loads(x)["step"] for x in (it / "train_log.jsonl").read_text().splitlines()] == list(
        range(1, STEPS + 1)
    )
    model = AutoModelForCausalLM.from_pretrained(str(it / "model"))
    start, saved = load_file(str(tiny_model_dir / "model.safetensors")), model.state_dict()
    assert all(saved[k].shape == v.shape for k, v in start.items())  # gathered: full shapes
    assert all(not torch.equal(saved[k], v.to(saved[k].dtype)) for k, v in start.items()), "all should train"


def _weight_gap(ref: Path, got: Path, start: Path) -> float:
    """||got - ref|| / ||ref - start|| over all weights: float noise against what training moved."""
    a, b, s = (load_file(str(p / "model.safetensors")) for p in (ref, got, start))
    diff = sum(float((b[k].float() - a[k].float()).pow(2).sum()) for k in a) ** 0.5
    moved = sum(float((a[k].float() - s[k].float()).pow(2).sum()) for k in a) ** 0.5
    return diff / moved


def test_resume_after_a_kill_on_cuda(tiny_model_dir: Path, tmp_path: Path) -> None:
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    reference = spin_run(write_recipe(tmp_path / "ref.yaml", tiny_model_dir, ref_dir))
    assert reference.returncode == 0, reference.stderr[-3000:]
    recipe = write_recipe(tmp_path / "run.yaml", tiny_model_dir, run_dir)
    killed = spin_run(recipe, "train_step:3")  # iteration 1: step 3 logged, its checkpoint not written
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    check_no_torn_files(run_dir)
    resumed = spin_run(recipe)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming training at step 2" in resumed.stderr

    assert listing(run_dir) == listing(ref_dir)
    for t in (1, 2):
        log = (run_dir / f"iteration_{t}" / "train_log.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in log] == list(range(1, STEPS + 1))
        assert len((run_dir / f"iteration_{t}" / "pairs.jsonl").read_text().splitlines()) == PROMPTS
    first = "iteration_1/pairs.jsonl"  # sampled by the starting model before the kill: the same bytes
    assert (run_dir / first).read_bytes() == (ref_dir / first).read_bytes()
    model = "iteration_1/model"
    assert _weight_gap(ref_dir / model, run_dir / model, tiny_model_dir) < 0.1
