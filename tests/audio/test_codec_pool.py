"""The Opus worker pool (`audio/codec_pool.py`): workers are fresh interpreters that answer at
once and leave as soon as the pool shuts down, under asyncio's loop and under uvloop (which
`personaplex serve` runs on)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest
import uvloop

from personaplex.audio.codec_pool import OpusProcessPool


async def round_trip_then_shutdown() -> tuple[np.ndarray, list[int | None]]:
    pool = OpusProcessPool(2, 24_000)
    await pool.ready()
    stream = pool.stream()
    tone = 0.3 * np.sin(np.arange(1920 * 4) * 2 * np.pi * 440 / 24_000).astype(np.float32)
    decoded = await stream.decode(await stream.encode(tone))
    await pool.shutdown()
    return decoded, [worker.process.returncode for worker in pool._workers]


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_workers_answer_and_leave_at_once(run):
    decoded, exit_codes = run(round_trip_then_shutdown())
    assert decoded.dtype == np.float32 and decoded.size > 0
    # Each read the end of its socket and returned. Under uvloop they were killed (-9) after 5 s
    # each: the wait for them blocked the loop that closes the socket.
    assert exit_codes == [0, 0]


def test_the_worker_module_run_by_hand_says_how_it_is_started():
    run = subprocess.run([sys.executable, "-m", "personaplex.audio.codec_pool"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and "SOCKET_FD SAMPLE_RATE" in run.stderr
