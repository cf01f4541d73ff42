"""Model families served by a real 2-node pipeline, greedy output identical to mlx-lm.

Tiny random-weight models of mlx-lm's own classes (tests/helpers/tiny_models.py) for the
families whose split is hardest (a mixture of experts; sliding-window and global layers;
sinks with per-layer-type masks), and a 4-bit MLX-format folder written by mlx-lm's own
quantize and save: each is served by two node processes (`--model FOLDER`), and the
cluster's greedy reply equals mlx-lm's `generate_step` in one process on the same folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import pytest
import requests
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model as mlx_lm_load_model

from exo_tools.models.catalog import resolve_model
from exo_tools.models.gguf import gguf_tokenizer, read_gguf
from exo_tools.models.tokenizer import TextTokenizer
from tests.helpers.cluster_runs import start_cluster
from tests.helpers.tiny_models import write_tiny_model

pytestmark = pytest.mark.slow
MAX_TOKENS = 10
PROMPTS = ["What is the capital of France?", "List three prime numbers."]
# (architecture, bits): bits=None is float32, 4 is mlx-lm's 4-bit, served as it is.
MODELS = [("qwen3_moe", None), ("gemma3_text", None), ("gpt_oss", None), ("llama", 4)]


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> TextTokenizer:
    _, metadata = read_gguf(model_path)
    backend, _ = gguf_tokenizer(metadata)
    template = str(metadata["tokenizer.chat_template"])
    return TextTokenizer(backend, bos_token_id=None, eos_token_ids=[2], chat_template=template)


@pytest.fixture(scope="module", params=MODELS, ids=lambda m: f"{m[0]}-{m[1] or 32}bit")
def served(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tokenizer: TextTokenizer,
) -> Iterator[tuple[Path, str]]:
    architecture, bits = request.param
    folder = write_tiny_model(
        architecture, tmp_path_factory.mktemp("models") / architecture, tokenizer, bits=bits
    )
    dtype = "native" if bits else "float32"
    cluster = start_cluster(2, "--model", str(folder), "--dtype", dtype)
    try:
        yield folder, cluster.master.url
    finally:
        cluster.stop()


def mlx_lm_greedy(folder: Path, prompt: str) -> str:
    """mlx-lm's own greedy generation on one process, through the folder's template."""
    text = TextTokenizer.from_hf_folder(folder)
    ids = text.encode(
        text.apply_chat_template([{"role": "user", "content": prompt}]), add_special_tokens=True
    )
    model, _ = mlx_lm_load_model(folder)
    tokens: list[int] = []
    for token, _ in generate_step(mx.array(ids), model, max_tokens=MAX_TOKENS):
        value = int(token)
        if value in text.eos_token_ids:
            break
        tokens.append(value)
    return text.decode(tokens)


def test_two_node_pipeline_is_identical_to_mlx_lm(served: tuple[Path, str]) -> None:
    folder, url = served
    model_id = resolve_model(str(folder)).id
    placement = requests.get(f"{url}/v1/cluster", timeout=10).json()["placement"]
    layers = [(stage["start_layer"], stage["end_layer"]) for stage in placement["stages"]]
    assert len(layers) == 2 and layers[0][0] == 0 and layers[0][1] == layers[1][0], layers
    for prompt in PROMPTS:
        body = {
            "model": model_id,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        content = reply.json()["choices"][0]["message"]["content"]
        assert content == mlx_lm_greedy(folder, prompt), json.dumps(reply.json())
