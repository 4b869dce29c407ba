"""`personaplex bench --serve`: real-time websocket clients against `personaplex serve`.

What a browser does, N times over: connect to /api/chat (full duplex), wait for the
handshake, then send one Ogg/Opus page of microphone audio every 80 ms (pre-encoded, so
the clients cost little CPU) and read what comes back. The clients run in several processes
so that they keep real-time pace however many there are. For each N this reports, over at
least `--duration` seconds:

- the server's frame time (median, p99: the shared frame's compute, from /api/status),
- mic-to-reply latency (p50, p99): from a client sending mic frame i to it receiving the
  reply frame i (the i-th audio message: one Ogg page per 80 ms frame), over loopback,
- dropped mic frames: frames the model never heard (the server's ring overflowed) and
  frames it heard late (the client's audio came after its frame ran, so the model heard
  silence there and the audio one frame later); frames not answered before a client
  closed are counted apart,
- server CPU (percent of one core, psutil) and GPU memory (peak, from /api/status),
- the clients' own pace: how late they sent their frames (p99) and how many went out more
  than half a frame late, which can make frames late at the server through no fault of its
  own (the clients share the machine).

By default it starts `personaplex serve --random-weights` itself (full 7B shape, no
download) with room for the largest N, and writes the rows to `--out`/<card>-serving.json.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from personaplex.audio.format import FRAME_SAMPLES, SAMPLE_RATE

FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE


@dataclass
class ClientResult:
    sent: int = 0
    answered: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    send_lags_ms: list[float] = field(default_factory=list)  # how long after its due time each frame went out
    errors: list[str] = field(default_factory=list)


def microphone_pages(seconds: float, seed: int) -> list[bytes]:
    """Ogg/Opus messages of speech-like noise, one per 80 ms frame (the first one carries the
    stream's header pages too, as a browser's first message does)."""
    from personaplex.audio.opus import OpusStreamEncoder

    frames = int(seconds / FRAME_SECONDS) + 1
    rng = np.random.default_rng(seed)
    t = np.arange(frames * FRAME_SAMPLES) / SAMPLE_RATE
    pcm = (0.2 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(t.size))
    encoder = OpusStreamEncoder(SAMPLE_RATE)
    return [encoder.encode(pcm[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES].astype(np.float32)) for i in range(frames)]


def frames_in(seconds: float) -> int:
    """80 ms frames a client sends in `seconds` (counted, not compared against a clock: whether
    start + 1.2 - start >= 1.2 depends on the clock's value)."""
    return math.ceil(seconds / FRAME_SECONDS - 1e-9)


async def one_client(url: str, pages: list[bytes], duration_s: float, start_delay_s: float) -> ClientResult:
    import websockets

    result = ClientResult()
    await asyncio.sleep(start_delay_s)
    sent_at: dict[int, float] = {}
    try:
        async with websockets.connect(url, max_size=None, open_timeout=60, ping_interval=None) as socket:
            while (await socket.recv())[0] != 0x00:  # the handshake: the persona is ready
                pass

            async def send() -> None:
                start = time.monotonic()
                for index, page in enumerate(pages[: frames_in(duration_s)]):
                    due = start + index * FRAME_SECONDS
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    sent_at[index] = time.monotonic()
                    result.send_lags_ms.append((sent_at[index] - due) * 1e3)
                    await socket.send(b"\x01" + page)
                    result.sent += 1
                # The last replies (1 s at most), then hang up at once: a client that stayed on
                # without sending would have the model go on hearing silence for it.
                deadline = time.monotonic() + 1.0
                while result.answered < result.sent and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)

            async def receive() -> None:
                async for message in socket:
                    if message[0] == 0x01:
                        if result.answered in sent_at:
                            result.latencies_ms.append((time.monotonic() - sent_at[result.answered]) * 1e3)
                        result.answered += 1
                    elif message[0] == 0x05:
                        result.errors.append(message[1:].decode(errors="replace"))

            receiver = asyncio.create_task(receive())
            await send()
            receiver.cancel()
    except Exception as err:  # noqa: BLE001 - a failed client is a result, not a crash
        result.errors.append(f"{type(err).__name__}: {err}")
    return result


def client_process(url: str, clients: int, duration_s: float, seed: int) -> list[dict]:
    """One process's share of the clients, each starting at a random phase of the first second."""
    pages = microphone_pages(duration_s + 2, seed)
    rng = np.random.default_rng(seed)

    async def run_all() -> list[ClientResult]:
        return await asyncio.gather(*(one_client(url, pages, duration_s, float(rng.uniform(0, 1)))
                                      for _ in range(clients)))

    return [asdict(result) for result in asyncio.run(run_all())]


def run_clients(url: str, clients: int, duration_s: float, processes: int) -> list[ClientResult]:
    processes = max(1, min(processes, clients))
    shares = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.starmap(client_process, [(url, share, duration_s, seed) for seed, share in enumerate(shares)])
    return [ClientResult(**result) for part in parts for result in part]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def dropped_frames(base: str) -> float:
    """Microphone frames the server's rings dropped so far (its Prometheus counter)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("personaplex_dropped_frames_total "):
                return float(line.split()[1])
    return 0.0


def wait_ready(status_url: str, server: subprocess.Popen | None, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise SystemExit(f"personaplex bench: error: the server exited with code {server.returncode}")
        try:
            status = get_json(status_url)
            if status["state"] == "ready":
                return status
            if status["state"] == "error":
                raise SystemExit(f"personaplex bench: error: the server could not load the model: {status['error']}")
        except OSError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"personaplex bench: error: the server was not ready within {timeout_s:.0f} s")


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 2)


def start_server(args, max_sessions: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "personaplex.cli.main", "serve", "--random-weights", "--port", str(args.port),
               "--max-sessions", str(max_sessions), "--weights", args.serve_weights, "--kv-cache", args.kv,
               "--asr-model", "none", "--log-level", "warning"]
    # Its own process group, so that stopping it stops everything it started.
    return subprocess.Popen(command, start_new_session=True)


def run(args) -> int:
    import psutil

    clients_list = [int(n) for n in str(args.clients).split(",")]
    base = args.url or f"http://127.0.0.1:{args.port}"
    server = None if args.url else start_server(args, max(clients_list))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    try:
        wait_ready(f"{base}/api/status", server, timeout_s=args.server_timeout)
        process = psutil.Process(server.pid) if server is not None else None
        ws_url = base.replace("http", "ws", 1) + "/api/chat?mode=duplex&voice=NATM0"
        card = _card()
        for clients in clients_list:
            before = get_json(f"{base}/api/status")["frames"]
            dropped_before = dropped_frames(base)
            if process is not None:
                process.cpu_percent()
            started = time.monotonic()
            results = run_clients(ws_url, clients, args.duration, args.client_processes)
            duration = time.monotonic() - started
            cpu = process.cpu_percent() if process is not None else None
            after_status = get_json(f"{base}/api/status")
            after = after_status["frames"]
            latencies = [ms for result in results for ms in result.latencies_ms]
            send_lags = [ms for result in results for ms in result.send_lags_ms]
            late = after["late_frames"] - before["late_frames"]
            ring_dropped = dropped_frames(base) - dropped_before
            # A late frame is answered with a reply to silence: it counts as an answer, but the
            # client's own frame was not heard then.
            unanswered = sum(result.sent - result.answered for result in results) + late
            errors = [error for result in results for error in result.errors]
            row = {
                "path": "serve", "sessions": clients, "weights": args.serve_weights, "kv": args.kv,
                "frame_ms_median": after.get("frame_ms_median"), "frame_ms_p99": after.get("frame_ms_p99"),
                "mic_to_reply_ms_p50": percentile(latencies, 0.5), "mic_to_reply_ms_p99": percentile(latencies, 0.99),
                "dropped_frames": round(ring_dropped + late, 1), "ring_dropped_frames": round(ring_dropped, 1),
                "late_frames": late, "unanswered_frames": unanswered,
                "frames_sent": sum(result.sent for result in results),
                # The clients' own pace: frames a client sent over half a frame late can reach the
                # server too late for their frame through no fault of the server's.
                "client_send_lag_ms_p99": percentile(send_lags, 0.99),
                "client_sends_late": sum(ms > FRAME_SECONDS * 500 for ms in send_lags),
                "duration_s": round(duration, 1), "cpu_percent": cpu, "gpu_mem_gb": after.get("gpu_mem_gb"),
                "batch_rows": after.get("capacity"), "client_errors": errors[:5], "card": card,
                "replicas": len(after_status.get("replicas") or ()) or 1,  # serve --replicas (SCALING.md)
                "date": datetime.date.today().isoformat(),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            (out / f"{card.replace(' ', '_')}-serving.json").write_text(json.dumps({"rows": rows}, indent=1))
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    return 0


def _card() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
