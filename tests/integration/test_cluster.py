"""Real member processes on loopback: real zeroconf, real gRPC, polled over real HTTP."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cluster_checks import (
    get_view,
    node_ids,
    start_member,
    wait_converged,
    wait_for,
    wait_serving,
    write_secret,
)
from tests.helpers.nodes import NodeProcess

pytestmark = pytest.mark.slow

BOUND_S = 5.0  # discovery, failure detection and re-election bound


@pytest.fixture
def members() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for m in started:
        m.stop()


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    return write_secret(tmp_path / "secret", "integration-secret")


def _start(members: list[NodeProcess], tmp_path: Path, node_id: str, **kw: object) -> NodeProcess:
    m = start_member(node_id, tmp_path, **kw)  # type: ignore[arg-type]
    members.append(m)
    return m


def _trio(
    members: list[NodeProcess], tmp_path: Path, secret: Path, **kw: object
) -> list[NodeProcess]:
    trio = [_start(members, tmp_path, f"n{i}", secret_file=secret, **kw) for i in range(3)]
    wait_serving(trio)
    return trio


def test_three_members_discover_and_agree(
    members: list[NodeProcess], tmp_path: Path, secret: Path
) -> None:
    launched = time.monotonic()
    trio = _trio(members, tmp_path, secret)
    serving = time.monotonic() - launched
    elapsed, master = wait_converged([m.url for m in trio], {"n0", "n1", "n2"}, BOUND_S)
    print(
        f"\n[timing] discovery: 3 members agree {elapsed:.2f}s after the last one served "
        f"({serving + elapsed:.2f}s after launching the processes, python startup and "
        "zeroconf registration included)"
    )
    for m in trio:
        view = get_view(m.url)
        assert view is not None and view["self"] == m.node_id and view["master"] == master
        for node in view["nodes"]:
            assert node["capabilities"]["memory_total"] > 0
            assert node["capabilities"]["chip"]
            assert node["grpc_port"] > 0 and node["api_port"] > 0
            assert node["data_port"] > 0 and node["data_port"] != node["grpc_port"]
        master_api = next(x for x in trio if x.node_id == master).api_port
        expected_url = None if m.node_id == master else f"http://127.0.0.1:{master_api}"
        assert view["master_api_url"] == expected_url
    # Latency is measured once heartbeats run: every directed pair shows up.
    wait_for(
        lambda: all(
            {(lk["source"], lk["target"]) for lk in (get_view(m.url) or {}).get("links", [])}
            >= {(a, b) for a in ("n0", "n1", "n2") for b in ("n0", "n1", "n2") if a != b}
            for m in trio
        ),
        3.0,
        "all six links with latency",
    )
    view = get_view(trio[0].url)
    assert view is not None and all(0 < lk["latency_ms"] < 1000 for lk in view["links"])


def test_wrong_secret_is_refused(members: list[NodeProcess], tmp_path: Path, secret: Path) -> None:
    good = [_start(members, tmp_path, f"g{i}", secret_file=secret) for i in range(2)]
    bad_secret = write_secret(tmp_path / "bad", "not-the-secret")
    bad = _start(members, tmp_path, "bad", secret_file=bad_secret)
    wait_serving([*good, bad])
    wait_converged([m.url for m in good], {"g0", "g1"}, BOUND_S)
    # Give the intruder several retry rounds to try.
    time.sleep(4.0)
    wait_converged([m.url for m in good], {"g0", "g1"}, 0.5)
    assert node_ids(get_view(bad.url)) == {"bad"}
    assert all(m.alive() for m in [*good, bad])
    for m in good:
        log = m.log()
        refusals = [ln for ln in log.splitlines() if "refused" in ln and "bad" in ln]
        assert refusals, f"{m.node_id} did not log the refusal:\n{log[-2000:]}"
        # Logged once per peer and path, not once per attempt.
        assert len(refusals) <= 3, "\n".join(refusals)
    assert "could not prove" in bad.log() or "refused" in bad.log()


def test_a_static_peer_using_our_id_is_never_admitted(
    members: list[NodeProcess], tmp_path: Path, secret: Path
) -> None:
    # As after copying a home directory, node_id file included, to another machine.
    first = start_member("twin", tmp_path / "a", secret_file=secret, discovery=False)
    members.append(first)
    wait_serving([first])
    second = start_member(
        "twin", tmp_path / "b", secret_file=secret, discovery=False, peers=[first.grpc_target]
    )
    members.append(second)
    wait_serving([second])
    wait_for(lambda: "already uses this node's id" in second.log(), 10, "the refusal")
    refusal = next(ln for ln in second.log().splitlines() if "already uses this node's id" in ln)
    assert first.grpc_target in refusal and "node_id" in refusal, refusal
    assert "admitted twin" not in second.log()
    assert all(m.alive() for m in (first, second))


def test_other_cluster_stays_invisible(
    members: list[NodeProcess], tmp_path: Path, secret: Path
) -> None:
    a = [_start(members, tmp_path, f"a{i}", secret_file=secret, cluster="alpha") for i in range(2)]
    b = _start(members, tmp_path, "b0", secret_file=secret, cluster="beta")
    wait_serving([*a, b])
    wait_converged([m.url for m in a], {"a0", "a1"}, BOUND_S)
    time.sleep(2.0)
    wait_converged([m.url for m in a], {"a0", "a1"}, 0.5)
    view = get_view(b.url)
    assert view is not None and node_ids(view) == {"b0"} and view["master"] == "b0"


def test_static_peers_without_discovery(
    members: list[NodeProcess], tmp_path: Path, secret: Path
) -> None:
    first = _start(members, tmp_path, "s0", secret_file=secret, discovery=False)
    wait_serving([first])
    # s2 only knows s0; it must learn s1 through s0's view.
    rest = [
        _start(
            members,
            tmp_path,
            f"s{i}",
            secret_file=secret,
            discovery=False,
            peers=[first.grpc_target],
        )
        for i in (1, 2)
    ]
    wait_serving(rest)
    elapsed, _ = wait_converged([m.url for m in [first, *rest]], {"s0", "s1", "s2"}, BOUND_S)
    print(f"\n[timing] static peers: 3 members agree after {elapsed:.2f}s")
    assert "advertising" not in first.log()  # zeroconf really was off


def test_killing_master_elects_new_one(
    members: list[NodeProcess], tmp_path: Path, secret: Path
) -> None:
    trio = _trio(members, tmp_path, secret)
    _, master = wait_converged([m.url for m in trio], {"n0", "n1", "n2"}, BOUND_S)
    # Let heartbeats settle so the measurement starts from a steady state.
    time.sleep(1.0)
    victim = next(m for m in trio if m.node_id == master)
    rest = [m for m in trio if m is not victim]
    victim.send_signal(signal.SIGKILL)
    elapsed, new_master = wait_converged([m.url for m in rest], {m.node_id for m in rest}, BOUND_S)
    print(f"\n[timing] re-election after SIGKILL of master {master}: {elapsed:.2f}s")
    assert new_master != master
    for m in rest:
        view = get_view(m.url)
        assert view is not None
        expected = None if m.node_id == new_master else "http://127.0.0.1:"
        if expected is None:
            assert view["master_api_url"] is None
        else:
            assert view["master_api_url"].startswith(expected)


def test_stopped_member_removed_then_readmitted(
    members: list[NodeProcess], tmp_path: Path, secret: Path
) -> None:
    trio = _trio(members, tmp_path, secret)
    _, master = wait_converged([m.url for m in trio], {"n0", "n1", "n2"}, BOUND_S)
    time.sleep(1.0)
    # Stop the master: removal must also move the mastership.
    victim = next(m for m in trio if m.node_id == master)
    rest = [m for m in trio if m is not victim]
    victim.send_signal(signal.SIGSTOP)
    removed, new_master = wait_converged([m.url for m in rest], {m.node_id for m in rest}, BOUND_S)
    print(f"\n[timing] failure detection (SIGSTOP): removed after {removed:.2f}s")
    assert new_master != master
    victim.send_signal(signal.SIGCONT)
    back, final_master = wait_converged([m.url for m in trio], {"n0", "n1", "n2"}, BOUND_S)
    print(f"[timing] re-admission after SIGCONT: {back:.2f}s")
    # The oldest node is master again once it is back.
    assert final_master == master


def test_secret_rotation_without_restarts(
    members: list[NodeProcess], tmp_path: Path, secret: Path
) -> None:
    """docs/CLUSTER.md's procedure: every node's file becomes "new, old", then "new"; the
    members never lose each other, and a node left on the old secret is dropped."""
    files = {name: write_secret(tmp_path / f"secret-{name}", "old-secret") for name in "abc"}
    nodes = {
        name: _start(members, tmp_path, name, secret_file=path) for name, path in files.items()
    }
    wait_serving(list(nodes.values()))
    urls = [m.url for m in nodes.values()]
    wait_converged(urls, set(nodes), BOUND_S)

    def rewrite(name: str, text: str, changes: int) -> None:
        files[name].write_text(text)
        wait_for(
            lambda: nodes[name].log().count("cluster secret changed") == changes,
            10,
            f"{name} to reload its secret file",
        )

    for name in "abc":  # phase 1, one machine at a time
        rewrite(name, "new-secret\nold-secret\n", 1)
        wait_converged(urls, set(nodes), BOUND_S)
        assert all(m.alive() for m in nodes.values())
    for name in "ab":  # phase 2; c is forgotten, left holding the old secret too
        rewrite(name, "new-secret\n", 2)
        wait_converged(urls, set(nodes), BOUND_S)
    # c still accepts both, so a and b (new alone) keep it: rotation done for them.
    files["c"].write_text("old-secret\n")  # c goes back to the old secret alone
    wait_for(lambda: nodes["c"].log().count("cluster secret changed") == 2, 10, "c reload")
    wait_converged([nodes["a"].url, nodes["b"].url], {"a", "b"}, BOUND_S * 2)
    wait_converged([nodes["c"].url], {"c"}, BOUND_S * 2)
    # A newcomer with the new secret joins; one with the old is refused.
    newcomer = _start(
        members, tmp_path, "d", secret_file=write_secret(tmp_path / "d", "new-secret")
    )
    stale = _start(members, tmp_path, "e", secret_file=write_secret(tmp_path / "e", "old-secret"))
    wait_serving([newcomer, stale])
    wait_converged([nodes["a"].url, nodes["b"].url, newcomer.url], {"a", "b", "d"}, BOUND_S * 2)
    assert "a" not in node_ids(get_view(stale.url))
