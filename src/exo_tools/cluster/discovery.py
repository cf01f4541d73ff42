"""Zeroconf (mDNS/DNS-SD) advertisement and browsing of exo-tools nodes.

mDNS only finds candidates: it never reports a silent departure, so liveness comes from gRPC
heartbeats (membership.py). A goodbye (clean stop of the peer) is passed on as a hint.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass

import psutil
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_exo-tools._tcp.local."
RESOLVE_TIMEOUT_MS = 3000


def duplicate_id_message(node_id: str, other: str, id_file: str | None) -> str:
    fix = f"delete {id_file} on this machine" if id_file else "remove the copied node_id file"
    return (
        f"another node already uses this node's id {node_id!r} (at {other}); its home "
        f"directory was probably copied here. To fix it, {fix} (a new id is made at the next "
        "start) or give this node its own --node-id, then start it again"
    )


@dataclass(frozen=True)
class DiscoveredPeer:
    node_id: str
    addresses: tuple[str, ...]
    grpc_port: int
    api_port: int
    version: str
    cluster_name: str


def local_ipv4_addresses() -> list[str]:
    """Every IPv4 address of this host: non-loopback first, loopback last.

    Loopback comes last so peers on other machines try a reachable address first, while nodes
    on the same machine can still use it (a wrong target is caught by the node-id check).
    """
    outer: list[str] = []
    loopback: list[str] = []
    for interface_addresses in psutil.net_if_addrs().values():
        for address in interface_addresses:
            if address.family != socket.AF_INET:
                continue
            ip = ipaddress.ip_address(address.address)
            if ip.is_loopback:
                loopback.append(address.address)
            elif not ip.is_link_local:
                outer.append(address.address)
    return sorted(set(outer)) + sorted(set(loopback))


def advertised_addresses(interfaces: list[str]) -> list[str]:
    return list(interfaces) if interfaces else local_ipv4_addresses()


def _instance_name(node_id: str) -> str:
    # A random part per process: two nodes that share an id (a copied home) must both be
    # seen to be told apart, not collide in one name.
    node_id = f"{node_id}-{secrets.token_hex(3)}"
    # DNS-SD instance labels are at most 63 bytes; the full id is in the TXT record anyway.
    return f"{node_id.encode()[:63].decode(errors='ignore')}.{SERVICE_TYPE}"


def _txt_value(properties: dict[bytes, bytes | None], key: str) -> str:
    value = properties.get(key.encode())
    return value.decode(errors="replace") if value else ""


class Discovery:
    """Registers this node and reports other nodes of the same cluster name."""

    def __init__(
        self,
        *,
        node_id: str,
        cluster_name: str,
        grpc_port: int,
        api_port: int,
        version: str,
        interfaces: list[str],
        on_found: Callable[[DiscoveredPeer], None],
        on_gone: Callable[[str], None],
        start_time: float = 0.0,
        on_duplicate: Callable[[str], None] | None = None,
        id_file: str | None = None,
    ) -> None:
        self.node_id = node_id
        self.start_time = start_time
        # Called (on zeroconf's thread) when an older node advertises this node's id.
        self.on_duplicate = on_duplicate
        self.id_file = id_file
        self.cluster_name = cluster_name
        self.grpc_port = grpc_port
        self.api_port = api_port
        self.version = version
        self.interfaces = interfaces
        self.on_found = on_found
        self.on_gone = on_gone
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._names: dict[str, str] = {}  # service name -> node id (for goodbyes)
        self._duplicates: set[str] = set()  # names seen advertising our own id

    async def start(self) -> None:
        addresses = advertised_addresses(self.interfaces)
        self._zeroconf = AsyncZeroconf(
            interfaces=list(self.interfaces) if self.interfaces else InterfaceChoice.All,
            ip_version=IPVersion.V4Only,
        )
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            _instance_name(self.node_id),
            port=self.grpc_port,
            addresses=[socket.inet_aton(address) for address in addresses],
            properties={
                "node_id": self.node_id,
                "grpc_port": str(self.grpc_port),
                "api_port": str(self.api_port),
                "version": self.version,
                "cluster": self.cluster_name,
                "start_time": repr(self.start_time),
            },
        )
        # Browse first so discovery of others overlaps the ~1.6 s registration probe.
        self._browser = AsyncServiceBrowser(
            self._zeroconf.zeroconf, [SERVICE_TYPE], handlers=[self._on_change]
        )
        await self._zeroconf.async_register_service(self._info, allow_name_change=True)
        log.info(
            "advertising %s on %s (grpc %d, cluster %r)",
            self.node_id,
            ", ".join(addresses),
            self.grpc_port,
            self.cluster_name,
        )

    def _duplicate(self, name: str, address: str, properties: dict[bytes, bytes | None]) -> None:
        """Another node advertises our id: the newer of the two refuses to run, the older
        says so (once) and never admits it."""
        if name in self._duplicates:
            return
        self._duplicates.add(name)
        try:
            other_start = float(_txt_value(properties, "start_time") or 0.0)
        except ValueError:
            other_start = 0.0
        newer = (self.start_time, self._info.name if self._info else "") > (other_start, name)
        if newer and self.on_duplicate is not None:
            self.on_duplicate(duplicate_id_message(self.node_id, f"{address} (API)", self.id_file))
        else:
            log.error(
                "the node at %s (API) advertises this node's id %r: it was started from a copy "
                "of this node's home directory; it refuses to run until its node_id file is "
                "deleted",
                address,
                self.node_id,
            )

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._zeroconf is not None:
            try:
                if self._info is not None:
                    # Goodbye packets let peers drop us at once instead of by heartbeat failure.
                    await asyncio.wait_for(self._zeroconf.async_unregister_service(self._info), 3)
            except (TimeoutError, Exception) as error:  # stop must never hang or raise
                log.debug("unregister failed: %s", error)
            await self._zeroconf.async_close()
            self._zeroconf = None

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            node_id = self._names.pop(name, None)
            if node_id is not None and node_id != self.node_id:
                self.on_gone(node_id)
            return
        task = asyncio.ensure_future(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        if self._zeroconf is None:
            return
        info = AsyncServiceInfo(service_type, name)
        try:
            ok = await info.async_request(self._zeroconf.zeroconf, RESOLVE_TIMEOUT_MS)
        except Exception as error:
            log.debug("resolve of %s failed: %s", name, error)
            return
        if not ok:
            log.debug("could not resolve %s", name)
            return
        properties = info.properties
        node_id = _txt_value(properties, "node_id")
        cluster = _txt_value(properties, "cluster")
        if not node_id:
            return
        if cluster != self.cluster_name:
            log.debug("ignoring %s of cluster %r", node_id, cluster)
            return
        try:
            grpc_port = int(_txt_value(properties, "grpc_port") or info.port or 0)
            api_port = int(_txt_value(properties, "api_port") or 0)
        except ValueError:
            log.debug("bad ports in TXT of %s", name)
            return
        addresses = tuple(info.parsed_addresses(IPVersion.V4Only))
        if not addresses or not grpc_port:
            return
        if node_id == self.node_id:
            if self._info is not None and name != self._info.name:
                self._duplicate(name, f"{addresses[0]}:{api_port}", properties)
            return
        self._names[name] = node_id
        self.on_found(
            DiscoveredPeer(
                node_id=node_id,
                addresses=addresses,
                grpc_port=grpc_port,
                api_port=api_port,
                version=_txt_value(properties, "version"),
                cluster_name=cluster,
            )
        )
