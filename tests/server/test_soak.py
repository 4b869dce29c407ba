"""A short soak of `personaplex serve` (scripts/soak.py): cycles of each mode leave the
server's memory, threads and file descriptors where they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from personaplex.cli import serve
from tests.server.harness import REPO_ROOT, require_tool
from tests.server.test_serve_cli import parse, started  # noqa: F401  (fixture)


@pytest.mark.slow
def test_conversation_cycles_leave_the_server_flat(tiny_folder):
    require_tool("espeak-ng")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    finished = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "soak.py"), "--model", str(tiny_folder),
         "--cycles", "20", "--warmup", "10", "--asr-model", "none", "--report-every", "0", "--json"],
        capture_output=True, text=True, env=env, timeout=900, check=False,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-2000:]
    results = json.loads(finished.stdout)
    assert set(results) == {"turn", "duplex"}
    for mode, result in results.items():
        start, end = result["start"], result["end"]
        assert end["threads"] <= start["threads"], (mode, result)
        assert end["open_fds"] <= start["open_fds"], (mode, result)
        assert result["rss_growth_mb"] < 8, (mode, result)


ARENA_PROBE = """
import ctypes, ctypes.util, re, sys, tempfile, threading
import numpy as np
from personaplex.server.memory import limit_malloc_arenas
if sys.argv[1] == "limited":
    assert limit_malloc_arenas()
barrier = threading.Barrier(8)
def allocate():
    barrier.wait()  # all at once, as a server's threads do
    [np.ones(100) for _ in range(1000)]
threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads: thread.start()
for thread in threads: thread.join()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile() as report:
    stream = libc.fopen(report.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    print(len(re.findall("<heap nr=", open(report.name).read())))
"""


def arenas_after_threads(mode: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", ARENA_PROBE, mode], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_the_server_process_keeps_to_two_malloc_arenas():
    """Threads allocating at once spread over many glibc arenas, which fragment as
    turn-based conversations come and go (server/memory.py); serve caps them at two."""
    if not sys.platform.startswith("linux"):
        pytest.skip("malloc arenas are glibc's")
    assert arenas_after_threads("default") > 2  # what the cap is for
    assert arenas_after_threads("limited") <= 2


def test_serve_caps_the_arenas_before_serving(started, monkeypatch):  # noqa: F811
    calls = []
    monkeypatch.setattr("personaplex.server.memory.limit_malloc_arenas", lambda: calls.append(True))
    serve.run(parse("--asr-model", "none"))
    assert calls == [True]
