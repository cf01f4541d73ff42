"""Hosts in network namespaces on one bridge (test helper): each host is a namespace with
an `eth0` on a bridge that lives in a namespace of its own, so a host's link can be cut
(`ip link set down` on its bridge port) or made lossy (nftables in its namespace) without
touching anything outside the test. The test process itself can sit on the bridge too
(`client=True`), and then reaches every host as a client on the LAN would."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

SUBNET = "10.231.0"  # only ever configured inside the test namespaces
CLIENT_ADDRESS = f"{SUBNET}.100"  # the test process's own address on the bridge
LOSS_TABLE = "exo_chaos"


def netns_usable() -> bool:
    """Root, `ip netns` works, and curl is there for looking into a namespace."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("curl") is None:
        return False
    probe = f"exo-probe-{uuid.uuid4().hex[:6]}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ok


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _nft(netns: str, *args: str) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", *args], check=True, capture_output=True, text=True
    )
    return done.stdout


@dataclass
class Lan:
    tag: str
    bridge_ns: str
    hosts: list[str] = field(default_factory=list)  # namespace per host
    bridge_ports: list[str] = field(default_factory=list)  # bridge-side veth per host

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def cut(self, i: int) -> None:
        ip("-n", self.bridge_ns, "link", "set", self.bridge_ports[i], "down")

    def restore(self, i: int) -> None:
        ip("-n", self.bridge_ns, "link", "set", self.bridge_ports[i], "up")

    def start_loss(self, i: int, percent: int) -> None:
        """Drop `percent` % of host i's packets on its link, in each direction, at random."""
        ns = self.hosts[i]
        _nft(ns, "add", "table", "inet", LOSS_TABLE)
        for chain, hook, where in (
            ("inbound", "input", "iifname"),
            ("outbound", "output", "oifname"),
        ):
            _nft(
                ns,
                "add",
                "chain",
                "inet",
                LOSS_TABLE,
                chain,
                f"{{ type filter hook {hook} priority 0; }}",
            )
            rule = [
                where,
                "eth0",
                "numgen",
                "random",
                "mod",
                "100",
                "<",
                str(percent),
                "counter",
                "drop",
            ]
            _nft(ns, "add", "rule", "inet", LOSS_TABLE, chain, *rule)

    def stop_loss(self, i: int) -> int:
        """Remove host i's loss rules; returns how many packets they dropped."""
        listing = _nft(self.hosts[i], "list", "table", "inet", LOSS_TABLE)
        dropped = sum(
            int(line.split("packets")[1].split()[0])
            for line in listing.splitlines()
            if "counter packets" in line
        )
        _nft(self.hosts[i], "delete", "table", "inet", LOSS_TABLE)
        return dropped


@contextmanager
def bridged_lan(hosts: int, *, client: bool = False) -> Iterator[Lan]:
    """`hosts` namespaces on one bridge at SUBNET.1, .2, ...; with `client`, this process's
    namespace joins the bridge at CLIENT_ADDRESS. Everything is removed on exit."""
    tag = uuid.uuid4().hex[:5]  # unique per run: parallel runs never share names
    net = Lan(tag=tag, bridge_ns=f"exo-br-{tag}")
    try:
        ip("netns", "add", net.bridge_ns)
        ip("-n", net.bridge_ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip("-n", net.bridge_ns, "link", "set", "br0", "up")
        for i in range(hosts):
            ns = f"exo-h{i}-{tag}"
            ip("netns", "add", ns)
            net.hosts.append(ns)
            net.bridge_ports.append(_attach(net, f"eh{i}{tag}", f"eb{i}{tag}", ns, net.addr(i)))
        if client:
            _attach(net, f"ec{tag}", f"ebc{tag}", None, CLIENT_ADDRESS)
        yield net
    finally:
        for ns in [*net.hosts, net.bridge_ns]:
            # Deleting a namespace destroys its veths (and their peers) too.
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _attach(net: Lan, host_if: str, bridge_if: str, ns: str | None, address: str) -> str:
    """A veth from namespace `ns` (None: this process's) to the bridge; the bridge port."""
    ip("link", "add", host_if, "type", "veth", "peer", "name", bridge_if)
    ip("link", "set", bridge_if, "netns", net.bridge_ns)
    ip("-n", net.bridge_ns, "link", "set", bridge_if, "master", "br0")
    ip("-n", net.bridge_ns, "link", "set", bridge_if, "up")
    if ns is None:
        ip("addr", "add", f"{address}/24", "dev", host_if)
        ip("link", "set", host_if, "up")
        return bridge_if
    ip("link", "set", host_if, "netns", ns)
    ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", ns, "link", "set", host_if, "name", "eth0")
    ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
    ip("-n", ns, "link", "set", "eth0", "up")
    return bridge_if
