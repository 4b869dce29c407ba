"""The voice assistant's server: the page, the HTTP API and the conversation websocket.

Why FastAPI on uvicorn: one ASGI application serves the static page, a small JSON API
(described by the OpenAPI schema FastAPI generates from the response models, at
/openapi.json and /docs) and the websocket, on one port and one asyncio event loop, where
each conversation is a set of tasks and blocking model work runs in worker threads.
uvicorn is the standard production ASGI server (websockets, TLS, graceful shutdown).
The reference server uses aiohttp, which has no generated API description.

Endpoints: GET / (the page, or the folder given as `static_dir`), GET /api/health,
GET /api/status (loading progress, sessions), GET /api/voices, GET /api/prompts,
GET /metrics (Prometheus), WS /api/chat (the conversation protocol: see protocol.py for the
messages, sessions.py for the query parameters), WS /v1/realtime (the OpenAI Realtime
protocol: openai_realtime.py). Until the model is ready the websocket answers an error
message ("model loading ...") and closes with code 1013 (try again later; closing.py lists
the codes); the page waits for GET /api/status to say "ready" before it offers the talk button.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Request, Response, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from personaplex.audio.vad import UtteranceDetector
from personaplex.errors import PersonaPlexError
from personaplex.runtime.prompts import PROMPT_PRESETS, check_system_prompt
from personaplex.runtime.voices import VOICE_NAMES
from personaplex.server import openai_realtime, protocol
from personaplex.server.closing import CloseCode
from personaplex.server.conversation import (
    Channel,
    ConversationServices,
    DuplexConversation,
    Engine,
    TurnBasedConversation,
    client_error_message,
)
from personaplex.audio.codec_pool import OpusProcessPool
from personaplex.audio.io import SAMPLE_RATE
from personaplex.server.metrics import ServerMetrics
from personaplex.server.model_host import ModelHost
from personaplex.server.security import TOKEN_COOKIE, AccessPolicy, HostGuard
from personaplex.runtime.voices import DEFAULT_VOICE
from personaplex.server.sessions import (
    ServerBusyError,
    SessionConfig,
    SessionInfo,
    SessionManager,
)

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_PROMPT_PRESET = "default"

CONVERSATION_PATH = "/api/chat"
LOADING_POLL_S = 0.5  # how often a `serve_once_loaded` startup looks at the model's loading


@dataclass(frozen=True)
class ServerSettings:
    max_sessions: int = 4
    policy: AccessPolicy = field(default_factory=AccessPolicy)
    # Full-duplex: microphone audio kept waiting for the model before the oldest is dropped.
    ring_frames: int = 8
    # Worker processes for the conversations' Opus encoding and decoding (audio/codec_pool.py).
    codec_processes: int = 1
    # Full-duplex: microphone audio from before the handshake kept for the model (10 s).
    startup_frames: int = 125
    # A folder served at / instead of the built-in page (e.g. NVIDIA's built web client).
    static_dir: Path | None = None
    make_detector: Callable[[], UtteranceDetector] = UtteranceDetector
    # Set when this app is one replica of several (server/cluster.py): /api/status and
    # /metrics then speak for all of them.
    cluster: ClusterView | None = None
    # A conversation whose client sends nothing for this long is ended (None: never).
    idle_timeout_s: float | None = 60.0
    # Start serving only once the model has loaded (or failed to). One process serves at once
    # and shows the loading on its page; a Ray Serve replica behind HAProxy waits, so that it
    # joins HAProxy's backends only when it can hold conversations (server/cluster.py).
    serve_once_loaded: bool = False


class Health(BaseModel):
    status: str
    model_ready: bool


class AsrStatus(BaseModel):
    model: str | None
    state: str  # off | loading | ready | error
    error: str | None


class SessionSummary(BaseModel):
    id: int
    mode: str
    voice: str
    seconds: float


class ReplicaSummary(BaseModel):
    id: str
    node: str
    device: str
    pid: int
    state: str  # loading | ready | error
    stage: str
    fraction: float | None
    sessions: int
    max_sessions: int
    free_slots: int
    frames: dict[str, float | int]  # this replica's shared frame (Status.frames)


class Status(BaseModel):
    state: str  # loading | ready | error
    stage: str  # download | load | warmup | ready (or starting)
    fraction: float | None
    message: str
    elapsed_s: float
    timings: dict[str, float]  # seconds per finished (or current) stage
    error: str | None
    help: str | None  # what to do when the model is unavailable
    asr: AsrStatus
    sessions: list[SessionSummary]
    max_sessions: int
    frames: dict[str, float | int]  # the shared frame: frames run, late frames, frame time (ms)
    replicas: list[ReplicaSummary] | None = None  # only when served by several replicas


class ClusterView(Protocol):
    """What a replica's /api/status and /metrics report about every replica."""

    async def status(self) -> Status: ...

    async def metrics(self) -> str: ...


class Voices(BaseModel):
    voices: list[str]
    default: str


class Prompts(BaseModel):
    presets: dict[str, str]
    default: str


def create_app(host: ModelHost, settings: ServerSettings | None = None) -> FastAPI:
    """The ASGI application; `host` starts loading the model when the app starts."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    sessions = SessionManager(settings.max_sessions)

    codecs: OpusProcessPool | None = None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        nonlocal codecs
        codecs = OpusProcessPool(settings.codec_processes, SAMPLE_RATE)
        host.start()
        await codecs.ready()
        while settings.serve_once_loaded and host.status()["state"] == "loading":
            await asyncio.sleep(LOADING_POLL_S)
        try:
            yield
        finally:
            await codecs.shutdown()

    app = FastAPI(
        title="PersonaPlex voice assistant",
        version="1",
        description=_api_description(),
        lifespan=lifespan,
    )
    app.add_middleware(HostGuard, policy=settings.policy)
    if settings.policy.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=sorted(settings.policy.allowed_origins),
            allow_methods=["GET"],
            allow_headers=["Authorization"],
        )

    def require_token(request: Request) -> None:
        if not settings.policy.token_accepted(request.query_params, request.headers, request.cookies):
            raise HTTPException(status_code=401, detail=_TOKEN_MESSAGE)

    authorised = [Depends(require_token)]

    def local_status() -> Status:
        metrics.model_ready.set(1 if host.engine is not None else 0)
        return Status(
            **host.status(),
            sessions=[SessionSummary(**info.describe()) for info in sessions.active()],
            max_sessions=sessions.limit,
            frames=host.engine.frame_stats() if host.engine is not None else {},
        )

    # What a cluster replica (server/cluster.py) reports about itself.
    app.state.local_status = local_status
    app.state.sessions = sessions
    app.state.metrics = metrics


    @app.middleware("http")
    async def remember_token(request: Request, call_next: Callable[[Request], Any]) -> Response:
        """A page opened with the right ?token= gets it as a cookie, for the clients that
        build their own websocket URL without it."""
        response = await call_next(request)
        token = settings.policy.token
        presented = "token" in request.query_params
        if token is not None and presented and settings.policy.token_accepted(request.query_params, {}):
            response.set_cookie(
                TOKEN_COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https"
            )
        return response

    if settings.static_dir is None:

        @app.get("/", include_in_schema=False)
        async def page() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/health", response_model=Health, summary="Liveness; whether the model is ready")
    async def health() -> Health:
        return Health(status="ok", model_ready=host.engine is not None)

    @app.get(
        "/api/status",
        response_model=Status,
        dependencies=authorised,
        summary="Model loading progress and running conversations",
    )
    async def status() -> Status:
        return local_status() if settings.cluster is None else await settings.cluster.status()

    @app.get("/api/voices", response_model=Voices, dependencies=authorised, summary="Voice presets")
    async def voices() -> Voices:
        return Voices(voices=list(VOICE_NAMES), default=DEFAULT_VOICE)

    @app.get("/api/prompts", response_model=Prompts, dependencies=authorised, summary="System prompt presets")
    async def prompts() -> Prompts:
        return Prompts(presets=dict(PROMPT_PRESETS), default=DEFAULT_PROMPT_PRESET)

    @app.get(
        "/metrics", response_class=PlainTextResponse, dependencies=authorised, summary="Prometheus metrics"
    )
    async def prometheus_metrics() -> PlainTextResponse:
        metrics.model_ready.set(1 if host.engine is not None else 0)
        text = metrics.render() if settings.cluster is None else await settings.cluster.metrics()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.websocket(CONVERSATION_PATH)
    async def chat(websocket: WebSocket) -> None:
        if not settings.policy.origin_accepted(websocket.headers):
            metrics.sessions_rejected.labels(reason="origin").inc()
            await websocket.close(code=CloseCode.POLICY)  # before accepting: the handshake gets a 403
            return
        await websocket.accept()
        channel = Channel(websocket)
        try:
            await _serve_conversation(channel, websocket)
        finally:
            await channel.close()

    async def _serve_conversation(channel: Channel, websocket: WebSocket) -> None:
        if not settings.policy.token_accepted(websocket.query_params, websocket.headers, websocket.cookies):
            await _refuse(channel, "unauthorised", _TOKEN_MESSAGE, CloseCode.POLICY)
            return
        try:
            config = SessionConfig.from_query(websocket.query_params)
        except PersonaPlexError as err:
            await _refuse(channel, "settings", str(err), CloseCode.POLICY)
            return
        engine = host.engine
        if engine is None:
            await _refuse(channel, "loading", host.not_ready_reason(), CloseCode.TRY_LATER)
            return
        check_prompt = _prompt_check(engine)
        try:
            check_prompt(config.system_prompt)
        except PersonaPlexError as err:
            await _refuse(channel, "settings", str(err), CloseCode.POLICY)
            return
        services = ConversationServices(
            engine=engine,
            metrics=metrics,
            make_detector=settings.make_detector,
            transcriber=host.transcriber,
            ring_frames=settings.ring_frames,
            codecs=codecs,
            startup_frames=settings.startup_frames,
            check_prompt=check_prompt,
            idle_timeout_s=settings.idle_timeout_s,
        )
        try:
            with conversation_slot(config) as info:
                kind = TurnBasedConversation if config.mode == "turn" else DuplexConversation
                conversation = kind(channel, services, config, info)
                try:
                    await conversation.run()
                finally:
                    conversation.close()
        except ServerBusyError as err:
            await _refuse(channel, "busy", str(err), CloseCode.TRY_LATER)
        except PersonaPlexError as err:
            # The engine refused this conversation's request (a persona that does not fit,
            # ...): the same request would fail again.
            logger.warning("conversation refused: %s", err)  # the log keeps the details
            await _end(channel, client_error_message(err, config.voice), CloseCode.POLICY)
        except Exception as err:
            # One conversation's failure ends that conversation only.
            logger.exception("conversation failed")
            metrics.session_crashes.inc()
            await _end(channel, client_error_message(err, config.voice), CloseCode.SERVER_ERROR)

    @contextmanager
    def conversation_slot(config: SessionConfig) -> Iterator[SessionInfo]:
        """One of the server's slots, counted, for as long as a conversation runs."""
        with sessions.slot(config) as info:
            metrics.sessions_total.labels(mode=config.mode).inc()
            metrics.sessions_active.labels(mode=config.mode).inc()
            try:
                yield info
            finally:
                metrics.sessions_active.labels(mode=config.mode).dec()

    async def _refuse(channel: Channel, reason: str, message: str, code: CloseCode) -> None:
        metrics.sessions_rejected.labels(reason=reason).inc()
        await _end(channel, message, code)

    async def _end(channel: Channel, message: str, code: CloseCode) -> None:
        """The error message (0x05), then the close frame with the same reason."""
        await channel.send(protocol.error(message))
        await channel.close(code, message)

    openai_realtime.add_route(app, host, settings, metrics, conversation_slot)
    if settings.static_dir is not None:
        # Last: the folder answers every path the routes above do not.
        app.mount("/", StaticFiles(directory=settings.static_dir, html=True), name="client")
    return app


def _prompt_check(engine: Engine) -> Callable[[str], str]:
    """The system prompt bound of `engine`: characters, then pieces against its context."""
    return functools.partial(
        check_system_prompt, tokenizer=engine.tokenizer, context_frames=engine.lm.config.context
    )


_TOKEN_MESSAGE = (
    "unauthorised: this server needs its access token; open the page with ?token=TOKEN "
    "(the URL `personaplex serve` printed) or pass --token to `personaplex chat`"
)


def _api_description() -> str:
    from personaplex.server import sessions as sessions_module

    return (
        "HTTP API of the PersonaPlex voice assistant. The conversation itself runs over the "
        "websocket `/api/chat` (not listed below, OpenAPI has no websockets).\n\n"
        "## Websocket messages\n" + _dedent_doc(protocol.__doc__) + "\n\n"
        "## Websocket query parameters\n" + _dedent_doc(sessions_module.__doc__)
    )


def _dedent_doc(doc: str | None) -> str:
    return "\n".join(line.strip() for line in (doc or "").strip().splitlines()[1:]).strip()
