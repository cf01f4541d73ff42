"""The Worker gRPC service of a node: load a shard, run the pipeline streams, release requests.

Every node serves it; the master also calls its own instance in-process. Messages carry the
placement epoch and a node refuses any other epoch than the one it holds, with a clear
FAILED_PRECONDITION error, so nothing of an old placement is ever half-applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from ..constraints import register_tokenizer
from ..engine.pipeline import InstalledStage, StageEngine
from ..engine.shard import ShardModel
from ..engine.tensor_parallel import TensorCollective, TensorShardModel
from ..models import sources
from ..models.catalog import ModelCard
from ..models.loader import LoadedModel, load_model
from ..proto import node_pb2, node_pb2_grpc
from ..types import Shard, TensorSlice

log = logging.getLogger(__name__)

ChannelFor = Callable[[str], "grpc.aio.Channel | None"]
BrokenListener = Callable[[str], None]


def memory_report() -> dict[str, int]:
    """This process's resident memory and MLX's own allocator counters, in bytes."""
    import mlx.core as mx
    import psutil

    return {
        "rss": psutil.Process().memory_info().rss,
        "mlx_active": mx.get_active_memory(),
        "mlx_peak": mx.get_peak_memory(),
    }


class StreamSender:
    """A persistent stream to another node: the next pipeline stage (the last stage's: to
    stage 0), a tensor member's commands, or a tensor member's all-reduce partials.

    `send` may be called from any thread; messages go out in order on one gRPC call of the
    Worker `method` ("Activations" or "AllReduce"). When the stream breaks, `on_broken`
    hears why, once, and later messages are dropped."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        channel_for: ChannelFor,
        target_id: str,
        on_broken: BrokenListener,
        method: str = "Activations",
    ) -> None:
        self._method = method
        self._loop = loop
        self._channel_for = channel_for
        self.target_id = target_id
        self._on_broken = on_broken
        # Messages waiting for the writer. `_idle` (under `_lock`) says the writer has found
        # the deque empty and waits for `_ready`: only then does `send` wake the event loop,
        # so a burst (prefill chunks, many requests) costs one wakeup, not one per message.
        self._pending: deque[Any] = deque()
        self._lock = threading.Lock()
        self._idle = True
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._broken = False

    def send(self, message: Any) -> None:
        if self._broken or self._closing:
            return
        with self._lock:
            self._pending.append(message)
            if not self._idle:
                return  # the writer is draining and will pick this up
            self._idle = False
        with contextlib.suppress(RuntimeError):  # the loop is gone at shutdown
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._task is None and not self._broken and not self._closing:
            self._task = self._loop.create_task(self._run(), name=f"stream-{self.target_id}")
        self._ready.set()

    async def _requests(self) -> AsyncIterator[Any]:
        """The call's request stream: everything queued, in order, then wait for more.

        gRPC consumes it in its own task and writes each message as soon as the previous
        write completed; handing the call an iterator, rather than `await call.write()` per
        message, skips the interceptor's per-write queue and task (peer channels sign calls).
        """
        while not self._broken:
            with self._lock:
                message = self._pending.popleft() if self._pending else None
                if message is None:
                    self._idle = True
            if message is None:
                await self._ready.wait()
                self._ready.clear()
            elif message is _END_OF_STREAM:
                return
            else:
                yield message

    def _broke(self, reason: str) -> None:
        if self._broken or self._closing:
            return
        self._broken = True
        self._ready.set()  # lets the request stream end
        kind = "all-reduce" if self._method == "AllReduce" else "pipeline"
        log.warning("%s stream to %s broke: %s", kind, self.target_id, reason)
        self._on_broken(f"the {kind} stream to node {self.target_id} broke: {reason}")

    async def _run(self) -> None:
        channel = self._channel_for(self.target_id)
        if channel is None:
            self._broke("the node is not a healthy member")
            return
        # Peer channels sign every call (cluster.membership.signing_interceptors).
        call: Any = getattr(node_pb2_grpc.WorkerStub(channel), self._method)(self._requests())
        try:
            # The peer answers nothing; the response side ends when the stream does, so a
            # dead peer or a refused epoch shows up here (a failed write ends the call too).
            async for _ in call:
                pass
            code = await call.code()
            if code != grpc.StatusCode.OK:
                self._broke(f"{code.name}: {await call.details()}")
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as error:
            self._broke(_describe(error))

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            with self._lock:
                self._pending.append(_END_OF_STREAM)  # after what is queued: it still goes
                self._idle = False
            self._ready.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=1.0)
            except (TimeoutError, asyncio.CancelledError, Exception):
                self._task.cancel()


_END_OF_STREAM = object()


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"


def _caller(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-exo-node":
            return value if isinstance(value, str) else value.decode()
    return context.peer()


class Worker(node_pb2_grpc.WorkerServicer):
    def __init__(
        self,
        *,
        card: ModelCard,
        models_dir: Path,
        engine: StageEngine,
        channel_for: ChannelFor,
        chat_template: str | None = None,
    ) -> None:
        self.card = card
        self.models_dir = models_dir
        self.engine = engine
        self._channel_for = channel_for
        self._chat_template = chat_template
        self.epoch = 0
        self.state = "idle"  # idle, loading, ready, failed
        self.error: str | None = None
        self.shard: Shard | None = None
        self.loaded: LoadedModel | None = None
        self.layers_loaded = 0
        self.placement_json = ""
        self.tensor: TensorSlice | None = None
        self._senders: list[StreamSender] = []
        self._collective: TensorCollective | None = None
        self._load_lock = asyncio.Lock()
        self.broken_listeners: list[BrokenListener] = []
        self._stopping = False

    # ---------------------------------------------------------------- state

    def describe(self) -> dict[str, Any]:
        body: dict[str, Any] = {"epoch": self.epoch, "state": self.state}
        if self.shard is not None:
            body["start_layer"] = self.shard.start_layer
            body["end_layer"] = self.shard.end_layer
            body["layers_loaded"] = self.layers_loaded
        if self.tensor is not None:
            body["tensor_rank"] = self.tensor.rank
            body["kv_heads"] = [self.tensor.kv_head_start, self.tensor.kv_head_end]
            body["mlp_columns"] = [self.tensor.mlp_start, self.tensor.mlp_end]
        if self.loaded is not None:
            body["weight_bytes"] = self.loaded.weight_bytes
        if self.error:
            body["error"] = self.error
        return body

    def _ring_broken(self, reason: str) -> None:
        self.engine.fail_all(reason)
        for listener in list(self.broken_listeners):
            listener(reason)

    async def stop(self) -> None:
        self._stopping = True
        await self._close_senders()

    async def _close_senders(self) -> None:
        senders, self._senders = self._senders, []
        for sender in senders:
            await sender.close()

    # ---------------------------------------------------------------- loading

    async def load(
        self,
        request: node_pb2.LoadShardRequest,
        report: Callable[[node_pb2.LoadShardProgress], None] = lambda _: None,
    ) -> node_pb2.LoadShardProgress:
        """Load this node's shard of placement `request.epoch`; the final progress message."""
        if request.epoch < self.epoch:
            return node_pb2.LoadShardProgress(
                epoch=request.epoch,
                finished=True,
                current_epoch=self.epoch,
                error=f"placement epoch {request.epoch} is older than this node's "
                f"epoch {self.epoch}; refused",
            )
        spec = request.shard
        shard = Shard(spec.model_id, spec.start_layer, spec.end_layer, spec.n_layers)
        tensor = None
        if spec.tp_size > 1:
            if len(spec.tp_members) != spec.tp_size or spec.tp_rank >= spec.tp_size:
                return node_pb2.LoadShardProgress(
                    epoch=request.epoch,
                    finished=True,
                    error=f"malformed tensor plan: rank {spec.tp_rank} of {spec.tp_size} "
                    f"with {len(spec.tp_members)} members",
                )
            tensor = TensorSlice(
                spec.tp_rank,
                spec.tp_size,
                spec.kv_head_start,
                spec.kv_head_end,
                spec.mlp_start,
                spec.mlp_end,
            )
        if spec.model_id != self.card.id:
            return node_pb2.LoadShardProgress(
                epoch=request.epoch,
                finished=True,
                error=f"this node serves {self.card.id}, not {spec.model_id}",
            )
        async with self._load_lock:
            self.epoch = request.epoch  # from now on, messages of older epochs are refused
            self.placement_json = request.placement_json
            self.state, self.error, self.shard, self.layers_loaded = "loading", None, shard, 0
            self.tensor = tensor
            await self._close_senders()
            self._collective = None
            # Drop the old shard before loading the new one so memory never holds both.
            self.loaded = None
            await asyncio.to_thread(
                self.engine.install, None, f"the model is being re-placed (epoch {request.epoch})"
            )
            loop = asyncio.get_running_loop()

            def on_progress(done: int, total: int) -> None:
                self.layers_loaded = done
                message = node_pb2.LoadShardProgress(
                    epoch=request.epoch, stage="load", done=done, total=total
                )
                loop.call_soon_threadsafe(report, message)

            try:
                report(node_pb2.LoadShardProgress(epoch=request.epoch, stage="fetch"))
                path = await asyncio.to_thread(
                    sources.fetch, self.card, self.models_dir, progress=False
                )
                loaded = await asyncio.to_thread(
                    load_model,
                    self.card,
                    path,
                    shard=shard,
                    dtype=request.dtype or "auto",
                    progress=False,
                    chat_template=self._chat_template,
                    on_progress=on_progress,
                    tensor=tensor,
                )
                if self.epoch != request.epoch:
                    raise RuntimeError(f"superseded by epoch {self.epoch} while loading")
                if shard.is_last and (tensor is None or tensor.is_root):
                    # The sampling node needs the tokenizer for grammar constraints.
                    await asyncio.to_thread(register_tokenizer, self.card.id, loaded.tokenizer)
                if tensor is not None:
                    stage = self._tensor_stage(loop, request, loaded, tensor)
                else:
                    send = None
                    if request.n_stages > 1:
                        sender = StreamSender(
                            loop, self._channel_for, request.next_node_id, self._ring_broken
                        )
                        self._senders.append(sender)
                        send = sender.send
                    stage = InstalledStage(
                        epoch=request.epoch,
                        model=ShardModel(loaded.model, loaded.shard),
                        eos_token_ids=loaded.tokenizer.eos_token_ids,
                        n_stages=max(1, request.n_stages),
                        send=send,
                    )
                await asyncio.to_thread(self.engine.install, stage, "re-placed")
            except Exception as error:
                self.state, self.error = "failed", f"loading the shard failed: {error}"
                log.exception("loading shard %s failed", shard)
                return node_pb2.LoadShardProgress(
                    epoch=request.epoch, finished=True, error=self.error
                )
            self.loaded, self.state = loaded, "ready"
            memory = memory_report()
            log.info(
                "stage %d/%d of epoch %d ready: layers [%d, %d), %.0f MB, next %s",
                request.stage_index + 1,
                request.n_stages,
                request.epoch,
                shard.start_layer,
                shard.end_layer,
                loaded.weight_bytes / 1e6,
                request.next_node_id or "-",
            )
            return node_pb2.LoadShardProgress(
                epoch=request.epoch,
                stage="ready",
                done=shard.n_local_layers,
                total=shard.n_local_layers,
                finished=True,
                weight_bytes=loaded.weight_bytes,
                rss=memory["rss"],
                mlx_active=memory["mlx_active"],
            )

    def _tensor_stage(
        self,
        loop: asyncio.AbstractEventLoop,
        request: node_pb2.LoadShardRequest,
        loaded: LoadedModel,
        tensor: TensorSlice,
    ) -> InstalledStage:
        """Streams to every other member (partials; on rank 0 also commands) and the stage."""
        members = list(request.shard.tp_members)

        def sender(rank: int, method: str) -> StreamSender:
            stream = StreamSender(loop, self._channel_for, members[rank], self._ring_broken, method)
            self._senders.append(stream)
            return stream

        partials = {
            rank: sender(rank, "AllReduce") for rank in range(tensor.size) if rank != tensor.rank
        }
        collective = TensorCollective(
            rank=tensor.rank,
            size=tensor.size,
            epoch=request.epoch,
            send=lambda rank, message: partials[rank].send(message),
        )
        self._collective = collective
        # Rank 0 drives: it hands every pass to the others.
        commands = [sender(rank, "Activations") for rank in range(1, tensor.size) if tensor.is_root]

        def broadcast(message: node_pb2.ActivationMessage) -> None:
            for stream in commands:
                stream.send(message)

        return InstalledStage(
            epoch=request.epoch,
            model=TensorShardModel(loaded.model, loaded.shard, tensor, collective),
            eos_token_ids=loaded.tokenizer.eos_token_ids,
            n_stages=1,
            broadcast=broadcast if tensor.is_root else None,
        )

    # ---------------------------------------------------------------- gRPC

    async def LoadShard(
        self,
        request: node_pb2.LoadShardRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[node_pb2.LoadShardProgress]:
        updates: asyncio.Queue[node_pb2.LoadShardProgress] = asyncio.Queue()
        task = asyncio.create_task(self.load(request, updates.put_nowait))
        try:
            while not task.done() or not updates.empty():
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            yield task.result()
        finally:
            if not task.done():
                # The master gave up on this load; let it finish, it is harmless.
                pass

    async def Activations(
        self,
        request_iterator: AsyncIterator[node_pb2.ActivationMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[node_pb2.ActivationMessage]:
        def accept(message: node_pb2.ActivationMessage) -> str | None:
            if message.epoch != self.epoch or self.state != "ready":
                return (
                    f"refused a message of placement epoch {message.epoch}: node "
                    f"holds epoch {self.epoch} ({self.state})"
                )
            self.engine.deliver(message)
            return None

        await self._receive(request_iterator, context, "pipeline", accept)
        return
        yield  # pragma: no cover - makes this an async generator (a bidi handler)

    async def _receive(
        self,
        request_iterator: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
        kind: str,
        accept: Callable[[Any], str | None],
    ) -> None:
        """Hand each incoming message of a persistent stream to `accept`, which returns why
        it refuses one (the stream then ends with FAILED_PRECONDITION). A stream that breaks
        fails this node's requests: its sender is gone."""
        caller = _caller(context)
        stale: str | None = None
        try:
            async for message in request_iterator:
                stale = accept(message)
                if stale is not None:
                    break
        except asyncio.CancelledError:
            if not self._stopping:
                self._ring_broken(f"the {kind} stream from node {caller} broke")
            raise
        except Exception as error:
            if not self._stopping:
                self._ring_broken(f"the {kind} stream from node {caller} broke: {error}")
            return
        if stale is not None:
            log.warning("%s (from %s)", stale, caller)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, stale)

    async def ReleaseRequest(
        self,
        request: node_pb2.ReleaseRequestRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> node_pb2.ReleaseRequestResponse:
        if request.epoch != self.epoch:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"refused a release of placement epoch {request.epoch}: node holds epoch "
                f"{self.epoch}",
            )
        self.engine.release(request.request_id)
        return node_pb2.ReleaseRequestResponse(released=True)

    async def AllReduce(
        self,
        request_iterator: AsyncIterator[node_pb2.AllReduceMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[node_pb2.AllReduceMessage]:
        caller = _caller(context)

        def accept(message: node_pb2.AllReduceMessage) -> str | None:
            collective = self._collective
            if collective is None or message.epoch != collective.epoch:
                return (
                    f"refused an all-reduce message of placement epoch {message.epoch}: "
                    f"node holds epoch {self.epoch} ({self.state})"
                )
            if message.error:
                self._ring_broken(f"tensor member {caller}: {message.error}")
            collective.deliver(message)
            return None

        await self._receive(request_iterator, context, "all-reduce", accept)
        return
        yield  # pragma: no cover - makes this an async generator (a bidi handler)
