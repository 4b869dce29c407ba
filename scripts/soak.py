#!/usr/bin/env python
"""Soak `personaplex serve`: many conversation cycles of each mode, and what the server
process holds before and after (resident memory, threads, open file descriptors).

    python scripts/soak.py --model DIR [--cycles 1000] [--modes turn,duplex] [--json]

It starts the server on a free loopback port (CPU unless --device), warms it up with a
few cycles, then runs the cycles one after another: a turn-based cycle speaks a sentence
(espeak-ng), ends the turn and waits for the whole reply; a full-duplex cycle streams
--duplex-seconds of audio and waits for its frames. Each cycle is a new connection.
Figures are printed every --report-every cycles; --json prints the summary as JSON.
Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from websockets.sync.client import connect

from personaplex.audio.format import SAMPLE_RATE
from personaplex.audio.io import read_wav, resample
from personaplex.audio.opus import OpusStreamEncoder
from personaplex.server import protocol
from personaplex.server.protocol import ControlAction, MessageKind

SENTENCE = "Hello there. What is the weather like today?"


@dataclass(frozen=True)
class ProcessFigures:
    rss_mb: float
    threads: int
    open_fds: int


def process_figures(pid: int) -> ProcessFigures:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return ProcessFigures(
        rss_mb=round(int(status["VmRSS"].split()[0]) / 1024, 1),
        threads=int(status["Threads"]),
        open_fds=len(os.listdir(f"/proc/{pid}/fd")),
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spoken_sentence(workdir: Path) -> np.ndarray:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        sys.exit("soak: turn-based cycles speak with espeak-ng: install it (scripts/system-deps.sh)")
    wav = workdir / "sentence.wav"
    subprocess.run([espeak, "-w", str(wav), SENTENCE], check=True)
    pcm, rate = read_wav(wav)
    silence = np.zeros(SAMPLE_RATE // 4, dtype=np.float32)
    return np.concatenate([silence, resample(pcm, rate, SAMPLE_RATE), silence])


class Server:
    """`personaplex serve` in a child process, until closed."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.port = free_port()
        command = [
            sys.executable, "-m", "personaplex.cli.main", "serve", "--model", str(args.model),
            "--port", str(self.port), "--asr-model", args.asr_model, "--device", args.device,
            "--log-level", "warning",
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sys.stderr)
        self._wait_ready(args.ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"soak: the server exited with code {self.process.returncode} while loading")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/status", timeout=2) as answer:
                    status = json.load(answer)
                if status["state"] == "error":
                    sys.exit(f"soak: the server could not load the model: {status['error']}")
                if status["state"] == "ready" and status["asr"]["state"] in ("off", "ready"):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        sys.exit(f"soak: the server was not ready after {timeout:g} s")

    def chat_url(self, **query: object) -> str:
        query = {"events": 1, **query}  # the cycles wait for events (speech_started, reply_end, frame)
        return f"ws://127.0.0.1:{self.port}/api/chat?" + "&".join(f"{k}={v}" for k, v in query.items())

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def receive_until(connection, done, timeout: float) -> None:
    """Read messages until done(kind, payload) is true; fail on an error message."""
    deadline = time.monotonic() + timeout
    while True:
        message = connection.recv(timeout=max(0.01, deadline - time.monotonic()))
        kind, payload = MessageKind(message[0]), message[1:]
        if kind == MessageKind.ERROR:
            raise RuntimeError(f"the server answered an error: {payload.decode()}")
        if done(kind, payload):
            return


def event_type(kind: MessageKind, payload: bytes) -> str | None:
    return json.loads(payload)["type"] if kind == MessageKind.METADATA else None


def turn_cycle(server: Server, speech: np.ndarray, max_steps: int, timeout: float) -> None:
    with connect(server.chat_url(mode="turn", max_steps=max_steps, seed=1), max_size=None) as connection:
        receive_until(connection, lambda kind, _: kind == MessageKind.HANDSHAKE, timeout)
        connection.send(protocol.audio(OpusStreamEncoder().encode(speech)))
        receive_until(connection, lambda kind, payload: event_type(kind, payload) == "speech_started", timeout)
        connection.send(protocol.control(ControlAction.END_TURN))
        receive_until(connection, lambda kind, payload: event_type(kind, payload) == "reply_end", timeout)


def duplex_cycle(server: Server, seconds: float, timeout: float) -> None:
    frames = int(seconds * 12.5)
    tone = (0.2 * np.sin(2 * np.pi * 220 * np.arange(frames * 1920) / SAMPLE_RATE)).astype(np.float32)

    def ring_empty(kind: MessageKind, payload: bytes) -> bool:
        # The audio arrives as one message before the first frame: once a frame leaves
        # nothing buffered, the model has taken all of it (what it did not drop).
        return event_type(kind, payload) == "frame" and json.loads(payload)["buffered_ms"] == 0

    with connect(server.chat_url(mode="duplex", seed=1), max_size=None) as connection:
        receive_until(connection, lambda kind, _: kind == MessageKind.HANDSHAKE, timeout)
        connection.send(protocol.audio(OpusStreamEncoder().encode(tone)))
        receive_until(connection, ring_empty, timeout)


def soak(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        speech = spoken_sentence(Path(workdir)) if "turn" in args.modes else None
        for mode in args.modes:
            server = Server(args)
            try:

                def cycle() -> None:
                    if mode == "turn":
                        turn_cycle(server, speech, args.max_steps, args.cycle_timeout)
                    else:
                        duplex_cycle(server, args.duplex_seconds, args.cycle_timeout)

                for _ in range(args.warmup):
                    cycle()
                start = process_figures(server.process.pid)
                started = time.monotonic()
                for index in range(1, args.cycles + 1):
                    cycle()
                    if args.report_every and index % args.report_every == 0:
                        figures = process_figures(server.process.pid)
                        print(f"{mode} {index}/{args.cycles}: {figures}", file=sys.stderr, flush=True)
                time.sleep(1.0)  # let the last conversation's threads and sockets end
                end = process_figures(server.process.pid)
            finally:
                server.close()
            results[mode] = {
                "cycles": args.cycles,
                "seconds": round(time.monotonic() - started, 1),
                "start": asdict(start),
                "end": asdict(end),
                "rss_growth_mb": round(end.rss_mb - start.rss_mb, 1),
            }
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (a tiny test folder works)")
    parser.add_argument("--cycles", type=int, default=1000, help="cycles per mode (default 1000)")
    parser.add_argument("--warmup", type=int, default=20, help="cycles before the start figures (default 20)")
    parser.add_argument("--modes", type=lambda text: text.split(","), default=["turn", "duplex"])
    parser.add_argument("--asr-model", default="bundled", help="as `serve --asr-model` (default bundled)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-steps", type=int, default=50, help="frames of each turn-based reply")
    parser.add_argument("--duplex-seconds", type=float, default=0.8, help="audio of each full-duplex cycle")
    parser.add_argument("--cycle-timeout", type=float, default=120.0)
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--report-every", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    unknown = set(args.modes) - {"turn", "duplex"}
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(sorted(unknown))}: use turn and/or duplex")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = soak(args)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for mode, result in results.items():
            print(
                f"{mode}: {result['cycles']} cycles in {result['seconds']} s; "
                f"start {result['start']}, end {result['end']}, RSS {result['rss_growth_mb']:+} MB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
