"""The Worker gRPC service of a node: load a shard, run the pipeline and all-reduce streams.

Every node serves it; the master also calls its own instance in-process. Messages carry the
placement epoch and a node refuses any other epoch than the one it holds, with a clear
FAILED_PRECONDITION error, so nothing of an old placement is ever half-applied. Protos are
converted at this edge (exo_tools.cluster.wire): the engine sees only exo_tools.types.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
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
from .streams import (
    ACTIVATIONS,
    ALL_REDUCE,
    Accept,
    BrokenListener,
    DataChannelFor,
    Outboxes,
    SignCall,
    StreamReader,
)
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


def _caller(context: grpc.ServicerContext) -> str:
    """The calling node's id (the signed metadata the interceptor verified)."""
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
        data_channel_for: DataChannelFor,
        sign_call: SignCall,
        chat_template: str | None = None,
        encrypted: bool = False,
    ) -> None:
        self.card = card
        self._encrypted = encrypted  # peer channels are TLS (for what a broken stream means)
        self.models_dir = models_dir
        self.engine = engine
        self._data_channel_for = data_channel_for
        self._sign_call = sign_call
        self._chat_template = chat_template
        self.epoch = 0
        self.state = WorkerState.IDLE
        self.error: str | None = None
        self.shard: Shard | None = None
        self.loaded: LoadedModel | None = None
        self.layers_loaded = 0
        self.placement_json = ""
        self.outboxes = Outboxes(encrypted)  # what this node's stages send, served to pulls
        self._readers: list[StreamReader] = []
        self._loop: asyncio.AbstractEventLoop | None = None
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

    def _ring_broken(self, reason: str, peer: str, epoch: int) -> None:
        """A stream of placement `epoch` broke: this node's requests of it fail (the
        master's park), and the listeners hear why. A stream of an older placement,
        ending after the next was installed, breaks nothing that still runs."""
        if epoch != self.epoch:
            log.info("stream of the replaced placement epoch %d ended: %s", epoch, reason)
            return
        self.engine.fail_all(reason)
        for listener in list(self.broken_listeners):
            listener(reason, peer)

    def _broken_from_any_thread(self, epoch: int) -> BrokenListener:
        loop = self._loop
        assert loop is not None

        def broken(reason: str, peer: str) -> None:
            if not self._stopping:
                with contextlib.suppress(RuntimeError):  # the loop is gone at shutdown
                    loop.call_soon_threadsafe(self._ring_broken, reason, peer, epoch)

        return broken

    async def stop(self) -> None:
        self._stopping = True
        self._close_streams(None)

    def _close_streams(self, epoch: int | None) -> None:
        """Placement `epoch` replaces the current one (None: the node stops): the streams
        this node reads end, and those it serves end once what is queued has gone out."""
        readers, self._readers = self._readers, []
        for reader in readers:
            reader.close()
        if epoch is None:
            self.outboxes.close_all()
        else:
            self.outboxes.replace(epoch)

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
            self._close_streams(order.epoch)
            self._collective = None
            # Drop the old shard before loading the new one so memory never holds both.
            self.loaded = None
            await asyncio.to_thread(
                self.engine.install, None, f"the model is being re-placed (epoch {order.epoch})"
            )
            loop = self._loop = asyncio.get_running_loop()

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
                    stage = self._tensor_stage(order, loaded, tensor)
                else:
                    send = None
                    if order.n_stages > 1:
                        send = self._stream_to(order.epoch, order.next_node_id)
                    stage = InstalledStage(
                        epoch=order.epoch,
                        model=ShardModel(loaded.model, loaded.shard),
                        eos_token_ids=loaded.tokenizer.eos_token_ids,
                        n_stages=order.n_stages,
                        send=send,
                    )
                stage.grammar_tokenizer = grammar
                self.outboxes.all_open(order.epoch)
                await asyncio.to_thread(self.engine.install, stage, "re-placed")
                # Before this load reports ready, so before any request runs on it.
                self._start_readers(order)
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

    def _outbox_to(self, epoch: int, node_id: str, method: str) -> Callable[[Any], None]:
        """What this stage sends `node_id` on `method` (it pulls it)."""
        return self.outboxes.open(node_id, method, epoch, self._broken_from_any_thread(epoch)).send

    def _stream_to(self, epoch: int, node_id: str) -> Callable[[StageMessage], None]:
        """The engine's `send` towards the next stage: converted here, on the MLX thread."""
        send = self._outbox_to(epoch, node_id, ACTIVATIONS)
        return lambda message: send(stage_message_to_proto(message))

    def _start_readers(self, order: LoadOrder) -> None:
        """Pull every stream this stage takes: its previous stage's output; on a tensor
        member, rank 0's commands and every other member's partials."""
        pulls: list[tuple[str, str, Accept]] = []
        if order.shard.tensor is not None:
            members = order.tensor_members
            rank = order.shard.tensor.rank
            if rank != 0:
                pulls.append((members[0], ACTIVATIONS, self._accept_activation))
            pulls += [
                (member, ALL_REDUCE, functools.partial(self._accept_partial, member))
                for other, member in enumerate(members)
                if other != rank
            ]
        elif order.n_stages > 1:
            pulls.append((order.previous_node_id, ACTIVATIONS, self._accept_activation))
        for node_id, method, accept in pulls:
            reader = StreamReader(
                node_id,
                method,
                order.epoch,
                self._data_channel_for(node_id),
                self._sign_call,
                accept,
                self._broken_from_any_thread(order.epoch),
                self._encrypted,
            )
            self._readers.append(reader.start())

    def _accept_activation(self, message: node_pb2.ActivationMessage) -> str | None:
        """On a reader's thread: hand the message to the engine, or say why not."""
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

    def _accept_partial(self, sender_id: str, message: node_pb2.AllReduceMessage) -> str | None:
        collective = self._collective
        if collective is None or message.epoch != collective.epoch:
            return (
                f"refused an all-reduce message of placement epoch {message.epoch}: "
                f"node holds epoch {self.epoch} ({self.state})"
            )
        if message.error:
            self._broken_from_any_thread(message.epoch)(
                f"tensor member {sender_id}: {message.error}", sender_id
            )
        collective.deliver(partial_from_proto(message))
        return None

    def _tensor_stage(
        self,
        order: LoadOrder,
        loaded: LoadedModel,
        tensor: TensorSlice,
    ) -> InstalledStage:
        """Streams to every other member (partials; on rank 0 also commands) and the stage."""
        members = order.tensor_members
        partials = {
            rank: self._outbox_to(order.epoch, members[rank], ALL_REDUCE)
            for rank in range(tensor.size)
            if rank != tensor.rank
        }

        def send_partial(rank: int, partial: Partial) -> None:
            partials[rank](partial_to_proto(partial))

        collective = TensorCollective(
            rank=tensor.rank, size=tensor.size, epoch=order.epoch, send=send_partial
        )
        self._collective = collective
        # Rank 0 drives: it hands every pass to the others.
        commands = [
            self._stream_to(order.epoch, members[rank])
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


class DataPlaneService(node_pb2_grpc.DataPlaneServicer):
    """The data plane server's side of a node's streams (on its threads): each call is a
    receiver pulling what this node's stage sends it (`placement/streams.py`)."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def Activations(
        self, request: node_pb2.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[node_pb2.ActivationMessage]:
        return self._serve(ACTIVATIONS, request, context)

    def AllReduce(
        self, request: node_pb2.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[node_pb2.AllReduceMessage]:
        return self._serve(ALL_REDUCE, request, context)

    def _serve(
        self, method: str, request: node_pb2.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        box = self._worker.outboxes.for_pull(_caller(context), method, request.epoch)
        if isinstance(box, str):
            log.warning("%s", box)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, box)
        yield from box.serve(context)
