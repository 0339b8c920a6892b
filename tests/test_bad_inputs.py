"""Bad input, through the CLI: one line `spinlm: error: ...` naming the problem, where, and what to do; exit 2;
no traceback; nothing already written overwritten.

Each test runs `spinlm.cli.main(["run", recipe, ...])` in-process on the tiny model with a bad data file, model
folder, output folder or config (one subprocess test checks the real console output). Inputs that are
merely odd (duplicate prompts, over-long prompts) are not errors: they are handled by policy and counted in
summary.json's "data" statistics, which is checked too. Also here: a full disk (simulated inside
`spinlm.io.atomic_write_text` and from deeper code) and a NaN loss in training (stop, name the step, keep the
last trainer checkpoint, resume from it on the next run).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from spinlm.cli import main

GOOD_ROWS = [
    {"messages": [{"role": "user", "content": f"{i}+{i}="}, {"role": "assistant", "content": str(2 * i)}]}
    for i in range(10)
]


def jsonl(rows: list[Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def recipe(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A recipe on the tiny model and tmp_path/data.jsonl that plays no SPIN iteration (evaluation only)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"""model: {{name_or_path: {tiny_model_dir}}}
data: {{path: {tmp_path / "data.jsonl"}, eval_size: 2}}
output_dir: {tmp_path / "run"}
generation: {{max_new_tokens: 4, batch_size: 16}}
train: {{iterations: 0, max_length: 48}}
eval: {{batch_size: 16, num_samples: 1}}
""",
        encoding="utf-8",
    )
    (tmp_path / "data.jsonl").write_text(jsonl(GOOD_ROWS), encoding="utf-8")
    return path


def fails(capsys: pytest.CaptureFixture[str], recipe: Path, *overrides: str) -> str:
    """Run the CLI, expect exit 2 and exactly one stderr line `spinlm: error: ...`; return that line."""
    capsys.readouterr()
    code = main(["run", str(recipe), *overrides])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("spinlm: error: "), err
    return lines[0]


def data_error(capsys: pytest.CaptureFixture[str], recipe: Path, content: str | bytes) -> str:
    data = recipe.parent / "data.jsonl"
    data.write_bytes(content.encode() if isinstance(content, str) else content)
    line = fails(capsys, recipe)
    assert not (recipe.parent / "run" / "config.yaml").exists()  # nothing written for a bad input
    return line


# --- data -----------------------------------------------------------------------------------------------


def test_missing_data_file(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(capsys, recipe, f"data.path={recipe.parent / 'nope.jsonl'}")
    assert "data file not found" in line and "nope.jsonl" in line and "data.path" in line


def test_no_held_out_prompts(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(capsys, recipe, "data.eval_size=0")
    assert "data.eval_size is 0" in line and "at least 1" in line


def test_bad_json_line(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = data_error(capsys, recipe, jsonl(GOOD_ROWS) + "{not json\n")
    assert "data.jsonl:11" in line and "not valid JSON" in line


def test_wrong_types(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = data_error(capsys, recipe, jsonl([*GOOD_ROWS[:3], {"messages": "hello"}]))
    assert "data.jsonl:4" in line and "'messages'" in line and "must be a list" in line


def test_missing_response_field(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = data_error(capsys, recipe, jsonl([{"prompt": f"{i}+1="} for i in range(5)]))
    assert "data.jsonl:1" in line and "columns found (prompt)" in line and "data.columns" in line


def test_missing_prompt_field(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"completion": f"{i}"} for i in range(5)]
    line = data_error(capsys, recipe, jsonl(rows))
    assert "data.jsonl:1" in line and "completion" in line and "data.columns" in line


def test_empty_response(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(5)] + [
        {"prompt": "a", "completion": " "}
    ]
    line = data_error(capsys, recipe, jsonl(rows))
    assert "data.jsonl:6" in line and "'completion'" in line and "empty" in line


def test_no_usable_rows(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = data_error(capsys, recipe, "\n\n")
    assert "no usable rows" in line


def test_non_utf8_bytes(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = jsonl(GOOD_ROWS).encode() + b'{"prompt": "caf\xe9", "completion": "x"}\n'
    line = data_error(capsys, recipe, bad)
    assert "data.jsonl:11" in line and "UTF-8" in line


@pytest.mark.parametrize("policy", ["keep", "drop"])
def test_duplicate_prompts_are_counted(recipe: Path, policy: str) -> None:
    (recipe.parent / "data.jsonl").write_text(jsonl(GOOD_ROWS + GOOD_ROWS[:3]), encoding="utf-8")
    assert main(["run", str(recipe), f"data.duplicates={policy}"]) == 0
    stats = json.loads((recipe.parent / "run" / "summary.json").read_text())["data"]
    assert stats["rows_read"] == 13 and stats["duplicates_found"] == 3
    assert stats["duplicates_dropped"] == (3 if policy == "drop" else 0)
    assert stats["examples"] == (10 if policy == "drop" else 13)


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_long_prompts_are_counted(recipe: Path, policy: str) -> None:
    rows = GOOD_ROWS + [
        {"messages": [{"role": "user", "content": "9" * 60 + "+1="}, {"role": "assistant", "content": "1"}]}
    ]
    (recipe.parent / "data.jsonl").write_text(jsonl(rows), encoding="utf-8")
    assert main(["run", str(recipe), "data.max_prompt_tokens=30", f"data.long_prompts={policy}"]) == 0
    stats = json.loads((recipe.parent / "run" / "summary.json").read_text())["data"]
    assert stats["prompts_truncated"] == (1 if policy == "truncate" else 0)
    assert stats["prompts_dropped"] == (1 if policy == "drop" else 0)
    assert stats["examples"] == (11 if policy == "truncate" else 10)


def test_all_prompts_too_long(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(capsys, recipe, "data.max_prompt_tokens=3", "data.long_prompts=drop")
    assert "no usable rows left" in line and "data.max_prompt_tokens" in line


# --- model, tokenizer, output folder --------------------------------------------------------------------


def test_tokenizer_without_chat_template(
    recipe: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spinlm.config import ModelConfig
    from spinlm.modeling import CHAR_CHAT_TEMPLATE, load_tokenizer

    model = tmp_path / "no_template"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    line = fails(capsys, recipe, f"model.name_or_path={model}")
    assert "no chat template" in line and "model.chat_template" in line
    # Configured, it is used for both generation and training.
    tok = load_tokenizer(model, ModelConfig(chat_template=CHAR_CHAT_TEMPLATE))
    assert tok.chat_template == CHAR_CHAT_TEMPLATE


def test_model_folder_that_does_not_exist(
    recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = fails(capsys, recipe, f"model.name_or_path={tmp_path / 'missing_model'}")
    assert "could not load a tokenizer" in line and "missing_model" in line


def test_model_folder_with_broken_weights(
    recipe: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").write_bytes(b"\x00\x01 not safetensors")
    line = fails(capsys, recipe, f"model.name_or_path={model}")
    assert "could not load a model" in line and "broken" in line


def test_output_folder_under_a_file(recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("I am a file")
    line = fails(capsys, recipe, f"output_dir={blocker / 'run'}")
    assert "cannot write" in line and "a_file" in line and "output_dir" in line
    line = fails(capsys, recipe, f"output_dir={blocker}")  # the output folder itself is a file
    assert "a file stands where a folder is needed" in line
    assert blocker.read_text() == "I am a file"


# --- full disk --------------------------------------------------------------------------------------------


def test_full_disk_keeps_the_earlier_files(
    recipe: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import spinlm.io

    assert main(["run", str(recipe)]) == 0
    run = recipe.parent / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    def full_disk_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = open(path, mode, *args, **kwargs)  # noqa: SIM115
        if "w" not in mode:
            return f

        class Full:  # writes half, then the disk is full
            def __enter__(self) -> Full:
                return self

            def __exit__(self, *exc: object) -> None:
                f.close()

            def write(self, text: str) -> int:
                f.write(text[: len(text) // 2])
                f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name: str) -> Any:
                return getattr(f, name)

        return Full()

    monkeypatch.setattr(spinlm.io, "open", full_disk_open, raising=False)
    line = fails(capsys, recipe)
    assert "no space left on device while writing" in line and "config.yaml" in line and "rerun" in line
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # nothing overwritten or torn, no .tmp left behind


def test_oserror_from_anywhere_is_one_line(
    recipe: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import spinlm.api

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(
            errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/iteration_1/model.tmp/model.safetensors"
        )

    monkeypatch.setattr(spinlm.api, "run", disk_full)
    line = fails(capsys, recipe)
    assert line.startswith(
        "spinlm: error: no space left on device while writing /runs/x/iteration_1/model.tmp"
    )
    with pytest.raises(OSError):
        main(["--debug", "run", str(recipe)])  # --debug keeps the traceback


# --- config -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lerning_rate=1e-5", "unknown config key 'train.lerning_rate'"),
        ("bogus=1", "unknown config key 'bogus'"),
        ("generation.top_p=1.5", "config field 'generation.top_p' must be in (0, 1]"),
        ("train.batch_size=0", "config field 'train.batch_size' must be > 0"),
        ("data.duplicates=sometimes", "config field 'data.duplicates' must be one of keep, drop"),
        ("train.iterations=two", "config field 'train.iterations' must be an integer"),
    ],
)
def test_bad_config(recipe: Path, capsys: pytest.CaptureFixture[str], override: str, expected: str) -> None:
    line = fails(capsys, recipe, override)
    assert line.startswith(f"spinlm: error: {expected}"), line
    assert not (recipe.parent / "run").exists()


def test_bad_data_on_resume_leaves_the_run_folder_untouched(
    recipe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(recipe)]) == 0
    run = recipe.parent / "run"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    (recipe.parent / "data.jsonl").write_text(jsonl(GOOD_ROWS) + '{"messages": 3}\n', encoding="utf-8")
    assert "data.jsonl:11" in fails(capsys, recipe)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert after == before


# --- NaN loss ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nan_loss_stops_keeps_the_checkpoint_and_resumes(
    recipe: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import spinlm.trainer as train_module

    real_loss, calls = train_module.spin_loss, {"n": 0}

    def nan_at_step_3(**kwargs: Any) -> Any:
        calls["n"] += 1
        out = real_loss(**kwargs)
        if calls["n"] == 3:
            out.losses.data.fill_(float("nan"))
        return out

    overrides = [
        "train.iterations=1",
        "train.save_steps=1",
        "train.batch_size=2",
        "train.optimizer=adamw",
        "train.epochs=1",
    ]
    monkeypatch.setattr(train_module, "spin_loss", nan_at_step_3)
    line = fails(capsys, recipe, *overrides)
    assert "the loss became nan at iteration 1, step 3" in line and "trainer_checkpoint" in line
    it1 = recipe.parent / "run" / "iteration_1"
    assert json.loads((it1 / "trainer_checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert [json.loads(r)["step"] for r in (it1 / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert not (it1 / ".train.done").exists() and not (it1 / "model").exists()

    monkeypatch.setattr(train_module, "spin_loss", real_loss)
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="spinlm"):
        assert main(["run", str(recipe), *overrides]) == 0
    assert "iteration 1: resuming training at step 2 of 4" in caplog.text
    steps = [json.loads(r)["step"] for r in (it1 / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 4  # 8 pairs / 2: resumed at 3
    losses = [json.loads(r)["loss"] for r in (it1 / "train_log.jsonl").read_text().splitlines()]
    assert torch.isfinite(torch.tensor(losses)).all()
    assert (it1 / ".train.done").exists() and not (it1 / "trainer_checkpoint").exists()


# --- the real console ---------------------------------------------------------------------------------------


def test_console_shows_one_line_and_no_traceback(recipe: Path) -> None:
    (recipe.parent / "data.jsonl").write_text(jsonl(GOOD_ROWS) + "[1, 2]\n", encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "spinlm.cli", "run", str(recipe)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("spinlm: error: "), proc.stderr
    assert "data.jsonl:11" in proc.stderr and "Traceback" not in proc.stderr


# --- GGUF models: one-line errors naming the fix (no model is loaded: resolution fails first) ---------------


def _eval_argv(model: str, *extra: str) -> list[str]:
    return ["eval", "--model", model, "--dataset", "builtin:addition", *extra]


def test_gguf_folder_without_gguf_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "SmolLM2.Q4_1.gguf").write_bytes(b"GGUF")
    assert main(_eval_argv(str(tmp_path / "m"))) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds GGUF files" in err and "model.gguf_file=SmolLM2.Q4_1.gguf" in err


def test_wrong_gguf_file_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "SmolLM2.Q4_1.gguf").write_bytes(b"GGUF")
    assert main(_eval_argv(str(tmp_path / "m"), "--gguf-file", "SmolLM2.Q8.gguf")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not in" in err and "GGUF files there: SmolLM2.Q4_1.gguf" in err


def test_gguf_without_the_gguf_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert main(_eval_argv(str(tmp_path / "m.gguf"))) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs the gguf package" in err and "pip install gguf" in err


def test_model_package_not_installed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_eval_argv("package:no_such_model_pkg")) == 2
    err = capsys.readouterr().err.strip()
    assert "package:no_such_model_pkg is not installed" in err and "pip install no_such_model_pkg" in err
