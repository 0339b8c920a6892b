"""`data.subset`: the configuration of a Hub dataset that has several (openai/gsm8k: main, socratic).

Offline: `datasets.load_dataset` is replaced by a recorder to check what spinlm asks of the Hub, and a local
folder laid out like a Hub dataset repository (a README naming two configurations) is loaded for real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from spinlm.config import DataConfig, load_config
from spinlm.data import load_sft_examples
from spinlm.errors import SpinError
from spinlm.resume import config_differences

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-gsm8k.yaml"
ROW = {
    "question": "Natalia sold 48 clips in April and half as many in May. How many?",
    "answer": "72\n#### 72",
}
GSM8K_COLUMNS = {"prompt": "question", "response": "answer"}


@pytest.fixture
def recorded_load_dataset(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple, dict]]:
    """Replace datasets.load_dataset by a recorder that returns one GSM8K-style row."""
    import datasets

    calls: list[tuple[tuple, dict]] = []

    def fake(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([ROW])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    return calls


def test_subset_is_passed_to_load_dataset_as_name(recorded_load_dataset: list) -> None:
    cfg = DataConfig(path="openai/gsm8k", subset="main", columns=GSM8K_COLUMNS, answer_pattern="gsm8k")
    examples, stats = load_sft_examples(cfg)
    assert recorded_load_dataset == [
        (("openai/gsm8k",), {"name": "main", "split": "train", "revision": None})
    ]
    assert examples[0].reference == "72" and examples[0].prompt[0]["content"].startswith("Natalia")
    assert stats.source == "openai/gsm8k (split train, subset main)"


def test_without_subset_load_dataset_gets_name_none(recorded_load_dataset: list) -> None:
    load_sft_examples(DataConfig(path="someone/sft", columns=GSM8K_COLUMNS))
    assert recorded_load_dataset[0][1]["name"] is None


def test_the_gsm8k_recipe_names_the_public_source(recorded_load_dataset: list) -> None:
    cfg = load_config(RECIPE)
    assert (cfg.data.path, cfg.data.subset, cfg.data.split) == ("openai/gsm8k", "main", "train")
    assert cfg.data.answer_pattern == "gsm8k"
    examples, _ = load_sft_examples(cfg.data, seed=cfg.seed)
    assert recorded_load_dataset[0][0] == ("openai/gsm8k",)
    assert recorded_load_dataset[0][1]["name"] == "main"
    assert examples[0].reference == "72"


def test_one_override_points_the_recipe_at_a_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    def no_hub(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a local file must not go through load_dataset")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    local = tmp_path / "train.jsonl"
    local.write_text(json.dumps(ROW) + "\n", encoding="utf-8")
    cfg = load_config(RECIPE, [f"data.path={local}"])
    assert cfg.data.subset == "main"  # kept, and ignored for a single file
    examples, stats = load_sft_examples(cfg.data, seed=cfg.seed)
    assert stats.source == str(local) and examples[0].reference == "72"


def _multi_config_repo(root: Path) -> Path:
    """A folder laid out like a Hub dataset repository with two configurations and no default."""
    for name in ("main", "socratic"):
        (root / name).mkdir(parents=True)
        rows = [{"question": f"{name} question {i}?", "answer": f"{name} answer\n#### {i}"} for i in range(3)]
        (root / name / "train.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
        )
    configs = "".join(
        f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/train.jsonl\n"
        for name in ("main", "socratic")
    )
    (root / "README.md").write_text(f"---\nconfigs:\n{configs}---\n", encoding="utf-8")
    return root


def test_a_local_multi_config_dataset_needs_its_subset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    repo = _multi_config_repo(tmp_path / "gsm8k")
    with pytest.raises(
        SpinError,
        match=r"has several configurations and data.subset does not pick one of them "
        r"\(set data.subset to one of \['main', 'socratic'\]\)",
    ):
        load_sft_examples(DataConfig(path=str(repo), columns=GSM8K_COLUMNS))
    examples, stats = load_sft_examples(
        DataConfig(path=str(repo), subset="socratic", columns=GSM8K_COLUMNS, answer_pattern="gsm8k")
    )
    assert [e.prompt[0]["content"] for e in examples] == [f"socratic question {i}?" for i in range(3)]
    assert [e.reference for e in examples] == ["0", "1", "2"]
    assert stats.source.endswith("(split train, subset socratic)")


def test_a_folder_that_is_no_dataset_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpinError, match=r"could not load dataset '.*empty' \(a local dataset folder: "):
        load_sft_examples(DataConfig(path=str(tmp_path / "empty")))


def test_a_run_started_before_data_subset_existed_resumes() -> None:
    new = load_config(None, **{"model.name_or_path": "sft_model", "data.path": "sft.jsonl"}).to_dict()
    old = json.loads(json.dumps(new))
    del old["data"]["subset"]
    assert config_differences(old, new) == []
    old["data"]["subset"] = "socratic"
    assert config_differences(old, new) == ["data.subset"]
