"""The wire formats: activations (raw bytes + dtype + shape, bfloat16 included), sampling
parameters and packed steps."""

from __future__ import annotations

import mlx.core as mx
import pytest

from exo_tools.cluster.wire import (
    sampling_from_proto,
    sampling_to_proto,
    stage_message_from_proto,
    stage_message_to_proto,
    tensor_from_proto,
    tensor_to_proto,
)
from exo_tools.engine.batching import packed_lengths, packed_segments, packed_steps
from exo_tools.engine.tensors import from_wire, to_wire
from exo_tools.proto import node_pb2
from exo_tools.types import Forward, SamplingParams


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16, mx.int32, mx.uint32])
def test_round_trip_is_exact(dtype: mx.Dtype) -> None:
    array = (mx.random.normal((2, 3, 5)) * 100).astype(dtype)
    wire = tensor_to_proto(to_wire(array))
    assert list(wire.shape) == [2, 3, 5]
    assert len(wire.data) == array.size * array.itemsize
    back = from_wire(tensor_from_proto(node_pb2.Tensor.FromString(wire.SerializeToString())))
    assert back.dtype == dtype
    assert back.shape == array.shape
    assert mx.array_equal(back, array).item()


def test_bfloat16_keeps_its_bits() -> None:
    # Values that need bfloat16's last mantissa bit and its float32-sized exponent range;
    # numpy has no bfloat16, so the wire carries the raw 2-byte patterns.
    array = mx.array([1.0 + 2**-7, -3.5, 3.0e38], dtype=mx.bfloat16)
    wire = to_wire(array)
    assert wire.dtype == "bfloat16"
    assert len(wire.data) == 6
    assert mx.array_equal(from_wire(wire), array).item()


def test_unknown_dtype_is_refused_on_both_ends() -> None:
    with pytest.raises(ValueError, match="complex64"):
        to_wire(mx.array([1 + 2j], dtype=mx.complex64))
    with pytest.raises(ValueError, match="float8"):
        from_wire(tensor_from_proto(node_pb2.Tensor(data=b"\0", dtype="float8", shape=[1])))


def test_sampling_params_cross_the_wire_whole() -> None:
    """Every field the sampling stage needs arrives as the API node set it."""
    for params in (
        SamplingParams(),
        SamplingParams(
            temperature=0.2,
            top_p=0.9,
            top_k=40,
            repetition_penalty=1.3,
            dry_multiplier=0.8,
            dry_base=2.0,
            dry_allowed_length=3,
            wrap_up_after=48,
            seed=7,
            constraint="{}",
            logprobs=True,
            top_logprobs=2,
        ),
    ):
        assert sampling_from_proto(sampling_to_proto(params)) == params


def test_a_packed_forward_crosses_the_wire_whole() -> None:
    """A packed batched step keeps its rows, its chunk's length and its hidden state."""
    hidden = mx.arange(5 * 4, dtype=mx.float32).reshape(1, 5, 4)
    message = Forward("a", 3, 7, to_wire(hidden), sample=True, rows=["a", "b", "c"], chunk_tokens=3)
    back = stage_message_from_proto(stage_message_to_proto(message))
    assert isinstance(back, Forward)
    assert (back.rows, back.chunk_tokens, back.sample, back.step) == (["a", "b", "c"], 3, True, 7)
    assert mx.array_equal(from_wire(back.hidden), hidden).item()


def test_packed_segments_keep_the_rows_asked_for() -> None:
    """A stage that lost one request of a packed step passes on the others' segments."""
    hidden = mx.arange(6, dtype=mx.float32).reshape(1, 6, 1)  # steps 0, 1; chunk 2..5
    lengths = packed_lengths(2, 4)
    assert packed_segments(hidden, lengths, [1, 2]).reshape(-1).tolist() == [1, 2, 3, 4, 5]
    steps = packed_steps(packed_segments(hidden, lengths, [0, 1]), 2)
    assert steps.shape == (2, 1, 1)
    assert steps.reshape(-1).tolist() == [0, 1]
