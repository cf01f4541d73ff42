"""GGUF → MLX: hyperparameters, weights, tokenizer and chat template from one file.

MLX's `mx.load` reads GGUF and returns Q4_0/Q4_1/Q8_0 tensors already in MLX's affine
quantized layout (packed uint32 weight + scales + biases), so the work here is naming,
per-module quantization parameters, undoing llama.cpp's Q/K row permutation, and
rebuilding the tokenizer from the vocabulary stored in the metadata.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# llama.cpp token types (gguf TokenType): 3 = control, 4 = user-defined.
_CONTROL_TOKEN = 3
_USER_DEFINED_TOKEN = 4

_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_ARCH_TO_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "mistral": "llama"}


class GGUFError(ValueError):
    """The GGUF file is of a kind exo-tools cannot load; the message says which part."""


@dataclass
class GGUFModel:
    """Everything read from a GGUF file, in the shapes mlx-lm expects."""

    config: dict[str, Any]
    weights: dict[str, mx.array]
    quantization: dict[str, dict[str, int]]
    tokenizer: Tokenizer
    special_tokens: dict[str, int | None]
    added_token_ids: list[int]
    chat_template: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


def _scalar(value: Any) -> Any:
    """GGUF scalars come back as 0-d MLX arrays; turn them into Python values."""
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    loaded = mx.load(str(path), return_metadata=True)
    if not isinstance(loaded, tuple):
        raise GGUFError(f"{path}: mx.load returned no metadata; is this a GGUF file?")
    tensors, metadata = loaded
    return dict(tensors), dict(metadata)


def gguf_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """An mlx-lm style config.json built from GGUF hyperparameters."""
    arch = str(metadata.get("general.architecture", ""))
    if arch not in _ARCH_TO_MODEL_TYPE:
        raise GGUFError(
            f"GGUF architecture {arch!r} is not supported yet "
            f"(supported: {', '.join(sorted(_ARCH_TO_MODEL_TYPE))})"
        )

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        return _scalar(value)

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab_size = get("vocab_size")
    if vocab_size is None:
        vocab_size = len(metadata["tokenizer.ggml.tokens"])
    config: dict[str, Any] = {
        "model_type": _ARCH_TO_MODEL_TYPE[arch],
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": int(get("rope.dimension_count", hidden // n_heads)),
        # GGUF stores eps as float32; round-trip through str keeps 1e-5 exact.
        "rms_norm_eps": float(f"{float(get('attention.layer_norm_rms_epsilon')):.7g}"),
        "vocab_size": int(vocab_size),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "rope_traditional": False,
    }
    return config


_NAME_MAP = [
    (re.compile(r"^token_embd\."), "model.embed_tokens."),
    (re.compile(r"^output_norm\."), "model.norm."),
    (re.compile(r"^output\."), "lm_head."),
    (re.compile(r"^blk\.(\d+)\.attn_q\."), r"model.layers.\1.self_attn.q_proj."),
    (re.compile(r"^blk\.(\d+)\.attn_k\."), r"model.layers.\1.self_attn.k_proj."),
    (re.compile(r"^blk\.(\d+)\.attn_v\."), r"model.layers.\1.self_attn.v_proj."),
    (re.compile(r"^blk\.(\d+)\.attn_output\."), r"model.layers.\1.self_attn.o_proj."),
    (re.compile(r"^blk\.(\d+)\.ffn_gate\."), r"model.layers.\1.mlp.gate_proj."),
    (re.compile(r"^blk\.(\d+)\.ffn_up\."), r"model.layers.\1.mlp.up_proj."),
    (re.compile(r"^blk\.(\d+)\.ffn_down\."), r"model.layers.\1.mlp.down_proj."),
    (re.compile(r"^blk\.(\d+)\.attn_norm\."), r"model.layers.\1.input_layernorm."),
    (re.compile(r"^blk\.(\d+)\.ffn_norm\."), r"model.layers.\1.post_attention_layernorm."),
]


def mlx_name(gguf_name: str) -> str | None:
    """The mlx-lm parameter name for a GGUF tensor name, or None when unused."""
    for pattern, replacement in _NAME_MAP:
        if pattern.match(gguf_name):
            return pattern.sub(replacement, gguf_name)
    if gguf_name.endswith("rope_freqs.weight"):
        return None
    raise GGUFError(f"unknown GGUF tensor {gguf_name!r}")


def layer_index(name: str) -> int | None:
    """The transformer block a mlx-lm parameter belongs to, or None for embed/norm/head."""
    match = re.match(r"^model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def unpermute_rows(tensor: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's rotary row interleave for Q or K.

    The converter reorders each head's rows from (half, pair) to (pair, half); swapping
    back only moves whole rows, so it is exact on packed quantized rows, scales and biases.
    """
    rows = tensor.shape[0]
    head_dim = rows // n_heads
    rest = tensor.shape[1:]
    return tensor.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def gguf_weights(
    tensors: dict[str, mx.array], config: dict[str, Any]
) -> tuple[dict[str, mx.array], dict[str, dict[str, int]]]:
    """Rename tensors and work out each quantized module's bits and group size."""
    weights: dict[str, mx.array] = {}
    for name, tensor in tensors.items():
        target = mlx_name(name)
        if target is None:
            continue
        if ".self_attn.q_proj." in target and not target.endswith(".bias"):
            tensor = unpermute_rows(tensor, config["num_attention_heads"])
        elif ".self_attn.k_proj." in target and not target.endswith(".bias"):
            tensor = unpermute_rows(tensor, config["num_key_value_heads"])
        weights[target] = tensor

    quantization: dict[str, dict[str, int]] = {}
    for name, tensor in weights.items():
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        packed = weights[f"{module}.weight"]
        in_dim = _module_input_dim(module, config)
        bits = 32 * packed.shape[-1] // in_dim
        group_size = in_dim // tensor.shape[-1]
        quantization[module] = {"bits": bits, "group_size": group_size}
    return weights, quantization


def _module_input_dim(module: str, config: dict[str, Any]) -> int:
    if module.endswith("mlp.down_proj"):
        return int(config["intermediate_size"])
    if module.endswith("self_attn.o_proj"):
        return int(config["num_attention_heads"] * config["head_dim"])
    return int(config["hidden_size"])


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer named by `tokenizer.ggml.pre` (llama.cpp's names)."""
    if pre in ("smollm", "starcoder", "refact"):
        # Every digit is its own token before the GPT-2 split.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in ("gpt-2", "gpt2", "default", "olmo", "phi-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pattern = {"llama-bpe": _LLAMA3_PATTERN, "llama3": _LLAMA3_PATTERN, "qwen2": _QWEN2_PATTERN}
    if pre in pattern:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern[pre]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise GGUFError(f"GGUF pre-tokenizer {pre!r} is not supported yet")


def gguf_tokenizer(metadata: dict[str, Any]) -> tuple[Tokenizer, list[int]]:
    """A `tokenizers` tokenizer rebuilt from the GGUF vocabulary and merges.

    Returns the tokenizer and the ids that are added (special) tokens.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(
            f"GGUF tokenizer model {kind!r} is not supported yet (only byte-level BPE 'gpt2')"
        )
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)  # type: ignore[arg-type]
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = _pre_tokenizer(str(metadata.get("tokenizer.ggml.pre", "gpt-2")))
    tokenizer.decoder = decoders.ByteLevel()

    token_types = _scalar(metadata.get("tokenizer.ggml.token_type")) or []
    added_ids = [
        index
        for index, kind_id in enumerate(token_types)
        if kind_id in (_CONTROL_TOKEN, _USER_DEFINED_TOKEN)
    ]
    tokenizer.add_special_tokens(
        [
            AddedToken(
                tokens[index], special=token_types[index] == _CONTROL_TOKEN, normalized=False
            )
            for index in added_ids
        ]
    )
    return tokenizer, added_ids


def load_gguf(path: Path) -> GGUFModel:
    tensors, metadata = read_gguf(path)
    config = gguf_config(metadata)
    weights, quantization = gguf_weights(tensors, config)
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    tokenizer, added_ids = gguf_tokenizer(metadata)

    def token_id(key: str) -> int | None:
        value = _scalar(metadata.get(f"tokenizer.ggml.{key}_token_id"))
        return int(value) if value is not None else None

    special = {
        "bos": token_id("bos"),
        "eos": token_id("eos"),
        "pad": token_id("padding"),
        "unk": token_id("unknown"),
    }
    add_bos = bool(_scalar(metadata.get("tokenizer.ggml.add_bos_token", False)))
    config["add_bos_token"] = add_bos
    template = metadata.get("tokenizer.chat_template")
    scalar_metadata = {
        key: _scalar(value)
        for key, value in metadata.items()
        if not key.startswith("tokenizer.ggml.") or key.endswith("_id")
    }
    return GGUFModel(
        config=config,
        weights=weights,
        quantization=quantization,
        tokenizer=tokenizer,
        special_tokens=special,
        added_token_ids=added_ids,
        chat_template=str(template) if template is not None else None,
        metadata=scalar_metadata,
    )
