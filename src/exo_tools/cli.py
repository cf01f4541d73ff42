"""The `exo-tools` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__


def _existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return path


def _default_home() -> Path:
    from .models.sources import default_home

    return default_home()


def _add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="exo-tools state folder (node id, secret, models); "
        "default $EXO_TOOLS_HOME or ~/.cache/exo-tools",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="where fetched models are stored; default $EXO_TOOLS_MODELS_DIR or HOME/models",
    )


def _storage(args: argparse.Namespace) -> tuple[Path, Path]:
    from .models.sources import default_models_dir

    home = (args.home or _default_home()).expanduser()
    models_dir = (args.models_dir or default_models_dir(home)).expanduser()
    return home, models_dir


def build_parser() -> argparse.ArgumentParser:
    from .cluster.config import parse_port
    from .models.catalog import DEFAULT_MODEL_ID, DTYPES
    from .tools import FORMATS

    parser = argparse.ArgumentParser(
        prog="exo-tools",
        description="A distributed MLX inference cluster with an OpenAI-compatible API "
        "and reliable tool calling.",
    )
    parser.add_argument("--version", action="version", version=f"exo-tools {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    node = commands.add_parser(
        "node",
        help="run a node daemon (loads the model, serves the OpenAI API)",
        description="Run a node: fetch and load the model, then serve /v1/chat/completions, "
        "/v1/models and /health.",
    )
    node.add_argument(
        "--model",
        default=DEFAULT_MODEL_ID,
        help=f"catalog id, .gguf file, Hugging Face folder or repo id (default {DEFAULT_MODEL_ID}; "
        "see `exo-tools models list`)",
    )
    node.add_argument("--host", default="127.0.0.1", help="API bind address (default 127.0.0.1)")
    node.add_argument("--api-port", type=parse_port, default=52415, help="API port (default 52415)")
    _add_storage_arguments(node)
    node.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weight precision: auto picks float32 on CPUs with an optimized BLAS, "
        "else the file's own (quantized) weights (default auto)",
    )
    node.add_argument(
        "--api-key",
        default=os.environ.get("EXO_TOOLS_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health "
        "(default $EXO_TOOLS_API_KEY, unset = open)",
    )
    node.add_argument(
        "--chat-template",
        type=_existing_file,
        default=None,
        help="a Jinja chat template file to use instead of the model's own",
    )
    node.add_argument(
        "--tool-format",
        choices=FORMATS,
        default=None,
        help="tool-call format of the model (default: from the model card, else inferred "
        "from the chat template)",
    )
    node.add_argument(
        "--lazy-tool-grammar",
        action=argparse.BooleanOptionalAction,
        default=False,
        help='with tool_choice "auto", constrain a tool call to its schema once the model '
        "starts one (free text before it; formats hermes and qwen3_coder; default off, see "
        "docs/CONSTRAINED_DECODING.md); forced calls and response_format are always "
        "constrained",
    )
    from .cluster import add_cluster_arguments

    add_cluster_arguments(node)
    from .placement.plan import add_placement_arguments

    add_placement_arguments(node)
    node.add_argument("--no-progress", action="store_true", help="no progress bars")
    node.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    cluster = commands.add_parser(
        "cluster",
        help="show a running cluster: nodes, master, links",
        description="Print GET /v1/cluster of a node as a table.",
    )
    cluster.add_argument(
        "--url", default="http://127.0.0.1:52415", help="any node's API (default local)"
    )
    cluster.add_argument("--api-key", default=os.environ.get("EXO_TOOLS_API_KEY"))
    cluster.add_argument("--json", action="store_true", help="print the raw JSON")

    models = commands.add_parser("models", help="list, fetch and inspect models")
    model_commands = models.add_subparsers(dest="models_command", metavar="ACTION")
    listing = model_commands.add_parser("list", help="the model catalog and what is local")
    _add_storage_arguments(listing)
    pull = model_commands.add_parser("pull", help="fetch a model and check that it loads")
    pull.add_argument("model", help="catalog id, .gguf file, HF folder or repo id")
    pull.add_argument("--no-load", action="store_true", help="fetch only, skip the load check")
    _add_storage_arguments(pull)
    show = model_commands.add_parser("show", help="a model's card and local files")
    show.add_argument("model")
    _add_storage_arguments(show)
    remove = model_commands.add_parser("rm", help="delete exo-tools' copy of a model")
    remove.add_argument("model")
    _add_storage_arguments(remove)
    return parser


def _fail(message: str) -> None:
    print(f"exo-tools: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _run_node(args: argparse.Namespace) -> int:
    from .cluster import cluster_config_from_args
    from .models.catalog import UnknownModelError
    from .node import Node, NodeConfig

    home, models_dir = _storage(args)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    home.mkdir(parents=True, exist_ok=True)
    cluster = cluster_config_from_args(
        args, home=home, api_host=args.host, api_port=args.api_port, version=__version__
    )
    logging.getLogger("exo_tools.cluster").info(
        "node %s, cluster %r, secret from %s",
        cluster.node_id,
        cluster.cluster_name,
        cluster.secret_source,
    )
    try:
        node = Node(
            NodeConfig(
                model=args.model,
                host=args.host,
                api_port=args.api_port,
                home=home,
                models_dir=models_dir,
                dtype=args.dtype,
                api_key=args.api_key or None,
                chat_template_file=args.chat_template,
                tool_format=args.tool_format,
                progress=not args.no_progress,
                cluster=cluster,
                parallelism=args.parallelism,
                min_nodes=args.min_nodes,
                lazy_tool_grammar=args.lazy_tool_grammar,
            )
        )
    except UnknownModelError as error:
        _fail(f"--model: {error}")
        return 2
    return asyncio.run(node.run())


def _card_row(card: Any, models_dir: Path) -> list[str]:
    from .models import sources

    local = sources.local_path(card, models_dir)
    return [
        card.id,
        card.family,
        card.tool_format or "auto",
        "yes" if local else "no",
        card.source.describe(),
    ]


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


def _run_models(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .models import sources
    from .models.catalog import CATALOG, UnknownModelError, resolve_model

    _, models_dir = _storage(args)
    if args.models_command == "list":
        rows = [_card_row(card, models_dir) for card in CATALOG.values()]
        _print_table(["ID", "FAMILY", "TOOLS", "LOCAL", "SOURCE"], rows)
        return 0
    if args.models_command is None:
        parser.parse_args(["models", "--help"])
        return 2
    try:
        card = resolve_model(args.model)
    except UnknownModelError as error:
        _fail(str(error))
        return 2
    if args.models_command == "show":
        local = sources.local_path(card, models_dir)
        info: dict[str, Any] = {
            "id": card.id,
            "name": card.name,
            "family": card.family,
            "tool_format": card.tool_format,
            "source": card.source.describe(),
            "description": card.description,
            "local_path": str(local) if local else None,
        }
        print(json.dumps(info, indent=2))
        return 0
    if args.models_command == "rm":
        removed = sources.remove(card, models_dir)
        print(f"removed {card.id}" if removed else f"nothing of {card.id} to remove here")
        return 0
    # pull
    try:
        path = sources.fetch(card, models_dir)
    except sources.ModelFetchError as error:
        _fail(str(error))
        return 2
    print(f"{card.id}: {path}")
    if not args.no_load:
        from .models.loader import load_model

        loaded = load_model(card, path)
        print(
            f"{card.id}: loads ({loaded.config['num_hidden_layers']} layers, "
            f"{loaded.weight_bytes / 1e6:.0f} MB as {loaded.dtype})"
        )
    return 0


def _run_cluster(args: argparse.Namespace) -> int:
    import requests

    from .cluster import render_cluster_table

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.url.rstrip("/")
    try:
        response = requests.get(f"{url}/v1/cluster", headers=headers, timeout=10)
    except requests.RequestException as error:
        _fail(f"--url: cannot reach {url}: {error}")
        return 2
    if response.status_code != 200:
        _fail(f"{url}/v1/cluster answered {response.status_code}: {response.text.strip()}")
    view = response.json()
    print(json.dumps(view, indent=2) if args.json else render_cluster_table(view))
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        raise SystemExit(2)
    if args.command == "node" or (args.command == "models" and args.models_command == "pull"):
        from .blas import reexec_with_fast_blas

        reexec_with_fast_blas(["-m", "exo_tools", *argv])
    if args.command == "node":
        raise SystemExit(_run_node(args))
    if args.command == "models":
        raise SystemExit(_run_models(args, parser))
    if args.command == "cluster":
        raise SystemExit(_run_cluster(args))
    parser.print_help()
    raise SystemExit(2)
