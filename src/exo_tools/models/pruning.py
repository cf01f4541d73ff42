"""Which parts of a model a node holds, and standing in for the parts it does not.

A shard's model object keeps every layer position and module of the architecture, so the
model's own forward code runs unchanged (exo_tools.engine.shard). What the node does not
hold is never loaded nor evaluated (MLX's parameters are lazy until evaluated, so the
unloaded ones take no memory) and is replaced, after loading, by a stand-in:

- a layer of another stage becomes a `SkippedLayer`: it passes the hidden state through and
  answers the model's questions about the layer (its attention type, whether it is linear);
- any other module not held becomes an `UnheldModule`, which fails clearly if called.

Stand-ins are plain objects, not modules, so they have no parameters to count or load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..types import Shard, TensorSlice


class SkippedLayer:
    """A layer another stage computes."""

    def __init__(self, layer: Any, position: int) -> None:
        self._layer = layer
        self.position = position

    def __getattr__(self, name: str) -> Any:
        return getattr(self._layer, name)

    def __call__(self, hidden: Any, *args: Any, **kwargs: Any) -> Any:
        return hidden


class UnheldModule:
    """A module this node does not hold (an output head on a middle stage, say)."""

    def __init__(self, path: str, *, is_embedding: bool = False) -> None:
        self.path = path
        self.is_embedding = is_embedding

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.path} is not held by this node")


_EMBEDDINGS = (nn.Embedding, nn.QuantizedEmbedding)


def embedding_key(inner: nn.Module) -> str | None:
    """The key of the token embedding among the inner model's children (held or not)."""
    for key, value in inner.items():
        if isinstance(value, _EMBEDDINGS) or (
            isinstance(value, UnheldModule) and value.is_embedding
        ):
            return key
    return None


def layers_path(model: nn.Module) -> str | None:
    """The dotted path of the module that holds the model's list of layers ("model" for
    most mlx-lm models, "language_model.model" for Llama 4), found breadth first."""
    frontier: list[tuple[str, nn.Module]] = [("", model)]
    for _ in range(4):
        found: list[tuple[str, nn.Module]] = []
        for path, module in frontier:
            layers = module.get("layers")
            if path and isinstance(layers, list) and layers:
                return path
            for key, child in module.items():
                if isinstance(child, nn.Module):
                    found.append((f"{path}.{key}" if path else key, child))
        frontier = found
    return None


def module_at(model: nn.Module, path: str) -> Any:
    module: Any = model
    for key in path.split("."):
        module = module[key]
    return module


def layer_position(name: str, inner: str = "model") -> int | None:
    """The layer position of a parameter named "<inner>.layers.N....", else None."""
    prefix = f"{inner}.layers."
    if not name.startswith(prefix):
        return None
    position = name[len(prefix) :].split(".", 1)[0]
    return int(position) if position.isdigit() else None


@dataclass(frozen=True)
class Holding:
    """What of a model one node holds: its shard's layers, maybe the token embedding, and
    on the last stage the final norm and output head."""

    shard: Shard
    inner: str  # the path of the module holding the layers
    embedding_prefix: str  # e.g. "model.embed_tokens."
    embedding: bool
    head: bool

    @classmethod
    def of(
        cls,
        shard: Shard,
        inner: str,
        embedding_prefix: str,
        tied: bool,
        tensor: TensorSlice | None,
    ) -> Holding:
        # Tensor members other than rank 0 neither embed nor sample.
        bare = tensor is not None and not tensor.is_root
        return cls(
            shard,
            inner,
            embedding_prefix,
            embedding=not bare and (shard.is_first or (tied and shard.is_last)),
            head=not bare and shard.is_last,
        )

    def holds(self, name: str) -> bool:
        """Whether the parameter `name` (of the whole model) is held."""
        position = layer_position(name, self.inner)
        if position is not None:
            return self.shard.contains(position)
        if name.startswith(self.embedding_prefix):
            return self.embedding
        # The final norm, the output head and whatever else is outside the layers run
        # after them: the last stage's. (A model with another module before its layers
        # fails on the first stage with that module's name, never silently.)
        return self.head


def is_output_head(name: str) -> bool:
    """The output projection (vocabulary x hidden): only the last stage holds it."""
    return name.startswith("lm_head.") or ".lm_head." in name


def stand_in(model: nn.Module, holding: Holding) -> None:
    """Replace every layer and module the node does not hold by its stand-in."""
    layers: list[Any] = module_at(model, holding.inner)["layers"]
    for position, layer in enumerate(layers):
        if not holding.shard.contains(position):
            layers[position] = SkippedLayer(layer, position)
    _stand_in_modules(model, "", holding)


def _stand_in_modules(module: nn.Module, prefix: str, holding: Holding) -> None:
    for key, value in list(module.items()):
        path = f"{prefix}{key}"
        if not isinstance(value, nn.Module) or path == f"{holding.inner}.layers":
            continue
        names = [f"{path}.{name}" for name, _ in parameter_arrays(value)]
        if names and not any(holding.holds(name) for name in names):
            module[key] = UnheldModule(
                path, is_embedding=f"{path}.".startswith(holding.embedding_prefix)
            )
        elif f"{holding.inner}.".startswith(f"{path}."):
            # On the way to the layers' module: look inside.
            _stand_in_modules(value, f"{path}.", holding)


def parameter_arrays(module: nn.Module) -> list[tuple[str, mx.array]]:
    """Every parameter of a module, by dotted name (stand-ins have none)."""
    flat = cast(list[tuple[str, Any]], tree_flatten(module.parameters()))
    return [(name, value) for name, value in flat if isinstance(value, mx.array)]
