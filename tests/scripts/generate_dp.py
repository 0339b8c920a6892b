"""Data-parallel generation check, run under `torchrun --standalone --nproc_per_node 2` by
tests/test_generate_distributed.py: every process generates its round-robin share of the shards of a
sampled generation; rank 0 writes what every rank got back, and which shards each rank generated.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/scripts/generate_dp.py MODEL_DIR OUT_DIR

(`accelerate launch --cpu` would start a single process: it runs several CPU processes only through MPI.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from spinlm.config import GenerationConfig, ModelConfig
from spinlm.generation import generate_responses
from spinlm.modeling import load_model, load_tokenizer
from spinlm.tasks import get_task

# The settings the test repeats in a single process.
NUM_PROMPTS, SEED = 22, 7
CFG = GenerationConfig(max_new_tokens=8, batch_size=4, shard_size=4, engine="auto")


def prompts() -> list[list[dict]]:
    make = get_task("grammar").make_examples
    assert make is not None
    return [e.prompt for e in make(NUM_PROMPTS, 3)]


def main() -> None:
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)  # two processes on a shared 2-core machine
    acc = Accelerator(cpu=True)
    tok = load_tokenizer(model_dir, ModelConfig())
    model = load_model(model_dir, ModelConfig(), device=torch.device("cpu")).eval()
    mine: list[int] = []
    gens = generate_responses(
        model, tok, prompts(), CFG, seed=SEED, shard_dir=out / "shards", accelerator=acc, on_shard=mine.append
    )
    rows = [[g.text, g.num_tokens, g.finished] for g in gens]
    (out / f"rank{acc.process_index}.json").write_text(
        json.dumps({"world": acc.num_processes, "shards": mine, "results": rows})
    )
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
