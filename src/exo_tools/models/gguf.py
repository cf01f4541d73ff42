"""GGUF → MLX: hyperparameters, weights, tokenizer and chat template from one file.

MLX's `mx.load` reads GGUF files whose tensors are all F32/F16/Q4_0/Q4_1/Q8_0 and returns
the quantized ones already in MLX's affine layout (packed uint32 weight + scales + biases).
Files with other types (K-quants such as Q4_K_M mix Q4_K, Q6_K, Q5_0 and Q8_0) are read
here: Q8_0 is repacked into MLX's 8-bit layout (lossless), everything else is dequantized to
float32 with the `gguf` package. The rest is naming per architecture, per-module
quantization parameters, undoing what llama.cpp's converter changed (llama's Q/K row
interleave, Gemma's +1 on norm weights), and rebuilding the tokenizer from the vocabulary
stored in the metadata (byte-level BPE or SentencePiece).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
)

# llama.cpp token types (gguf TokenType): 1 = normal, 3 = control, 4 = user-defined.
_NORMAL_TOKEN = 1
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


# ---------------------------------------------------------------- reading the file

_GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types (gguf.GGUFValueType) → struct format; 8 = string, 9 = array.
_VALUE_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?"}
_VALUE_FORMATS |= {10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# What mx.load turns into MLX arrays itself; a file with any other type is read here.
_MLX_READABLE = {
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q8_0,
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: the last axis is GGUF's innermost (ne[0])
    qtype: GGMLQuantizationType
    offset: int  # from the start of the data section

    @property
    def nbytes(self) -> int:
        block, block_bytes = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * block_bytes


@dataclass
class GGUFHeader:
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    data_start: int


class _HeaderReader:
    """Sequential little-endian reads of a GGUF header (the `gguf` package's reader builds
    a numpy view per array element, which takes ~10 s for a 262k-token vocabulary)."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self._file.read(size))[0]

    def string(self) -> str:
        length = self.unpack("Q")
        return self._file.read(length).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("I"), self.unpack("Q")
            if item_kind == _STRING:
                return [self.string() for _ in range(count)]
            fmt = _VALUE_FORMATS[item_kind]
            raw = self._file.read(struct.calcsize(fmt) * count)
            return list(struct.unpack(f"<{count}{fmt}", raw))
        if kind not in _VALUE_FORMATS:
            raise GGUFError(f"unknown GGUF metadata value type {kind}")
        return self.unpack(_VALUE_FORMATS[kind])

    def tell(self) -> int:
        return self._file.tell()


def read_header(path: Path) -> GGUFHeader:
    """The metadata and tensor directory of a GGUF file (no tensor data is read)."""
    with path.open("rb") as file:
        if file.read(4) != _GGUF_MAGIC:
            raise GGUFError(f"{path} is not a GGUF file")
        reader = _HeaderReader(file)
        version = reader.unpack("I")
        if version < 2:
            raise GGUFError(f"{path}: GGUF version {version} is too old (need 2 or later)")
        n_tensors, n_values = reader.unpack("Q"), reader.unpack("Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_values):
            key = reader.string()
            metadata[key] = reader.value(reader.unpack("I"))
        tensors: list[GGUFTensorInfo] = []
        for _ in range(n_tensors):
            name = reader.string()
            dims = [reader.unpack("Q") for _ in range(reader.unpack("I"))]
            kind, offset = reader.unpack("I"), reader.unpack("Q")
            try:
                qtype = GGMLQuantizationType(kind)
            except ValueError as error:
                raise GGUFError(f"{path}: tensor {name} has unknown type {kind}") from error
            tensors.append(GGUFTensorInfo(name, tuple(reversed(dims)), qtype, offset))
        alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-reader.tell() // alignment) * alignment
    return GGUFHeader(metadata, tensors, data_start)


def q8_0_to_mlx(blocks: np.ndarray, shape: tuple[int, ...]) -> tuple[mx.array, ...]:
    """Q8_0 rows (per 32 values: a float16 scale d, then 32 int8 q; value = d·q) as MLX's
    8-bit affine triple with group 32: unsigned q + 128, scale d, bias -128·d. Exact."""
    rows = int(np.prod(shape[:-1]))
    groups = shape[-1] // 32
    raw = np.ascontiguousarray(blocks).reshape(rows, groups, 34)
    scales = raw[:, :, :2].copy().view(np.float16).reshape(rows, groups)
    unsigned = raw[:, :, 2:] ^ np.uint8(0x80)  # int8 bit pattern + 128, as uint8
    packed = np.ascontiguousarray(unsigned).reshape(rows, shape[-1]).view("<u4")
    biases = scales * np.float16(-128.0)  # a power of two: exact in float16
    return (
        mx.array(packed.reshape(*shape[:-1], -1)),
        mx.array(scales.reshape(*shape[:-1], groups)),
        mx.array(biases.reshape(*shape[:-1], groups)),
    )


def _read_tensors(path: Path, header: GGUFHeader) -> dict[str, mx.array]:
    """The file's tensors as MLX arrays: float types as they are, Q8_0 as MLX 8-bit (the
    `.scales`/`.biases` beside the weight, as mx.load names them), the rest dequantized."""
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=header.data_start)
    tensors: dict[str, mx.array] = {}
    for info in header.tensors:
        raw = data[info.offset : info.offset + info.nbytes]
        if info.qtype == GGMLQuantizationType.F32:
            tensors[info.name] = mx.array(raw.view(np.float32).reshape(info.shape))
        elif info.qtype == GGMLQuantizationType.F16:
            tensors[info.name] = mx.array(raw.view(np.float16).reshape(info.shape))
        elif info.qtype == GGMLQuantizationType.Q8_0:
            base = info.name.removesuffix(".weight")
            weight, scales, biases = q8_0_to_mlx(raw, info.shape)
            tensors[info.name] = weight
            tensors[f"{base}.scales"] = scales
            tensors[f"{base}.biases"] = biases
        else:
            rows = raw.reshape(*info.shape[:-1], -1)
            tensors[info.name] = mx.array(dequantize(rows, info.qtype).reshape(info.shape))
    return tensors


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    header = read_header(path)
    if any(info.qtype not in _MLX_READABLE for info in header.tensors):
        return _read_tensors(path, header), header.metadata
    loaded = mx.load(str(path), return_metadata=True)
    if not isinstance(loaded, tuple):
        raise GGUFError(f"{path}: mx.load returned no metadata; is this a GGUF file?")
    tensors, metadata = loaded
    return dict(tensors), dict(metadata)


# ---------------------------------------------------------------- architectures

_Get = Callable[[str, Any], Any]

_LLAMA_NAMES = [
    (r"token_embd", "model.embed_tokens"),
    (r"output_norm", "model.norm"),
    (r"output", "lm_head"),
    (r"blk\.(\d+)\.attn_q", r"model.layers.\1.self_attn.q_proj"),
    (r"blk\.(\d+)\.attn_k", r"model.layers.\1.self_attn.k_proj"),
    (r"blk\.(\d+)\.attn_v", r"model.layers.\1.self_attn.v_proj"),
    (r"blk\.(\d+)\.attn_output", r"model.layers.\1.self_attn.o_proj"),
    (r"blk\.(\d+)\.ffn_gate", r"model.layers.\1.mlp.gate_proj"),
    (r"blk\.(\d+)\.ffn_up", r"model.layers.\1.mlp.up_proj"),
    (r"blk\.(\d+)\.ffn_down", r"model.layers.\1.mlp.down_proj"),
    (r"blk\.(\d+)\.attn_norm", r"model.layers.\1.input_layernorm"),
    (r"blk\.(\d+)\.ffn_norm", r"model.layers.\1.post_attention_layernorm"),
]

# Gemma 3 normalizes before and after both attention and MLP; llama.cpp's `ffn_norm` is
# the one before the MLP there.
_GEMMA3_NAMES = [
    *(entry for entry in _LLAMA_NAMES if "ffn_norm" not in entry[0]),
    (r"blk\.(\d+)\.attn_q_norm", r"model.layers.\1.self_attn.q_norm"),
    (r"blk\.(\d+)\.attn_k_norm", r"model.layers.\1.self_attn.k_norm"),
    (r"blk\.(\d+)\.post_attention_norm", r"model.layers.\1.post_attention_layernorm"),
    (r"blk\.(\d+)\.ffn_norm", r"model.layers.\1.pre_feedforward_layernorm"),
    (r"blk\.(\d+)\.post_ffw_norm", r"model.layers.\1.post_feedforward_layernorm"),
]


def _no_extra_config(_get: _Get, _config: dict[str, Any]) -> dict[str, Any]:
    return {}


def _gemma3_config(get: _Get, config: dict[str, Any]) -> dict[str, Any]:
    """What mlx-lm's gemma3_text needs beyond the common settings, as llama.cpp reads it:
    5 sliding-window layers per global one, local RoPE base 10k, and attention scaled by
    head_dim except in the 27B model (62 layers), which uses hidden/heads."""
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    scalar = config["hidden_size"] // heads if layers == 62 else config["head_dim"]
    extra: dict[str, Any] = {
        "sliding_window": int(get("attention.sliding_window", 512)),
        "sliding_window_pattern": 6,
        "rope_local_base_freq": float(get("rope.freq_base_swa", 10000.0)),
        "query_pre_attn_scalar": float(scalar),
    }
    pattern = get("attention.sliding_window_pattern", None)
    if isinstance(pattern, int):
        extra["sliding_window_pattern"] = pattern
    if get("rope.scaling.type", None) == "linear":
        extra["rope_scaling"] = {"type": "linear", "factor": float(get("rope.scaling.factor", 1))}
    return extra


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one llama.cpp architecture maps onto an mlx-lm model type."""

    model_type: str
    names: list[tuple[str, str]]
    # llama.cpp's converter interleaves Q/K rows for llama's rotary layout only.
    permuted_qk: bool = False
    # Gemma's RMSNorm scales by (1 + w); llama.cpp's converter stores 1 + w, mlx-lm wants w.
    norm_offset: float = 0.0
    # Default head_dim when the file has no key length (rope.dimension_count for llama).
    head_dim_key: str = "rope.dimension_count"
    extra_config: Callable[[_Get, dict[str, Any]], dict[str, Any]] = _no_extra_config


ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture("llama", _LLAMA_NAMES, permuted_qk=True),
    "mistral": GGUFArchitecture("llama", _LLAMA_NAMES, permuted_qk=True),
    "qwen2": GGUFArchitecture("qwen2", _LLAMA_NAMES),
    "gemma3": GGUFArchitecture(
        "gemma3_text",
        _GEMMA3_NAMES,
        norm_offset=1.0,
        head_dim_key="attention.key_length",
        extra_config=_gemma3_config,
    ),
}


def architecture(metadata: dict[str, Any]) -> GGUFArchitecture:
    arch = str(_scalar(metadata.get("general.architecture", "")))
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"GGUF architecture {arch!r} is not supported yet "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[arch]


def gguf_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """An mlx-lm style config.json built from GGUF hyperparameters."""
    arch = str(_scalar(metadata.get("general.architecture", "")))
    spec = architecture(metadata)

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        return _scalar(value)

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab_size = get("vocab_size")
    if vocab_size is None:
        vocab_size = len(metadata["tokenizer.ggml.tokens"])
    config: dict[str, Any] = {
        "model_type": spec.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": int(get(spec.head_dim_key, hidden // n_heads)),
        # GGUF stores eps as float32; round-trip through str keeps 1e-5 exact.
        "rms_norm_eps": float(f"{float(get('attention.layer_norm_rms_epsilon')):.7g}"),
        "vocab_size": int(vocab_size),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "rope_traditional": False,
    }
    config.update(spec.extra_config(get, config))
    return config


def mlx_name(gguf_name: str, spec: GGUFArchitecture = ARCHITECTURES["llama"]) -> str | None:
    """The mlx-lm parameter name for a GGUF tensor name, or None when unused."""
    base, dot, suffix = gguf_name.rpartition(".")
    if base.endswith("rope_freqs"):
        return None  # llama.cpp's precomputed rotary factors; mlx-lm computes its own
    for pattern, replacement in spec.names:
        if re.fullmatch(pattern, base):
            return re.sub(f"^{pattern}$", replacement, base) + dot + suffix
    raise GGUFError(f"unknown GGUF tensor {gguf_name!r}")


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
    tensors: dict[str, mx.array],
    config: dict[str, Any],
    spec: GGUFArchitecture = ARCHITECTURES["llama"],
) -> tuple[dict[str, mx.array], dict[str, dict[str, int]]]:
    """Rename tensors and work out each quantized module's bits and group size."""
    weights: dict[str, mx.array] = {}
    for name, tensor in tensors.items():
        target = mlx_name(name, spec)
        if target is None:
            continue
        if spec.permuted_qk and not target.endswith(".bias"):
            if ".self_attn.q_proj." in target:
                tensor = unpermute_rows(tensor, config["num_attention_heads"])
            elif ".self_attn.k_proj." in target:
                tensor = unpermute_rows(tensor, config["num_key_value_heads"])
        if spec.norm_offset and target.endswith("norm.weight"):
            tensor = tensor.astype(mx.float32) - spec.norm_offset
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


def _byte_level_bpe(metadata: dict[str, Any], tokens: list[str]) -> Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)  # type: ignore[arg-type]
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = _pre_tokenizer(str(metadata.get("tokenizer.ggml.pre", "gpt-2")))
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def sentencepiece_merges(
    tokens: list[str], scores: list[float], token_types: list[int]
) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's BPE encoding over scored pieces.

    SentencePiece repeatedly joins the adjacent pair whose concatenation is the
    highest-scored piece of the vocabulary; as ranked merges that is every split of every
    normal piece into two normal pieces, ranked by the joined piece's score (higher first),
    ties by the pieces' ids.
    """
    normal = {
        token: index
        for index, token in enumerate(tokens)
        if not token_types or token_types[index] == _NORMAL_TOKEN
    }
    ranked: list[tuple[float, int, int]] = []
    for token, index in normal.items():
        score = -scores[index]
        for cut in range(1, len(token)):
            left_id = normal.get(token[:cut])
            if left_id is not None:
                right_id = normal.get(token[cut:])
                if right_id is not None:
                    ranked.append((score, left_id, right_id))
    ranked.sort()
    return [(tokens[left], tokens[right]) for _, left, right in ranked]


def _sentencepiece_bpe(metadata: dict[str, Any], tokens: list[str]) -> Tokenizer:
    """llama.cpp's "llama" tokenizer: SentencePiece BPE with byte fallback, where a space is
    the piece "▁" (no pre-splitting: pieces may span several spaces)."""
    scores = [float(score) for score in _scalar(metadata["tokenizer.ggml.scores"])]
    token_types = list(_scalar(metadata.get("tokenizer.ggml.token_type")) or [])
    vocab = {token: index for index, token in enumerate(tokens)}
    unknown = _scalar(metadata.get("tokenizer.ggml.unknown_token_id"))
    bpe = models.BPE(
        vocab=vocab,
        merges=sentencepiece_merges(tokens, scores, token_types),
        unk_token=tokens[int(unknown)] if unknown is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(bpe)
    add_prefix = bool(_scalar(metadata.get("tokenizer.ggml.add_space_prefix", True)))
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", "▁")]
    if add_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode: list[decoders.Decoder] = [
        decoders.Replace("▁", " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if add_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode)
    return tokenizer


_TOKENIZER_MODELS: dict[str, Callable[[dict[str, Any], list[str]], Tokenizer]] = {
    "gpt2": _byte_level_bpe,
    "llama": _sentencepiece_bpe,
}


def gguf_tokenizer(metadata: dict[str, Any]) -> tuple[Tokenizer, list[int]]:
    """A `tokenizers` tokenizer rebuilt from the GGUF vocabulary (and merges or scores).

    Returns the tokenizer and the ids that are added (special) tokens.
    """
    kind = str(_scalar(metadata.get("tokenizer.ggml.model")))
    if kind not in _TOKENIZER_MODELS:
        raise GGUFError(
            f"GGUF tokenizer model {kind!r} is not supported yet (supported: byte-level BPE "
            "'gpt2', SentencePiece 'llama')"
        )
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    tokenizer = _TOKENIZER_MODELS[kind](metadata, tokens)

    token_types = _scalar(metadata.get("tokenizer.ggml.token_type")) or []
    added_ids = [
        index
        for index, kind_id in enumerate(token_types)
        if kind_id in (_CONTROL_TOKEN, _USER_DEFINED_TOKEN)
    ]
    # Control tokens are special (skipped when decoding); user-defined ones (Gemma's runs of
    # spaces and newlines) are text that is always one token.
    for kind_id, add in ((_CONTROL_TOKEN, True), (_USER_DEFINED_TOKEN, False)):
        chosen = [
            AddedToken(tokens[index], special=add, normalized=False)
            for index in added_ids
            if token_types[index] == kind_id
        ]
        if add:
            tokenizer.add_special_tokens(chosen)
        else:
            tokenizer.add_tokens(chosen)
    return tokenizer, added_ids


# Gemma's turn format, for GGUFs converted without a template (base models): a system
# message opens the first user turn, the assistant's role is "model".
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set system = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system.text = message['content'] + '\n\n' %}"
    "{% else %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n"
    "{{ system.text }}{% set system.text = '' %}{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_DEFAULT_TEMPLATES = {"gemma3_text": GEMMA_CHAT_TEMPLATE}


def load_gguf(path: Path) -> GGUFModel:
    tensors, metadata = read_gguf(path)
    config = gguf_config(metadata)
    weights, quantization = gguf_weights(tensors, config, architecture(metadata))
    del tensors
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
    template = metadata.get("tokenizer.chat_template") or _DEFAULT_TEMPLATES.get(
        config["model_type"]
    )
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
