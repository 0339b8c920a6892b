"""Fitting the Hugging Face ecosystem: TensorBoard logs, model cards, push_to_hub, real GSM8K data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from spinlm.config import SpinConfig

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "train.jsonl"


class LocalHub:
    """Stands in for huggingface_hub.HfApi: repos are folders under `root`."""

    root: Path

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.created: list[tuple[str, str]] = []

    def create_repo(self, repo_id: str, repo_type: str = "model", exist_ok: bool = False) -> None:
        (self.root / repo_type / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def upload_folder(self, folder_path: str, repo_id: str, repo_type: str, commit_message: str) -> None:
        import shutil

        shutil.copytree(folder_path, self.root / repo_type / repo_id, dirs_exist_ok=True)

    def upload_file(
        self, path_or_fileobj: str, path_in_repo: str, repo_id: str, repo_type: str, commit_message: str
    ) -> None:
        dest = self.root / repo_type / repo_id / path_in_repo
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(Path(path_or_fileobj).read_bytes())


@pytest.mark.slow
def test_tensorboard_model_cards_and_push_to_hub(make_config, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from spinlm.loop import run

    LocalHub.root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub, "HfApi", LocalHub)
    cfg = make_config("report_to=[tensorboard]", "push_to_hub=me/tiny-spin", "train.iterations=1")
    assert isinstance(cfg, SpinConfig)
    run(cfg)
    out = Path(cfg.output_dir)

    # TensorBoard: one event folder per iteration (namespaced tags) and one for the evaluation metrics.
    events = EventAccumulator(str(out / "tensorboard" / "iteration_1"))
    events.Reload()
    assert "iteration_1/loss" in events.Tags()["scalars"]
    assert "iteration_1/rewards/margin" in events.Tags()["scalars"]
    evals = EventAccumulator(str(out / "tensorboard" / "eval"))
    evals.Reload()
    assert "eval/discriminability" in evals.Tags()["scalars"]

    # Model card: base model, iteration, recipe and metrics.
    card = (out / "iteration_1" / "model" / "README.md").read_text()
    assert f"base_model: {cfg.model.name_or_path}" in card
    assert "SPIN iteration 1" in card and "discriminability" in card and "learning_rate" in card

    # push_to_hub: the model folder and the pairs reach the (local stand-in for the) Hub.
    assert (LocalHub.root / "model" / "me/tiny-spin-iter1" / "model.safetensors").exists()
    pushed = LocalHub.root / "dataset" / "me/tiny-spin-pairs" / "iteration_1" / "pairs.jsonl"
    assert pushed.read_text() == (out / "iteration_1" / "pairs.jsonl").read_text()


@pytest.mark.slow
def test_gsm8k_one_tiny_iteration(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Real data: GSM8K through the column mapping, one tiny iteration on 64 prompts, exact match on the number."""
    if not GSM8K.exists():
        pytest.skip(f"GSM8K not found at {GSM8K} (shared data is only present in the project's workspace)")
    from spinlm.config import load_config
    from spinlm.loop import run

    cfg = load_config(
        None,
        [
            f"model.name_or_path={tiny_model_dir}",
            f"output_dir={tmp_path / 'gsm8k'}",
            f"data.path={GSM8K}",
            "data.columns={prompt: question, response: answer}",
            "data.answer_pattern='####\\s*(.+)$'",
            "data.max_samples=72",
            "data.eval_size=8",
            "data.max_prompt_tokens=160",
            "data.long_prompts=truncate",
            "generation.max_new_tokens=8",
            "generation.batch_size=32",
            "train.iterations=1",
            "train.learning_rate=1e-4",
            "train.optimizer=adamw",
            "train.epochs=1",
            "train.batch_size=8",
            "train.max_length=256",
            "eval.batch_size=16",
        ],
    )
    summary = run(cfg)
    assert summary["primary_metric"] == "answer_exact_match"
    pairs = [
        json.loads(line)
        for line in (tmp_path / "gsm8k" / "iteration_1" / "pairs.jsonl").read_text().splitlines()
    ]
    assert len(pairs) == 64  # 72 sampled, 8 held out; long questions truncated, not dropped
    assert all("####" in p["chosen"][0]["content"] for p in pairs)
    for it in summary["iterations"]:
        assert 0.0 <= it["metrics"]["answer_exact_match"] <= 1.0
