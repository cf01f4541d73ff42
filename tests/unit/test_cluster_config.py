"""CLI flags, --peer validation, view JSON and the text table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from exo_tools.cluster import (
    ClusterView,
    LinkInfo,
    NodeInfo,
    add_cluster_arguments,
    cluster_config_from_args,
    render_cluster_table,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exo-tools node")
    add_cluster_arguments(p)
    return p


@pytest.mark.parametrize("bad", ["nohost", "host:", ":123", "h:0", "h:70000", "h:abc", "a b:1"])
def test_bad_peer_is_a_clear_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["--peer", bad])
    assert exc.value.code == 2
    assert "--peer" in capsys.readouterr().err


def test_good_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXO_TOOLS_SECRET", raising=False)
    secret = tmp_path / "s"
    secret.write_text("abc\n")
    args = _parser().parse_args(
        [
            "--peer", "10.0.0.2:5000", "--peer", "host.local:6000", "--interface", "127.0.0.1",
            "--cluster", "lab", "--no-discovery", "--secret-file", str(secret),
            "--grpc-port", "7000",
        ]
    )  # fmt: skip
    cfg = cluster_config_from_args(
        args, home=tmp_path / "h", api_host="0.0.0.0", api_port=8000, version="1"
    )
    assert cfg.static_peers == ["10.0.0.2:5000", "host.local:6000"]
    assert cfg.interfaces == ["127.0.0.1"] and cfg.cluster_name == "lab"
    assert not cfg.discovery and cfg.secret == b"abc" and cfg.grpc_port == 7000
    assert cfg.api_port == 8000 and cfg.version == "1"


def test_node_id_persists_per_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXO_TOOLS_SECRET", "x")
    args = _parser().parse_args([])
    ids = [
        cluster_config_from_args(
            args, home=tmp_path / h, api_host="", api_port=1, version=""
        ).node_id
        for h in ("a", "a", "b")
    ]
    assert ids[0] == ids[1] != ids[2]
    assert cluster_config_from_args(
        _parser().parse_args(["--node-id", "given"]), home=tmp_path / "a", api_host="",
        api_port=1, version=""
    ).node_id == "given"  # fmt: skip


def test_bad_interface_and_node_id(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--interface", "eth0"], ["--node-id", "a/b"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(argv)
    err = capsys.readouterr().err
    assert "--interface" in err and "--node-id" in err


def _view() -> ClusterView:
    return ClusterView(
        self_id="n1",
        cluster="lab",
        master="n2",
        nodes=[
            NodeInfo(id="n1", addresses=["10.0.0.1"], grpc_port=5, api_port=8),
            NodeInfo(id="n2", addresses=["10.0.0.2"], grpc_port=6, api_port=9),
        ],
        links=[LinkInfo(source="n1", target="n2", latency_ms=0.42)],
    )


def test_view_json_uses_self_key() -> None:
    data = _view().model_dump(by_alias=True)
    assert data["self"] == "n1" and "self_id" not in data
    text = json.dumps(data)
    assert ClusterView.model_validate_json(text).self_id == "n1"


def test_table_shows_nodes_master_and_links() -> None:
    out = render_cluster_table(_view().model_dump(by_alias=True))
    lines = out.splitlines()
    assert any("n2" in ln and "*" in ln and "10.0.0.2:6" in ln for ln in lines)
    assert any("n1 -> n2" in ln and "0.42 ms" in ln for ln in lines)
    assert "healthy" in out
