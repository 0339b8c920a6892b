"""Resuming a run folder, and the safe defaults of what is loaded.

- A changed config that would change results is refused, naming the differing fields; bookkeeping fields may
  change; `--force` overrides; a refused run writes nothing.
- Training resumed from a trainer checkpoint gives bitwise the weights and the log of an uninterrupted run,
  with the log rows the stopped process wrote after its checkpoint dropped (no step twice).
- The repairs of a killed process's leftovers: `trim_log`, `recover_checkpoint`, `tidy_run_folder`,
  `train_finished`; one run per folder (`RunLock`).
- Safe defaults: `trust_remote_code` off; weights loaded as safetensors only (a pickle `.bin` folder is
  refused); trainer checkpoints hold safetensors weights and are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from spinlm.cli import main
from spinlm.config import ModelConfig, load_config
from spinlm.errors import SpinError
from spinlm.io import trim_log
from spinlm.resume import RunLock, check_resume_config, recover_checkpoint, tidy_run_folder, train_finished

CPU = torch.device("cpu")


# --- a changed config -------------------------------------------------------------------------------------


def test_changed_config_is_refused_with_the_differing_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spinlm.config import config_to_yaml

    run = tmp_path / "run"
    base = ["task=addition", "model.name_or_path=m", f"output_dir={run}"]
    run.mkdir()
    (run / "config.yaml").write_text(config_to_yaml(load_config(None, base)))
    before = (run / "config.yaml").read_bytes()

    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: addition\n")
    code = main(["run", str(recipe), *base[1:], "train.learning_rate=1e-4", "generation.temperature=0.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "holds a run with a different config" in err
    assert "generation.temperature (1.0 -> 0.5)" in err and "train.learning_rate (5e-07 -> 0.0001)" in err
    assert "--force" in err
    assert (run / "config.yaml").read_bytes() == before  # nothing written

    # Bookkeeping fields may change; --force accepts the rest.
    check_resume_config(run, load_config(None, [*base, "train.iterations=7", "eval.num_samples=1"]), False)
    changed = load_config(None, [*base, "train.learning_rate=1e-4"])
    with pytest.raises(SpinError, match="train.learning_rate"):
        check_resume_config(run, changed, False)
    check_resume_config(run, changed, True)


def test_a_second_run_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    from spinlm.loop import run

    cfg = load_config(None, ["task=addition", "model.name_or_path=m", f"output_dir={tmp_path / 'run'}"])
    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run"), pytest.raises(SpinError, match="another spinlm run is using"):
        run(cfg)


# --- training resume ----------------------------------------------------------------------------------------


def _pairs(tokenizer: Any, model: Any, n: int) -> list[dict]:
    from spinlm.logps import score_logps
    from spinlm.tasks import get_task

    make = get_task("addition").make_examples
    assert make is not None
    examples = make(n, 0)
    wrong = [str(int(e.response) + 1) if e.response.isdigit() else e.response + "1" for e in examples]
    prompts = [e.prompt for e in examples]
    real = score_logps(model, tokenizer, prompts, [e.response for e in examples], 48, 16)
    gen = score_logps(model, tokenizer, prompts, wrong, 48, 16)
    return [
        {
            "prompt": e.prompt,
            "chosen": [{"role": "assistant", "content": e.response}],
            "rejected": [{"role": "assistant", "content": w}],
            "ref_chosen_logps": c - 0.5,
            "ref_rejected_logps": g + 0.5,
        }
        for e, w, c, g in zip(examples, wrong, real, gen)
    ]


def test_training_resumes_bitwise_from_its_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import spinlm.trainer as train_module
    from spinlm.config import TrainConfig
    from spinlm.modeling import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir, ModelConfig())
    pairs = _pairs(tok, load_model(tiny_model_dir, ModelConfig(), device=CPU), 24)
    cfg = TrainConfig(
        optimizer="adamw", learning_rate=3e-3, epochs=1, batch_size=4, max_length=48, save_steps=1, beta=0.5
    )

    def train(out: Path) -> Any:
        model = load_model(tiny_model_dir, ModelConfig(), device=CPU)
        train_module.train_iteration(
            model, tok, pairs, cfg, 1, 0, out, checkpoint_dir=out / "ckpt", save_dir=out / "model"
        )
        return model

    reference = train(tmp_path / "a")

    # Die after step 4 is logged but before its checkpoint (as SIGKILL would, mid-loop).
    real_save = train_module._save_trainer_state

    def die_at_4(accelerator: Any, checkpoint_dir: Path, step: int, scheduler: Any) -> None:
        if step == 4:
            raise KeyboardInterrupt
        real_save(accelerator, checkpoint_dir, step, scheduler)

    monkeypatch.setattr(train_module, "_save_trainer_state", die_at_4)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b")
    b = tmp_path / "b"
    assert json.loads((b / "ckpt" / "trainer_state.json").read_text())["step"] == 3
    assert len((b / "train_log.jsonl").read_text().splitlines()) == 4
    assert (b / "ckpt" / "model.safetensors").exists() and not list((b / "ckpt").glob("pytorch_model*"))
    monkeypatch.setattr(train_module, "_save_trainer_state", real_save)

    # Resume: the checkpoint's torch files are read with weights_only=True (no arbitrary unpickling).
    loads: list[dict] = []
    real_load = torch.load

    def spy_load(*args: Any, **kwargs: Any) -> Any:
        loads.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    resumed = train(b)
    assert loads and all(kw.get("weights_only") is True for kw in loads)

    assert (b / "train_log.jsonl").read_bytes() == (tmp_path / "a" / "train_log.jsonl").read_bytes()
    ref_state, got_state = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(ref_state[k], got_state[k]) for k in ref_state)
    assert not (b / "ckpt").exists()
    assert not list(b.rglob("*.bin")) and (b / "model" / "model.safetensors").exists()


# --- repairs --------------------------------------------------------------------------------------------------


def test_trim_log_drops_rows_past_the_checkpoint(tmp_path: Path) -> None:
    log = tmp_path / "train_log.jsonl"
    log.write_text(
        "".join(json.dumps({"step": s, "loss": 0.1 * s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo'
    )
    trim_log(log, 3)
    assert [json.loads(r)["step"] for r in log.read_text().splitlines()] == [1, 2, 3]
    trim_log(log, 0)
    assert not log.exists()
    trim_log(log, 2)  # nothing to trim


def _checkpoint(path: Path, step: int) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text("weights")
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


def test_recover_checkpoint_after_a_kill_mid_swap(tmp_path: Path) -> None:
    ckpt = tmp_path / "trainer_checkpoint"
    # Killed after NAME -> NAME.old, before NAME.tmp -> NAME: the complete .tmp (newer) wins.
    _checkpoint(tmp_path / "trainer_checkpoint.old", 3)
    _checkpoint(tmp_path / "trainer_checkpoint.tmp", 4)
    recover_checkpoint(ckpt)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_checkpoint"]

    # Killed while writing NAME.tmp (no trainer_state.json yet) after the swap began: .old is used.
    shutil.rmtree(ckpt)
    _checkpoint(tmp_path / "trainer_checkpoint.old", 5)
    (tmp_path / "trainer_checkpoint.tmp").mkdir()
    recover_checkpoint(ckpt)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_checkpoint"]

    # Killed while writing NAME.tmp with NAME intact: NAME stays, the partial .tmp goes.
    (tmp_path / "trainer_checkpoint.tmp").mkdir()
    (tmp_path / "trainer_checkpoint.tmp" / "model.safetensors").write_text("half")
    recover_checkpoint(ckpt)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_checkpoint"]


def test_tidy_run_folder_removes_leftovers_of_killed_writes(tmp_path: Path) -> None:
    it = tmp_path / "iteration_1"
    (it / "generations").mkdir(parents=True)
    (it / "generations" / "shard_00001.jsonl.tmp").write_text('{"index": 0, "te')
    (it / "generations" / "shard_00000.jsonl").write_text("{}\n")
    (it / "model.tmp").mkdir()
    (it / "model.tmp" / "config.json.tmp").write_text("{")
    _checkpoint(it / "trainer_checkpoint.tmp", 2)
    tidy_run_folder(tmp_path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == [
        "iteration_1/generations/shard_00000.jsonl",
        "iteration_1/trainer_checkpoint/model.safetensors",
        "iteration_1/trainer_checkpoint/trainer_state.json",
    ]


def test_train_finished_when_the_model_was_saved_but_not_marked(tmp_path: Path) -> None:
    assert not train_finished(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert not train_finished(tmp_path)  # no weights: not a finished save
    (tmp_path / "model" / "model.safetensors").write_text("w")
    assert train_finished(tmp_path)


# --- safe defaults ----------------------------------------------------------------------------------------------


def test_remote_code_is_off_and_weights_are_safetensors_only(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    from spinlm.modeling import load_model

    assert ModelConfig().trust_remote_code is False
    seen: dict[str, Any] = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(path: str, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(tiny_model_dir, ModelConfig(), device=CPU)
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True

    # A folder holding only pickled weights (pytorch_model.bin) is refused, never unpickled.
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    from safetensors.torch import load_file

    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(SpinError, match="could not load a model"):
        load_model(pickled, ModelConfig(), device=CPU)
