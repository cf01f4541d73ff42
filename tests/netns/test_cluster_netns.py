"""Three hosts in network namespaces on one bridge: zeroconf across a real L2 segment,
link cuts with `ip link set down`, master loss. Skipped unless root with `ip netns`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.cluster_checks import (
    start_member,
    wait_converged,
    wait_serving,
    write_secret,
)
from tests.helpers.nodes import NodeProcess

BOUND_S = 5.0
SUBNET = "10.231.0"  # only ever configured inside the test namespaces


def _netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("curl") is None:
        return False
    probe = f"exo-probe-{uuid.uuid4().hex[:6]}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ok


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _netns_usable(), reason="needs root and working `ip netns`"),
]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


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


@pytest.fixture
def lan() -> Iterator[Lan]:
    tag = uuid.uuid4().hex[:5]  # unique per run: parallel runs never share names
    net = Lan(tag=tag, bridge_ns=f"exo-br-{tag}")
    try:
        ip("netns", "add", net.bridge_ns)
        ip("-n", net.bridge_ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip("-n", net.bridge_ns, "link", "set", "br0", "up")
        for i in range(3):
            ns, host_if, br_if = f"exo-h{i}-{tag}", f"eh{i}{tag}", f"eb{i}{tag}"
            ip("netns", "add", ns)
            net.hosts.append(ns)
            ip("link", "add", host_if, "type", "veth", "peer", "name", br_if)
            ip("link", "set", host_if, "netns", ns)
            ip("link", "set", br_if, "netns", net.bridge_ns)
            net.bridge_ports.append(br_if)
            ip("-n", net.bridge_ns, "link", "set", br_if, "master", "br0")
            ip("-n", net.bridge_ns, "link", "set", br_if, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", host_if, "name", "eth0")
            ip("-n", ns, "addr", "add", f"{net.addr(i)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
        yield net
    finally:
        for ns in [*net.hosts, net.bridge_ns]:
            # Deleting a namespace destroys its veths (and their peers) too.
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def hosts(lan: Lan, tmp_path: Path) -> Iterator[list[NodeProcess]]:
    secret = write_secret(tmp_path / "secret", "netns-secret")
    members = [
        start_member(
            f"h{i}",
            tmp_path,
            secret_file=secret,
            api_port=18000,
            grpc_port=19000,  # same ports on every host: they are separate machines
            interface=lan.addr(i),
            host=lan.addr(i),
            netns=lan.hosts[i],
        )
        for i in range(3)
    ]
    try:
        wait_serving(members, timeout=20)
        yield members
    finally:
        for m in members:
            m.stop()


def test_discovery_cut_and_rejoin(lan: Lan, hosts: list[NodeProcess]) -> None:
    ids = {m.node_id for m in hosts}
    elapsed, master = wait_converged(hosts, ids, BOUND_S)
    print(f"\n[timing] netns discovery: 3 hosts agree {elapsed:.2f}s after the last one served")
    time.sleep(1.0)
    # Cut a non-master: the other two drop it, keep their master.
    victim_i = next(i for i, m in enumerate(hosts) if m.node_id != master)
    victim = hosts[victim_i]
    rest = [m for m in hosts if m is not victim]
    lan.cut(victim_i)
    removed, still = wait_converged(rest, ids - {victim.node_id}, BOUND_S)
    print(f"[timing] netns link cut: {victim.node_id} removed after {removed:.2f}s")
    assert still == master
    # Partitioned alone, the victim elects itself.
    wait_converged([victim], {victim.node_id}, BOUND_S)
    lan.restore(victim_i)
    back, healed = wait_converged(hosts, ids, BOUND_S)
    print(f"[timing] netns link restored: all agree again after {back:.2f}s")
    assert healed == master
    assert all(m.alive() for m in hosts)


def test_master_killed_new_one_elected(lan: Lan, hosts: list[NodeProcess]) -> None:
    ids = {m.node_id for m in hosts}
    _, master = wait_converged(hosts, ids, BOUND_S)
    time.sleep(1.0)
    victim = next(m for m in hosts if m.node_id == master)
    rest = [m for m in hosts if m is not victim]
    victim.send_signal(signal.SIGKILL)
    elapsed, new_master = wait_converged(rest, ids - {master}, BOUND_S)
    print(f"\n[timing] netns re-election after SIGKILL of {master}: {elapsed:.2f}s")
    assert new_master != master
