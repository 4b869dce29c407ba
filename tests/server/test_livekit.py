"""LiveKit Agents' PersonaPlex RealtimeModel (livekit-plugins-nvidia[personaplex]) against our
server on the tiny model: audio and text both ways, nothing it cannot read, and no reconnect
storm when the server refuses it. The plugin runs in its own venv (it pins its own
dependencies), in a subprocess: scripts/test.sh creates .venv-livekit."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from personaplex.server.security import AccessPolicy
from tests.server.harness import REPO_ROOT

DRIVER = Path(__file__).with_name("livekit_driver.py")


def livekit_python() -> str:
    python = os.environ.get("PERSONAPLEX_LIVEKIT_PYTHON") or str(
        REPO_ROOT / ".venv-livekit" / "bin" / "python"
    )
    if not Path(python).is_file():
        reason = (
            f"LiveKit's plugin venv is missing ({python}): scripts/test.sh creates it, "
            "or set PERSONAPLEX_LIVEKIT_PYTHON to a python with livekit-plugins-nvidia[personaplex]"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return python


def drive(*args: str, timeout: float = 150) -> dict:
    done = subprocess.run(
        [livekit_python(), str(DRIVER), *args], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("input_rate, token", [(24_000, None), (48_000, "sekrit")])
def test_the_livekit_plugin_talks_both_ways(start_server, engine, input_rate, token):
    server = start_server(engine, policy=AccessPolicy.create(token))
    url = f"ws://127.0.0.1:{server.port}"
    seen = drive(
        "talk", url, "VARM2", "You are a helpful assistant.", str(input_rate), *([token] if token else [])
    )
    assert seen["audio_samples"] >= 24_000, seen
    assert seen["errors"] == [] and seen["warnings"] == [], seen  # no "Unknown message type 0x04"
    assert seen["text"], seen
    assert engine._personas and any(key[0] == "VARM2" for key in engine._personas)


def test_a_refused_plugin_backs_off_instead_of_reconnecting_at_once(start_server, engine):
    server = start_server(engine)
    seen = drive("refused", f"ws://127.0.0.1:{server.port}", "NATF0", "talk " * 600, "2.5")
    # The prompt does not fit the tiny model: 1008 with its reason. The plugin treats any
    # close but 1000 as an error and backs off (1 s, 2 s, ...); after a 1000 it reconnected at once.
    assert 1 <= seen["connects"] <= 3, seen
    assert len(seen["errors"]) == seen["connects"], seen
