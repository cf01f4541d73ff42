"""Text rendering of a /v1/cluster view for `exo-tools cluster`."""

from __future__ import annotations

from typing import Any


def _gib(n: Any) -> str:
    try:
        return f"{int(n) / 2**30:.1f}"
    except (TypeError, ValueError):
        return "?"


def _grid(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]


def render_cluster_table(view: dict[str, Any]) -> str:
    """A readable table of nodes (master marked with '*') and links with latency."""
    me = view.get("self", "")
    master = view.get("master", "")
    rows: list[list[str]] = []
    for node in view.get("nodes", []):
        caps = node.get("capabilities", {}) or {}
        addrs = node.get("addresses", []) or []
        nid = str(node.get("id", ""))
        marks = ("*" if nid == master else " ") + ("<" if nid == me else " ")
        rows.append(
            [
                marks + nid,
                f"{addrs[0] if addrs else '?'}:{node.get('grpc_port', '?')}",
                str(node.get("api_port", "")),
                f"{_gib(caps.get('memory_available'))}/{_gib(caps.get('memory_total'))} GiB",
                str(caps.get("chip", "")),
                str(caps.get("mlx_device", "")) or "-",
                "healthy" if node.get("healthy", False) else "down",
            ]
        )
    out = [
        f"cluster {view.get('cluster', '')!s}: {len(rows)} node(s), master {master}".replace(
            "cluster : ", "cluster: "
        )
    ]
    out += _grid(["  NODE", "GRPC", "API", "MEMORY (avail/total)", "CHIP", "DEVICE", "STATE"], rows)
    links = view.get("links", []) or []
    if links:
        out.append("")
        out += _grid(
            ["LINK", "LATENCY"],
            [
                [
                    f"{lk.get('source')} -> {lk.get('target')}",
                    f"{float(lk.get('latency_ms', 0)):.2f} ms",
                ]
                for lk in links
            ],
        )
    out.append("(* master, < this node)")
    return "\n".join(out)
