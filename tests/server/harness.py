"""Helpers for the server, audio and CLI tests: a live server in a thread (and the
`start_server` fixture around it), a protocol client, espeak-ng speech, and the skip rule
for missing system tools."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import uvicorn
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from personaplex.audio.io import read_wav, resample
from personaplex.audio.opus import OpusStreamDecoder, OpusStreamEncoder
from personaplex.server import protocol
from personaplex.server.app import ServerSettings, create_app
from personaplex.server.connections import guarded_http_protocol
from personaplex.server.model_host import ModelHost
from personaplex.server.protocol import MessageKind
from tests.server.fakes import FakeEngine

SAMPLE_RATE = 24_000
REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "test-artifacts"


def require_tool(name: str) -> str:
    """Path of a system tool; skip when missing, except under CI where it must be there."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing under CI: scripts/system-deps.sh should install it")
        pytest.skip(f"{name} is not installed (run scripts/system-deps.sh)")
    return path


def speak(text: str, workdir: Path, *, name: str = "speech") -> np.ndarray:
    """espeak-ng saying `text`, as 24 kHz float32 with its own leading/trailing silence trimmed."""
    espeak = require_tool("espeak-ng")
    wav = workdir / f"{name}.wav"
    subprocess.run([espeak, "-w", str(wav), text], check=True)
    pcm, rate = read_wav(wav)
    pcm = resample(pcm, rate, SAMPLE_RATE)
    loud = np.nonzero(np.abs(pcm) > 0.01)[0]
    return pcm[loud[0] : loud[-1] + 1]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


class LoopbackUrls:
    """The page and websocket addresses of a server listening on loopback at `port`."""

    port: int

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/chat"


class ServerThread(LoopbackUrls):
    """uvicorn serving `app` on a free loopback port, in a background thread."""

    def __init__(self, app: Any, http: type | None = None) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        # The protocol `personaplex serve` runs, with its slowloris guard.
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", ws="websockets-sansio", http=http or guarded_http_protocol()
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=20)
        self._socket.close()


def get_text(url: str, headers: dict[str, str] | None = None) -> str:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    return json.loads(get_text(url, headers))


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


@dataclass
class Received:
    """Everything a client got, decoded."""

    handshakes: int = 0
    audio_messages: int = 0
    pcm: list[np.ndarray] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    pings: int = 0

    def events_of(self, event_type: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["type"] == event_type]

    @property
    def samples(self) -> int:
        return sum(len(p) for p in self.pcm)


class ChatClient:
    """A protocol client over websockets' sync API, decoding what comes back."""

    def __init__(
        self, url: str, *, origin: str | None = None, headers: dict[str, str] | None = None, **query: Any
    ) -> None:
        """`query`: the websocket's query parameters; `events=1` unless given (events=0: a
        client of the reference protocol)."""
        from urllib.parse import urlencode

        query.setdefault("events", 1)
        full_url = f"{url}?{urlencode(query)}" if query else url
        self._exit_stack = ExitStack()
        self.connection: ClientConnection = self._exit_stack.enter_context(
            connect(full_url, open_timeout=10, max_size=None, origin=origin, additional_headers=headers)
        )
        self.received = Received()
        self._decoder = OpusStreamDecoder()
        self._encoder = OpusStreamEncoder()
        self.closed = False

    def send_pcm(self, pcm: np.ndarray) -> None:
        ogg = self._encoder.encode(pcm)
        if ogg:
            self.connection.send(protocol.audio(ogg))

    def send(self, message: bytes | str) -> None:
        self.connection.send(message)

    def poll(self, timeout: float = 0.0) -> bool:
        """Take one message if one comes within `timeout`; False when none or closed."""
        if self.closed:
            return False
        try:
            message = self.connection.recv(timeout=timeout)
        except TimeoutError:
            return False
        except ConnectionClosed:
            self.closed = True
            return False
        self._record(message)
        return True

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.closed:
            self.poll(timeout=0.05)

    def wait_for(self, predicate, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.received):
            if self.closed:
                raise AssertionError(
                    f"socket closed while waiting; got {self.received.errors} {self.received.events[-5:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out; last events {self.received.events[-5:]}, errors {self.received.errors}"
                )
            self.poll(timeout=0.05)

    def close(self) -> None:
        self._exit_stack.close()
        self.closed = True

    def wait_closed(self, timeout: float = 20.0) -> tuple[int | None, str | None]:
        """Read until the server closes the socket; its close code and reason."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not close; errors {self.received.errors}")
            self.poll(timeout=0.05)
        return self.connection.close_code, self.connection.close_reason

    def _record(self, message: bytes | str) -> None:
        assert isinstance(message, bytes), f"server sent a text frame: {message!r}"
        kind, payload = MessageKind(message[0]), message[1:]
        got = self.received
        if kind == MessageKind.HANDSHAKE:
            got.handshakes += 1
        elif kind == MessageKind.AUDIO:
            got.audio_messages += 1
            got.pcm.append(self._decoder.decode(payload))
        elif kind == MessageKind.TEXT:
            got.text.append(payload.decode())
        elif kind == MessageKind.METADATA:
            got.events.append(json.loads(payload))
        elif kind == MessageKind.ERROR:
            got.errors.append(payload.decode())
        elif kind == MessageKind.PING:
            got.pings += 1


def stream_realtime(client: ChatClient, pcm: np.ndarray, block: int = 1920, speed: float = 1.0) -> None:
    """Send `pcm` in blocks at `speed` x real time, reading replies meanwhile."""
    for start in range(0, len(pcm), block):
        client.send_pcm(pcm[start : start + block])
        client.drain(block / SAMPLE_RATE / speed)


def instant_loader(engine: Any) -> Callable[[Callable[[Any], None]], Any]:
    """A loader that reports the three stages quickly, then hands out `engine`."""

    def load(progress: Callable[[Any], None]) -> Any:
        for stage in ("download", "load", "warmup"):
            progress(SimpleNamespace(stage=stage, fraction=1.0, message=f"{stage} done"))
            time.sleep(0.01)
        return engine

    return load


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerThread]]:
    """start_server(engine=None, loader=None, transcriber=None, http=None, **ServerSettings fields)."""
    with ExitStack() as stack:

        def start(
            engine: Any = None,
            *,
            loader: Callable[..., Any] | None = None,
            transcriber: Any = None,
            wait: bool = True,
            http: type | None = None,
            **settings: Any,
        ) -> ServerThread:
            engine = engine if engine is not None else FakeEngine()
            host = ModelHost(
                loader or instant_loader(engine),
                (lambda: transcriber) if transcriber is not None else None,
                "test-asr" if transcriber is not None else None,
            )
            server = stack.enter_context(ServerThread(create_app(host, ServerSettings(**settings)), http))
            if wait:
                deadline = time.monotonic() + 60
                while host.status()["state"] == "loading" and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert host.engine is not None, host.status()
                if transcriber is not None:
                    deadline = time.monotonic() + 10
                    while host.transcriber is None and time.monotonic() < deadline:
                        time.sleep(0.01)
            server.host = host  # type: ignore[attr-defined]
            return server

        yield start
