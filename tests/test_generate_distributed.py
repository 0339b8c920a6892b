"""Data-parallel generation: 2 CPU processes (torchrun + Accelerator) split the shards round-robin, and
every process gets back exactly one response per prompt, in order, equal to a single-process run.
Launched with torchrun, which is what `accelerate launch --num_processes 2` does on GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "generate_dp.py"


@pytest.mark.slow
def test_two_processes_match_one(tiny_grammar_model_dir: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import generate_dp as dp  # the script's prompts and settings
    finally:
        sys.path.pop(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    # `accelerate launch --cpu` starts one process (several CPU processes need MPI there); torchrun starts
    # two, and Accelerator() picks them up as MULTI_CPU with gloo, as under `accelerate launch` on GPUs.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(SCRIPT), str(tiny_grammar_model_dir), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    n_shards = -(-dp.NUM_PROMPTS // dp.CFG.shard_size)
    assert ranks[0]["shards"] == list(range(0, n_shards, 2)) and ranks[1]["shards"] == list(
        range(1, n_shards, 2)
    )
    assert len(list((tmp_path / "shards").glob("shard_*.jsonl"))) == n_shards

    # Every rank got all responses, in prompt order, none lost or duplicated, and the same ones.
    on_disk = [
        json.loads(line)
        for f in sorted((tmp_path / "shards").glob("shard_*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    assert sorted(row["index"] for row in on_disk) == list(range(dp.NUM_PROMPTS))
    assert ranks[0]["results"] == ranks[1]["results"]

    # Equal to one process with the same seed (the sampler depends on (seed, prompt index, step) only).
    from spinlm.config import ModelConfig
    from spinlm.generation import generate_responses
    from spinlm.modeling import load_model, load_tokenizer

    tok = load_tokenizer(tiny_grammar_model_dir, ModelConfig())
    model = load_model(tiny_grammar_model_dir, ModelConfig(), device=torch.device("cpu")).eval()
    engine = json.loads((tmp_path / "shards" / "engine.json").read_text())["engine"]
    cfg = type(dp.CFG)(**{**dp.CFG.__dict__, "engine": engine})
    single = generate_responses(model, tok, dp.prompts(), cfg, seed=dp.SEED)
    assert ranks[0]["results"] == [[g.text, g.num_tokens, g.finished] for g in single]
