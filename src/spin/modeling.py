"""Models and tokenizers: loading them, rendering chat templates, and the built-in tiny model.

One rendering function serves generation, scoring and training, so the prompt the opponent answers is
byte-for-byte the prompt the main player is trained on (the official SPIN code renders them differently,
a known reproduction bug). A pair's token ids are `ids(prompt_text) + ids(response_text)`, where
`response_text` is what the chat template adds after the generation prompt for the assistant turn.

The built-in model is a character-level Llama (vocab: printable ASCII, newline and 6 special tokens) used
by `spin demo`, the tests and the CPU benchmarks; it needs no download.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from spin.config import ModelConfig
from spin.data import Message
from spin.errors import SpinError

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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(path: str | Path, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Load a tokenizer, make sure it can pad (left, for generation) and has a chat template."""
    try:
        tok = AutoTokenizer.from_pretrained(
            str(path), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as e:  # noqa: BLE001 - any failure here is a user-facing load problem
        raise SpinError(
            f"could not load a tokenizer from '{path}': {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            hint="check model.name_or_path points at a Hugging Face model folder or Hub id",
        ) from None
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
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "use_safetensors": True,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.revision is not None and not Path(path).exists():
        kwargs["revision"] = cfg.revision
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if load_in_4bit:
        kwargs.update(_four_bit_kwargs(device))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else ""
        raise SpinError(
            f"could not load a model from '{path}': {type(e).__name__}: {first}",
            hint="a Hugging Face causal-LM folder with config.json and *.safetensors, or a Hub id, is expected",
        ) from None
    if load_in_4bit:
        return model  # placed by device_map; a 4-bit model cannot be moved with .to()
    return model.to(device)  # type: ignore[arg-type]


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


def save_model(model: Any, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Save a standard HF checkpoint (safetensors) atomically, replacing only its own files in `path`."""
    from spin.io import save_checkpoint

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
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
    room = max(max_length - len(prompt_ids), 1)
    return Encoded(prompt_ids + response_ids[:room], len(prompt_ids))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
