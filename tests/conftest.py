from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.nodes import NodeProcess, shared_models_dir, start_node


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The default model's GGUF file, fetched into the shared test store if missing."""
    from exo_tools.models import sources
    from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID

    return sources.fetch(CATALOG[DEFAULT_MODEL_ID], shared_models_dir(), progress=False)


@pytest.fixture(scope="session")
def node(model_path: Path) -> Iterator[NodeProcess]:
    """One real node process serving the default model, shared by the API tests."""
    process = start_node()
    yield process
    process.stop()
