"""The package's shared vocabulary: plain types every layer may use.

This module imports nothing else of exo_tools, so any package can depend on it without
depending on another's internals. It names what a node holds (`Shard`, `TensorSlice`),
what placement needs to know of a model (`ModelLayout`), how a request samples
(`SamplingParams`), what the engine tells serving about a request (`TokenEvent`,
`FinishEvent`, `ErrorEvent` through a `GenerationHandle`), and the data-plane messages
between stages (`Forward`, `SampledToken`, `Release`, `Failure`, `Partial`), which the
cluster layer's wire module turns into protos and back, and an API request relayed to
another node (`RelayedResponse`, `RelayError`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, Protocol

# ---------------------------------------------------------------- what a node holds


@dataclass(frozen=True)
class TensorSlice:
    """A tensor member's share: KV heads [kv_head_start, kv_head_end) with their query
    heads, and MLP columns [mlp_start, mlp_end)."""

    rank: int
    size: int
    kv_head_start: int
    kv_head_end: int
    mlp_start: int
    mlp_end: int

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def n_kv_heads(self) -> int:
        return self.kv_head_end - self.kv_head_start

    @property
    def n_mlp_columns(self) -> int:
        return self.mlp_end - self.mlp_start


@dataclass(frozen=True)
class Shard:
    """What of a model one node computes: layers [start_layer, end_layer) of a model with
    n_layers, and with `tensor` only its slice of each of those layers."""

    model_id: str
    start_layer: int
    end_layer: int
    n_layers: int
    tensor: TensorSlice | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.start_layer < self.end_layer <= self.n_layers:
            raise ValueError(
                f"invalid shard [{self.start_layer}, {self.end_layer}) of {self.n_layers} layers"
            )

    @classmethod
    def full(cls, model_id: str, n_layers: int, tensor: TensorSlice | None = None) -> Shard:
        return cls(model_id, 0, n_layers, n_layers, tensor)

    @property
    def is_first(self) -> bool:
        return self.start_layer == 0

    @property
    def is_last(self) -> bool:
        return self.end_layer == self.n_layers

    @property
    def n_local_layers(self) -> int:
        return self.end_layer - self.start_layer

    def contains(self, layer: int) -> bool:
        return self.start_layer <= layer < self.end_layer

    def describe(self) -> str:
        """What of the model this shard holds, in words."""
        part = self.tensor
        if part is None:
            return f"layers [{self.start_layer}, {self.end_layer})"
        return (
            f"KV heads [{part.kv_head_start}, {part.kv_head_end}) and MLP columns "
            f"[{part.mlp_start}, {part.mlp_end})"
        )


@dataclass(frozen=True)
class ModelLayout:
    """The sizes placement needs, in bytes at the dtype the nodes will load."""

    model_id: str
    n_layers: int
    layer_bytes: int  # one transformer block
    embed_bytes: int  # token embedding (first stage; also the last when tied)
    head_bytes: int  # final norm + untied output head (last stage)
    tied_embeddings: bool
    kv_bytes_per_token: int  # per layer: keys + values of one token
    kv_budget_tokens: int  # tokens of KV cache each stage must have room for
    # For tensor slicing (0 when unknown): per-layer bytes of the attention projections and
    # of the MLP, and the dimensions they are cut along.
    n_kv_heads: int = 0
    intermediate_size: int = 0
    attention_bytes: int = 0
    mlp_bytes: int = 0
    # Each layer's own weights when they differ (MoE and dense layers in one model); empty
    # means every layer weighs `layer_bytes`.
    per_layer_bytes: tuple[int, ...] = ()
    # Why the model's blocks cannot be tensor-split ("" when they can), with its type.
    model_type: str = ""
    tensor_refusal: str = ""

    def layer_weights(self, start: int, end: int) -> int:
        """The weights of layers [start, end)."""
        if self.per_layer_bytes:
            return sum(self.per_layer_bytes[start:end])
        return (end - start) * self.layer_bytes

    def stage_bytes(self, start: int, end: int) -> int:
        """Weights plus the KV budget of a stage holding layers [start, end)."""
        kv = (end - start) * self.kv_bytes_per_token * self.kv_budget_tokens
        total = self.layer_weights(start, end) + kv
        if start == 0:
            total += self.embed_bytes
        if end == self.n_layers:
            total += self.head_bytes
            if self.tied_embeddings and start != 0:
                total += self.embed_bytes
        return total

    def tensor_weight_bytes(self, part: TensorSlice) -> int:
        """The weights of a tensor member holding `part`."""
        rest = self.layer_bytes - self.attention_bytes - self.mlp_bytes  # norms, replicated
        per_layer = (
            rest
            + self.attention_bytes * part.n_kv_heads // self.n_kv_heads
            + self.mlp_bytes * part.n_mlp_columns // self.intermediate_size
        )
        total = self.n_layers * per_layer
        if part.is_root:
            total += self.embed_bytes + self.head_bytes
        return total

    def tensor_bytes(self, part: TensorSlice) -> int:
        """Weights plus the KV budget of a tensor member holding `part`."""
        kv = self.n_layers * self.kv_bytes_per_token * self.kv_budget_tokens * part.n_kv_heads
        return self.tensor_weight_bytes(part) + kv // self.n_kv_heads

    def shard_bytes(self, shard: Shard) -> int:
        """Weights plus the KV budget of a node holding `shard`."""
        if shard.tensor is not None:
            return self.tensor_bytes(shard.tensor)
        return self.stage_bytes(shard.start_layer, shard.end_layer)


class Parallelism(StrEnum):
    """How the master splits a model (`--parallelism`); AUTO lets it choose."""

    AUTO = "auto"
    PIPELINE = "pipeline"
    TENSOR = "tensor"


# ---------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # sample among the k most likely tokens (0: all)
    # > 1 makes the tokens among the last REPETITION_WINDOW generated less likely (as
    # vLLM's and llama.cpp's `repetition_penalty`); 1: off.
    repetition_penalty: float = 1.0
    # DRY ("don't repeat yourself", llama.cpp's and koboldcpp's sampler): a token that would
    # extend a repeat of an earlier run of generated tokens, at least `dry_allowed_length`
    # long, loses `dry_multiplier * dry_base ** (length - dry_allowed_length)` of its logit.
    # It breaks the verbatim loops small models fall into; 0: off.
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    # Once this many tokens are generated, the answer ends at its next sentence or line
    # end (the end-of-turn token is forced there; from 1.5 times as many, at any word end)
    # instead of running on to max_tokens: small models' answers often run on. 0: off.
    # Never applied under a constraint.
    wrap_up_after: int = 0
    seed: int | None = None
    # A grammar constraint for this request (see exo_tools.constraints), as its serialized
    # spec so it can travel to whichever node samples; None = unconstrained.
    constraint: str | None = None
    # Report the sampled token's log-probability and this many top alternatives
    # (OpenAI `logprobs` / `top_logprobs`), from the model's own distribution.
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's log-probability and the most likely tokens with theirs."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


# ---------------------------------------------------------------- one request's events

# "stop": end of sequence; "length": max_tokens; "cancelled": the consumer went away.
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class PromptEvent:
    """The prompt is in, before the first token: how much of it the prefix cache served."""

    cached_tokens: int


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@dataclass(frozen=True)
class FinishEvent:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    failovers: int = 0  # times it resumed on a new placement after losing its own


@dataclass(frozen=True)
class ErrorEvent:
    message: str


RequestEvent = PromptEvent | TokenEvent | FinishEvent | ErrorEvent


class GenerationHandle:
    """The event loop's side of one request: an async stream of its events."""

    def __init__(
        self,
        request_id: str,
        cancelled: threading.Event,
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        self.request_id = request_id
        self.events: asyncio.Queue[RequestEvent] = asyncio.Queue()
        self._cancelled = cancelled
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        """Stop generating; the engine frees the request's state at its next step."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        if self._on_cancel is not None:
            # Wakes an engine whose request is waiting on other stages.
            self._on_cancel()


# A node's scheduling limits (its --max-batch, --max-running and --max-queued): decode
# steps per batched pass, requests running at once, requests waiting for a place.
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_RUNNING = 32
DEFAULT_MAX_QUEUED = 128


class Overloaded(RuntimeError):
    """The node's queue is full: the client should retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TokenGenerator(Protocol):
    """What serving needs from the engine: submit a prompt, get a stream of events."""

    def overloaded(self) -> Overloaded | None:
        """Why a request submitted now would be refused (its queue is full), or None."""
        ...

    def submit(
        self,
        request_id: str,
        prompt: list[int],
        *,
        sampling: SamplingParams,
        max_tokens: int,
        loop: asyncio.AbstractEventLoop,
    ) -> GenerationHandle:
        """Raises `Overloaded` when the node cannot take the request."""
        ...


# ---------------------------------------------------------------- the data plane


@dataclass(frozen=True)
class WireTensor:
    """An array as raw little-endian bytes; dtype is its MLX name ("float32", ...)."""

    data: bytes
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Forward:
    """Hidden states of one step of a request, to the next stage (or, from tensor rank 0,
    the embedded input of one pass, to every other member)."""

    request_id: str
    epoch: int
    step: int  # decode step (0: prefill); a tensor pass's number
    hidden: WireTensor
    sample: bool = False  # the last stage samples a token from this step's output
    sampling: SamplingParams | None = None  # with the request's first message only
    sent_ns: int = 0  # sender's wall clock, for per-hop latency statistics
    # With the first message: start from a copy of prefix cache entry `reuse_entry` cut to
    # its first `reuse_tokens` tokens (0: a fresh cache).
    reuse_entry: int = 0
    reuse_tokens: int = 0
    # A batched decode step (engine.batching): the hidden state's rows belong to these
    # requests, in order (`request_id` is the first); empty for one request.
    rows: list[str] = field(default_factory=list[str])
    # A packed pass: the last of `rows` is a prefill chunk of this many tokens, beside the
    # others' decode steps of one token each, all along the sequence axis of one batch
    # row (hidden is (1, decode steps + chunk_tokens, dim)). 0: not packed.
    chunk_tokens: int = 0

    @property
    def request_ids(self) -> list[str]:
        """The requests of this step's rows."""
        return self.rows or [self.request_id]


@dataclass
class SampledToken:
    """The token the last stage sampled, back to stage 0."""

    request_id: str
    epoch: int
    step: int
    token_id: int
    logprobs: TokenLogprobs | None = None
    sent_ns: int = 0


@dataclass
class Release:
    """The request ended: free its state (follows its last work down the ring).

    With `keep_as`, each stage keeps the request's cache as prefix cache entry `keep_as`
    holding `keep_tokens` tokens, and the release goes on around to stage 0 with what the
    stages evicted added to `evict` (every stage drops the entries named there) and
    `trimmable` cleared by any stage whose cache cannot be cut. A release with an empty
    `request_id` only evicts."""

    request_id: str
    epoch: int
    sent_ns: int = 0
    keep_as: int = 0
    keep_tokens: int = 0
    evict: list[int] = field(default_factory=list[int])
    trimmable: bool = True
    stage_bytes: list[int] = field(default_factory=list[int])  # each later stage's store


@dataclass
class Failure:
    """The request failed at the sender; travels on to stage 0, which reports it."""

    request_id: str
    epoch: int
    error: str
    sent_ns: int = 0
    # A stage did not hold the prefix cache entry it was asked to start from: stage 0
    # recomputes the request from its first token instead of reporting an error.
    cache_miss: bool = False


StageMessage = Forward | SampledToken | Release | Failure


@dataclass
class Partial:
    """A tensor member's partial sum of one all-reduce (or, with `error`, why it stops)."""

    request_id: str
    epoch: int
    step: int
    layer: int
    phase: int  # 0: attention output, 1: MLP output
    rank: int
    tensor: WireTensor | None = None
    error: str = ""


# ---------------------------------------------------------------- loading a shard


@dataclass(frozen=True)
class LoadOrder:
    """The master's order to a node: load `shard` for placement `epoch`."""

    epoch: int
    shard: Shard
    dtype: str = "auto"  # weight precision ("auto", "float32", ...)
    stage_index: int = 0
    n_stages: int = 1  # pipeline stages (1 for tensor parallelism: every member is whole)
    next_node_id: str = ""  # where this stage streams its output (the last: stage 0)
    previous_node_id: str = ""  # whose output it pulls (stage 0: the last stage's)
    tensor_members: tuple[str, ...] = ()  # tensor parallelism: node ids by rank
    placement_json: str = ""  # the whole placement, for GET /v1/cluster on members


@dataclass(frozen=True)
class LoadProgress:
    """One step of a load; `finished` marks the last, with `error` when it failed."""

    epoch: int
    stage: str = ""  # "fetch", "load", "ready"
    done: int = 0
    total: int = 0
    finished: bool = False
    error: str = ""
    weight_bytes: int = 0  # bytes of the shard's parameters, once loaded
    rss: int = 0  # the member's resident memory after loading
    mlx_active: int = 0  # MLX's active memory after loading
    current_epoch: int = 0  # the member's epoch (set when it refuses an older one)


# ---------------------------------------------------------------- API requests relayed


class RelayError(Exception):
    """The node an API request was relayed to could not be reached, or the relay broke."""


@dataclass
class RelayedResponse:
    """The answer of a node an API request was relayed to: status and headers, then the
    body as it streams."""

    status: int
    headers: dict[str, str]
    body: AsyncIterator[bytes]
