"""The `exo-tools` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .models.catalog import ModelCard
from .placement.plan import NodeResources, PlacementError, plan_placement
from .types import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUED, DEFAULT_MAX_RUNNING, ModelLayout


def _existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _number_in(low: float, high: float, *, low_included: bool) -> Callable[[str], float]:
    """A parser of a number from `low` (included or not) to `high` (included)."""
    interval = f"{'[' if low_included else '('}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = low - 1.0
        above_low = value >= low if low_included else value > low
        if not (above_low and value <= high):
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}")
        return value

    return parse


_unit_interval = _number_in(0.0, 1.0, low_included=False)  # top_p
_temperature = _number_in(0.0, 2.0, low_included=True)
_repetition_penalty = _number_in(0.0, 2.0, low_included=False)
_dry_multiplier = _number_in(0.0, 10.0, low_included=True)
_share = _number_in(0.0, 1.0, low_included=True)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text!r}")
    return value


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
        help="run a node daemon (loads the model, serves the OpenAI and Anthropic APIs)",
        description="Run a node: fetch and load the model, then serve /v1/chat/completions, "
        "/v1/responses, /v1/messages, /v1/models and /health.",
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
        help="require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') on every route but "
        "/health (default $EXO_TOOLS_API_KEY, unset = open)",
    )
    node.add_argument(
        "--tls-cert",
        type=_existing_file,
        default=None,
        metavar="FILE",
        help="serve the API over HTTPS with this PEM certificate (chain); needs --tls-key",
    )
    node.add_argument(
        "--tls-key",
        type=_existing_file,
        default=None,
        metavar="FILE",
        help="the PEM private key of --tls-cert",
    )
    node.add_argument(
        "--tls-self-signed",
        action="store_true",
        help="serve the API over HTTPS with a self-signed certificate made on first start "
        "and kept in <home>/api_tls (its SHA-256 fingerprint is logged at start, for "
        "clients to pin)",
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
    node.add_argument(
        "--require-tool-on-user-turn",
        action=argparse.BooleanOptionalAction,
        default=False,
        help='for small models as agents: with tools offered and tool_choice "auto", answer '
        "a user's message that opens a task with one tool call decoded under the grammar "
        '(as "required"); after a tool result, and for a user message that follows a text '
        'answer, "auto" stays free, so the model can answer in text (default off; all '
        "three APIs; formats hermes, llama3_json, qwen3_coder)",
    )
    node.add_argument(
        "--default-max-tokens",
        type=_positive_int,
        default=None,
        metavar="N",
        help="output limit of a request that sets none (Codex sends none, and a small model "
        "may write until the context is full); default: whatever the context leaves",
    )
    node.add_argument(
        "--wrap-up-share",
        type=_share,
        default=0.0,
        metavar="F",
        help="for small models, whose answers run on to the output limit (which agent CLIs "
        "report as an error): once an answer has used this share of its max_tokens, it ends "
        "at its next sentence or line end outside a code block, and from half as far again "
        "at its next word end (e.g. 0.5; not for tool calls or other constrained output; "
        "default 0: off)",
    )
    node.add_argument(
        "--default-temperature",
        type=_temperature,
        default=1.0,
        metavar="T",
        help="temperature of a request that sets none (default 1.0, the APIs' own; agent "
        "CLIs set none, and small models ramble at 1.0: SmolLM2's card samples at 0.2)",
    )
    node.add_argument(
        "--default-top-p",
        type=_unit_interval,
        default=1.0,
        metavar="P",
        help="top_p of a request that sets none (default 1.0)",
    )
    node.add_argument(
        "--default-top-k",
        type=_non_negative_int,
        default=0,
        metavar="K",
        help="top_k of a request that sets none (default 0: no top-k filter)",
    )
    node.add_argument(
        "--default-repetition-penalty",
        type=_repetition_penalty,
        default=1.0,
        metavar="R",
        help="repetition_penalty of a request that sets none: above 1 the tokens among "
        "the last 64 generated become less likely, which stops a small model's loops "
        "(default 1.0: off)",
    )
    node.add_argument(
        "--default-dry-multiplier",
        type=_dry_multiplier,
        default=0.0,
        metavar="M",
        help="dry_multiplier of a request that sets none: llama.cpp's DRY sampler, which "
        "makes a token that would repeat an earlier run of the answer (2+ tokens, not "
        "across newlines, colons, quotes or *) less likely, by M x 1.75^(run - 2) in logits; "
        "it ends the verbatim loops a small model falls into, which a repetition penalty's "
        "64-token window misses (default 0: off; llama.cpp suggests 0.8)",
    )
    node.add_argument(
        "--prefix-cache-mb",
        type=_non_negative_int,
        default=None,
        metavar="MB",
        help="memory this node keeps for the prefix KV cache (earlier conversations' KV of "
        "its layers, so an agent's next turn computes only its new tokens); 0 turns it off; "
        "default: a quarter of the memory free at start, at most 8192",
    )
    node.add_argument(
        "--max-batch",
        type=_positive_int,
        default=DEFAULT_MAX_BATCH,
        metavar="N",
        help="decode steps of running requests computed as one batched pass (a pass reads "
        "the weights once, so 8 streams cost little more than one); default: %(default)s",
    )
    node.add_argument(
        "--max-running",
        type=_positive_int,
        default=DEFAULT_MAX_RUNNING,
        metavar="N",
        help="requests this node (as master) runs at once; more wait in its queue; "
        "default: %(default)s",
    )
    node.add_argument(
        "--max-queued",
        type=_non_negative_int,
        default=DEFAULT_MAX_QUEUED,
        metavar="N",
        help="requests that may wait for a place; beyond that a request gets 503 with "
        "Retry-After; default: %(default)s",
    )
    node.add_argument(
        "--kv-cache-mb",
        type=_positive_int,
        default=None,
        metavar="MB",
        help="KV memory for the running requests (each reserves its prompt and token "
        "limit); a request that would exceed it waits; default: half the memory free at start",
    )
    node.add_argument(
        "--log-requests",
        type=Path,
        default=None,
        metavar="FILE",
        help="append every API request's body to FILE as one JSON line (to replay a "
        "client's session, e.g. with benchmarks/agent_turns.py --replay); off by default",
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
    listing = model_commands.add_parser(
        "list",
        help="the model catalog: sizes per quantization, and which fit the cluster",
        description="The models exo-tools knows: id, architecture, parameters (total, and "
        "active per token for mixture-of-experts), context length, tool-call format, "
        "whether it is local, and the on-disk size of each published quantization with "
        "whether it fits.",
        epilog="Fit: each size is planned as the master would place it (pipeline stages "
        "over the fewest nodes, each using 80% of its available memory for the weights "
        "plus a float32 KV cache for the full context, or --kv-tokens), from the catalog's "
        "sizes, before any download. The nodes are those of the running cluster at --url "
        "(GET /v1/cluster); with no node reachable, this machine alone. Marks: * fits on "
        "one node, +N needs N nodes, - does not fit; ~ marks a size estimated as "
        "parameters x bits per weight.",
    )
    listing.add_argument(
        "--url",
        default="http://127.0.0.1:52415",
        help="a node of the cluster to fit against (default local)",
    )
    listing.add_argument("--api-key", default=os.environ.get("EXO_TOOLS_API_KEY"))
    listing.add_argument(
        "--kv-tokens",
        type=_positive_int,
        default=None,
        metavar="N",
        help="KV-cache tokens to reserve per model (default: its full context, as the node plans)",
    )
    listing.add_argument("--json", action="store_true", help="print the catalog as JSON")
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
    from .cluster.auth import secret_fingerprint
    from .models.catalog import UnknownModelError
    from .node import Node, NodeConfig
    from .serving.request import SamplingDefaults

    home, models_dir = _storage(args)
    if (args.tls_cert is None) != (args.tls_key is None):
        _fail("--tls-cert and --tls-key go together: give both, or --tls-self-signed")
    if args.tls_self_signed and args.tls_cert is not None:
        _fail("--tls-self-signed and --tls-cert are alternatives: give one")
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    home.mkdir(parents=True, exist_ok=True)
    cluster = cluster_config_from_args(
        args, home=home, api_host=args.host, api_port=args.api_port, version=__version__
    )
    logging.getLogger("exo_tools.cluster").info(
        "node %s, cluster %r, secret %s from %s%s",
        cluster.node_id,
        cluster.cluster_name,
        secret_fingerprint(cluster.secret),
        cluster.secret_source,
        f" (also accepting {len(cluster.accepted_secrets)} more: a rotation)"
        if cluster.accepted_secrets
        else "",
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
                require_tool_on_user_turn=args.require_tool_on_user_turn,
                default_max_tokens=args.default_max_tokens,
                wrap_up_share=args.wrap_up_share,
                sampling_defaults=SamplingDefaults(
                    args.default_temperature,
                    args.default_top_p,
                    args.default_top_k,
                    args.default_repetition_penalty,
                    args.default_dry_multiplier,
                ),
                prefix_cache_bytes=None
                if args.prefix_cache_mb is None
                else args.prefix_cache_mb << 20,
                log_requests=args.log_requests,
                max_batch=args.max_batch,
                max_running=args.max_running,
                max_queued=args.max_queued,
                kv_cache_bytes=None if args.kv_cache_mb is None else args.kv_cache_mb << 20,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                tls_self_signed=args.tls_self_signed,
            )
        )
    except UnknownModelError as error:
        _fail(f"--model: {error}")
        return 2
    return asyncio.run(node.run())


@dataclass(frozen=True)
class FitTarget:
    """The nodes a catalog model is fitted against, and where their memory figures came
    from (the running cluster, or this machine alone)."""

    nodes: tuple[NodeResources, ...]
    master_id: str
    where: str


def cluster_fit_target(url: str, api_key: str | None) -> FitTarget:
    """The healthy nodes of the cluster at `url`; this machine alone if none answers."""
    import psutil
    import requests

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = requests.get(f"{url.rstrip('/')}/v1/cluster", headers=headers, timeout=5)
        view = response.json() if response.status_code == 200 else None
    except (requests.RequestException, ValueError):
        view = None
    if isinstance(view, dict) and view.get("nodes"):
        nodes = tuple(
            NodeResources(
                str(node["id"]),
                int((node.get("capabilities") or {}).get("memory_available") or 0),
            )
            for node in view["nodes"]
            if node.get("healthy", True)
        )
        master = str(view.get("master") or nodes[0].node_id)
        if any(node.node_id == master for node in nodes):
            return FitTarget(nodes, master, f"the cluster at {url} ({len(nodes)} node(s))")
    available = int(psutil.virtual_memory().available)
    return FitTarget(
        (NodeResources("this-machine", available),),
        "this-machine",
        f"this machine ({available / 2**30:.1f} GiB available; no node answered at {url})",
    )


def catalog_fit(layout: ModelLayout, target: FitTarget) -> int | None:
    """How many of the target's nodes the master's planner would place `layout` on, or
    None when it fits on none of their combinations."""
    try:
        placement = plan_placement(layout, list(target.nodes), master_id=target.master_id, epoch=0)
    except PlacementError:
        return None
    return len(placement.stages)


def _fit_mark(nodes_used: int | None) -> str:
    if nodes_used is None:
        return "-"
    return "*" if nodes_used == 1 else f"+{nodes_used}"


def _short_count(count: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return f"{count:.0f}"


def _short_bytes(size: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9)):
        if size >= scale:
            return f"{size / scale:.3g}{unit}"
    return f"{size / 1e6:.3g}M"


def _short_tokens(tokens: int) -> str:
    if tokens >= 2**20:
        return f"{tokens / 2**20:.3g}M"
    return f"{tokens / 2**10:.3g}k"


def _catalog_entry(
    card: ModelCard, models_dir: Path, target: FitTarget, kv_tokens: int | None
) -> dict[str, Any]:
    """One model of the catalog with, per quantization, its size and the nodes it needs."""
    from .models import sources
    from .models.catalog import estimated_layout

    local = sources.local_path(card, models_dir)
    entry: dict[str, Any] = {
        "id": card.id,
        "name": card.name,
        "family": card.family,
        "tool_format": card.tool_format,
        "source": card.source.describe(),
        "local": local is not None,
    }
    spec = card.spec
    if spec is None:
        return entry
    entry.update(
        architecture=spec.architecture,
        hf_repo=spec.hf_repo,
        parameters=spec.parameters,
        active_parameters=spec.active_parameters,
        context_length=spec.context_length,
        layers=spec.layers,
        quantizations=[
            {
                "name": form.name,
                "repo": form.repo,
                "bytes": form.bytes,
                "estimated": form.estimated,
                "fits_on_nodes": catalog_fit(
                    estimated_layout(card, form.name, kv_budget_tokens=kv_tokens), target
                ),
            }
            for form in spec.quantizations
        ],
    )
    return entry


def _catalog_row(entry: dict[str, Any]) -> list[str]:
    if "quantizations" not in entry:
        tools = entry["tool_format"] or "auto"
        return [
            entry["id"],
            entry["family"],
            "?",
            "?",
            tools,
            "yes" if entry["local"] else "no",
            "",
        ]
    params = _short_count(entry["parameters"])
    if entry["active_parameters"]:
        params += f"/A{_short_count(entry['active_parameters'])}"
    sizes = "  ".join(
        f"{form['name']} {'~' if form['estimated'] else ''}{_short_bytes(form['bytes'])}"
        f"{_fit_mark(form['fits_on_nodes'])}"
        for form in entry["quantizations"]
    )
    return [
        entry["id"],
        entry["architecture"],
        params,
        _short_tokens(entry["context_length"]),
        entry["tool_format"] or "auto",
        "yes" if entry["local"] else "no",
        sizes,
    ]


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def _run_models(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .models import sources
    from .models.catalog import CATALOG, UnknownModelError, resolve_model

    _, models_dir = _storage(args)
    if args.models_command == "list":
        target = cluster_fit_target(args.url, args.api_key)
        entries = [
            _catalog_entry(card, models_dir, target, args.kv_tokens) for card in CATALOG.values()
        ]
        if args.json:
            print(json.dumps({"fit_against": target.where, "models": entries}, indent=2))
            return 0
        rows = [_catalog_row(entry) for entry in entries]
        _print_table(["ID", "ARCH", "PARAMS", "CONTEXT", "TOOLS", "LOCAL", "SIZES"], rows)
        print(
            f"\nFit against {target.where}: * fits on one node, +N on N nodes, - nowhere; "
            "~ estimated size. See `exo-tools models list --help`."
        )
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
        if card.spec is not None:
            info["spec"] = asdict(card.spec)
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
        try:
            code = _run_node(args)
        except SystemExit as error:
            code = error.code if isinstance(error.code, int) else 1 if error.code else 0
            if isinstance(error.code, str):
                print(error.code, file=sys.stderr)
        _exit_without_finalizing(code)
    if args.command == "models":
        raise SystemExit(_run_models(args, parser))
    if args.command == "cluster":
        raise SystemExit(_run_cluster(args))
    parser.print_help()
    raise SystemExit(2)


def _exit_without_finalizing(code: int) -> NoReturn:
    """End a node that has shut down: logs flushed, then the process exits at once.

    Python's finalization races the threads that ran MLX (the default executor's, for one):
    `join()` returns before a thread's C++ thread-local destructors have run, and MLX's
    take the GIL, which a finalizing interpreter answers by unwinding the thread, and the
    C++ runtime aborts ("terminate called without an active exception", exit -6; 1 in 8
    SIGTERMs here, traced with gdb). Everything a node writes is closed before this point.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
