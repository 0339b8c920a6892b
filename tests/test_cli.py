"""The CLI: every subcommand has --help, and user errors are one line with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spinlm.cli import build_parser, main

SUBCOMMANDS = ["run", "generate", "train", "eval", "report", "config", "demo"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: spinlm {command}")
    assert len(out.splitlines()) > 3


def test_top_level_help_lists_subcommands() -> None:
    text = build_parser().format_help()
    for command in SUBCOMMANDS:
        assert command in text


def test_console_script_help_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "spinlm.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "Self-Play Fine-Tuning" in out.stdout


def test_bad_config_value_is_one_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: addition\nmodel: {name_or_path: x}\ntrain: {beta: -1}\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "spinlm: error: config field 'train.beta' must be a positive number or a list of them; got -1.0"
    )


def test_installed_names_agree() -> None:
    """The distribution, its console script and the import package are all `spinlm` (`spin` on PyPI is
    another project), and `--version` / `--help` work through each way of starting it."""
    import importlib.metadata as md
    import shutil
    from pathlib import Path

    import spinlm

    dist = md.distribution("spinlm")
    assert dist.metadata["Name"] == "spinlm"
    assert dist.version == spinlm.__version__
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"spinlm": "spinlm.cli:main"}
    assert Path(spinlm.__file__).parent.name == "spinlm"
    # The console script as installed beside this interpreter, and `python -m spinlm`.
    script = shutil.which("spinlm", path=str(Path(sys.executable).parent))
    assert script is not None
    for argv in ([script], [sys.executable, "-m", "spinlm"]):
        out = subprocess.run([*argv, "--version"], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == f"spinlm {spinlm.__version__}"
        out = subprocess.run([*argv, "--help"], capture_output=True, text=True, check=True)
        assert out.stdout.startswith("usage: spinlm ")
