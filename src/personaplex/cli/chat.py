"""`personaplex chat`: talk to a running `personaplex serve` from the terminal.

The microphone and the speaker go through sounddevice (PortAudio), an optional extra:
`pip install 'personaplex[chat]'`. The terminal shows the user's words (turn-based, when
the server has speech recognition) and the model's inner monologue as it comes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TextIO
from urllib.parse import urlencode, urlsplit, urlunsplit

import numpy as np

from personaplex.audio.format import FRAME_SAMPLES, SAMPLE_RATE
from personaplex.audio.opus import OpusStreamDecoder, OpusStreamEncoder
from personaplex.cli.arguments import MAX_STEPS_HELP, reply_frames
from personaplex.errors import PersonaPlexError
from personaplex.runtime.validation import DEFAULT_STEPS
from personaplex.server import protocol
from personaplex.server.protocol import MessageKind

MIC_BLOCK = 480  # 20 ms
JITTER_FRAMES = 3
SPEAKING_LEVEL = 0.01
SPEAKING_HANGOVER_S = 0.3
DEFAULT_URL = "http://127.0.0.1:8998"


def register(subparsers: Any) -> None:
    """Add the `chat` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "chat",
        help="talk to a running `personaplex serve` with the microphone and speaker",
        description="A terminal client for the voice assistant server "
        "(needs `pip install 'personaplex[chat]'`).",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
    parser.add_argument(
        "--mode", choices=("turn", "duplex"), default="turn", help="turn-based or full-duplex (default turn)"
    )
    parser.add_argument("--voice", default="NATM0", help="voice preset (default NATM0)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="system prompt preset name (see the server's /api/prompts)")
    prompt.add_argument("--system-prompt", help="system prompt text")
    parser.add_argument(
        "--max-steps",
        type=reply_frames,
        default=DEFAULT_STEPS,
        help=f"turn-based: reply length in 80 ms frames, {MAX_STEPS_HELP} (default {DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--echo-suppression",
        action="store_true",
        help="full-duplex: mute the microphone while the assistant speaks (without headphones)",
    )
    parser.add_argument("--token", help="the server's access token, if it has one")
    parser.add_argument("--input-device", help="sounddevice input device (name or index)")
    parser.add_argument("--output-device", help="sounddevice output device (name or index)")
    parser.add_argument(
        "--seconds", type=float, help="end the conversation after this long (default: at Ctrl-C)"
    )
    parser.set_defaults(func=run)


@dataclass(frozen=True)
class ChatOptions:
    url: str = DEFAULT_URL
    mode: str = "turn"
    voice: str = "NATM0"
    prompt: str | None = None
    system_prompt: str | None = None
    max_steps: int = DEFAULT_STEPS
    echo_suppression: bool = False
    token: str | None = None

    def websocket_url(self) -> str:
        parts = urlsplit(self.url)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        # events=1: the transcript, barge-in and state events this client shows.
        query: dict[str, Any] = {"mode": self.mode, "voice": self.voice, "events": 1}
        if self.system_prompt is not None:
            query["text_prompt"] = self.system_prompt
        elif self.prompt is not None:
            query["prompt"] = self.prompt
        if self.mode == "turn":
            query["max_steps"] = self.max_steps
        if self.token:
            query["token"] = self.token
        return urlunsplit((scheme, parts.netloc, "/api/chat", urlencode(query), ""))


class JitterBuffer:
    """Reply audio waiting for the speaker (used from the audio thread, hence the lock).

    Playback starts once `target_samples` are queued and again after running dry, so
    uneven arrival does not break the sound; `drain` plays out a shorter tail.
    """

    def __init__(self, target_samples: int) -> None:
        self._target = target_samples
        self._lock = threading.Lock()
        self._queued = np.zeros(0, dtype=np.float32)
        self._playing = False
        self._draining = False
        self.level = 0.0

    def push(self, pcm: np.ndarray) -> None:
        with self._lock:
            self._queued = np.concatenate([self._queued, pcm.astype(np.float32)])
            self._draining = False

    def drain(self) -> None:
        with self._lock:
            self._draining = True

    def flush(self) -> None:
        with self._lock:
            self._queued = np.zeros(0, dtype=np.float32)
            self._playing = False

    def read(self, count: int) -> np.ndarray:
        """The next `count` samples to play (silence where there is nothing to play)."""
        out = np.zeros(count, dtype=np.float32)
        with self._lock:
            ready = len(self._queued) >= self._target or (self._draining and len(self._queued) > 0)
            self._playing = self._playing or ready
            if self._playing:
                taken = self._queued[:count]
                out[: len(taken)] = taken
                self._queued = self._queued[len(taken) :]
                self._playing = len(self._queued) > 0
        self.level = float(np.sqrt(np.mean(out**2)))
        return out


class AudioDevice(Protocol):
    """Microphone in, speaker out."""

    player: JitterBuffer

    def start(self, on_block: Callable[[np.ndarray], None]) -> None:
        """Start calling `on_block` with 24 kHz mono float32 microphone blocks (any thread)."""

    def close(self) -> None: ...


class SoundDeviceAudio:
    """The default microphone and speaker through sounddevice."""

    def __init__(self, input_device: str | None = None, output_device: str | None = None) -> None:
        try:
            import sounddevice
        except (ImportError, OSError) as err:
            raise SystemExit(
                f"personaplex chat needs sounddevice and PortAudio ({err}): "
                "pip install 'personaplex[chat]' and, on Debian/Ubuntu, apt-get install libportaudio2"
            ) from None
        self._sounddevice = sounddevice
        self._devices = (_device(input_device), _device(output_device))
        self._check_devices()
        self.player = JitterBuffer(JITTER_FRAMES * FRAME_SAMPLES)
        self._streams: list[Any] = []

    def _check_devices(self) -> None:
        """Refuse at once, in one line, a machine without a usable microphone or speaker."""
        settings = {"samplerate": SAMPLE_RATE, "channels": 1, "dtype": "float32"}
        for kind, device, check in (
            ("microphone", self._devices[0], self._sounddevice.check_input_settings),
            ("speaker", self._devices[1], self._sounddevice.check_output_settings),
        ):
            try:
                check(device=device, **settings)
            except (self._sounddevice.PortAudioError, ValueError) as err:
                flag = "--input-device" if kind == "microphone" else "--output-device"
                raise PersonaPlexError(
                    f"no usable {kind} ({err}): connect one, or pick one with {flag} "
                    "(`python -m sounddevice` lists them)"
                ) from None

    def start(self, on_block: Callable[[np.ndarray], None]) -> None:
        def record(indata: np.ndarray, _frames: int, _time: Any, _status: Any) -> None:
            on_block(indata[:, 0].copy())

        def play(outdata: np.ndarray, frames: int, _time: Any, _status: Any) -> None:
            outdata[:, 0] = self.player.read(frames)

        common = {"samplerate": SAMPLE_RATE, "channels": 1, "dtype": "float32", "blocksize": MIC_BLOCK}
        self._streams = [
            self._sounddevice.InputStream(device=self._devices[0], callback=record, **common),
            self._sounddevice.OutputStream(device=self._devices[1], callback=play, **common),
        ]
        for stream in self._streams:
            stream.start()

    def close(self) -> None:
        for stream in self._streams:
            stream.stop()
            stream.close()


def _device(name: str | None) -> int | str | None:
    return int(name) if name is not None and name.isdigit() else name


class ChatClient:
    """One conversation with the server: microphone to socket, socket to speaker and terminal."""

    def __init__(self, options: ChatOptions, audio: AudioDevice, out: TextIO = sys.stdout) -> None:
        self.options = options
        self.audio = audio
        self.out = out
        self._encoder = OpusStreamEncoder()
        self._decoder = OpusStreamDecoder()
        self._sending = False
        self._speaking_until = 0.0
        self._in_model_line = False
        self.errors: list[str] = []

    async def run(self, seconds: float | None = None) -> int:
        """Converse until the server closes, Ctrl-C, or `seconds` pass; 0 on a clean end."""
        if not await asyncio.to_thread(self._wait_until_ready):
            return 1
        from websockets.asyncio.client import connect

        loop = asyncio.get_running_loop()
        microphone: asyncio.Queue[np.ndarray] = asyncio.Queue()
        async with connect(self.options.websocket_url(), max_size=None) as socket:
            self.audio.start(lambda block: loop.call_soon_threadsafe(microphone.put_nowait, block))
            try:
                tasks = [
                    asyncio.create_task(self._receive(socket)),
                    asyncio.create_task(self._send_microphone(socket, microphone)),
                ]
                done, pending = await asyncio.wait(
                    tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
                )
                for task in pending:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                self.audio.close()
        self._end_model_line()
        refused = bool(self.errors) and not self._sending  # busy, unauthorised, bad settings
        return 1 if refused else 0

    def _wait_until_ready(self) -> bool:
        """Show the server's loading progress; False (with what to do) if the model is unavailable."""
        last_message = None
        while True:
            try:
                status = self._get_status()
            except (urllib.error.URLError, OSError) as err:
                self._print(
                    f"cannot reach the server at {self.options.url} ({err}): "
                    "start it with `personaplex serve`"
                )
                return False
            if status["state"] == "ready":
                return True
            if status["state"] == "error":
                help_lines = f"\n{status['help']}" if status.get("help") else ""
                self._print(f"the server's model is unavailable: {status['error']}{help_lines}")
                return False
            message = f"model {status['stage']}: {status['message']}"
            if message != last_message:
                self._print(message)
                last_message = message
            time.sleep(0.5)

    def _get_status(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.options.token}"} if self.options.token else {}
        request = urllib.request.Request(self.options.url.rstrip("/") + "/api/status", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    async def _send_microphone(self, socket: Any, microphone: asyncio.Queue[np.ndarray]) -> None:
        while True:
            block = await microphone.get()
            if not self._sending:
                continue  # the server is not ready for audio before its handshake
            suppress = (
                self.options.mode == "duplex"
                and self.options.echo_suppression
                and time.monotonic() < self._speaking_until
            )
            ogg = self._encoder.encode(np.zeros_like(block) if suppress else block)
            if ogg:
                await socket.send(protocol.audio(ogg))

    async def _receive(self, socket: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in socket:
                self._handle(message)
        except ConnectionClosed:
            pass

    def _handle(self, message: bytes) -> None:
        kind, payload = message[0], message[1:]
        if kind == MessageKind.HANDSHAKE:
            self._sending = True
        elif kind == MessageKind.AUDIO:
            self.audio.player.push(self._decoder.decode(payload))
            if self.audio.player.level > SPEAKING_LEVEL:
                self._speaking_until = time.monotonic() + SPEAKING_HANGOVER_S
        elif kind == MessageKind.TEXT:
            self._model_text(payload.decode("utf-8"))
        elif kind == MessageKind.METADATA:
            self._event(json.loads(payload))
        elif kind == MessageKind.ERROR:
            self.errors.append(payload.decode("utf-8"))
            self._print(f"error: {self.errors[-1]}")

    def _event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "transcript":
            self._print(f"you: {event['text']}")
        elif kind == "speech_started":
            self.audio.player.flush()
        elif kind == "reply_end":
            self.audio.player.drain()
            self._end_model_line()
        elif kind == "state" and event["state"] in ("listening", "live"):
            self._end_model_line()
            self._print(f"[{event['state']}]")
        elif kind == "dropped":
            self._print(f"[{event['frames']} microphone frames dropped: the server is slower than real time]")

    def _model_text(self, piece: str) -> None:
        if not self._in_model_line:
            self.out.write("persona:")
            self._in_model_line = True
        self.out.write(piece)
        self.out.flush()

    def _end_model_line(self) -> None:
        if self._in_model_line:
            self.out.write("\n")
            self._in_model_line = False

    def _print(self, line: str) -> None:
        self._end_model_line()
        print(line, file=self.out, flush=True)


def run(args: argparse.Namespace) -> int:
    """Converse until Ctrl-C (or --seconds)."""
    options = ChatOptions(
        url=args.url,
        mode=args.mode,
        voice=args.voice,
        prompt=args.prompt,
        system_prompt=args.system_prompt,
        max_steps=args.max_steps,
        echo_suppression=args.echo_suppression,
        token=args.token,
    )
    audio = SoundDeviceAudio(args.input_device, args.output_device)
    print("Speak when you see [listening] or [live]; Ctrl-C ends the conversation.", flush=True)
    try:
        return asyncio.run(ChatClient(options, audio).run(args.seconds))
    except KeyboardInterrupt:
        return 0
