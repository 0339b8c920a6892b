"""Generation engines: correctness of batching, order, seeding, stop strings, resume, and auto's choice.

The oracle for greedy decoding is plain `model.generate` on one prompt at a time (no padding at all), the
paper's simplified loop; every engine must reproduce it on prompts of different lengths.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import spinlm.generation as gen
from spinlm.config import GenerationConfig
from spinlm.engines import Sampler
from spinlm.generation import generate_responses, supported_engines
from spinlm.modeling import encode, load_model, load_tokenizer, render_prompt

ENGINES = ["refill", "generate", "continuous"]


@pytest.fixture(scope="module")
def lm(tiny_grammar_model_dir: Path) -> tuple[Any, Any]:
    from spinlm.config import ModelConfig

    tok = load_tokenizer(tiny_grammar_model_dir, ModelConfig())
    model = load_model(tiny_grammar_model_dir, ModelConfig(), device=torch.device("cpu")).eval()
    return model, tok


@pytest.fixture(scope="module")
def prompts() -> list[list[dict]]:
    """12 prompts of 14 to 45 tokens (a system message of varied length in front of grammar keys)."""
    from spinlm.tasks import GRAMMAR_KEYS

    out = []
    for i, key in enumerate(GRAMMAR_KEYS[:12]):
        system = [{"role": "system", "content": "xy" * (3 * i)}] if i % 3 else []
        out.append(system + [{"role": "user", "content": key}])
    return out


def _cfg(**kw: Any) -> GenerationConfig:
    base: dict[str, Any] = {"max_new_tokens": 12, "batch_size": 4, "shard_size": 64, "engine": "refill"}
    return GenerationConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def one_at_a_time(lm: tuple[Any, Any], prompts: list[list[dict]]) -> list[str]:
    """Greedy texts from `model.generate` on each prompt alone (no padding): the reference."""
    model, tok = lm
    texts = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([encode(tok, render_prompt(tok, p))])
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12
            )
            texts.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


def test_continuous_batching_is_supported_on_cpu(lm: tuple[Any, Any]) -> None:
    assert supported_engines(lm[0]) == ENGINES


@pytest.mark.parametrize("engine", ENGINES)
def test_batched_greedy_equals_one_at_a_time(
    lm: tuple[Any, Any], prompts: list[list[dict]], one_at_a_time: list[str], engine: str
) -> None:
    """Left padding, row dropping and refilling (batch 4 < 12 prompts) change nothing in greedy outputs."""
    got = generate_responses(*lm, prompts, _cfg(engine=engine), seed=0, greedy=True)
    assert [g.text for g in got] == one_at_a_time
    assert len(set(one_at_a_time)) > 4  # the prompts really get different answers


def test_results_follow_input_order(lm: tuple[Any, Any], prompts: list[list[dict]]) -> None:
    """Prompts are generated longest first; results come back in the caller's order."""
    perm = [7, 2, 11, 0, 5, 9, 1, 3, 10, 4, 8, 6]
    base = generate_responses(*lm, prompts, _cfg(), seed=0, greedy=True)
    shuffled = generate_responses(*lm, [prompts[i] for i in perm], _cfg(), seed=0, greedy=True)
    assert [g.text for g in shuffled] == [base[i].text for i in perm]


def test_same_seed_same_samples_across_batching_and_engines(
    lm: tuple[Any, Any], prompts: list[list[dict]]
) -> None:
    a = generate_responses(*lm, prompts, _cfg(engine="refill", batch_size=3), seed=5)
    b = generate_responses(*lm, prompts, _cfg(engine="generate", batch_size=16), seed=5)
    c = generate_responses(*lm, prompts, _cfg(engine="refill", batch_size=3), seed=6)
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.text for g in a] != [g.text for g in c]


def test_continuous_sampling_is_seeded(lm: tuple[Any, Any], prompts: list[list[dict]]) -> None:
    """Seeded; a model on sdpa_segments (load_model's CPU choice) runs continuous batching as plain sdpa,
    which accepts no other SDPA name, and gets sdpa_segments back."""
    model = lm[0]
    model.set_attn_implementation("sdpa_segments")
    a = generate_responses(*lm, prompts, _cfg(engine="continuous"), seed=5)
    assert model.config._attn_implementation == "sdpa_segments"
    b = generate_responses(*lm, prompts, _cfg(engine="continuous"), seed=5)
    c = generate_responses(*lm, prompts, _cfg(engine="continuous"), seed=6)
    assert a == b and a != c


def test_sampler_draws_from_the_filtered_softmax() -> None:
    """Counter-based inverse-CDF draws: frequencies over many (key, step) match softmax(logits / T) within 4 sigma,
    and top-k / top-p remove exactly the tokens they should."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 40_000
    keys, steps = torch.arange(n), torch.arange(n) % 7
    for cfg, allowed in [
        (GenerationConfig(temperature=0.7, top_k=0, top_p=1.0), 6),
        (GenerationConfig(temperature=1.0, top_k=3, top_p=1.0), 3),
        (GenerationConfig(temperature=1.0, top_k=0, top_p=0.8), 3),  # masses .56 .21 .13 | .08 ...
    ]:
        sampler = Sampler(cfg, seed=11)
        filtered = sampler.filtered(logits)
        assert int(torch.isfinite(filtered).sum()) == allowed
        p = torch.softmax(filtered, -1)[0]
        draws = sampler.pick(logits.expand(n, -1), keys, steps)
        freq = torch.bincount(draws, minlength=6).double() / n
        sigma = torch.sqrt(p.double() * (1 - p.double()) / n)
        assert torch.all((freq - p).abs() <= 4 * sigma + 1e-9), (freq, p)


def test_top_k_zero_means_no_top_k(lm: tuple[Any, Any], prompts: list[list[dict]], monkeypatch: Any) -> None:
    model, tok = lm
    seen: dict[str, Any] = {}

    class Captured(Exception):
        pass

    def fake_generate(**kwargs: Any) -> Any:
        seen.update(kwargs)
        raise Captured

    monkeypatch.setattr(model, "generate", fake_generate)
    with pytest.raises(Captured):
        generate_responses(model, tok, prompts, _cfg(engine="generate", top_k=0), seed=0)
    hf = seen["generation_config"]
    assert hf.do_sample is False  # so transformers adds no TopK warper (its default top_k is 50)
    (noisy,) = seen["logits_processor"]
    scores = torch.randn(4, 50)
    out = noisy(seen["input_ids"][:4], scores)
    assert torch.isfinite(noisy.sampler.filtered(scores)).all()  # top_k=0: nothing filtered
    assert (torch.isfinite(out).sum(-1) == 1).all()  # one sampled token per row, whose argmax generate takes
    assert int(torch.isfinite(Sampler(_cfg(top_k=5), 0).filtered(scores)).sum()) == 4 * 5

    def fake_batch(inputs: Any, generation_config: Any, **kwargs: Any) -> Any:
        seen["cb"] = generation_config
        raise Captured

    monkeypatch.setattr(model, "generate_batch", fake_batch)
    with pytest.raises(Captured):
        generate_responses(model, tok, prompts, _cfg(engine="continuous", top_k=0), seed=0)
    assert seen["cb"].do_sample is True and seen["cb"].top_k == 0  # 0, not None: None means 50 there


@pytest.mark.parametrize("engine", ENGINES)
def test_stop_strings_cut_responses(
    lm: tuple[Any, Any], prompts: list[list[dict]], one_at_a_time: list[str], engine: str
) -> None:
    """A stop string cuts the reply before it; the tokens count up to the one that completed it."""
    i = max(range(len(prompts)), key=lambda j: len(one_at_a_time[j]))
    full = one_at_a_time[i]
    assert len(full) >= 3
    stop = full[1:3]
    (g,) = generate_responses(
        *lm, [prompts[i]], _cfg(engine=engine, stop_strings=[stop]), seed=0, greedy=True
    )
    cut = full.index(stop)
    assert g.text == full[:cut] and g.finished
    assert g.num_tokens == cut + len(stop)  # character-level model: one token per character


def test_stopped_generation_resumes_from_last_finished_shard(
    lm: tuple[Any, Any], prompts: list[list[dict]], tmp_path: Path, monkeypatch: Any
) -> None:
    cfg = _cfg(shard_size=4)  # 12 prompts -> shards 0, 1, 2
    uninterrupted = generate_responses(*lm, prompts, cfg, seed=3, shard_dir=tmp_path / "full")

    def stop_after_shard_1(s: int) -> None:
        if s == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_responses(*lm, prompts, cfg, seed=3, shard_dir=tmp_path / "gen", on_shard=stop_after_shard_1)
    assert sorted(p.name for p in (tmp_path / "gen").glob("shard_*.jsonl")) == [
        "shard_00000.jsonl",
        "shard_00001.jsonl",
    ]

    calls: list[int] = []
    real = gen._ENGINE_FNS["refill"]

    def counting(model: Any, ids: list[list[int]], keys: list[int], *rest: Any) -> Any:
        calls.append(len(ids))
        return real(model, ids, keys, *rest)

    monkeypatch.setitem(gen._ENGINE_FNS, "refill", counting)
    resumed = generate_responses(*lm, prompts, cfg, seed=3, shard_dir=tmp_path / "gen")
    assert calls == [4]  # only shard 2 was generated
    assert resumed == uninterrupted


def test_auto_picks_by_rule_without_timing_logs_and_records(
    lm: tuple[Any, Any], prompts: list[list[dict]], tmp_path: Path, monkeypatch: Any, caplog: Any
) -> None:
    """auto runs no timing probes: the generation itself is the only engine call (refill, which supports
    this Llama), the choice and why are logged and recorded for a resume."""
    monkeypatch.setattr(gen, "_LOGGED", set())
    called: list[str] = []
    for name, fn in list(gen._ENGINE_FNS.items()):

        def wrapped(*args: Any, _fn: Any = fn, _name: str = name) -> Any:
            called.append(_name)
            return _fn(*args)

        monkeypatch.setitem(gen._ENGINE_FNS, name, wrapped)
    cfg = _cfg(engine="auto", batch_size=1, max_new_tokens=4)  # 12 batches: the old auto timed engines here
    with caplog.at_level(logging.INFO, logger="spinlm.generation"):
        first = generate_responses(*lm, prompts, cfg, seed=0, shard_dir=tmp_path / "a")
    assert set(called) == {"refill"}  # one call per shard, no probe of any other engine
    record = json.loads((tmp_path / "a" / "engine.json").read_text())
    assert record == {"engine": "refill", "reason": "default where the model supports it"}
    assert "engine refill: default where the model supports it" in caplog.text
    named = generate_responses(*lm, prompts, _cfg(engine="refill", batch_size=1, max_new_tokens=4), seed=0)
    assert [g.text for g in first] == [g.text for g in named]  # auto = refill here, same samples

    # A resumed generation keeps the engine it started with, whatever auto would say now.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "engine.json").write_text(json.dumps({"engine": "generate", "reason": "test"}))
    called.clear()
    generate_responses(*lm, prompts, cfg, seed=0, shard_dir=tmp_path / "b")
    assert set(called) == {"generate"}


def test_auto_falls_back_to_generate_where_refill_cannot(lm: tuple[Any, Any], monkeypatch: Any) -> None:
    monkeypatch.setattr(gen, "refill_supported", lambda model: False)
    engine, reason = gen._choose_engine(lm[0])
    assert engine == "generate" and "refill does not support" in reason


def test_the_engine_choice_is_logged_once(
    lm: tuple[Any, Any], prompts: list[list[dict]], monkeypatch: Any, caplog: Any
) -> None:
    monkeypatch.setattr(gen, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="spinlm.generation"):
        for desc in ("eval samples", "eval greedy", "generate 1"):
            generate_responses(*lm, prompts[:3], _cfg(engine="auto", max_new_tokens=2), seed=0, desc=desc)
    lines = [
        r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "engine" in r.getMessage()
    ]
    assert lines == ["eval samples: engine refill: default where the model supports it"]


def test_empty_prompt_list(lm: tuple[Any, Any]) -> None:
    assert generate_responses(*lm, [], _cfg(engine="auto"), seed=0) == []


def test_num_tokens_and_finished(lm: tuple[Any, Any], prompts: list[list[dict]]) -> None:
    got = generate_responses(*lm, prompts, _cfg(max_new_tokens=3), seed=1)
    for g in got:
        assert 1 <= g.num_tokens <= 3
        assert g.finished or g.num_tokens == 3


def test_generation_dtype_samples_from_a_cast_copy(lm: tuple[Any, Any], prompts: list[list[dict]]) -> None:
    """generation.dtype=bfloat16 on an fp32 model: the engines run a bf16 copy of the same weights, and the
    model itself keeps its fp32 weights (a cast there and back would lose their low bits)."""
    model, tok = lm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = gen.generation_model(model, _cfg(dtype="bfloat16"))
    assert copy is not model and next(copy.parameters()).dtype == torch.bfloat16
    for name, value in copy.state_dict().items():
        assert torch.equal(value, before[name].to(torch.bfloat16)), name
    assert gen.generation_model(model, _cfg(dtype="model")) is model  # the model's own dtype: no copy
    assert gen.generation_model(model, _cfg()) is model  # auto on a CPU without fast bf16 (the suite's)
    assert gen.generation_model(model, _cfg(dtype="float32")) is model  # already that dtype
    out = generate_responses(model, tok, prompts, _cfg(dtype="bfloat16"), seed=0, greedy=True)
    assert len(out) == len(prompts) and all(g.num_tokens > 0 for g in out)
    assert all(torch.equal(v, before[k]) and v.dtype == torch.float32 for k, v in model.state_dict().items())


def test_generation_dtype_auto_is_bf16_where_bf16_is_fast(lm: tuple[Any, Any], monkeypatch: Any) -> None:
    """auto: a bf16 copy of an fp32 model on a CPU with AMX; the model itself elsewhere."""
    model, _ = lm
    monkeypatch.delenv("SPINLM_CPU_BF16")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert next(gen.generation_model(model, _cfg(dtype="auto")).parameters()).dtype == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert gen.generation_model(model, _cfg(dtype="auto")) is model


def test_generation_dtype_is_validated() -> None:
    from spinlm.errors import SpinError

    with pytest.raises(SpinError, match="generation.dtype"):
        GenerationConfig(dtype="int8")
