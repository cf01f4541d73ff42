"""Slicing a model for tensor parallelism, and the all-reduce, on a small random llama.

Members run on threads of this process and deliver partials to each other directly; the
sum of their outputs must be the full model's (to float32 rounding), dense and quantized.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from exo_tools.engine.tensor_parallel import CollectiveError, TensorCollective, TensorShardModel
from exo_tools.models.tensor_slicing import (
    TensorPlanError,
    check_tensor_slice,
    narrow_attention,
    slice_weights,
)
from exo_tools.types import Partial, Shard, TensorSlice

CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 5,
    "intermediate_size": 256,
    "num_attention_heads": 6,
    "num_key_value_heads": 3,
    "head_dim": 32,
    "rms_norm_eps": 1e-5,
    "vocab_size": 97,
    "tie_word_embeddings": True,
}
GROUP = {"bits": 4, "group_size": 32}


def build(config: dict[str, Any], quantized: bool) -> nn.Module:
    model = llama.Model(llama.ModelArgs.from_dict(config))
    if quantized:
        nn.quantize(model, group_size=GROUP["group_size"], bits=GROUP["bits"])
    return model


def flat(model: nn.Module) -> dict[str, mx.array]:
    return dict(cast(list[tuple[str, mx.array]], tree_flatten(model.parameters())))


def member_model(
    full: dict[str, mx.array], part: TensorSlice, quantized: bool
) -> tuple[nn.Module, dict[str, dict[str, int]]]:
    weights = dict(full)
    quant = {
        name.removesuffix(".scales"): dict(GROUP) for name in weights if name.endswith(".scales")
    }
    block_quant = {m: q for m, q in quant.items() if ".layers." in m}

    def dense(module: str) -> None:
        params = block_quant.pop(module)
        weights[f"{module}.weight"] = mx.dequantize(
            weights[f"{module}.weight"],
            weights.pop(f"{module}.scales"),
            weights.pop(f"{module}.biases"),
            group_size=params["group_size"],
            bits=params["bits"],
        )

    slice_weights(weights, block_quant, CONFIG, part, dense)
    # Built from the whole config, its attention narrowed to the member's heads, as the
    # loader does; the cut weights replace the whole ones.
    model = llama.Model(llama.ModelArgs.from_dict(CONFIG))
    narrow_attention(model.model.layers, CONFIG, part)
    if quantized:
        kept = {**block_quant, **{m: q for m, q in quant.items() if ".layers." not in m}}
        nn.quantize(model, class_predicate=lambda path, _module: kept.get(path, False))
    assert {name for name, _ in tree_flatten(model.parameters())} == set(weights)
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())  # on this thread's stream, before members run on theirs
    return model, block_quant


def run_members(
    full: dict[str, mx.array], parts: list[TensorSlice], tokens: mx.array, quantized: bool
) -> tuple[mx.array, list[TensorCollective]]:
    collectives: list[TensorCollective] = []

    def send_to(peer: int, message: Partial) -> None:
        collectives[peer].deliver(message)

    members = []
    for part in parts:
        collective = TensorCollective(rank=part.rank, size=len(parts), epoch=1, send=send_to)
        collectives.append(collective)
        model, _ = member_model(full, part, quantized)
        members.append(
            TensorShardModel(
                model, Shard.full("tiny", CONFIG["num_hidden_layers"]), part, collective
            )
        )
    outputs: list[Any] = [None] * len(parts)
    # Rank 0 embeds and hands the first block's input on, as its driver does.
    handed: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def hand_on(hidden: mx.array) -> None:
        mx.eval(hidden)
        for _ in parts[1:]:
            handed.put(hidden)

    def run(rank: int) -> None:
        member = members[rank]
        member.collective.begin("request", 1)
        with mx.stream(mx.new_stream(mx.cpu)):
            if rank == 0:
                out = member.forward(tokens, member.make_cache(), input_tap=hand_on)
            else:
                out = member.forward(handed.get(timeout=60), member.make_cache())
            mx.eval(out)
        outputs[rank] = out

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(len(parts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outputs[0], collectives


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize(
    "parts",
    [
        # 3 KV heads over 2 members: uneven, and MLP cut at 64 or 96 columns.
        [TensorSlice(0, 2, 0, 1, 0, 64), TensorSlice(1, 2, 1, 3, 64, 256)],
        [TensorSlice(0, 2, 0, 2, 0, 96), TensorSlice(1, 2, 2, 3, 96, 256)],
        # Off a quantization group boundary: that projection is made dense first.
        [TensorSlice(0, 2, 0, 1, 0, 48), TensorSlice(1, 2, 1, 3, 48, 256)],
        [
            TensorSlice(0, 3, 0, 1, 0, 64),
            TensorSlice(1, 3, 1, 2, 64, 192),
            TensorSlice(2, 3, 2, 3, 192, 256),
        ],
    ],
)
def test_members_sum_to_the_full_model(parts: list[TensorSlice], quantized: bool) -> None:
    mx.random.seed(0)
    model = build(CONFIG, quantized)
    full = flat(model)
    mx.eval(list(full.values()))
    tokens = mx.array([[5, 17, 3, 42, 8]])
    expected = model(tokens)
    got, collectives = run_members(full, parts, tokens, quantized)
    assert got.shape == expected.shape
    assert mx.allclose(got, expected, atol=1e-4, rtol=1e-4).item()
    # Every layer's two phases, each member once.
    calls = 2 * CONFIG["num_hidden_layers"]
    assert all(len(c.latencies_us) == calls for c in collectives)


def test_member_holds_only_its_slice() -> None:
    mx.random.seed(0)
    full = flat(build(CONFIG, quantized=False))
    part = TensorSlice(1, 2, 1, 3, 64, 256)
    model, _ = member_model(full, part, quantized=False)
    weights = flat(model)
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 128)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 32, 128)
    assert weights["model.layers.0.self_attn.o_proj.weight"].shape == (128, 4 * 32)
    assert weights["model.layers.0.mlp.gate_proj.weight"].shape == (192, 128)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (128, 192)


def test_quantized_cut_off_a_group_boundary_is_made_dense_first() -> None:
    mx.random.seed(0)
    full = flat(build(CONFIG, quantized=True))
    # Column 48 is not a multiple of the group size (32): down_proj must be made dense.
    part = TensorSlice(0, 2, 0, 1, 0, 48)
    _, quantized = member_model(full, part, quantized=True)
    assert "model.layers.0.mlp.down_proj" not in quantized
    assert "model.layers.0.mlp.gate_proj" in quantized


def test_impossible_slices_are_refused() -> None:
    with pytest.raises(TensorPlanError, match="KV heads"):
        check_tensor_slice(CONFIG, TensorSlice(0, 2, 0, 4, 0, 64))
    with pytest.raises(TensorPlanError, match="MLP columns"):
        check_tensor_slice(CONFIG, TensorSlice(0, 2, 0, 1, 0, 512))


def test_an_aborted_collective_wakes_its_waiter() -> None:
    collective = TensorCollective(rank=0, size=2, epoch=1, send=lambda peer, message: None)
    collective.begin("request", 1)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            collective.all_reduce(mx.zeros((1, 1, 4)), 0, 0)
        except CollectiveError as error:
            errors.append(error)

    thread = threading.Thread(target=wait)
    thread.start()
    collective.abort("the all-reduce stream to node b broke")
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert "node b broke" in str(errors[0])
    # A peer's error message fails the next call at once too.
    peer = TensorCollective(rank=1, size=2, epoch=1, send=lambda peer, message: None)
    peer.deliver(Partial("", 0, 0, 0, 0, rank=0, error="member 0 failed"))
    with pytest.raises(CollectiveError, match="member 0 failed"):
        peer.all_reduce(mx.zeros((1, 1, 4)), 0, 0)
