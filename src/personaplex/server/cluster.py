"""Conversations across GPUs and machines: the server as a Ray Serve application.

Each replica of the `PersonaPlexServer` deployment is the whole one-process server
(`create_app` around its own `ModelHost`, engine and session limit) on one GPU
(`num_gpus=1`; 0 on the CPU). Ray Serve's HTTP proxy (one per node) carries the page,
the API and the conversation websockets to the replicas; a websocket is one long request,
so a conversation stays on the replica that took it. Three pieces make that work for
conversations (docs/SCALING.md has the design and its limits):

- `SessionSlotRouter`, the deployment's request router: a new conversation goes to a
  ready replica with a free slot; every replica reports readiness and its slots through
  `record_routing_stats`, and the router counts the conversations it routed since.
  Only when every ready replica is full does one of them get it, and answer "busy"
  (0x05, close 1013) as one process does. A replica still loading takes none while
  another is ready (it would answer "model loading").
- `ReplicaBoard`, a one-replica deployment where every replica posts its status and
  metrics each second, so that /api/status lists the replicas and /metrics adds up all
  of them whichever replica answers.
- `ConversationEndNotice`, an ASGI middleware in Ray Serve's proxies: when the replica
  behind an open conversation dies, the proxy's stream ends without a close; the
  middleware then sends the client a 0x05 message and closes with 1011. It is installed
  through Ray Serve's `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` (see `PROXY_ENV`).

`max_ongoing_requests` is a replica's conversation capacity plus `HTTP_HEADROOM`, so
that the page, /api/status and /metrics still reach a replica whose conversations fill
it; autoscaling counts ongoing requests, so its target is set in conversations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, replace
from typing import Any

import ray
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)
from starlette.middleware import Middleware

from personaplex.errors import PersonaPlexError
from personaplex.server import protocol
from personaplex.server.closing import CloseCode
from personaplex.server.app import (
    CONVERSATION_PATH,
    ReplicaSummary,
    ServerSettings,
    Status,
    create_app,
)
from personaplex.server.model_host import EngineLoader, ModelHost, TranscriberLoader
from personaplex.server.scaling import Scaling

logger = logging.getLogger(__name__)

APP_NAME = "personaplex"
# Requests a replica takes beyond its conversations: the page, /api/status, /metrics.
HTTP_HEADROOM = 16
# A replica posts its report when its conversations or loading state change (checked every
# REPORT_CHECK_S) and at least every REPORT_INTERVAL_S.
REPORT_CHECK_S = 0.1
REPORT_INTERVAL_S = 1.0
# A replica that has not reported for this long is gone (killed, or its node lost).
REPORT_STALE_S = 3.0
BOARD_CALL_TIMEOUT_S = 2.0
BOARD_READ_CACHE_S = 0.25
ADDRESS_PROBE_TIMEOUT_S = 5.0
ROUTING_STATS_PERIOD_S = 0.5
# A replica being removed lets its conversations run this long before it stops.
SHUTDOWN_GRACE_S = 120.0
# Ray Serve reads this in every proxy process to add our middleware (ConversationEndNotice).
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "personaplex.server.cluster:proxy_middlewares"}
# What every Ray process needs for the HAProxy ingress (read when Ray Serve is imported).
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}

REPLICA_GONE_MESSAGE = (
    "the server process holding this conversation stopped (its GPU worker failed or was "
    "removed); start a new conversation: another worker takes it"
)


@dataclass(frozen=True)
class ReplicaRecipe:
    """What every replica builds its server from (sent to each replica, so picklable)."""

    load_engine: EngineLoader
    load_transcriber: TranscriberLoader | None
    asr_model_name: str | None
    settings: ServerSettings


# --- the board: every replica's latest report --------------------------------------------


@serve.deployment(
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
    logging_config={"enable_access_log": False},  # a post per replica per second
)
class ReplicaBoard:
    """The latest status and metrics of every replica; reports older than REPORT_STALE_S
    are from replicas that are gone."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[float, dict[str, Any]]] = {}

    def post(self, report: dict[str, Any]) -> None:
        self._reports[report["id"]] = (time.monotonic(), report)

    def withdraw(self, replica_id: str) -> None:
        self._reports.pop(replica_id, None)

    def reports(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        for replica_id, (posted_at, _) in list(self._reports.items()):
            if now - posted_at > REPORT_STALE_S:
                del self._reports[replica_id]
        return [report for _, report in sorted(self._reports.values(), key=lambda item: item[1]["id"])]


class BoardView:
    """What /api/status and /metrics of one replica say about all of them."""

    def __init__(self, board: DeploymentHandle, own_report: Callable[[], dict[str, Any]]) -> None:
        self._board = board
        self._own_report = own_report
        # Every open page polls /api/status: one board read per BOARD_READ_CACHE_S serves them all.
        self._posted: list[dict[str, Any]] = []
        self._read_at = -BOARD_READ_CACHE_S

    async def reports(self) -> list[dict[str, Any]]:
        """Every replica's report, this replica's fresh rather than as last posted."""
        own = self._own_report()
        if time.monotonic() - self._read_at >= BOARD_READ_CACHE_S:
            try:
                self._posted = await asyncio.wait_for(self._board.reports.remote(), BOARD_CALL_TIMEOUT_S)
            except Exception as err:  # the board restarts with its deployment: answer for this replica
                logger.warning("the replica board is unavailable (%s); reporting this replica only", err)
                self._posted = []
            self._read_at = time.monotonic()
        others = [report for report in self._posted if report["id"] != own["id"]]
        return sorted([own, *others], key=lambda report: report["id"])

    async def status(self) -> Status:
        return cluster_status(await self.reports())

    async def metrics(self) -> str:
        return summed_metrics(await self.reports())


def cluster_status(reports: list[dict[str, Any]]) -> Status:
    """/api/status for the whole application: the loading fields of the most advanced
    replica (the one that decides whether conversations can start), every running
    conversation, the total capacity, the replicas' frames together, and one line per
    replica."""
    statuses = [Status(**report["status"]) for report in reports]
    lead = max(statuses, key=_readiness)
    return lead.model_copy(
        update={
            "sessions": [session for status in statuses for session in status.sessions],
            "max_sessions": sum(status.max_sessions for status in statuses),
            "frames": combined_frames([status.frames for status in statuses]),
            "replicas": [_summary(report, status) for report, status in zip(reports, statuses, strict=True)],
        }
    )


# How each replica's frame statistics combine: counts add up; times and memory peaks are
# the worst replica's (a client on the slowest GPU lives with its frame time).
_FRAME_TOTALS = ("frames_run", "late_frames", "live_rows", "capacity")
_FRAME_WORST = ("frame_ms_median", "frame_ms_p99", "gpu_mem_gb")


def combined_frames(frames: list[dict[str, float | int]]) -> dict[str, float | int]:
    combined: dict[str, float | int] = {}
    for stats in frames:
        for key, value in stats.items():
            if key in _FRAME_TOTALS:
                combined[key] = combined.get(key, 0) + value
            elif key in _FRAME_WORST:
                combined[key] = max(combined.get(key, value), value)
    return combined


def _readiness(status: Status) -> tuple[int, float]:
    rank = {"ready": 2, "loading": 1}.get(status.state, 0)
    return rank, status.fraction or 0.0


def _summary(report: dict[str, Any], status: Status) -> ReplicaSummary:
    return ReplicaSummary(
        id=report["id"],
        node=report["node"],
        device=report["device"],
        state=status.state,
        stage=status.stage,
        fraction=status.fraction,
        pid=report["pid"],
        sessions=len(status.sessions),
        max_sessions=status.max_sessions,
        free_slots=max(0, status.max_sessions - len(status.sessions)),
        frames=status.frames,
    )


def summed_metrics(reports: list[dict[str, Any]]) -> str:
    """The replicas' Prometheus metrics added up, series by series: the same exposition one
    process gives (counters, histograms and session gauges are totals; model_ready counts
    the ready replicas). /api/status has each replica's own figures."""
    families: dict[str, Metric] = {}
    totals: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for report in reports:
        for family in text_string_to_metric_families(report["metrics"]):
            families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            series = totals.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sample.labels.items()))
                series[key] = series.get(key, 0.0) + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in totals[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry).decode()


class _Families:
    """A prometheus_client collector over metric families already built."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


# --- the replica -------------------------------------------------------------------------


@serve.ingress()
class PersonaPlexServer:
    """One replica: the one-process server (page, API, conversations) on one GPU."""

    async def __init__(self, recipe: ReplicaRecipe, board: DeploymentHandle) -> None:
        context = serve.get_replica_context()
        self._replica_id = context.replica_id.unique_id
        self._node = _node_address()
        self._device = _device_description()
        self._board = board
        self._host = ModelHost(recipe.load_engine, recipe.load_transcriber, recipe.asr_model_name)
        self._app = create_app(
            self._host, replace(recipe.settings, cluster=BoardView(board, self._report))
        )
        self._reporting = asyncio.get_running_loop().create_task(self._report_periodically())

    def __serve_build_asgi_app__(self) -> Any:
        return self._app

    def record_routing_stats(self) -> dict[str, Any]:
        """What SessionSlotRouter routes conversations by."""
        sessions, limit = self._sessions()
        return {"ready": self._host.engine is not None, "sessions": sessions, "max_sessions": limit}

    async def __del__(self) -> None:
        # Serve calls this on a graceful stop (scale down, redeploy): leave the board at once.
        self._reporting.cancel()
        with contextlib.suppress(Exception):  # the board may be stopping too
            await asyncio.wait_for(self._board.withdraw.remote(self._replica_id), BOARD_CALL_TIMEOUT_S)

    def _sessions(self) -> tuple[int, int]:
        manager = self._app.state.sessions
        return len(manager.active()), manager.limit

    def _report(self) -> dict[str, Any]:
        return {
            "id": self._replica_id,
            "node": self._node,
            "device": self._device,
            "pid": os.getpid(),
            "status": self._app.state.local_status().model_dump(),
            "metrics": self._app.state.metrics.render(),
        }

    async def _report_periodically(self) -> None:
        posted_state, posted_at = None, 0.0
        while True:
            state = (self._host.status()["state"], self._sessions())
            if state != posted_state or time.monotonic() - posted_at >= REPORT_INTERVAL_S:
                try:
                    await asyncio.wait_for(self._board.post.remote(self._report()), BOARD_CALL_TIMEOUT_S)
                except Exception as err:  # the board is restarting: the next report goes through
                    logger.warning("could not post this replica's report: %s", err)
                else:
                    posted_state, posted_at = state, time.monotonic()
            await asyncio.sleep(REPORT_CHECK_S)


def _node_address() -> str:
    return ray.util.get_node_ip_address()


def _device_description() -> str:
    gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    if not gpus:
        return "cpu"
    import torch

    return f"GPU {','.join(gpus)} ({torch.cuda.get_device_name(0)})"


# --- routing ------------------------------------------------------------------------------


class SessionSlotRouter(FIFOMixin, LocalityMixin, RequestRouter):
    """Conversations to ready replicas with a free slot; other requests to any replica.

    Ranks, best first: ready replicas with a free slot, ready replicas without (they answer
    "busy"), replicas not known to be ready (they answer "model loading"); each split into
    this proxy's node, its availability zone, the rest (a conversation's every message
    crosses from proxy to replica). Within a rank Ray Serve takes the replica with the
    fewest ongoing requests. Slots come from the replicas' routing stats (every
    ROUTING_STATS_PERIOD_S) and the conversations this router has sent since, so that
    simultaneous new conversations spread out.
    """

    def initialize_state(self, **kwargs: Any) -> None:
        self._conversations: dict[ReplicaID, set[str]] = {}

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is None or not _is_conversation(pending_request):
            return [candidate_replicas]
        with_slot, full, not_ready = [], [], []
        for replica in candidate_replicas:
            stats = replica.routing_stats or {}
            if not stats.get("ready"):
                not_ready.append(replica)
            elif self._free_slots(replica.replica_id, stats) > 0:
                with_slot.append(replica)
            else:
                full.append(replica)
        return [
            nearness
            for rank in (with_slot, full, not_ready)
            for nearness in self.rank_replicas_via_locality(rank)
            if nearness
        ]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        if _is_conversation(pending_request):
            self._conversations.setdefault(replica_id, set()).add(
                pending_request.metadata.internal_request_id
            )

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._conversations.get(replica_id, set()).discard(internal_request_id)

    def _free_slots(self, replica_id: ReplicaID, stats: dict[str, Any]) -> int:
        # The stats lag; the conversations routed here since are known exactly.
        sessions = max(int(stats.get("sessions", 0)), len(self._conversations.get(replica_id, ())))
        return int(stats.get("max_sessions", 0)) - sessions


def _is_conversation(pending_request: PendingRequest) -> bool:
    return pending_request.metadata.route.rstrip("/").endswith(CONVERSATION_PATH)


# --- the proxy's notice to clients of a replica that died ---------------------------------

AsgiScope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
AsgiReceive = Callable[[], Awaitable[AsgiMessage]]
AsgiSend = Callable[[AsgiMessage], Awaitable[None]]


class ConversationEndNotice:
    """ASGI middleware for Ray Serve's proxy: a conversation whose replica went away
    without closing it gets a 0x05 message and close code 1011, instead of a bare drop."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: AsgiScope, receive: AsgiReceive, send: AsgiSend) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        seen = {"accepted": False, "ended": False}

        async def watched_receive() -> AsgiMessage:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                seen["ended"] = True
            return message

        async def watched_send(message: AsgiMessage) -> None:
            if message["type"] == "websocket.accept":
                seen["accepted"] = True
            elif message["type"] == "websocket.close":
                seen["ended"] = True
            await send(message)

        await self.app(scope, watched_receive, watched_send)
        if seen["accepted"] and not seen["ended"]:
            logger.warning("a conversation's replica went away; telling the client")
            with contextlib.suppress(Exception):  # the client may be gone as well
                await send({"type": "websocket.send", "bytes": protocol.error(REPLICA_GONE_MESSAGE)})
                await send({"type": "websocket.close", "code": CloseCode.SERVER_ERROR})


def proxy_middlewares() -> list[Middleware]:
    """Ray Serve's proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(ConversationEndNotice)]


# --- the application ----------------------------------------------------------------------


def build_application(recipe: ReplicaRecipe, scaling: Scaling) -> serve.Application:
    """The Ray Serve application: the replicas and their board."""
    scaling = scaling.checked()
    capacity = recipe.settings.max_sessions
    gpus = _gpus_per_replica(scaling)
    options: dict[str, Any] = {
        "name": "PersonaPlexServer",
        # A GPU replica keeps a core for its conversations' Opus and websocket work; CPU
        # replicas share the machine's cores (Ray would otherwise cap them at one per core).
        "ray_actor_options": {"num_gpus": gpus, "num_cpus": 1 if gpus else 0},
        "max_ongoing_requests": capacity + HTTP_HEADROOM,
        "graceful_shutdown_timeout_s": SHUTDOWN_GRACE_S,
    }
    if scaling.ingress == "proxy":
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=SessionSlotRouter,
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
        )
    else:
        # HAProxy balances its connections itself (leastconn; Ray Serve refuses a custom
        # router on the deployment it serves) and knows nothing of our readiness: a replica
        # joins its backends when Serve starts it, so it starts only once its model is loaded
        # (its app's startup waits). Meanwhile it still posts its loading progress to the board.
        recipe = replace(recipe, settings=replace(recipe.settings, serve_once_loaded=True))
    if scaling.min_replicas is not None:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=scaling.min_replicas,
            initial_replicas=scaling.replicas,
            max_replicas=scaling.max_replicas,
            target_ongoing_requests=max(scaling.target_load * capacity, 1.0),
            # A new replica loads and warms up the model before it takes anyone.
            upscale_delay_s=10.0,
            downscale_delay_s=300.0,
        )
    else:
        options["num_replicas"] = scaling.replicas
    deployment = serve.deployment(PersonaPlexServer).options(**options)
    return deployment.bind(recipe, ReplicaBoard.bind())


def _gpus_per_replica(scaling: Scaling) -> float:
    if scaling.gpus_per_replica is not None:
        return scaling.gpus_per_replica
    if not ray.is_initialized():  # built before Ray is up: Ray's own tools decide the placement
        return 1.0
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def serve_until_stopped(
    recipe: ReplicaRecipe,
    scaling: Scaling,
    *,
    ray_address: str | None,
    http_options: dict[str, Any],
    log_level: str,
    welcome: str,
) -> None:
    """Start Ray (or join the cluster at `ray_address`), run the application on Ray
    Serve's proxy with `http_options` until Ctrl-C or SIGTERM, then remove it (and stop
    the Ray started here). Serve's controller, proxies and replicas log at `log_level`
    (INFO includes one access line per request, as uvicorn's); `welcome` is printed once
    the application is deployed."""
    import signal

    # A local cluster's processes inherit these: every proxy gets ConversationEndNotice, and
    # with --ingress haproxy, Ray Serve starts HAProxy and the replicas' own HTTP servers.
    os.environ.update(PROXY_ENV)
    if scaling.ingress == "haproxy":
        os.environ.update(HAPROXY_ENV)
    if ray_address is not None:
        _check_reachable(ray_address)
    try:
        ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"the Ray cluster at {ray_address}" if ray_address else "a local Ray instance"
        raise PersonaPlexError(
            f"could not start or reach {where} ({err}); check --ray-address (host:port of the "
            "head node's GCS, or 'auto' on a node of the cluster)"
        ) from None
    # After ray.init, which installs its own (crash-dumping) SIGTERM handler.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _start_serve(recipe, scaling, http_options, log_level)
        print(welcome, file=sys.stderr, flush=True)
        while True:
            time.sleep(1.0)
    finally:
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        if ray_address is None:
            with contextlib.suppress(Exception):
                serve.shutdown()
        ray.shutdown()


def _start_serve(recipe: ReplicaRecipe, scaling: Scaling, http_options: dict[str, Any], log_level: str) -> None:
    """Serve's controller, proxies (or HAProxy) and the application, deployed; Serve failing
    to start (a port taken, say) is one line naming what failed."""
    try:
        serve.start(
            http_options=http_options,
            logging_config={"log_level": log_level.upper()},
            # On a cluster that runs no Serve yet, the proxies get it from the controller.
            controller_options={"runtime_env": {"env_vars": dict(PROXY_ENV)}},
        )
        if scaling.ingress == "haproxy":
            print(f"starting {scaling.replicas} replica(s): with --ingress haproxy the server answers once "
                  "one has loaded the model", file=sys.stderr, flush=True)
        serve.run(
            build_application(recipe, scaling),
            name=APP_NAME,
            route_prefix="/",
            blocking=False,
            logging_config={"log_level": log_level.upper()},
        )
    except (ray.exceptions.RayError, RuntimeError) as err:
        raise PersonaPlexError(
            f"Ray Serve could not start: {_failure_line(err)}. Is another `serve --replicas` or Ray Serve "
            "running on this machine? Stop it (`ray stop`), or use another --port"
        ) from None


def _failure_line(err: BaseException) -> str:
    """The line of a (remote, multi-line) error that says what failed: HAProxy's ALERT, else the
    last line that names an error, else the first."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for marker in ("[ALERT]", "Error", "error"):
        named = [line for line in lines if marker in line]
        if named:
            return named[0 if marker == "[ALERT]" else -1][:300]
    return lines[0][:300] if lines else type(err).__name__


def _check_reachable(ray_address: str) -> None:
    """Fail at once on a HOST:PORT nobody listens on (Ray itself retries for minutes)."""
    host, _, port = ray_address.rpartition(":")
    if "://" in ray_address or not host or not port.isdigit():
        return  # "auto", ray://..., or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise PersonaPlexError(
            f"no Ray cluster answers at {ray_address} ({err}); give the head node's GCS address "
            "(`ray start --head` prints it; port 6379 by default), or 'auto' on a node of the cluster"
        ) from None


def _interrupt(_signal: int, _frame: Any) -> None:
    raise KeyboardInterrupt
