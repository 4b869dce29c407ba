"""One conversation over one websocket: turn-based or full-duplex.

Each conversation owns its Opus decoder and encoder, its VAD state or microphone ring
buffer, and its tasks; nothing is shared with other conversations but the engine (which
serialises model work itself), the ASR model and the metrics. When the socket closes,
generation stops at once and the slot is freed by the caller.

Events the server sends as metadata (0x04) to clients that ask for them (`events=1`: the
reference clients do not know them), each a JSON object with a "type":
- `session`: the settings in force, `sample_rate`, `frame_samples`, the session `id`.
- `state`: `listening` | `hearing` (user speaking) | `thinking` (ASR, prefill) | `speaking`
  (turn-based), `live` (full-duplex).
- `speech_started`: turn-based; the user talks over the reply: stop playing it.
- `transcript`: `{"role": "user", "text": ...}`: the user's words (turn-based, with ASR).
- `frame`: `{"index", "compute_ms", "rtf"}` for each generated 80 ms frame; full-duplex
  adds `buffered_ms`, the microphone audio waiting for the model.
- `reply_end`: turn-based; `{"frames": n, "reason": "done" | "interrupted"}`.
- `dropped`: full-duplex; `{"frames": total}` microphone frames dropped so far because
  inference fell behind (sent at most once a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from personaplex.audio.asr import Transcriber
from personaplex.audio.codec_pool import OpusProcessPool
from personaplex.audio.opus import opus_seconds
from personaplex.audio.vad import SpeechStarted, UtteranceDetector, UtteranceEnded
from personaplex.errors import PersonaPlexError, UnknownVoiceError
from personaplex.runtime.prompts import PieceTokenizer
from personaplex.server import protocol
from personaplex.server.closing import CloseCode, close_reason
from personaplex.server.metrics import ServerMetrics
from personaplex.server.protocol import ControlAction, MessageKind, ProtocolError
from personaplex.server.sessions import UPDATABLE_SETTINGS, SessionConfig, SessionInfo, SettingsError

logger = logging.getLogger(__name__)

FRAME_MS = 80.0
DROP_EVENT_INTERVAL_S = 1.0
# A client may send microphone audio ahead of real time by this much (network bursts, a
# recorder's start-up buffer); beyond it, audio is refused before it is decoded.
AUDIO_BURST_S = 10.0
# Opus' highest bitrate (510 kbit/s) plus Ogg framing: more bytes per second than this are
# not a microphone, whatever their packets claim.
MAX_AUDIO_BYTES_PER_S = 80_000


class Chunk(Protocol):
    """What the engine yields for each generated frame (personaplex.AudioChunk)."""

    pcm: np.ndarray
    text: str
    frame_index: int
    elapsed_ms: float


class Engine(Protocol):
    """The part of personaplex.PersonaPlex a conversation uses."""

    sample_rate: int
    frame_samples: int
    tokenizer: PieceTokenizer  # with lm.config.context: the bound on system prompts
    lm: Any

    def respond_stream(self, audio: np.ndarray, **settings: Any) -> Iterator[Chunk]: ...

    def frame_stats(self) -> dict[str, float | int]: ...

    def respond_realtime(
        self, mic_frames: AsyncIterator[np.ndarray], **settings: Any
    ) -> AsyncIterator[Chunk]: ...


@dataclass(frozen=True)
class ConversationServices:
    """What the server shares with every conversation."""

    engine: Engine
    metrics: ServerMetrics
    make_detector: Callable[[], UtteranceDetector]
    transcriber: Transcriber | None
    ring_frames: int
    codecs: OpusProcessPool
    # Full-duplex: microphone audio kept from before the handshake (and the burst some
    # clients send right after it), however slow the engine is to catch up.
    startup_frames: int
    # The system prompt bound of this engine (check_system_prompt with its tokenizer and context).
    check_prompt: Callable[[str], str]
    # A conversation whose client sends nothing for this long is ended (None: never).
    idle_timeout_s: float | None


class Channel:
    """The websocket, with sends serialised (several tasks send) and a closed flag."""

    def __init__(self, websocket: WebSocket) -> None:
        self._websocket = websocket
        self._send_lock = asyncio.Lock()
        self.open = True

    async def send(self, message: bytes) -> None:
        await self._send(message)

    async def send_text(self, message: str) -> None:
        await self._send(message)

    async def _send(self, message: bytes | str) -> None:
        if not self.open:
            return
        async with self._send_lock:
            try:
                if isinstance(message, str):
                    await self._websocket.send_text(message)
                else:
                    await self._websocket.send_bytes(message)
            except (WebSocketDisconnect, RuntimeError, OSError):
                # The peer went away between our check and the send: the receive side
                # sees the disconnect and ends the conversation.
                self.open = False

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the socket with `code` and `reason` (closing.py), unless the peer already did."""
        if not self.open:
            return
        self.open = False
        async with self._send_lock:
            with contextlib.suppress(RuntimeError, OSError):  # the peer closed first
                await self._websocket.close(code=code, reason=close_reason(reason))

    async def receive(self) -> bytes | str | None:
        """The next message, or None once the peer has closed the socket."""
        if not self.open:
            return None
        message = await self._websocket.receive()
        if message["type"] == "websocket.disconnect":
            self.open = False
            return None
        if message.get("bytes") is not None:
            return message["bytes"]
        return message.get("text") or ""


class Conversation(ABC):
    """The protocol side shared by both modes: reading messages and answering errors."""

    def __init__(
        self,
        channel: Channel,
        services: ConversationServices,
        config: SessionConfig,
        info: SessionInfo,
    ) -> None:
        self.channel = channel
        self.services = services
        self.config = config
        self.info = info
        self._opus = services.codecs.stream()  # encoder + decoder, in a codec worker process
        self._audio_budget = RealTimeBudget(AUDIO_BURST_S)
        self._last_activity = time.monotonic()
        self._refused_audio_s = 0.0
        self._last_refusal_error = 0.0

    @abstractmethod
    async def run(self) -> None:
        """Serve the conversation until the socket closes or generation fails."""

    def close(self) -> None:
        """Free what the conversation holds outside this process (its Opus streams)."""
        self._opus.close()

    async def send_event(self, event_type: str, **fields: Any) -> None:
        if self.config.events:
            await self.channel.send(protocol.metadata({"type": event_type, **fields}))

    async def send_error(self, message: str) -> None:
        await self.channel.send(protocol.error(message))

    async def send_session_event(self) -> None:
        await self.send_event(
            "session",
            id=self.info.session_id,
            sample_rate=self.services.engine.sample_rate,
            frame_samples=self.services.engine.frame_samples,
            **self.config.describe(),
        )

    async def send_chunk(self, chunk: Chunk, **frame_fields: Any) -> None:
        """The frame's audio and text, then its timing event."""
        ogg = await self._opus.encode(chunk.pcm)
        if ogg:
            await self.channel.send(protocol.audio(ogg))
        if chunk.text:
            await self.channel.send(protocol.text(chunk.text))
        self.services.metrics.frame_seconds.observe(chunk.elapsed_ms / 1000.0)
        await self.send_event(
            "frame",
            index=chunk.frame_index,
            compute_ms=round(chunk.elapsed_ms, 2),
            rtf=round(chunk.elapsed_ms / FRAME_MS, 3),
            **frame_fields,
        )

    def waiting_for_server(self) -> bool:
        """Whether the client is waiting for the server (a reply, the persona): not idle then."""
        return False

    async def receive_loop(self) -> None:
        """Handle client messages until the socket closes or the client falls silent."""
        while (message := await self._next_message()) is not None:
            try:
                await self._handle(message)
            except PersonaPlexError as err:  # protocol, audio and settings errors alike
                self.services.metrics.protocol_errors.inc()
                await self.send_error(str(err))
            except Exception as err:
                # A message we failed to foresee is still only a bad message: the session goes on.
                logger.exception("session %d: a client message could not be handled", self.info.session_id)
                self.services.metrics.protocol_errors.inc()
                await self.send_error(client_error_message(err, self.config.voice))

    def mark_activity(self) -> None:
        """Restart the idle clock (a client message came, or the server finished a reply)."""
        self._last_activity = time.monotonic()

    def _idle_left_s(self) -> float | None:
        timeout = self.services.idle_timeout_s
        if timeout is None or self.waiting_for_server():
            return timeout
        return max(0.0, self._last_activity + timeout - time.monotonic())

    async def _next_message(self) -> bytes | str | None:
        """The next client message; None once the socket closed or the idle timeout ended it."""
        while True:
            try:
                message = await asyncio.wait_for(self.channel.receive(), self._idle_left_s())
            except TimeoutError:
                if self.waiting_for_server() or self._idle_left_s():
                    continue  # a reply ended meanwhile: the clock restarted
                break
            self.mark_activity()
            return message
        self.services.metrics.idle_timeouts.inc()
        await self.send_error(
            f"idle: no message from the client for {self.services.idle_timeout_s:g} s, so the "
            "conversation ended (the server's --idle-timeout); reconnect to talk again"
        )
        await self.channel.close()
        return None

    async def _handle(self, message: bytes | str) -> None:
        if isinstance(message, str):
            raise ProtocolError("text websocket frames are not part of the protocol: send binary messages")
        decoded = protocol.decode_message(message)
        if decoded.kind == MessageKind.AUDIO:
            cost_s = _audio_cost_s(decoded.payload)  # read before any decoding
            if not self._audio_budget.admit(cost_s):
                await self._refuse_audio(cost_s)
                return
            pcm = await self._opus.decode(decoded.payload)
            if len(pcm):
                await self.on_audio(pcm)
        elif decoded.kind == MessageKind.CONTROL:
            await self.on_control(protocol.parse_control(decoded.payload))
        elif decoded.kind == MessageKind.METADATA:
            await self.on_settings(protocol.parse_metadata(decoded.payload))
        elif decoded.kind == MessageKind.PING:
            await self.channel.send(protocol.ping())
        else:
            raise ProtocolError(f"the server does not accept {decoded.kind.name.lower()} messages")

    async def _refuse_audio(self, seconds: float) -> None:
        """Count audio sent beyond real time; tell the client at most once a second."""
        self._refused_audio_s += seconds
        self.services.metrics.refused_audio_seconds.inc(seconds)
        now = time.monotonic()
        if now - self._last_refusal_error >= DROP_EVENT_INTERVAL_S:
            self._last_refusal_error = now
            await self.send_error(
                f"audio arrives faster than real time: {self._refused_audio_s:.1f} s of it refused so far; "
                "send the microphone as it records"
            )

    @abstractmethod
    async def on_audio(self, pcm: np.ndarray) -> None:
        """Decoded microphone audio (24 kHz float32)."""

    @abstractmethod
    async def on_control(self, action: ControlAction) -> None:
        """A control message (0x03)."""

    @abstractmethod
    async def on_settings(self, changes: dict[str, Any]) -> None:
        """A metadata message (0x04) from the client."""


class TurnBasedConversation(Conversation):
    """Listen, detect the end of the utterance, transcribe, reply; speaking over a reply stops it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._detector = self.services.make_detector()
        self._reply_task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        await self.channel.send(protocol.handshake())
        await self.send_session_event()
        await self.send_event("state", state="listening")
        try:
            await self.receive_loop()
        finally:
            await self._stop_reply()

    async def on_audio(self, pcm: np.ndarray) -> None:
        for event in self._detector.feed(pcm):
            if isinstance(event, SpeechStarted):
                await self._stop_reply()
                await self.send_event("speech_started")
                await self.send_event("state", state="hearing")
            elif isinstance(event, UtteranceEnded):
                self._start_reply(event.audio)

    async def on_control(self, action: ControlAction) -> None:
        if action == ControlAction.END_TURN:
            utterance = self._detector.end_now()
            if utterance is not None:
                self._start_reply(utterance.audio)
        elif action == ControlAction.PAUSE:
            await self._stop_reply()
        else:
            raise ProtocolError(f"control action {action.name.lower()} is not supported by this server")

    async def on_settings(self, changes: dict[str, Any]) -> None:
        unknown = set(changes) - UPDATABLE_SETTINGS
        if unknown:
            raise SettingsError(
                f"cannot change {', '.join(sorted(unknown))}; "
                f"changeable: {', '.join(sorted(UPDATABLE_SETTINGS))}"
            )
        config = self.config.updated(changes)
        self.services.check_prompt(config.system_prompt)
        self.config = config
        await self.send_session_event()

    def waiting_for_server(self) -> bool:
        return self._reply_task is not None and not self._reply_task.done()

    def _start_reply(self, audio: np.ndarray) -> None:
        self._reply_task = asyncio.create_task(self._reply(audio, self.config))

    async def _stop_reply(self) -> None:
        task, self._reply_task = self._reply_task, None
        if task is None or task.done():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.send_event("state", state="listening")

    async def _reply(self, audio: np.ndarray, config: SessionConfig) -> None:
        frames = 0
        reason = "interrupted"
        try:
            await self.send_event("state", state="thinking")
            await self._send_transcript(audio)
            chunks = iterate_in_thread(
                lambda: self.services.engine.respond_stream(
                    audio,
                    sample_rate=self.services.engine.sample_rate,
                    voice=config.voice,
                    system_prompt=config.system_prompt,
                    max_steps=config.max_steps,
                    seed=config.seed,
                    sampling=config.sampling,
                )
            )
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    if frames == 0:
                        await self.send_event("state", state="speaking")
                    await self.send_chunk(chunk)
                    frames += 1
            reason = "done"
        except PersonaPlexError as err:
            reason = "error"
            logger.warning("session %d: reply refused: %s", self.info.session_id, err)
            await self.send_error(client_error_message(err, config.voice))
        except Exception as err:
            # A bug in one reply must not take the server down: report it, keep listening.
            reason = "error"
            logger.exception("session %d: reply failed", self.info.session_id)
            self.services.metrics.session_crashes.inc()
            await self.send_error(client_error_message(err, config.voice))
        finally:
            # Sent on cancellation too, so the client knows how much of the reply came.
            self.mark_activity()
            await asyncio.shield(self.send_event("reply_end", frames=frames, reason=reason))
        await self.send_event("state", state="listening")

    async def _send_transcript(self, audio: np.ndarray) -> None:
        transcriber = self.services.transcriber
        if transcriber is None:
            return
        words = await asyncio.to_thread(transcriber.transcribe, audio, self.services.engine.sample_rate)
        await self.send_event("transcript", role="user", text=words)


class DuplexConversation(Conversation):
    """Microphone frames go through a ring buffer to the engine, one reply frame per mic frame."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        engine = self.services.engine
        self._ring = PcmRing(
            self.services.ring_frames * engine.frame_samples, self.services.startup_frames * engine.frame_samples
        )
        self._dropped_frames = 0.0
        self._last_drop_event = 0.0
        self._live = False

    async def run(self) -> None:
        generation = asyncio.create_task(self._generate())
        receiving = asyncio.create_task(self.receive_loop())
        try:
            done, _pending = await asyncio.wait({generation, receiving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Whichever side ends first ends the other: a closed socket stops inference now.
            for task in (generation, receiving):
                task.cancel()
            await asyncio.gather(generation, receiving, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    def waiting_for_server(self) -> bool:
        return not self._live  # the persona is being prepared

    async def on_audio(self, pcm: np.ndarray) -> None:
        dropped_samples = self._ring.write(pcm)
        if dropped_samples == 0:
            return
        frames = dropped_samples / self.services.engine.frame_samples
        self._dropped_frames += frames
        self.services.metrics.dropped_frames.inc(frames)
        now = time.monotonic()
        if now - self._last_drop_event >= DROP_EVENT_INTERVAL_S:
            self._last_drop_event = now
            await self.send_event("dropped", frames=round(self._dropped_frames, 1))

    async def on_control(self, action: ControlAction) -> None:
        raise ProtocolError(
            f"control action {action.name.lower()} does not apply to a full-duplex conversation"
        )

    async def on_settings(self, changes: dict[str, Any]) -> None:
        raise SettingsError(
            "the settings of a full-duplex conversation are fixed when it starts: reconnect to change them"
        )

    async def _generate(self) -> None:
        """Run the engine until the socket closes; its errors end the conversation (app.py
        closes the socket with the code and reason that say whether to retry)."""
        config = self.config
        replies = self.services.engine.respond_realtime(
            self._microphone_frames(),
            voice=config.voice,
            system_prompt=config.system_prompt,
            seed=config.seed,
            sampling=config.sampling,
        )
        async with contextlib.aclosing(replies):
            async for chunk in replies:
                await self.send_chunk(
                    chunk, buffered_ms=round(self._ring.seconds(self.services.engine.sample_rate) * 1000)
                )

    async def _microphone_frames(self) -> AsyncIterator[np.ndarray]:
        """Frames for the engine; the first request means the persona prefill is done."""
        await self.channel.send(protocol.handshake())
        self._ring.handshake_sent()
        await self.send_session_event()
        await self.send_event("state", state="live")
        self._live = True
        self.mark_activity()
        frame_samples = self.services.engine.frame_samples
        while self.channel.open:
            yield await self._ring.read(frame_samples)


def client_error_message(err: Exception, voice: str) -> str:
    """What a remote client is told of an error: never a path or internal detail of this
    server (the log has those)."""
    if isinstance(err, UnknownVoiceError):
        # Only preset names get this far; the message would name the server's voice file.
        return f"voice {voice} is not available on this server (the server log has the details)"
    if isinstance(err, PersonaPlexError):
        return str(err)
    return f"internal error ({type(err).__name__}); the server log has the details"


def _audio_cost_s(payload: bytes) -> float:
    """Real time an audio message takes from a client's budget: its duration, or its size
    at the highest Opus bitrate when that is more."""
    return max(opus_seconds(payload), len(payload) / MAX_AUDIO_BYTES_PER_S)


class RealTimeBudget:
    """A token bucket of seconds of audio: it fills at real time up to `burst_s`."""

    def __init__(self, burst_s: float) -> None:
        self._burst_s = burst_s
        self._available_s = burst_s
        self._updated = time.monotonic()

    def admit(self, seconds: float) -> bool:
        """Whether `seconds` of audio may come in now (taken from the bucket if so)."""
        now = time.monotonic()
        self._available_s = min(self._burst_s, self._available_s + now - self._updated)
        self._updated = now
        if seconds > self._available_s:
            return False
        self._available_s -= seconds
        return True


class PcmRing:
    """Microphone audio waiting for the model, capped: when full, the oldest is dropped.

    Dropping keeps the conversation in real time when inference is slower than the
    microphone, instead of answering ever later. What the client said before the model was
    ready is the exception: audio written before the handshake, or in the burst a client
    sends right after it (clients that wait for the handshake queue their microphone
    meanwhile), is kept up to `startup_samples` and never dropped for later audio.
    """

    def __init__(self, capacity_samples: int, startup_samples: int = 0, startup_grace_s: float = 1.0) -> None:
        self._capacity = capacity_samples
        self._startup_capacity = startup_samples
        self._startup_grace_s = startup_grace_s  # after the handshake, audio still counts as the burst
        self._samples = np.zeros(0, dtype=np.float32)
        self._kept = 0  # the oldest samples, from the startup: not dropped
        self._handshake_at: float | None = None
        self._changed = asyncio.Event()

    def handshake_sent(self) -> None:
        self._handshake_at = time.monotonic()

    def _in_startup(self) -> bool:
        return self._handshake_at is None or time.monotonic() - self._handshake_at < self._startup_grace_s

    def write(self, pcm: np.ndarray) -> int:
        """Append `pcm`; returns how many samples were dropped to make room."""
        pcm = np.asarray(pcm, dtype=np.float32)
        if self._in_startup() and len(self._samples) == self._kept:  # kept audio stays one prefix
            self._kept += min(len(pcm), max(0, self._startup_capacity - self._kept))
        self._samples = np.concatenate([self._samples, pcm])
        # Beyond the kept startup audio, the oldest live audio goes first.
        overflow = max(0, len(self._samples) - self._kept - self._capacity)
        if overflow:
            self._samples = np.concatenate([self._samples[: self._kept], self._samples[self._kept + overflow :]])
        self._changed.set()
        return overflow

    async def read(self, count: int) -> np.ndarray:
        """Wait until `count` samples are there and take them."""
        while len(self._samples) < count:
            self._changed.clear()
            await self._changed.wait()
        taken, self._samples = self._samples[:count], self._samples[count:]
        self._kept = max(0, self._kept - count)
        return taken

    def clear(self) -> None:
        """Forget the audio waiting for the model."""
        self._samples = np.zeros(0, dtype=np.float32)
        self._kept = 0

    def seconds(self, sample_rate: int) -> float:
        return len(self._samples) / sample_rate


async def iterate_in_thread(make_iterator: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Run a blocking iterator in a worker thread and hand its items to the event loop.

    Closing this async generator (or cancelling its consumer) stops the worker after the
    item it is computing; the worker then closes the iterator in its own thread, so the
    engine frees the conversation's state without anything left running.
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()

    def hand_over(tag: str, value: Any) -> None:
        if stop.is_set():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is stopping
            loop.call_soon_threadsafe(items.put_nowait, (tag, value))

    def pump() -> None:
        iterator: Iterator[Any] | None = None
        try:
            iterator = make_iterator()
            for item in iterator:
                if stop.is_set():
                    break
                hand_over("item", item)
            hand_over("end", None)
        except Exception as err:  # handed to the consumer, which raises it
            hand_over("error", err)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=pump, name="personaplex-reply", daemon=True)
    worker.start()
    try:
        while True:
            tag, value = await items.get()
            if tag == "end":
                return
            if tag == "error":
                raise value
            yield value
    finally:
        stop.set()
