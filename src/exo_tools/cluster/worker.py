"""The Worker gRPC service of a node: load a shard, run the pipeline streams, release requests.

Every node serves it; the master also calls its own instance in-process. Messages carry the
placement epoch and a node refuses any other epoch than the one it holds, with a clear
FAILED_PRECONDITION error, so nothing of an old placement is ever half-applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from ..constraints import register_tokenizer
from ..engine.pipeline import InstalledStage, StageEngine
from ..engine.shard import Shard, ShardModel
from ..models import sources
from ..models.catalog import ModelCard
from ..models.loader import LoadedModel, load_model
from ..proto import node_pb2, node_pb2_grpc

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
    """The persistent stream from this stage to the next one (the last stage's: to stage 0).

    `send` may be called from any thread; messages go out in order on one gRPC call. When the
    stream breaks, `on_broken` hears why, once, and later messages are dropped."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        channel_for: ChannelFor,
        target_id: str,
        on_broken: BrokenListener,
    ) -> None:
        self._loop = loop
        self._channel_for = channel_for
        self.target_id = target_id
        self._on_broken = on_broken
        self._queue: asyncio.Queue[node_pb2.ActivationMessage | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._broken = False

    def send(self, message: node_pb2.ActivationMessage) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone at shutdown
            self._loop.call_soon_threadsafe(self._put, message)

    def _put(self, message: node_pb2.ActivationMessage) -> None:
        if self._broken or self._closing:
            return
        if self._task is None:
            self._task = self._loop.create_task(self._run(), name=f"stream-{self.target_id}")
        self._queue.put_nowait(message)

    def _broke(self, reason: str) -> None:
        if self._broken or self._closing:
            return
        self._broken = True
        log.warning("pipeline stream to %s broke: %s", self.target_id, reason)
        self._on_broken(f"the pipeline stream to node {self.target_id} broke: {reason}")

    async def _run(self) -> None:
        channel = self._channel_for(self.target_id)
        if channel is None:
            self._broke("the node is not a healthy member")
            return
        # Peer channels sign every call (cluster.membership.signing_interceptors).
        call: Any = node_pb2_grpc.WorkerStub(channel).Activations()
        reader = asyncio.create_task(self._read(call))
        try:
            while True:
                message = await self._queue.get()
                if message is None:
                    await call.done_writing()
                    break
                await call.write(message)
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as error:  # any failure to write means the stream is gone
            self._broke(_describe(error))
        finally:
            if self._closing:
                reader.cancel()

    async def _read(self, call: Any) -> None:
        try:
            async for _ in call:
                pass
            code = await call.code()
            if code != grpc.StatusCode.OK:
                self._broke(f"{code.name}: {await call.details()}")
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._broke(_describe(error))

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._queue.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=1.0)
            except (TimeoutError, asyncio.CancelledError, Exception):
                self._task.cancel()


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
        self._sender: StreamSender | None = None
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
        if self._sender is not None:
            await self._sender.close()

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
            if self._sender is not None:
                await self._sender.close()
                self._sender = None
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
                )
                if self.epoch != request.epoch:
                    raise RuntimeError(f"superseded by epoch {self.epoch} while loading")
                if shard.is_last:
                    # The last stage samples, so grammar constraints need the tokenizer here.
                    await asyncio.to_thread(register_tokenizer, self.card.id, loaded.tokenizer)
                send = None
                if request.n_stages > 1:
                    self._sender = StreamSender(
                        loop,
                        self._channel_for,
                        request.next_node_id,
                        self._ring_broken,
                    )
                    send = self._sender.send
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
        caller = _caller(context)
        stale: str | None = None
        try:
            async for message in request_iterator:
                if message.epoch != self.epoch or self.state != "ready":
                    stale = (
                        f"refused a message of placement epoch {message.epoch}: node "
                        f"holds epoch {self.epoch} ({self.state})"
                    )
                    break
                self.engine.deliver(message)
        except asyncio.CancelledError:
            if not self._stopping:
                self._ring_broken(f"the pipeline stream from node {caller} broke")
            raise
        except Exception as error:
            if not self._stopping:
                self._ring_broken(f"the pipeline stream from node {caller} broke: {error}")
            return
        if stale is not None:
            log.warning("%s (from %s)", stale, caller)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, stale)
        return
        yield  # pragma: no cover - makes this an async generator (a bidi handler)

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
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "tensor parallelism is not implemented yet"
        )
        yield  # pragma: no cover
