"""Runs ONE ClusterNode in this process and serves GET /v1/cluster (test helper).

    python tests/helpers/cluster_member.py --node-id a --api-port 8001 --grpc-port 9001 \
        --interface 127.0.0.1 --secret-file s.txt [--peer HOST:PORT] [--no-discovery]

Prints "READY <grpc_port>" on stdout once serving.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from exo_tools.cluster import ClusterNode, add_cluster_arguments, cluster_config_from_args


async def run(args: argparse.Namespace) -> None:
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="cluster-member-"))
    config = cluster_config_from_args(
        args, home=home, api_host=args.api_host, api_port=args.api_port, version="test"
    )
    node = ClusterNode(config)

    async def cluster(_: web.Request) -> web.Response:
        view = node.snapshot()
        body = view.model_dump(by_alias=True)
        body["master_api_url"] = node.master_api_url()
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/v1/cluster", cluster)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.api_host, args.api_port)
    await site.start()
    await node.start()
    print(f"READY {node.grpc_port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await node.stop()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    add_cluster_arguments(parser)
    parser.add_argument("--api-port", type=int, required=True)
    parser.add_argument("--api-host", default="0.0.0.0")
    parser.add_argument("--home", default=None)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s {args.node_id or '?'} %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("zeroconf").setLevel(logging.WARNING)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
