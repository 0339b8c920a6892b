"""The lm-eval hook, offline: a tiny local multiple-choice task (a JSON file + a task YAML) on the tiny model.

Skipped when lm-evaluation-harness is not installed (the optional extra `spinlm[lmeval]`; `make test` installs
only `.[dev]`).
"""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import pytest

from spinlm.errors import SpinError

# Checked at collection, so a skipped test does not build the tiny model first.
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed (pip install 'spinlm[lmeval]')"
)

TASK_YAML = """\
task: spin_tiny_addition
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _write_task(folder: Path, n: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        a, b = 3 * i + 1, 7 * i + 2
        choices = [str(a + b + 1), str(a * b + 5)]
        choices.insert(i % 3, str(a + b))  # the right answer at index label
        rows.append({"question": f"{a}+{b}=", "choices": choices, "label": i % 3})
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "spin_tiny_addition.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    return folder


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline flags for the Hugging Face libraries, and any attempt to open a network socket fails."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    real_connect = socket.socket.connect

    def guarded_connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address!r}")
        real_connect(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)


def test_flatten_results_names_and_filters() -> None:
    from spinlm.lm_eval_hook import flatten_results

    flat = flatten_results(
        {
            "arc": {"alias": "arc", "acc,none": 0.5, "acc_stderr,none": "N/A", "acc_norm,none": 0.25},
            "gsm8k": {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": float("nan")},
        }
    )
    assert flat == {
        "lm_eval/arc/acc": 0.5,
        "lm_eval/arc/acc_norm": 0.25,
        "lm_eval/gsm8k/exact_match/strict-match": 0.1,
    }


@needs_lm_eval
def test_run_lm_eval_on_local_task(
    tiny_model_dir: Path, tmp_path: Path, offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spinlm.lm_eval_hook import run_lm_eval

    tasks_dir = _write_task(tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)  # lm-eval may write caches relative to the working directory
    metrics = run_lm_eval(tiny_model_dir, ["spin_tiny_addition"], tasks_dir, limit=None, batch_size=4)
    assert 0.0 <= metrics["lm_eval/spin_tiny_addition/acc"] <= 1.0
    assert all(k.startswith("lm_eval/spin_tiny_addition/") for k in metrics)


def test_missing_lm_eval_raises_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from spinlm.lm_eval_hook import run_lm_eval

    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(SpinError) as err:
        run_lm_eval("unused", ["arc_easy"])
    assert "spinlm[lmeval]" in str(err.value.hint or err.value)


@needs_lm_eval
@pytest.mark.slow
def test_loop_merges_lm_eval_metrics(make_config, tmp_path: Path, offline: None) -> None:
    """`eval.lm_eval_tasks` set: every iteration's metrics (and summary.json) carry the lm-eval numbers."""
    from spinlm.loop import run

    tasks_dir = _write_task(tmp_path / "tasks")
    cfg = make_config(
        "train.iterations=1",
        "eval.lm_eval_tasks=[spin_tiny_addition]",
        f"eval.lm_eval_include_path={tasks_dir}",
        "eval.lm_eval_limit=6",
    )
    summary = run(cfg)  # type: ignore[arg-type]
    assert [it["iteration"] for it in summary["iterations"]] == [0, 1]
    for it in summary["iterations"]:
        acc = it["metrics"]["lm_eval/spin_tiny_addition/acc"]
        assert acc in {k / 6 for k in range(7)}  # limit=6 examples
