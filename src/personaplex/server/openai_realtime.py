"""The OpenAI Realtime API on WS /v1/realtime, so clients built for it talk to PersonaPlex.

A PersonaPlex conversation is one full-duplex voice session: the client streams microphone
audio with `input_audio_buffer.append` (base64 PCM16, 24 kHz mono) without committing
turns, and the model speaks and listens at the same time, one 80 ms frame out per 80 ms
in. Its speech streams back as `response.output_audio.delta` and its inner monologue as
`response.output_audio_transcript.delta`, both in one response that lasts the whole
session. `session.update` sets the voice (a PersonaPlex preset, `audio.output.voice`) and
`instructions` (the system prompt) until the first audio arrives, which starts the
conversation with them. Clients of the beta API (header `OpenAI-Beta: realtime=v1`) get
the beta names (`response.audio.delta`, `response.audio_transcript.delta`, `session.voice`).
Every problem is an `error` event; one that ends the session is also the reason of the
close frame (codes in closing.py). docs/CLIENTS.md lists what is mapped and what is not.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, WebSocket

from personaplex.errors import PersonaPlexError
from personaplex.server.closing import CloseCode
from personaplex.server.conversation import Channel, Engine, PcmRing, client_error_message
from personaplex.server.metrics import ServerMetrics
from personaplex.server.model_host import ModelHost
from personaplex.server.sessions import ServerBusyError, SessionConfig, SessionInfo

if TYPE_CHECKING:
    from personaplex.server.app import ServerSettings

logger = logging.getLogger(__name__)

PATH = "/v1/realtime"
MODEL_NAME = "personaplex-7b-v1"
AUDIO_FORMAT = {"type": "audio/pcm", "rate": 24_000}
MAX_APPEND_BYTES = 15 * 1024 * 1024  # the OpenAI API's limit for one append
# Client events that have no PersonaPlex meaning, and why.
UNSUPPORTED_EVENTS = {
    "input_audio_buffer.commit": "PersonaPlex listens continuously (full duplex): there are no turns to commit",
    "response.create": "PersonaPlex decides itself when to speak (full duplex): just stream audio",
    "response.cancel": "PersonaPlex speaks in full duplex: talk over it, or close the session",
    "conversation.item.create": "PersonaPlex takes speech only: send audio with input_audio_buffer.append",
    "conversation.item.retrieve": "PersonaPlex keeps no conversation items",
    "conversation.item.truncate": "PersonaPlex keeps no conversation items",
    "conversation.item.delete": "PersonaPlex keeps no conversation items",
    "output_audio_buffer.clear": "there is no output audio buffer on a websocket session",
}


@dataclass(frozen=True)
class EventNames:
    """Server event names that differ between the GA API and the beta one."""

    audio_delta: str
    transcript_delta: str


GA_NAMES = EventNames("response.output_audio.delta", "response.output_audio_transcript.delta")
BETA_NAMES = EventNames("response.audio.delta", "response.audio_transcript.delta")


class RealtimeError(PersonaPlexError, ValueError):
    """A client event the session cannot use; answered with an `error` event."""

    def __init__(self, message: str, code: str = "invalid_event", event_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.event_id = event_id


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def add_route(
    app: FastAPI,
    host: ModelHost,
    settings: ServerSettings,
    metrics: ServerMetrics,
    conversation_slot: Callable[[SessionConfig], AbstractContextManager[SessionInfo]],
) -> None:
    """Add WS /v1/realtime to `app`; `conversation_slot` holds one of the server's slots."""

    @app.websocket(PATH)
    async def realtime(websocket: WebSocket) -> None:
        if not settings.policy.origin_accepted(websocket.headers):
            metrics.sessions_rejected.labels(reason="origin").inc()
            await websocket.close(code=CloseCode.POLICY)
            return
        await websocket.accept()
        session = RealtimeSession(Channel(websocket), websocket.headers.get("openai-beta", ""), metrics)
        try:
            await _serve(session, websocket)
        finally:
            await session.channel.close()

    async def _serve(session: RealtimeSession, websocket: WebSocket) -> None:
        if not settings.policy.token_accepted(websocket.query_params, websocket.headers, websocket.cookies):
            message = "the API key is not this server's access token (personaplex serve --token)"
            await _refuse(session, "unauthorised", message, "invalid_api_key", CloseCode.POLICY)
            return
        engine = host.engine
        if engine is None:
            await _refuse(session, "loading", host.not_ready_reason(), "model_loading", CloseCode.TRY_LATER)
            return
        try:
            with conversation_slot(session.config):
                await session.run(engine, settings.ring_frames, settings.startup_frames)
        except ServerBusyError as err:
            await _refuse(session, "busy", str(err), "server_busy", CloseCode.TRY_LATER)
        except PersonaPlexError as err:
            logger.warning("realtime session refused: %s", err)  # the log keeps the details
            await session.end(client_error_message(err, session.config.voice), "invalid_request", CloseCode.POLICY)
        except Exception as err:
            logger.exception("realtime session failed")
            metrics.session_crashes.inc()
            await session.end(client_error_message(err, session.config.voice), "server_error", CloseCode.SERVER_ERROR)

    async def _refuse(
        session: RealtimeSession, reason: str, message: str, code: str, close_code: CloseCode
    ) -> None:
        metrics.sessions_rejected.labels(reason=reason).inc()
        await session.end(message, code, close_code)


class RealtimeSession:
    """One /v1/realtime websocket: settings until the first audio, then one conversation."""

    def __init__(self, channel: Channel, beta_header: str, metrics: ServerMetrics) -> None:
        self.channel = channel
        self._metrics = metrics
        self.beta = "realtime=v1" in beta_header
        self.names = BETA_NAMES if self.beta else GA_NAMES
        self.config = SessionConfig(mode="duplex")
        self.session_id = _new_id("sess")
        self._ring: PcmRing | None = None  # made when the conversation starts
        self._generation: asyncio.Task[None] | None = None
        self._generation_ended = asyncio.Event()

    # ------------------------------------------------------------------ sending

    async def send(self, event_type: str, **fields: Any) -> None:
        event = {"type": event_type, "event_id": _new_id("event"), **fields}
        await self.channel.send_text(json.dumps(event, separators=(",", ":")))

    async def send_error(self, message: str, code: str, event_id: str | None = None) -> None:
        error_type = (
            "server_error"
            if code in ("server_error", "server_busy", "model_loading")
            else "invalid_request_error"
        )
        await self.send(
            "error",
            error={"type": error_type, "code": code, "message": message, "param": None, "event_id": event_id},
        )

    async def end(self, message: str, code: str, close_code: CloseCode) -> None:
        await self.send_error(message, code)
        await self.channel.close(close_code, message)

    def describe(self) -> dict[str, Any]:
        """The session object of session.created / session.updated."""
        common = {
            "id": self.session_id,
            "object": "realtime.session",
            "model": MODEL_NAME,
            "instructions": self.config.system_prompt,
            "tools": [],
            "tool_choice": "none",
        }
        if self.beta:
            return {
                **common,
                "modalities": ["audio", "text"],
                "voice": self.config.voice,
                "input_audio_format": "pcm16",
                "output_audio_format": "pcm16",
                "turn_detection": None,
                "input_audio_transcription": None,
                "temperature": self.config.sampling.audio_temperature,
                "max_response_output_tokens": "inf",
            }
        return {
            **common,
            "type": "realtime",
            "output_modalities": ["audio"],
            "max_output_tokens": "inf",
            "audio": {
                "input": {
                    "format": AUDIO_FORMAT,
                    "turn_detection": None,
                    "transcription": None,
                    "noise_reduction": None,
                },
                "output": {"format": AUDIO_FORMAT, "voice": self.config.voice, "speed": 1.0},
            },
        }

    # ------------------------------------------------------------------ the session

    async def run(self, engine: Engine, ring_frames: int, startup_frames: int) -> None:
        self._engine = engine
        self._ring_samples = (ring_frames * engine.frame_samples, startup_frames * engine.frame_samples)
        await self.send("session.created", session=self.describe())
        receiving = asyncio.create_task(self._receive_loop())
        generation_ended = asyncio.create_task(self._generation_ended.wait())
        try:
            await asyncio.wait({receiving, generation_ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Whichever side ends first ends the other: a closed socket stops inference now.
            tasks = [receiving, generation_ended, *([self._generation] if self._generation else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in (self._generation, receiving):
            if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _receive_loop(self) -> None:
        while (message := await self.channel.receive()) is not None:
            try:
                await self._handle(message)
            except RealtimeError as err:
                await self.send_error(str(err), err.code, err.event_id)

    async def _handle(self, message: bytes | str) -> None:
        event = _parse_event(message)
        event_type, event_id = event["type"], event.get("event_id")
        if event_type == "input_audio_buffer.append":
            self._append(_pcm16(event.get("audio"), event_id))
        elif event_type == "session.update":
            await self._update(event.get("session"), event_id)
        elif event_type == "input_audio_buffer.clear":
            if self._ring is not None:
                self._ring.clear()
            await self.send("input_audio_buffer.cleared")
        elif event_type in UNSUPPORTED_EVENTS:
            raise RealtimeError(
                f"{event_type} is not supported: {UNSUPPORTED_EVENTS[event_type]}",
                "unsupported_event",
                event_id,
            )
        else:
            raise RealtimeError(f"unknown client event type {event_type!r}", "invalid_event", event_id)

    async def _update(self, session: Any, event_id: str | None) -> None:
        if not isinstance(session, dict):
            raise RealtimeError("session.update needs a `session` object", "invalid_event", event_id)
        changes = self._settings_of(session, event_id)
        if changes and self._ring is not None:
            raise RealtimeError(
                "the voice and instructions are fixed once audio has started: "
                "open a new session to change them",
                "session_locked",
                event_id,
            )
        try:
            self.config = self.config.updated(changes)
        except PersonaPlexError as err:
            raise RealtimeError(str(err), "invalid_value", event_id) from None
        await self.send("session.updated", session=self.describe())

    def _settings_of(self, session: dict[str, Any], event_id: str | None) -> dict[str, Any]:
        """The PersonaPlex settings in a session object (GA or beta shape); formats checked."""
        audio = _object(session.get("audio"))
        output = _object(audio.get("output"))
        for part in ("input", "output"):
            fmt = _object(audio.get(part)).get("format")
            if fmt is not None and (
                not isinstance(fmt, dict)
                or fmt.get("type") != "audio/pcm"
                or fmt.get("rate", 24_000) != 24_000
            ):
                raise RealtimeError(
                    f"audio.{part}.format must be audio/pcm at 24000 Hz, got {fmt!r}",
                    "invalid_value",
                    event_id,
                )
        for key in ("input_audio_format", "output_audio_format"):
            if session.get(key) not in (None, "pcm16"):
                raise RealtimeError(f"{key} must be pcm16, got {session[key]!r}", "invalid_value", event_id)
        changes: dict[str, Any] = {}
        voice = output.get("voice") or session.get("voice")
        if voice is not None:
            changes["voice"] = str(voice)
        if session.get("instructions") is not None:
            changes["text_prompt"] = str(session["instructions"])
        return changes

    def _append(self, pcm: np.ndarray) -> None:
        if self._ring is None:
            self._ring = PcmRing(*self._ring_samples)
            self._generation = asyncio.create_task(self._generate())
            self._generation.add_done_callback(lambda _task: self._generation_ended.set())
        dropped = self._ring.write(pcm)
        if dropped:
            self._metrics.dropped_frames.inc(dropped / self._engine.frame_samples)

    async def _generate(self) -> None:
        config, engine = self.config, self._engine
        replies = engine.respond_realtime(
            self._microphone_frames(),
            voice=config.voice,
            system_prompt=config.system_prompt,
            seed=config.seed,
            sampling=config.sampling,
        )
        response_id, item_id = _new_id("resp"), _new_id("item")
        where = {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}
        started = False
        async with contextlib.aclosing(replies):
            async for chunk in replies:
                if not started:
                    started = True
                    await self._announce_response(response_id, item_id)
                self._metrics.frame_seconds.observe(chunk.elapsed_ms / 1000.0)
                pcm16 = (np.clip(chunk.pcm, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
                await self.send(
                    self.names.audio_delta, delta=base64.b64encode(pcm16).decode("ascii"), **where
                )
                if chunk.text:
                    await self.send(self.names.transcript_delta, delta=chunk.text, **where)

    async def _announce_response(self, response_id: str, item_id: str) -> None:
        """The one response of the session, with its one audio item, as the API opens them."""
        await self.send(
            "response.created",
            response={
                "id": response_id,
                "object": "realtime.response",
                "status": "in_progress",
                "output": [],
                "conversation_id": None,
                "metadata": None,
                "usage": None,
            },
        )
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        await self.send("response.output_item.added", response_id=response_id, output_index=0, item=item)
        await self.send(
            "conversation.item.added" if not self.beta else "conversation.item.created",
            previous_item_id=None,
            item=item,
        )
        await self.send(
            "response.content_part.added",
            response_id=response_id,
            item_id=item_id,
            output_index=0,
            content_index=0,
            part={"type": "audio", "transcript": ""},
        )

    async def _microphone_frames(self) -> AsyncIterator[np.ndarray]:
        assert self._ring is not None
        self._ring.handshake_sent()  # the persona is ready: from now on audio is live
        while self.channel.open:
            yield await self._ring.read(self._engine.frame_samples)


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _parse_event(message: bytes | str) -> dict[str, Any]:
    if isinstance(message, bytes):
        raise RealtimeError("binary frames are not part of the Realtime API: send JSON events as text")
    try:
        event = json.loads(message)
    except json.JSONDecodeError as err:
        raise RealtimeError(f"a client event must be a JSON object ({err})") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise RealtimeError("a client event must be a JSON object with a string `type`")
    return event


def _pcm16(audio: Any, event_id: str | None) -> np.ndarray:
    """Base64 PCM16 (little-endian, 24 kHz mono) as float32."""
    if not isinstance(audio, str) or not audio:
        raise RealtimeError(
            "input_audio_buffer.append needs `audio`: base64 PCM16 at 24 kHz", "invalid_value", event_id
        )
    if len(audio) > MAX_APPEND_BYTES * 4 // 3 + 4:
        raise RealtimeError(
            "one append holds at most 15 MiB of audio: send smaller pieces", "invalid_value", event_id
        )
    try:
        data = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise RealtimeError("`audio` is not valid base64", "invalid_value", event_id) from None
    if len(data) % 2:
        raise RealtimeError(
            f"PCM16 audio has an even number of bytes, got {len(data)}", "invalid_value", event_id
        )
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
