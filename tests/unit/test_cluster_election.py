"""Election determinism, strike counting and view merging, without network."""

from __future__ import annotations

import itertools
import time

import pytest

from exo_tools.cluster.auth import ClusterAuth
from exo_tools.cluster.election import Candidate, Liveness, elect
from exo_tools.cluster.membership import Membership, PeerLink
from exo_tools.cluster.view import NodeInfo


def test_oldest_wins_regardless_of_order() -> None:
    cands = [Candidate("b", 10.0), Candidate("a", 12.0), Candidate("c", 11.0)]
    for perm in itertools.permutations(cands):
        assert elect(perm) == "b"


def test_ties_go_to_smallest_id() -> None:
    cands = [Candidate("n2", 5.0), Candidate("n10", 5.0), Candidate("n1", 5.0)]
    for perm in itertools.permutations(cands):
        assert elect(perm) == "n1"


def test_next_master_when_master_leaves() -> None:
    cands = {Candidate("a", 1.0), Candidate("b", 2.0), Candidate("c", 3.0)}
    assert elect(cands) == "a"
    assert elect(c for c in cands if c.node_id != "a") == "b"


def test_elect_requires_candidates() -> None:
    with pytest.raises(ValueError):
        elect([])


def test_three_strikes() -> None:
    lv = Liveness(max_strikes=3, dead_after_s=100.0)
    lv.success(0.0)
    assert not lv.failure(0.5)
    assert not lv.failure(1.0)
    assert lv.failure(1.5)


def test_success_resets_strikes() -> None:
    lv = Liveness(max_strikes=3, dead_after_s=100.0)
    lv.success(0.0)
    lv.failure(0.5)
    lv.failure(1.0)
    lv.success(1.2)
    assert not lv.failure(1.5)
    assert lv.strikes == 1


def test_dead_after_silence_even_without_strikes() -> None:
    lv = Liveness(max_strikes=3, dead_after_s=2.5)
    lv.success(10.0)
    assert not lv.is_dead(12.4)
    assert lv.is_dead(12.6)
    assert lv.failure(12.6)  # a single slow failure after long silence is enough


def test_never_seen_is_dead() -> None:
    assert Liveness().is_dead(0.0)


def _membership(start: float = 100.0) -> Membership:
    me = NodeInfo(id="me", start_time=start)
    return Membership(auth=ClusterAuth(b"s", "c"), self_info=lambda: me, cluster_name="c")


def _link(key: str, node_id: str, start: float, last_ok: float, target: str) -> PeerLink:
    link = PeerLink(key=key, origin="static", targets=[target], node_id=node_id, target=target)
    link.info = NodeInfo(id=node_id, start_time=start)
    link.admitted = True
    link.liveness.success(last_ok)
    return link


def test_view_merges_links_and_elects_over_healthy_only() -> None:
    m = _membership(start=100.0)
    now = time.monotonic()
    # Two links to the same node (static + discovered): the freshest one is used.
    m.links["static:x"] = _link("static:x", "older", 50.0, now - 1.0, "10.0.0.1:1")
    m.links["older"] = _link("older", "older", 50.0, now - 0.1, "10.0.0.2:1")
    m.links["young"] = _link("young", "young", 200.0, now, "10.0.0.3:1")
    healthy = m.healthy_links()
    assert set(healthy) == {"older", "young"}
    assert healthy["older"].target == "10.0.0.2:1"
    view = m.snapshot()
    assert [n.id for n in view.nodes] == ["me", "older", "young"]
    assert view.master == "older"
    # The oldest goes silent: it leaves the view and mastership moves to the next oldest.
    for key in ("static:x", "older"):
        m.links[key].liveness.last_ok = now - 10.0
    view = m.snapshot()
    assert [n.id for n in view.nodes] == ["me", "young"]
    assert view.master == "me"


def test_unadmitted_and_self_links_are_ignored() -> None:
    m = _membership()
    now = time.monotonic()
    pending = _link("p", "p", 1.0, now, "h:1")
    pending.admitted = False
    m.links["p"] = pending
    m.links["self"] = _link("self", "me", 1.0, now, "h:2")
    assert m.healthy_links() == {}
    assert m.snapshot().master == "me"
