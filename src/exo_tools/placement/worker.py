"""The Worker gRPC service of a node: load a shard, run the pipeline and all-reduce streams.

Every node serves it; the master also calls its own instance in-process. Messages carry the
placement epoch and a node refuses any other epoch than the one it holds, with a clear
FAILED_PRECONDITION error, so nothing of an old placement is ever half-applied. Protos are
converted at this edge (exo_tools.cluster.wire): the engine sees only exo_tools.types.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from ..cluster.auth import METADATA_NODE
from ..cluster.wire import (
    load_order_from_proto,
    partial_from_proto,
    partial_to_proto,
    progress_to_proto,
    stage_message_from_proto,
    stage_message_to_proto,
)
from ..constraints import grammar_tokenizer
from ..engine.core import InstalledStage, StageEngine
from ..engine.shard import ShardModel
from ..engine.tensor_parallel import TensorCollective, TensorShardModel
from ..models import sources
from ..models.catalog import ModelCard
from ..models.loader import LoadedModel, load_model
from ..proto import node_pb2, node_pb2_grpc
from ..types import LoadOrder, LoadProgress, Partial, Shard, StageMessage, TensorSlice
from .streams import BrokenListener, ChannelFor, StreamSender
from .views import ShardView, WorkerState, WorkerView

log = logging.getLogger(__name__)


def memory_report() -> dict[str, int]:
    """This process's resident memory and MLX's own allocator counters, in bytes."""
    import mlx.core as mx
    import psutil

    return {
        "rss": psutil.Process().memory_info().rss,
        "mlx_active": mx.get_active_memory(),
        "mlx_peak": mx.get_peak_memory(),
    }


def _caller(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == METADATA_NODE:
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
        encrypted: bool = False,
    ) -> None:
        self.card = card
        self._encrypted = encrypted  # peer channels are TLS (for what a broken stream means)
        self.models_dir = models_dir
        self.engine = engine
        self._channel_for = channel_for
        self._chat_template = chat_template
        self.epoch = 0
        self.state = WorkerState.IDLE
        self.error: str | None = None
        self.shard: Shard | None = None
        self.loaded: LoadedModel | None = None
        self.layers_loaded = 0
        self.placement_json = ""
        self._senders: list[StreamSender] = []
        self._collective: TensorCollective | None = None
        self._load_lock = asyncio.Lock()
        self.broken_listeners: list[BrokenListener] = []
        self._stopping = False

    # ---------------------------------------------------------------- state

    def view(self) -> WorkerView:
        view = WorkerView(epoch=self.epoch, state=self.state, error=self.error or None)
        if self.shard is not None:
            view = view.model_copy(
                update={**ShardView.fields_of(self.shard), "layers_loaded": self.layers_loaded}
            )
        if self.loaded is not None:
            view.weight_bytes = self.loaded.weight_bytes
        return view

    def _ring_broken(self, reason: str, epoch: int) -> None:
        """A stream of placement `epoch` broke: this node's requests of it fail (the
        master's park), and the listeners hear why. A stream of an older placement,
        ending after the next was installed, breaks nothing that still runs."""
        if epoch != self.epoch:
            log.info("stream of the replaced placement epoch %d ended: %s", epoch, reason)
            return
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
        order: LoadOrder,
        report: Callable[[LoadProgress], None] = lambda _: None,
    ) -> LoadProgress:
        """Load this node's shard of placement `order.epoch`; the final progress."""
        if order.epoch < self.epoch:
            return LoadProgress(
                order.epoch,
                finished=True,
                current_epoch=self.epoch,
                error=f"placement epoch {order.epoch} is older than this node's "
                f"epoch {self.epoch}; refused",
            )
        shard = order.shard
        tensor = shard.tensor
        if shard.model_id != self.card.id:
            return LoadProgress(
                order.epoch,
                finished=True,
                error=f"this node serves {self.card.id}, not {shard.model_id}",
            )
        async with self._load_lock:
            self.epoch = order.epoch  # from now on, messages of older epochs are refused
            self.placement_json = order.placement_json
            self.state, self.error, self.shard, self.layers_loaded = (
                WorkerState.LOADING,
                None,
                shard,
                0,
            )
            await self._close_senders()
            self._collective = None
            # Drop the old shard before loading the new one so memory never holds both.
            self.loaded = None
            await asyncio.to_thread(
                self.engine.install, None, f"the model is being re-placed (epoch {order.epoch})"
            )
            loop = asyncio.get_running_loop()

            def on_progress(done: int, total: int) -> None:
                self.layers_loaded = done
                progress = LoadProgress(order.epoch, stage="load", done=done, total=total)
                loop.call_soon_threadsafe(report, progress)

            try:
                report(LoadProgress(order.epoch, stage="fetch"))
                path = await asyncio.to_thread(
                    sources.fetch, self.card, self.models_dir, progress=False
                )
                loaded = await asyncio.to_thread(
                    load_model,
                    self.card,
                    path,
                    shard=shard,
                    dtype=order.dtype,
                    progress=False,
                    chat_template=self._chat_template,
                    on_progress=on_progress,
                    tensor=tensor,
                )
                if self.epoch != order.epoch:
                    raise RuntimeError(f"superseded by epoch {self.epoch} while loading")
                grammar = None
                if shard.is_last and (tensor is None or tensor.is_root):
                    # The sampling node needs the tokenizer for grammar constraints.
                    grammar = await asyncio.to_thread(
                        grammar_tokenizer, self.card.id, loaded.tokenizer
                    )
                if tensor is not None:
                    stage = self._tensor_stage(loop, order, loaded, tensor)
                else:
                    send = None
                    if order.n_stages > 1:
                        send = self._stream_to(loop, order.epoch, order.next_node_id)
                    stage = InstalledStage(
                        epoch=order.epoch,
                        model=ShardModel(loaded.model, loaded.shard),
                        eos_token_ids=loaded.tokenizer.eos_token_ids,
                        n_stages=order.n_stages,
                        send=send,
                    )
                stage.grammar_tokenizer = grammar
                await asyncio.to_thread(self.engine.install, stage, "re-placed")
            except Exception as error:
                self.state, self.error = WorkerState.FAILED, f"loading the shard failed: {error}"
                log.exception("loading shard %s failed", shard)
                return LoadProgress(order.epoch, finished=True, error=self.error)
            self.loaded, self.state = loaded, WorkerState.READY
            memory = memory_report()
            log.info(
                "stage %d/%d of epoch %d ready: %s, %.0f MB, next %s",
                order.stage_index + 1,
                order.n_stages,
                order.epoch,
                shard.describe(),
                loaded.weight_bytes / 1e6,
                order.next_node_id or "-",
            )
            return LoadProgress(
                order.epoch,
                stage="ready",
                done=shard.n_local_layers,
                total=shard.n_local_layers,
                finished=True,
                weight_bytes=loaded.weight_bytes,
                rss=memory["rss"],
                mlx_active=memory["mlx_active"],
            )

    def _sender(
        self,
        loop: asyncio.AbstractEventLoop,
        epoch: int,
        node_id: str,
        method: str = "Activations",
    ) -> StreamSender:
        def broken(reason: str) -> None:
            self._ring_broken(reason, epoch)

        sender = StreamSender(loop, self._channel_for, node_id, broken, method, self._encrypted)
        self._senders.append(sender)
        return sender

    def _stream_to(
        self, loop: asyncio.AbstractEventLoop, epoch: int, node_id: str
    ) -> Callable[[StageMessage], None]:
        """The engine's `send` towards the next stage: converted here, on the MLX thread."""
        sender = self._sender(loop, epoch, node_id)
        return lambda message: sender.send(stage_message_to_proto(message))

    def _tensor_stage(
        self,
        loop: asyncio.AbstractEventLoop,
        order: LoadOrder,
        loaded: LoadedModel,
        tensor: TensorSlice,
    ) -> InstalledStage:
        """Streams to every other member (partials; on rank 0 also commands) and the stage."""
        members = order.tensor_members
        partials = {
            rank: self._sender(loop, order.epoch, members[rank], "AllReduce")
            for rank in range(tensor.size)
            if rank != tensor.rank
        }

        def send_partial(rank: int, partial: Partial) -> None:
            partials[rank].send(partial_to_proto(partial))

        collective = TensorCollective(
            rank=tensor.rank, size=tensor.size, epoch=order.epoch, send=send_partial
        )
        self._collective = collective
        # Rank 0 drives: it hands every pass to the others.
        commands = [
            self._stream_to(loop, order.epoch, members[rank])
            for rank in range(1, tensor.size)
            if tensor.is_root
        ]

        def broadcast(message: StageMessage) -> None:
            for send in commands:
                send(message)

        return InstalledStage(
            epoch=order.epoch,
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
        try:
            order = load_order_from_proto(request)
        except ValueError as error:
            yield progress_to_proto(LoadProgress(request.epoch, finished=True, error=str(error)))
            return
        updates: asyncio.Queue[LoadProgress] = asyncio.Queue()
        # If the master gives up on this load, the task still finishes: that is harmless.
        task = asyncio.create_task(self.load(order, updates.put_nowait))
        while not task.done() or not updates.empty():
            getter = asyncio.ensure_future(updates.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield progress_to_proto(getter.result())
            else:
                getter.cancel()
        yield progress_to_proto(task.result())

    async def Activations(
        self,
        request_iterator: AsyncIterator[node_pb2.ActivationMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[node_pb2.ActivationMessage]:
        def accept(message: node_pb2.ActivationMessage) -> str | None:
            if message.epoch != self.epoch or self.state != WorkerState.READY:
                return (
                    f"refused a message of placement epoch {message.epoch}: node "
                    f"holds epoch {self.epoch} ({self.state})"
                )
            try:
                self.engine.deliver(stage_message_from_proto(message))
            except ValueError as error:
                return str(error)
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
        epoch = self.epoch  # the stream's, once a message said it
        try:
            async for message in request_iterator:
                epoch = message.epoch
                stale = accept(message)
                if stale is not None:
                    break
        except asyncio.CancelledError:
            if not self._stopping:
                self._ring_broken(f"the {kind} stream from node {caller} broke", epoch)
            raise
        except Exception as error:
            if not self._stopping:
                self._ring_broken(f"the {kind} stream from node {caller} broke: {error}", epoch)
            return
        if stale is not None:
            log.warning("%s (from %s)", stale, caller)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, stale)

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
                self._ring_broken(f"tensor member {caller}: {message.error}", message.epoch)
            collective.deliver(partial_from_proto(message))
            return None

        await self._receive(request_iterator, context, "all-reduce", accept)
        return
        yield  # pragma: no cover - makes this an async generator (a bidi handler)
