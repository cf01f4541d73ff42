"""Text rendering of a /v1/cluster view for `exo-tools cluster`."""

from __future__ import annotations

from typing import Any


def _gib(size: Any) -> str:
    try:
        return f"{int(size) / 2**30:.1f}"
    except (TypeError, ValueError):
        return "?"


def _grid(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [
        max(len(header), *(len(row[column]) for row in rows)) if rows else len(header)
        for column, header in enumerate(headers)
    ]
    row_format = "  ".join(f"{{:<{width}}}" for width in widths)
    return [
        row_format.format(*headers).rstrip(),
        *(row_format.format(*row).rstrip() for row in rows),
    ]


def render_cluster_table(view: dict[str, Any]) -> str:
    """A readable table of nodes (master marked with '*') and links with latency."""
    this_node = view.get("self", "")
    master = view.get("master", "")
    rows: list[list[str]] = []
    for node in view.get("nodes", []):
        capabilities = node.get("capabilities", {}) or {}
        addresses = node.get("addresses", []) or []
        node_id = str(node.get("id", ""))
        marks = ("*" if node_id == master else " ") + ("<" if node_id == this_node else " ")
        memory = (
            f"{_gib(capabilities.get('memory_available'))}"
            f"/{_gib(capabilities.get('memory_total'))} GiB"
        )
        rows.append(
            [
                marks + node_id,
                f"{addresses[0] if addresses else '?'}:{node.get('grpc_port', '?')}",
                str(node.get("api_port", "")),
                memory,
                str(capabilities.get("chip", "")),
                str(capabilities.get("mlx_device", "")) or "-",
                "healthy" if node.get("healthy", False) else "down",
            ]
        )
    lines = [
        f"cluster {view.get('cluster', '')!s}: {len(rows)} node(s), master {master}".replace(
            "cluster : ", "cluster: "
        )
    ]
    lines += _grid(
        ["  NODE", "GRPC", "API", "MEMORY (avail/total)", "CHIP", "DEVICE", "STATE"], rows
    )
    links = view.get("links", []) or []
    if links:
        lines.append("")
        lines += _grid(
            ["LINK", "LATENCY"],
            [
                [
                    f"{link.get('source')} -> {link.get('target')}",
                    f"{float(link.get('latency_ms', 0)):.2f} ms",
                ]
                for link in links
            ],
        )
    lines.append("(* master, < this node)")
    return "\n".join(lines)
