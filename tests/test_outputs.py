"""What the subcommands write and say: foreign files survive, output paths are checked before any work,
progress reaches a log, `spinlm eval` scores a whole file, bad pairs files and settings are one-line errors,
`spinlm config` lists every key, and third-party chatter stays out of the output.

Every test runs `spinlm.cli.main` in-process on the tiny model (no network).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import spinlm.api
from spinlm.cli import main

QUICK = [
    "data.num_examples=12",
    "generation.max_new_tokens=4",
    "generation.batch_size=8",
    "eval.batch_size=16",
]
TRAIN = ["train.batch_size=4", "train.epochs=1", "train.max_length=48", "train.save_steps=0"]


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("spinlm: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def pairs_file(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--dataset",
                "builtin:addition",
                "--output",
                str(out),
                *QUICK,
            ]
        )
        == 0
    )
    return out


def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a subcommand gets as far as loading the model (the work an output check must precede)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        pytest.fail("the model was loaded before the output path was checked")

    monkeypatch.setattr(spinlm.api, "load_model", refuse)
    monkeypatch.setattr(spinlm.api, "load_tokenizer", refuse)


# --- 1. never delete what spin did not write ------------------------------------------------------------


def test_train_output_keeps_a_sentinel_file(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "NOTES.txt").write_text("mine")
    argv = ["train", "--model", str(tiny_model_dir), "--pairs", str(pairs_file), "--output", str(out), *TRAIN]
    line = one_line_error(capsys, argv)  # a foreign non-empty folder: refused before any work
    assert "is not empty and was not written by spin" in line and "--force" in line
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.txt"]

    assert main([*argv, "--force"]) == 0
    assert (out / "NOTES.txt").read_text() == "mine"
    assert {"config.json", "model.safetensors", "train_log.jsonl", "NOTES.txt"} <= {
        p.name for p in out.iterdir()
    }
    mode = stat.S_IMODE((out / "model.safetensors").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # the user's umask, not safetensors' 0600

    assert main(argv) == 0  # now a spin output: no --force needed, and the sentinel still survives
    assert (out / "NOTES.txt").read_text() == "mine" and (out / "train_log.jsonl").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_output_dot_is_refused_in_a_folder_with_files(
    tiny_model_dir: Path,
    pairs_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "code.py").write_text("print(1)")
    monkeypatch.chdir(tmp_path)
    no_model_loading(monkeypatch)
    line = one_line_error(
        capsys, ["train", "--model", str(tiny_model_dir), "--pairs", str(pairs_file), "--output", "."]
    )
    assert "not written by spin" in line and (tmp_path / "code.py").exists()


def test_run_refuses_a_foreign_folder_and_keeps_its_tmp_files(
    make_config: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spinlm.config import config_to_yaml

    run = tmp_path / "project"
    run.mkdir()
    (run / "draft.tmp").write_text("a user's file")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(config_to_yaml(make_config("train.iterations=0", output_dir=run)))
    line = one_line_error(capsys, ["run", str(recipe)])
    assert "output_dir" in line and "not written by spin" in line
    assert main(["run", str(recipe), "--force"]) == 0
    assert (run / "draft.tmp").read_text() == "a user's file"  # tidy_run_folder removes only spin's .tmp
    assert (run / "iteration_0" / "metrics.json").exists()


# --- 2. output paths checked before any work ------------------------------------------------------------


def test_outputs_are_checked_before_the_model_is_loaded(
    tiny_model_dir: Path,
    pairs_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    no_model_loading(monkeypatch)
    model = ["--model", str(tiny_model_dir)]
    line = one_line_error(
        capsys, ["generate", *model, "--dataset", "builtin:addition", "--output", str(tmp_path)]
    )
    assert "--output pairs file" in line and "is a folder" in line
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = one_line_error(
        capsys, ["generate", *model, "--dataset", "builtin:addition", "--output", str(blocker / "p.jsonl")]
    )
    assert "a file stands where a folder is needed" in line
    line = one_line_error(capsys, ["train", *model, "--pairs", str(pairs_file), "--output", str(blocker)])
    assert "a file stands where a folder is needed" in line
    line = one_line_error(capsys, ["eval", *model, "--dataset", "builtin:addition", "--output", str(blocker)])
    assert "a file stands where a folder is needed" in line


# --- 5. progress that reaches a log ---------------------------------------------------------------------


def test_progress_lines_when_the_output_is_not_a_terminal(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Under pytest stderr is captured, not a terminal: tqdm draws nothing and spin logs lines instead.
    out = tmp_path / "p.jsonl"
    argv = ["generate", "--model", str(tiny_model_dir), "--dataset", "builtin:addition", "--output", str(out)]
    with caplog.at_level(logging.INFO, logger="spinlm"):
        assert (
            main([*argv, *QUICK, "generation.batch_size=2", "eval.batch_size=2", "progress_seconds=1e-9"])
            == 0
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "spinlm"]
    gen = [m for m in lines if m.startswith("generate: ")]
    assert any(
        re.fullmatch(r"generate: \d+/12 prompts \(\d+%\), [\d.e+-]+ prompts/s, ETA \S+ \(.*\)", m)
        for m in gen
    )
    assert any(m.startswith("generate: 12/12 prompts (100%)") and "done in" in m for m in gen)
    assert any(m.startswith("score real: ") and "batches" in m for m in lines)
    # and one closing line with each stage's seconds, whatever progress_seconds is
    assert any(
        re.fullmatch(r"generate: 12 replies in [\d.]+ s; score: both sides of 12 pairs in [\d.]+ s", m)
        for m in lines
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="spinlm"):
        assert main([*argv, *QUICK, "generation.batch_size=2", "progress_seconds=0"]) == 0  # 0: no lines
    assert not [r for r in caplog.records if re.match(r"(generate|score real): \d+/", r.getMessage())]


def test_progress_heartbeat_logs_while_nothing_finishes(caplog: pytest.LogCaptureFixture) -> None:
    """A batch of long generations finishes nothing for minutes: the heartbeat still logs a line."""
    import time

    from spinlm import progress

    old = progress.INTERVAL
    progress.set_interval(0.2)
    try:
        with caplog.at_level(logging.INFO, logger="spinlm"):
            bar = progress.Progress(total=3, desc="generate", unit="prompt")
            time.sleep(1.5)  # no update at all
            bar.close()
    finally:
        progress.set_interval(old)
    assert any(r.getMessage().startswith("generate: 0/3 prompts (0%)") for r in caplog.records)


def test_progress_line_format() -> None:
    from spinlm.progress import Progress

    bar = Progress(200, "train 1", unit="step", initial=50, enabled=True)
    bar.start -= 100.0  # 100 s ago; 50 steps done since: 0.5 steps/s, 100 to go
    bar.update(50)
    bar.set_postfix(loss="0.6931")
    assert bar.line() == "train 1: 100/200 steps (50%), 0.5 steps/s, ETA 3m20s (loss=0.6931)"
    bar.close()


# --- 6. spinlm eval on a whole file ------------------------------------------------------------------------


def test_eval_scores_a_whole_file_with_the_metrics_of_spin_run(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [{"question": f"{i:02d}+{i:02d}=", "answer": f"so\n#### {2 * i:03d}"} for i in range(6)]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    settings = ["data.columns={prompt: question, response: answer}", "data.answer_pattern=gsm8k", *QUICK]
    out = tmp_path / "eval"
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--dataset",
                str(data),
                "--output",
                str(out),
                *settings,
                "data.eval_size=6",
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 6  # every row scored, none held out (eval_size does not apply)
    assert [a["reference"] for a in answers] == [str(2 * i) for i in range(6)]
    assert metrics["answer_exact_match"] == sum(a["correct"] for a in answers) / 6
    assert json.loads((out / "metrics.json").read_text()) == metrics

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: {tiny_model_dir}}}\ndata: {{path: {data}, eval_size: 2}}\n")
    assert main(["run", str(recipe), f"output_dir={tmp_path / 'run'}", "train.iterations=0", *settings]) == 0
    run_metrics = json.loads((tmp_path / "run" / "iteration_0" / "metrics.json").read_text())
    assert set(metrics) == set(run_metrics)
    assert len((tmp_path / "run" / "iteration_0" / "answers.jsonl").read_text().splitlines()) == 2


# --- 7. one-line errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "holds no pairs (the file is empty)"),
        ("\n\n", "holds no pairs"),
        ('GOOD\n{"prompt": []\n', "pairs.jsonl:2: not valid JSON"),
        (
            '{"prompt": [{"role": "user", "content": "x"}]}\n',
            "pairs.jsonl:1: the pair lacks chosen, rejected",
        ),
        ("GOOD\n[1, 2]\n", "pairs.jsonl:2: a pair must be a JSON object"),
    ],
)
def test_bad_pairs_files(
    content: str,
    expected: str,
    tiny_model_dir: Path,
    pairs_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(content.replace("GOOD", pairs_file.read_text().splitlines()[0]))
    argv = ["train", "--model", str(tiny_model_dir), "--pairs", str(bad), "--output", str(tmp_path / "o")]
    line = one_line_error(capsys, argv)
    assert expected in line and ("spinlm generate" in line or "each line of a .jsonl file" in line)
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_pair_values_of_the_wrong_type(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = json.loads(pairs_file.read_text().splitlines()[0])
    for key, value, expected in (
        ("ref_chosen_logps", None, "'ref_chosen_logps' must be a finite number; got None"),
        ("rejected", "text", "'rejected' must be a list ending with an assistant message"),
        ("prompt", [], "'prompt' must be a non-empty list"),
    ):
        bad = tmp_path / "pairs.jsonl"
        bad.write_text(json.dumps({**row, key: value}) + "\n")
        line = one_line_error(
            capsys,
            ["train", "--model", str(tiny_model_dir), "--pairs", str(bad), "--output", str(tmp_path / "o")],
        )
        assert f"{bad}:1: {expected}" in line


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("threads=0", "config field 'threads' must be > 0"),
        ("progress_seconds=-1", "config field 'progress_seconds' must be >= 0"),
        ("data.answer_pattern=(x", "data.answer_pattern '(x' is not a valid regex"),
    ],
)
def test_bad_settings(
    override: str, expected: str, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = one_line_error(
        capsys, ["eval", "--model", str(tiny_model_dir), "--dataset", "builtin:addition", override]
    )
    assert line.startswith(f"spinlm: error: {expected}")


# --- 8. spinlm config, quiet output ------------------------------------------------------------------------


def test_spin_config_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    from spinlm.config import config_reference

    assert main(["config"]) == 0
    out = capsys.readouterr().out
    keys = [k for k, _, _, _ in config_reference()]
    assert len(keys) > 60 and all(f"\n{k}: " in "\n" + out for k in keys)
    assert "threads: int | None = null\n    CPU threads torch may use" in out
    assert "generation.engine: str = auto\n" in out and "train.beta: float | list[float] = 0.1\n" in out
    assert main(["config", "answer"]) == 0
    assert capsys.readouterr().out.startswith("data.answer_pattern: str | None = null\n    Exact-match")
    assert one_line_error(capsys, ["config", "nosuchkey"]).endswith("(run `spinlm config` to list every key)")


def test_redirected_output_has_progress_and_no_third_party_chatter(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # A real process with stdout and stderr sent to a file, as long runs are run.
    log_file = tmp_path / "run.log"
    argv = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        "builtin:addition",
        "--output",
        str(tmp_path / "p.jsonl"),
    ]
    extra = ["generation.engine=continuous", "progress_seconds=1e-9"]
    with log_file.open("w") as f:
        subprocess.run(
            [sys.executable, "-m", "spinlm.cli", *argv, *QUICK, *extra],
            stdout=f,
            stderr=subprocess.STDOUT,
            check=True,
        )
    text = log_file.read_text()
    assert "ContinuousBatchingLogger" not in text and " - INFO - " not in text  # 8 lines per call before
    assert re.search(r"^generate: 12/12 prompts \(100%\), .* done in ", text, flags=re.MULTILINE), text
    assert text.count("wrote 12 pairs") == 1


# --- 4. threads ------------------------------------------------------------------------------------------


def test_threads_setting_is_applied_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from spinlm.config import load_config
    from spinlm.runtime import apply_settings

    before = torch.get_num_threads()
    try:
        assert apply_settings(load_config(None, ["task=addition", "threads=1"])) == 1
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
        assert apply_settings(load_config(None, ["task=addition"])) == 3  # default: the cores we may use
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_iteration_must_be_positive(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--pairs",
        str(pairs_file),
        "--output",
        str(tmp_path / "o"),
    ]
    line = one_line_error(capsys, [*argv, "--iteration", "0"])
    assert "--iteration must be >= 1" in line
