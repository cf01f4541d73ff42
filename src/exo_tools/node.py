"""The node daemon: loads its model, runs the MLX thread, serves the API."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import signal
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from aiohttp import web

from .api import https
from .api.server import create_app
from .cluster import ClusterConfig, ClusterNode
from .cluster import capabilities as node_capabilities
from .cluster.relay import ApiRelayService, relay
from .engine.core import StageEngine
from .models import sources
from .models.catalog import ModelCard, resolve_model
from .models.loader import model_layout
from .placement.coordinator import Coordinator
from .placement.views import CoordinatorState, WorkerState
from .placement.worker import DataPlaneService, Worker, memory_report
from .proto import node_pb2_grpc
from .serving.chat import ChatService
from .serving.request import SamplingDefaults
from .types import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUED,
    DEFAULT_MAX_RUNNING,
    ModelLayout,
    Parallelism,
    RelayedResponse,
    RelayError,
)

log = logging.getLogger(__name__)

__all__ = ["Node", "NodeConfig", "memory_report"]


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
    parallelism: str = "auto"
    min_nodes: int = 1
    lazy_tool_grammar: bool = False
    require_tool_on_user_turn: bool = False
    default_max_tokens: int | None = None
    wrap_up_share: float = 0.0
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    prefix_cache_bytes: int | None = None  # None: the default share of free memory
    log_requests: Path | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    max_running: int = DEFAULT_MAX_RUNNING
    max_queued: int = DEFAULT_MAX_QUEUED
    kv_cache_bytes: int | None = None  # None: the default share of free memory
    tls_cert: Path | None = None  # the API serves HTTPS with this certificate and key
    tls_key: Path | None = None
    tls_self_signed: bool = False  # ... or with a self-signed pair kept in <home>/api_tls


class Node:
    """Every node runs the same parts: the Worker service and its MLX thread (a pipeline
    stage), and the coordinator, which acts while this node is master. The master serves the
    API by driving requests around the ring of stages; other nodes forward to it."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        card = resolve_model(config.model)
        if config.tool_format:
            card = card.with_tool_format(config.tool_format)
        self.card: ModelCard = card
        self._created = int(time.time())
        self._stop = asyncio.Event()
        self._service: ChatService | None = None
        self.cluster = ClusterNode(config.cluster) if config.cluster else None
        self.node_id = config.cluster.node_id if config.cluster else "local"
        self.engine = StageEngine(
            prefix_cache_bytes=config.prefix_cache_bytes,
            max_batch=config.max_batch,
            max_running=config.max_running,
            max_queued=config.max_queued,
            kv_budget_bytes=config.kv_cache_bytes,
        )
        template = config.chat_template_file.read_text() if config.chat_template_file else None
        self.worker = Worker(
            card=card,
            models_dir=config.models_dir,
            engine=self.engine,
            data_channel_for=self._data_channel,
            sign_call=self._sign_call,
            chat_template=template,
            encrypted=self.cluster is not None and self.cluster.tls is not None,
        )
        self.coordinator = Coordinator(
            node_id=self.node_id,
            cluster=self.cluster,
            worker=self.worker,
            layout=self._layout,
            memory_available=lambda: node_capabilities.probe().memory_available,
            parallelism=Parallelism(config.parallelism),
            min_nodes=config.min_nodes,
            dtype=config.dtype,
        )
        self.api_scheme = "https" if config.tls_cert or config.tls_self_signed else "http"
        self._relay_service = ApiRelayService(self._local_api_url)
        if self.cluster is not None:
            worker = self.worker
            relay_service = self._relay_service
            self.cluster.add_servicer_hook(
                lambda server: node_pb2_grpc.add_WorkerServicer_to_server(worker, server)
            )
            self.cluster.add_servicer_hook(
                lambda server: node_pb2_grpc.add_ApiServicer_to_server(relay_service, server)
            )
            data_plane = DataPlaneService(worker)
            self.cluster.add_data_servicer_hook(
                lambda server: node_pb2_grpc.add_DataPlaneServicer_to_server(data_plane, server)
            )

    def _data_channel(self, node_id: str) -> grpc.Channel | None:
        return self.cluster.data_channel(node_id) if self.cluster is not None else None

    def _sign_call(self, method: str) -> list[tuple[str, str]]:
        return self.cluster.sign_call(method) if self.cluster is not None else []

    def _layout(self) -> ModelLayout:
        path = sources.fetch(self.card, self.config.models_dir, progress=self.config.progress)
        return model_layout(self.card, path, dtype=self.config.dtype)

    # NodeBackend

    @property
    def model_id(self) -> str:
        return self.card.id

    @property
    def created(self) -> int:
        return self._created

    def chat_service(self) -> ChatService | None:
        """The master's chat service while its placement is ready; None otherwise."""
        loaded = self.worker.loaded
        if not self.coordinator.ready or loaded is None:
            return None
        if self._service is None:
            # The tokenizer and template are the model's, whatever this node's layers are.
            self._service = ChatService(
                loaded.card,
                loaded.tokenizer,
                loaded.context_length,
                self.engine,
                lazy_tool_grammar=self.config.lazy_tool_grammar,
                require_tool_on_user_turn=self.config.require_tool_on_user_turn,
                default_max_tokens=self.config.default_max_tokens,
                wrap_up_share=self.config.wrap_up_share,
                sampling_defaults=self.config.sampling_defaults,
            )
        return self._service

    def cluster_view(self) -> dict[str, Any] | None:
        if self.cluster is None:
            return None
        view = self.cluster.snapshot().model_dump(by_alias=True)
        placement = self.coordinator.describe()
        if placement is None and self.worker.placement_json:
            # A member shows the placement the master last gave it.
            placement = json.loads(self.worker.placement_json)
        view["placement"] = placement
        if self.coordinator.is_master:
            # Stage 0's index: the hit rate, and every stage's cached bytes.
            view["prefix_cache"] = self.engine.prefix_cache_stats()
            # Nodes whose placements kept breaking, left out for a while.
            view["left_out"] = [
                {
                    "node_id": out.node_id,
                    "seconds_left": round(out.seconds_left, 1),
                    "reason": out.reason,
                }
                for out in self.coordinator.left_out()
            ]
        return view

    def master_api_url(self) -> str | None:
        """The master's API when another node is master (chat requests go there)."""
        return self.cluster.master_api_url() if self.cluster else None

    async def relay(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        node_id: str | None = None,
    ) -> RelayedResponse:
        if self.cluster is None:
            raise RelayError("this node runs without the cluster layer")
        target = node_id or self.cluster.master_id
        channel = self.cluster.channel(target)
        if channel is None:
            role = " (the master)" if node_id is None else ""
            raise RelayError(f"node {target}{role} is not a healthy peer")
        return await relay(channel, method, path, headers, body)

    def _api_ssl_context(self) -> ssl.SSLContext | None:
        config = self.config
        if config.tls_self_signed:
            cert, key = https.self_signed_pair(config.home, config.host)
        elif config.tls_cert and config.tls_key:
            cert, key = config.tls_cert, config.tls_key
        else:
            return None
        try:
            context = https.server_context(cert, key)
        except ValueError as error:
            raise SystemExit(f"exo-tools: {error}") from error
        log.info(
            "API certificate %s, SHA-256 fingerprint %s%s",
            cert,
            https.fingerprint(cert),
            " (self-signed: clients must trust this file or pin the fingerprint)"
            if config.tls_self_signed
            else "",
        )
        return context

    def _local_api_url(self) -> str:
        """This node's own API, as the relay service calls it from this machine."""
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{self.api_scheme}://{host}:{self.config.api_port}"

    def _status(self) -> str:
        if self.coordinator.is_master:
            return self.coordinator.state
        # A member serves the API by forwarding; "ready" once its own stage is loaded.
        if self.worker.state == WorkerState.IDLE:
            return CoordinatorState.STANDBY
        return self.worker.state

    def ready(self) -> bool:
        """Whether a generation request sent here now would be served: on the master its
        placement is ready; elsewhere this node's own stage is loaded and a master known."""
        if self.coordinator.is_master:
            return self.coordinator.ready and self.worker.loaded is not None
        return self.worker.state == WorkerState.READY and self.master_api_url() is not None

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": self._status(),
            "ready": self.ready(),
            "model": self.card.id,
        }
        if self.cluster is not None:
            body["node_id"] = self.cluster.node_id
            body["master"] = self.cluster.master_id
        body["stage"] = self.worker.view().model_dump(exclude_none=True)
        body["active_requests"] = self.engine.active_requests
        body["pipeline"] = self.engine.stats()
        body["scheduler"] = self.engine.scheduler_stats()
        body["prefix_cache"] = self.engine.prefix_cache_stats()
        loaded = self.worker.loaded
        if loaded is not None:
            body["dtype"] = loaded.dtype
            body["weight_bytes"] = loaded.weight_bytes
            body["memory"] = memory_report()
        system = psutil.virtual_memory()
        body["system_memory"] = {"total": int(system.total), "available": int(system.available)}
        if self.coordinator.is_master:
            coordinator = self.coordinator
            body["placements"] = {
                "placed": coordinator.placements_made,
                "re_placed": coordinator.re_placements,
            }
        error = self.coordinator.error if self.coordinator.is_master else self.worker.error
        if error:
            body["error"] = error
        return body

    # lifecycle

    async def run(self) -> int:
        """Serve until SIGINT/SIGTERM."""
        app = create_app(self, api_key=self.config.api_key, log_requests=self.config.log_requests)
        # handler_cancellation: a client that disconnects cancels its handler, which
        # cancels its generation and frees its KV cache.
        ssl_context = self._api_ssl_context()
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.api_port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            raise SystemExit(
                f"exo-tools: cannot listen on {self.config.host}:{self.config.api_port} "
                f"(--host/--api-port): {error.strerror}"
            ) from error
        log.info(
            "API listening on %s://%s:%d", self.api_scheme, self.config.host, self.config.api_port
        )
        if not _is_loopback(self.config.host) and not self.config.api_key:
            log.warning(
                "the API listens on %s, beyond this machine, without an API key: anyone who "
                "can reach this port can use the model and read the dashboard; set --api-key "
                "(or $EXO_TOOLS_API_KEY)%s",
                self.config.host,
                "" if ssl_context else ", and --tls-cert/--tls-key or --tls-self-signed",
            )
        self.engine.start()
        if self.cluster is not None:
            # After the API listens, so the api_port peers learn about already answers.
            await self.cluster.start()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            self._stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signum, on_signal, signum)
        self.coordinator.start()
        waits = [asyncio.ensure_future(self._stop.wait())]
        if self.cluster is not None:
            # Set when this node must not run: another node has its id.
            waits.append(asyncio.ensure_future(self.cluster.fatal.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            await self.coordinator.stop()
            await self.worker.stop()
            if self.cluster is not None:
                await self.cluster.stop()
            await runner.cleanup()
            await self._relay_service.close()
            await asyncio.to_thread(self.engine.stop)
        if self.cluster is not None and self.cluster.fatal_error is not None:
            raise SystemExit(f"exo-tools: {self.cluster.fatal_error}")
        return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
