"""`spinlm run` under DDP (2 CPU processes, gloo) trains exactly like 1 process with the same global batch.

The 2-process run is launched with `torch.distributed.run` and `ACCELERATE_USE_CPU=true` (accelerate then
uses DDP over gloo; `accelerate launch --cpu` starts a single process unless run under mpirun). It plays
one whole iteration: sharded generation, reference scoring, DDP training, evaluation on every rank, rank 0
writing. Its pairs are then trained in this process with gradient accumulation 2 and the same seed: the
trainer cuts one shared order of micro-batches, so both see the same 8 pairs per optimizer step.

Tolerance: metrics within 1e-4 relative (1e-6 absolute near zero) and weights within 1e-6 after 4 SGD
steps. The only difference is float summation order: DDP averages the two micro-batch gradients with an
all-reduce (g0 + g1) / 2, accumulation sums g0 / 2 + g1 / 2 into .grad, and the logged metrics are averaged
by `accelerator.reduce` instead of a running sum. With 2 processes the results were bit-identical here
(halving is exact in floating point); other counts or BLAS thread counts change the last bits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from spinlm.config import config_to_yaml
from spinlm.modeling import load_model, load_tokenizer
from spinlm.trainer import train_iteration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_accumulation(
    make_config, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg: Any = make_config(
        "train.iterations=1",
        "data.num_examples=32",
        "data.eval_size=8",
        "generation.shard_size=8",
        "train.batch_size=4",
        "train.gradient_accumulation_steps=1",
        "train.optimizer=sgd",
        "train.learning_rate=0.1",
        "train.save_steps=0",
        "eval.num_samples=0",
        output_dir=tmp_path / "ddp",
    )
    (tmp_path / "cfg.yaml").write_text(config_to_yaml(cfg))
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "spinlm.cli",
        "run",
        str(tmp_path / "cfg.yaml"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    it = tmp_path / "ddp" / "iteration_1"
    ddp_log = [json.loads(line) for line in (it / "train_log.jsonl").read_text().splitlines()]
    assert len(ddp_log) == 4  # 32 pairs / (4 per micro-batch * 2 processes): two processes really ran
    assert (it / "metrics.json").exists() and (tmp_path / "ddp" / "summary.json").exists()

    # One process, accumulation 2, same pairs, same seed: the same 4 global batches of 8.
    pairs = [json.loads(line) for line in (it / "pairs.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(tiny_model_dir, cfg.model)
    model = load_model(tiny_model_dir, cfg.model, device=torch.device("cpu"))
    one_cfg = dataclasses.replace(cfg.train, gradient_accumulation_steps=2)
    train_iteration(
        model, tokenizer, pairs, one_cfg, iteration=1, run_seed=cfg.seed, log_dir=tmp_path / "one"
    )
    one_log = [json.loads(line) for line in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]

    assert len(one_log) == len(ddp_log)
    for a, b in zip(one_log, ddp_log):
        for key in ("loss", "rewards/real", "rewards/generated", "rewards/accuracy", "rewards/margin", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
    ddp_weights = load_file(str(it / "model" / "model.safetensors"))
    one_weights = model.state_dict()
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert set(ddp_weights) == set(start)
    diff = max((ddp_weights[k] - one_weights[k]).abs().max().item() for k in ddp_weights)
    moved = max((ddp_weights[k] - start[k]).abs().max().item() for k in ddp_weights)
    assert diff <= 1e-6 < 1e-3 < moved, (diff, moved)
