"""The CLI: every subcommand has --help, and user errors are one line with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spin.cli import build_parser, main

SUBCOMMANDS = ["run", "generate", "train", "eval", "report", "config", "demo"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: spin {command}")
    assert len(out.splitlines()) > 3


def test_top_level_help_lists_subcommands() -> None:
    text = build_parser().format_help()
    for command in SUBCOMMANDS:
        assert command in text


def test_console_script_help_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "spin.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "Self-Play Fine-Tuning" in out.stdout


def test_bad_config_value_is_one_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: addition\nmodel: {name_or_path: x}\ntrain: {beta: -1}\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "spin: error: config field 'train.beta' must be a positive number or a list of them; got -1.0"
    )
