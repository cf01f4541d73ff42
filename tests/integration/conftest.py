"""Fixtures shared by the parallelism tests (pipeline and tensor) and the in-process stage
tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from exo_tools.engine.shard import ShardModel
from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
from exo_tools.models.loader import load_model, model_layout
from exo_tools.models.tokenizer import TextTokenizer
from exo_tools.types import Shard
from tests.helpers.cluster_runs import MAX_TOKENS, MODEL, PROMPTS, TOP_LOGPROBS, user
from tests.helpers.mlx_lm_reference import reference_run


@pytest.fixture(scope="session")
def reference_runs(model_path: Path) -> dict[str, dict[str, Any]]:
    """mlx-lm's own greedy tokens for each prompt, with the log-probabilities of the first
    positions (float32, like the nodes on this CPU)."""
    cases = [
        {"messages": user(p), "max_tokens": MAX_TOKENS, "top_logprobs": TOP_LOGPROBS}
        for p in PROMPTS
    ]
    return dict(zip(PROMPTS, reference_run(model_path, "float32", cases), strict=True))


@pytest.fixture(scope="session")
def reference(reference_runs: dict[str, dict[str, Any]]) -> dict[str, list[int]]:
    return {prompt: run["tokens"] for prompt, run in reference_runs.items()}


@pytest.fixture(scope="session")
def tokenizer(model_path: Path) -> TextTokenizer:
    return load_model(CATALOG[MODEL], model_path, dtype="native", progress=False).tokenizer


@pytest.fixture(scope="module")
def halves(model_path: Path) -> tuple[ShardModel, ShardModel]:
    """The real default model split in two stages (float32), for in-process stage tests."""
    card = CATALOG[DEFAULT_MODEL_ID]
    n_layers = model_layout(card, model_path).n_layers
    middle = n_layers // 2
    models = []
    for start, end in [(0, middle), (middle, n_layers)]:
        shard = Shard(DEFAULT_MODEL_ID, start, end, n_layers)
        loaded = load_model(card, model_path, shard=shard, dtype="float32", progress=False)
        models.append(ShardModel(loaded.model, loaded.shard))
    return models[0], models[1]
