"""Fault injection: real `spinlm run` processes killed with SIGKILL in every phase, resumed, and compared.

One uninterrupted reference run, then ONE chain of 12 `python -m spinlm.cli run cfg.yaml` processes on a second
folder: each of the first 11 kills itself with SIGKILL at a chosen moment (`SPIN_FAULT_AFTER`, see
spinlm.io.fault_point), the next resumes the folder where the last one died, the 12th finishes. The moments
cover generation (after a shard; inside a shard's write), the stage boundaries (right after `.pairs.done`,
`.train.done`, `.eval.done`), training (after a logged step but before its checkpoint; half way through
swapping the checkpoint; inside the checkpoint's write), evaluation (inside its writes) and the gap between
iterations. Where the chain allows it, the occurrence number n is drawn from a fixed RNG.

After every kill the folder must hold no torn file (every JSON parses, every pairs file has one pair per
prompt); at the end the folder must equal the reference: the same file list, byte-identical pairs, shards,
training logs (no repeated or lost step) and samples, the same metrics except `seconds`, and bitwise equal
weights. Tiny on purpose (24 prompts, 3 shards and 6 steps per iteration, 2 iterations; one torch thread per
process): about a minute of CPU for the 13 processes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ITERATIONS, PROMPTS, STEPS = 2, 24, 6


def write_recipe(path: Path, model_dir: Path, out: Path) -> Path:
    path.write_text(
        f"""task: addition
seed: 3
output_dir: {out}
model: {{name_or_path: {model_dir}}}
data: {{num_examples: {PROMPTS}, eval_size: 8}}
generation: {{max_new_tokens: 6, batch_size: 8, shard_size: 8, engine: refill}}
train: {{iterations: {ITERATIONS}, learning_rate: 1.0e-3, optimizer: adamw, epochs: 1, batch_size: 4,
         max_length: 48, save_steps: 1}}
eval: {{batch_size: 32, num_samples: 2}}
""",
        encoding="utf-8",
    )
    return path


def spin_run(recipe: Path, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SPIN_FAULT_AFTER", None)
    if fault:
        env["SPIN_FAULT_AFTER"] = fault
    return subprocess.run(
        [sys.executable, "-m", "spinlm.cli", "run", str(recipe)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def kill_schedule(seed: int = 0) -> list[str]:
    """11 kill moments; each is reached whatever n the RNG drew for the earlier ones (see module docstring)."""
    rng = random.Random(seed)
    return [
        f"shard:{rng.randint(1, 3)}",  # iteration 1 generation, after a shard file is final
        "write:2",  # config.yaml is write 1; write 2 is the next shard (or pairs.jsonl): a torn .tmp
        "stage:1",  # right after .pairs.done of iteration 1
        f"train_step:{rng.randint(1, 4)}",  # step n logged, its checkpoint not saved
        "checkpoint_swap:2",  # trainer_checkpoint moved to .old, the new one still .tmp
        "write:3",  # config, trimmed log, then the next checkpoint's state (or .train.done): torn
        "stage:1",  # right after .train.done of iteration 1
        f"write:{rng.randint(2, 5)}",  # inside iteration 1's evaluation writes
        "stage:1",  # right after .eval.done of iteration 1: between iterations
        f"train_step:{rng.randint(1, 5)}",  # iteration 2: all of its generation, then a training step
        "stage:2",  # .train.done then .eval.done of iteration 2: before summary.json and the report
    ]


def check_no_torn_files(run_dir: Path) -> None:
    for path in run_dir.rglob("*.json"):
        if not path.name.endswith(".tmp"):
            json.loads(path.read_text(encoding="utf-8"))
    for path in run_dir.glob("iteration_*/pairs.jsonl"):
        assert len(path.read_text(encoding="utf-8").splitlines()) == PROMPTS, path
    for path in run_dir.glob("iteration_*/generations/shard_*.jsonl"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert rows and all("text" in r for r in rows), path


def listing(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def without_seconds(obj: object) -> object:
    if isinstance(obj, dict):
        # Wall-clock times (seconds, seconds_<stage>) differ between runs; so does the folder.
        return {
            k: without_seconds(v) for k, v in obj.items() if not k.startswith("seconds") and k != "output_dir"
        }
    if isinstance(obj, list):
        return [without_seconds(v) for v in obj]
    return obj


def assert_same_run(ref: Path, got: Path) -> None:
    assert listing(got) == listing(ref)
    for t in range(1, ITERATIONS + 1):
        it_ref, it_got = ref / f"iteration_{t}", got / f"iteration_{t}"
        pairs = [json.loads(line) for line in (it_got / "pairs.jsonl").read_text().splitlines()]
        assert len(pairs) == PROMPTS
        assert len({json.dumps(p["prompt"]) for p in pairs}) == PROMPTS  # one pair per prompt
        for name in ("pairs.jsonl", "pair_stats.json", "eval_state.json", "samples.jsonl", "train_log.jsonl"):
            assert (it_got / name).read_bytes() == (it_ref / name).read_bytes(), f"iteration {t}: {name}"
        steps = [json.loads(line)["step"] for line in (it_got / "train_log.jsonl").read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1))
        for shard in sorted((it_ref / "generations").iterdir()):
            assert (it_got / "generations" / shard.name).read_bytes() == shard.read_bytes()
        w_ref = load_file(str(it_ref / "model" / "model.safetensors"))
        w_got = load_file(str(it_got / "model" / "model.safetensors"))
        assert w_ref.keys() == w_got.keys()
        assert all(w_ref[k].equal(w_got[k]) for k in w_ref), f"iteration {t}: weights differ"
    for t in range(ITERATIONS + 1):
        metrics = [json.loads((d / f"iteration_{t}" / "metrics.json").read_text()) for d in (ref, got)]
        assert without_seconds(metrics[0]) == without_seconds(metrics[1])
    summaries = [json.loads((d / "summary.json").read_text()) for d in (ref, got)]
    assert without_seconds(summaries[0]) == without_seconds(summaries[1])


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_result(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    reference = spin_run(write_recipe(tmp_path / "ref.yaml", tiny_model_dir, ref_dir))
    assert reference.returncode == 0, reference.stderr[-3000:]

    recipe = write_recipe(tmp_path / "run.yaml", tiny_model_dir, run_dir)
    expect, last_train_kill = "", 0  # expect: what the next process must report (it resumed, not restarted)
    schedule = kill_schedule()
    for fault in [*schedule, None]:
        proc = spin_run(recipe, fault)
        assert expect in proc.stderr, f"after the previous kill, expected {expect!r}:\n{proc.stderr[-3000:]}"
        if fault is None:
            assert proc.returncode == 0, proc.stderr[-3000:]
            break
        assert proc.returncode == -signal.SIGKILL, f"{fault} was not reached:\n{proc.stderr[-3000:]}"
        check_no_torn_files(run_dir)
        event, n = fault.split(":")[0], int(fault.split(":")[1])
        if event == "shard" and fault == schedule[0]:
            expect = f"{n} of 3 shards already on disk"
        elif event == "train_step":
            last_train_kill = n  # step n was logged but its checkpoint never written
            expect = f"resuming training at step {n - 1}" if n > 1 else ""
        elif event == "checkpoint_swap":  # the checkpoint of step last_train_kill + 1 was left as .tmp
            expect = f"resuming training at step {last_train_kill + 1}"
        else:
            expect = ""
    assert_same_run(ref_dir, run_dir)
