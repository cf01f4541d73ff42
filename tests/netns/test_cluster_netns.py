"""Three hosts in network namespaces on one bridge: zeroconf across a real L2 segment,
link cuts with `ip link set down`, master loss. Skipped unless root with `ip netns`."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cluster_checks import (
    start_member,
    wait_converged,
    wait_serving,
    write_secret,
)
from tests.helpers.netns import Lan, bridged_lan, netns_usable
from tests.helpers.nodes import NodeProcess

BOUND_S = 5.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not netns_usable(), reason="needs root and working `ip netns`"),
]


@pytest.fixture
def lan() -> Iterator[Lan]:
    with bridged_lan(3) as net:
        yield net


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
