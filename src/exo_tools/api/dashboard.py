"""The dashboard: one self-contained page (no build step, no CDN, works offline) and the
JSON it polls, which the master gathers from its own figures and each member's."""

from __future__ import annotations

import time
from functools import cache
from importlib import resources
from typing import Any


@cache
def _packaged(name: str) -> str:
    """A file shipped beside this module (the pages)."""
    return resources.files(__name__.rpartition(".")[0]).joinpath(name).read_text(encoding="utf-8")


def page_html() -> str:
    return _packaged("dashboard.html")


def docs_html() -> str:
    return _packaged("docs.html")


def dashboard_body(
    *,
    local: dict[str, Any],
    view: dict[str, Any] | None,
    member_statuses: dict[str, dict[str, Any] | str],
    recent: list[dict[str, Any]],
    running: list[dict[str, Any]],
) -> dict[str, Any]:
    """What the page draws. `local` is this node's `/v1/node`; `member_statuses` each other
    node's, or why it could not be read."""
    self_id = str(local.get("node_id", "local"))
    master_id = str(local.get("master") or self_id)
    placement = (view or {}).get("placement")
    known = (view or {}).get("nodes") or [{"id": self_id, "healthy": True}]
    nodes = []
    for entry in known:
        node_id = str(entry["id"])
        status = local if node_id == self_id else member_statuses.get(node_id, "not asked")
        nodes.append(
            _node(
                entry,
                status,
                is_master=node_id == master_id,
            )
        )
    return {
        "time": time.time(),
        "cluster": (view or {}).get("cluster"),
        "self": self_id,
        "master": master_id,
        "model": local.get("model"),
        "status": local.get("status"),
        "ready": local.get("ready"),
        "version": local.get("version"),
        "nodes": nodes,
        "links": (view or {}).get("links") or [],
        "placement": placement,
        "scheduler": local.get("scheduler") or {},
        "prefix_cache": local.get("prefix_cache") or {},
        "pipeline": local.get("pipeline") or {},
        "tokens_generated": local.get("tokens_generated", 0),
        "running": running,
        "recent": recent,
    }


def _node(
    entry: dict[str, Any],
    status: dict[str, Any] | str,
    *,
    is_master: bool,
) -> dict[str, Any]:
    capabilities = entry.get("capabilities") or {}
    addresses = entry.get("addresses") or []
    node: dict[str, Any] = {
        "id": entry["id"],
        "address": f"{addresses[0]}:{entry.get('api_port')}" if addresses else None,
        "healthy": bool(entry.get("healthy", True)),
        "master": is_master,
        "chip": capabilities.get("chip"),
    }
    if isinstance(status, str):
        node["unreachable"] = status
        node["memory"] = {
            "total": capabilities.get("memory_total"),
            "available": capabilities.get("memory_available"),
        }
        return node
    system = status.get("system_memory") or {}
    memory = status.get("memory") or {}
    prefix = status.get("prefix_cache") or {}
    scheduler = status.get("scheduler") or {}
    node["state"] = status.get("status")
    node["error"] = status.get("error")
    node["memory"] = {
        "total": system.get("total", capabilities.get("memory_total")),
        "available": system.get("available", capabilities.get("memory_available")),
        "rss": memory.get("rss"),
        "weights": status.get("weight_bytes"),
        # What holds KV: the prefix cache's entries and the running requests' reservations.
        "kv_cache": int(prefix.get("bytes") or 0) + int(scheduler.get("kv_reserved_bytes") or 0),
    }
    node["busy_s"] = (status.get("pipeline") or {}).get("busy_s")
    node["warnings"] = status.get("warnings") or []
    return node
