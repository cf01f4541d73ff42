"""The node daemon: loads its model, runs the MLX thread, serves the API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from .api.server import create_app
from .cluster import ClusterConfig, ClusterNode
from .engine.runner import Runner
from .engine.shard import ShardModel
from .models import sources
from .models.catalog import ModelCard, resolve_model
from .models.loader import LoadedModel, load_model
from .serving.chat import ChatService

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


@dataclass
class NodeConfig:
    model: str
    host: str
    api_port: int
    home: Path
    models_dir: Path
    dtype: str = "auto"
    api_key: str | None = None
    chat_template_file: Path | None = None
    tool_format: str | None = None
    progress: bool = True
    cluster: ClusterConfig | None = None


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        card = resolve_model(config.model)
        if config.tool_format:
            card = card.with_tool_format(config.tool_format)
        self.card: ModelCard = card
        self._created = int(time.time())
        self._state = "starting"
        self._error: str | None = None
        self._loaded: LoadedModel | None = None
        self._runner: Runner | None = None
        self._service: ChatService | None = None
        self._stop = asyncio.Event()
        self.cluster = ClusterNode(config.cluster) if config.cluster else None

    # NodeBackend

    @property
    def model_id(self) -> str:
        return self.card.id

    @property
    def created(self) -> int:
        return self._created

    def chat_service(self) -> ChatService | None:
        return self._service

    def cluster_view(self) -> dict[str, Any] | None:
        return self.cluster.snapshot().model_dump(by_alias=True) if self.cluster else None

    def master_api_url(self) -> str | None:
        """The master's API when another node is master (chat requests go there)."""
        return self.cluster.master_api_url() if self.cluster else None

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self._state, "model": self.card.id}
        if self.cluster is not None:
            body["node_id"] = self.cluster.node_id
            body["master"] = self.cluster.master_id
        if self._loaded is not None:
            body["dtype"] = self._loaded.dtype
            body["weight_bytes"] = self._loaded.weight_bytes
            body["active_requests"] = self._runner.active_requests if self._runner else 0
            body["memory"] = memory_report()
        if self._error:
            body["error"] = self._error
        return body

    # lifecycle

    def _load_blocking(self) -> LoadedModel:
        self._state = "fetching"
        path = sources.fetch(self.card, self.config.models_dir, progress=self.config.progress)
        self._state = "loading"
        template = (
            self.config.chat_template_file.read_text() if self.config.chat_template_file else None
        )
        return load_model(
            self.card,
            path,
            dtype=self.config.dtype,
            progress=self.config.progress,
            chat_template=template,
        )

    async def _load(self) -> None:
        try:
            loaded = await asyncio.to_thread(self._load_blocking)
        except Exception as error:
            self._state = "failed"
            self._error = str(error)
            log.error("could not load %s: %s", self.card.id, error)
            self._stop.set()
            return
        runner = Runner(ShardModel(loaded.model, loaded.shard), loaded.tokenizer.eos_token_ids)
        runner.start()
        self._loaded, self._runner = loaded, runner
        self._service = ChatService(loaded, runner)
        self._state = "ready"
        log.info(
            "ready: %s (%s, %.0f MB) at http://%s:%d/v1",
            self.card.id,
            loaded.dtype,
            loaded.weight_bytes / 1e6,
            self.config.host,
            self.config.api_port,
        )

    async def run(self) -> int:
        """Serve until SIGINT/SIGTERM; the exit status is non-zero if the model failed."""
        app = create_app(self, api_key=self.config.api_key)
        # handler_cancellation: a client that disconnects cancels its handler, which
        # cancels its generation and frees its KV cache.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.api_port)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            raise SystemExit(
                f"exo-tools: cannot listen on {self.config.host}:{self.config.api_port} "
                f"(--host/--api-port): {error.strerror}"
            ) from error
        log.info("API listening on http://%s:%d", self.config.host, self.config.api_port)
        if self.cluster is not None:
            # After the API listens, so the api_port peers learn about already answers.
            await self.cluster.start()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signum, self._stop.set)
        loader = asyncio.create_task(self._load())
        try:
            await self._stop.wait()
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            if self.cluster is not None:
                await self.cluster.stop()
            await runner.cleanup()
            if self._runner is not None:
                await asyncio.to_thread(self._runner.stop)
        return 1 if self._state == "failed" else 0
