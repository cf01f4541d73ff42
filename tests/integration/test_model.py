"""The default model loaded in-process: GGUF conversion, tokenizer, HF folder and cache sources."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from exo_tools.engine.shard import ShardModel
from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID, HFFolderSource, resolve_model
from exo_tools.models.gguf import read_gguf
from exo_tools.models.loader import LoadedModel, load_model, parameter_arrays
from exo_tools.types import Shard
from tests.helpers.model_export import export_hf_folder
from tests.helpers.nodes import node_environment, start_node

pytestmark = pytest.mark.slow
CARD = CATALOG[DEFAULT_MODEL_ID]


@pytest.fixture(scope="module")
def loaded(model_path: Path) -> LoadedModel:
    return load_model(CARD, model_path, dtype="float32", progress=False)


def greedy(loaded: LoadedModel, question: str, max_tokens: int = 24) -> list[int]:
    tokenizer = loaded.tokenizer
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": question}])
    )
    model = ShardModel(loaded.model, loaded.shard)
    cache = model.make_cache()
    out: list[int] = []
    inputs = mx.array(prompt)[None]
    for _ in range(max_tokens):
        token = int(mx.argmax(model.forward(inputs, cache)[:, -1, :], axis=-1).item())
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
        inputs = mx.array([[token]])
    return out


def test_hyperparameters_from_gguf(loaded: LoadedModel) -> None:
    config = loaded.config
    assert config["hidden_size"] == 576
    assert config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["head_dim"] == 64
    assert config["intermediate_size"] == 1536
    assert config["rope_theta"] == 100000.0
    assert config["vocab_size"] == 49152
    assert config["max_position_embeddings"] == 8192
    assert config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is True


def test_tokenizer_matches_gguf_vocabulary(loaded: LoadedModel, model_path: Path) -> None:
    _, metadata = read_gguf(model_path)
    vocab: list[str] = metadata["tokenizer.ggml.tokens"]
    tokenizer = loaded.tokenizer
    # Whole words that are single entries in the vocabulary encode to exactly that entry.
    for word in [" the", " capital", " France", "Hello", " Paris"]:
        entry = word.replace(" ", "\u0120")
        assert tokenizer.encode(word) == [vocab.index(entry)], word
    # Digits are split one by one before BPE.
    assert [vocab[i] for i in tokenizer.encode("2024")] == ["2", "0", "2", "4"]
    assert [vocab[i] for i in tokenizer.encode(" 42")] == ["\u0120", "4", "2"]
    # Control tokens are single special tokens and skipped when decoding.
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids) == "user\nHi"
    assert tokenizer.eos_token_ids == frozenset({0, 2})
    # Byte-level round trip, including characters split across tokens.
    for text in ["naïve café — 東京 🚀", "def f(x):\n    return x * 2\n", "  spaces\ttabs"]:
        encoded = tokenizer.encode(text)
        assert all(0 <= i < len(vocab) for i in encoded)
        assert tokenizer.decode(encoded) == text


def test_chat_template_from_metadata(loaded: LoadedModel) -> None:
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_answers_capital_of_france(loaded: LoadedModel) -> None:
    answer = loaded.tokenizer.decode(greedy(loaded, "What is the capital of France?"))
    assert "Paris" in answer


def test_quantized_weights_give_the_same_answer(model_path: Path) -> None:
    quantized = load_model(CARD, model_path, dtype="native", progress=False)
    assert quantized.dtype == "native"
    assert quantized.weight_bytes < 150e6
    answer = quantized.tokenizer.decode(greedy(quantized, "What is the capital of France?"))
    assert "Paris" in answer


def test_shard_holds_only_its_layers(model_path: Path) -> None:
    middle = load_model(
        CARD, model_path, shard=Shard(CARD.id, 10, 20, 30), dtype="float32", progress=False
    )
    names = [name for name, _ in parameter_arrays(middle.model)]
    assert not any(name.startswith(("model.embed_tokens", "model.norm")) for name in names)
    # Layers keep their positions in the model (the model's own code indexes them).
    assert {int(name.split(".")[2]) for name in names if ".layers." in name} == set(range(10, 20))


def test_hf_folder_source_matches_gguf(loaded: LoadedModel, tmp_path: Path) -> None:
    folder = tmp_path / "SmolLM2-export"
    export_hf_folder(loaded, folder)
    card = resolve_model(str(folder))
    assert isinstance(card.source, HFFolderSource)
    from_folder = load_model(card, folder, dtype="float32", progress=False)
    question = "Write a haiku about the sea."
    assert greedy(from_folder, question) == greedy(loaded, question)


def test_node_serves_a_repo_from_the_hf_cache(loaded: LoadedModel, tmp_path: Path) -> None:
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--exo-test--smollm2"
    export_hf_folder(loaded, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    env = node_environment()
    env.update({"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    show = subprocess.run(
        [sys.executable, "-m", "exo_tools", "models", "show", "exo-test/smollm2"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert revision in json.loads(show.stdout)["local_path"]
    node = start_node("--model", "exo-test/smollm2", env=env)
    try:
        import requests

        reply = requests.post(
            f"{node.url}/v1/chat/completions",
            json={
                "model": "exo-test/smollm2",
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0,
            },
            timeout=120,
        ).json()
        assert "Paris" in reply["choices"][0]["message"]["content"]
    finally:
        node.stop()
