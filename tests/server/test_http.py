"""The HTTP side: page and static files (nothing from elsewhere), health, loading status
with stage timings, voices, prompts, Prometheus metrics and the OpenAPI description."""

from __future__ import annotations

import re
import threading
import time
from types import SimpleNamespace

from personaplex.errors import PersonaPlexError
from personaplex.runtime.prompts import PROMPT_PRESETS
from personaplex.runtime.voices import VOICE_NAMES
from personaplex.server.app import STATIC_DIR
from tests.server.fakes import FakeEngine
from tests.server.harness import ChatClient, get_json, get_text, silence, wait_until


def test_page_and_its_files_come_from_this_server_only(start_server):
    server = start_server()
    page = get_text(server.http_url + "/")
    assert "<title>PersonaPlex voice assistant</title>" in page
    referenced = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert referenced and all(ref.startswith("/static/") or ref == "data:," for ref in referenced)
    for path in sorted(STATIC_DIR.iterdir()):
        body = get_text(f"{server.http_url}/static/{path.name}")
        assert body == path.read_text()
        # No CDN, no remote import, no font or script from elsewhere.
        assert not re.search(r"""(?:src=|href=|import\s.*from\s|url\()\s*["']?https?://""", body), path.name


def test_status_reports_each_loading_stage_with_its_timing(start_server):
    release = threading.Event()

    def staged_loader(progress):
        progress(SimpleNamespace(stage="download", fraction=0.25, message="fetching model.safetensors"))
        time.sleep(0.2)
        progress(SimpleNamespace(stage="load", fraction=0.5, message="loading the language model"))
        release.wait(10)
        progress(SimpleNamespace(stage="warmup", fraction=0.0, message="warming up"))
        time.sleep(0.1)
        return FakeEngine()

    server = start_server(loader=staged_loader, wait=False)
    wait_until(lambda: get_json(server.http_url + "/api/status")["stage"] == "load")
    status = get_json(server.http_url + "/api/status")
    assert (status["state"], status["fraction"], status["message"]) == (
        "loading",
        0.5,
        "loading the language model",
    )
    assert status["timings"]["download"] >= 0.2
    assert get_json(server.http_url + "/api/health") == {"status": "ok", "model_ready": False}
    release.set()
    wait_until(lambda: get_json(server.http_url + "/api/status")["state"] == "ready")
    status = get_json(server.http_url + "/api/status")
    assert set(status["timings"]) == {"download", "load", "warmup"}
    assert status["timings"]["warmup"] >= 0.1
    assert status["error"] is None and status["help"] is None
    assert get_json(server.http_url + "/api/health") == {"status": "ok", "model_ready": True}


def test_serve_once_loaded_answers_only_when_the_model_has_loaded_or_failed(start_server):
    """What a Ray Serve replica behind HAProxy runs: its first answer already says ready (or
    why the model could not load)."""

    def slow_loader(progress):
        time.sleep(0.5)
        return FakeEngine()

    def failing_loader(progress):
        raise PersonaPlexError("no model here")

    server = start_server(loader=slow_loader, wait=False, serve_once_loaded=True)
    assert get_json(server.http_url + "/api/status")["state"] == "ready"
    server = start_server(loader=failing_loader, wait=False, serve_once_loaded=True)
    status = get_json(server.http_url + "/api/status")
    assert status["state"] == "error" and "no model here" in status["error"]


def test_voices_and_prompts(start_server):
    server = start_server()
    voices = get_json(server.http_url + "/api/voices")
    assert voices["voices"] == list(VOICE_NAMES) and len(voices["voices"]) == 18
    assert voices["default"] in voices["voices"]
    prompts = get_json(server.http_url + "/api/prompts")
    assert prompts["presets"] == PROMPT_PRESETS and prompts["default"] in prompts["presets"]


def test_metrics_count_sessions_frames_and_drops(start_server):
    # startup_frames=0: no audio kept from the startup, so the burst below is dropped.
    server = start_server(FakeEngine(frame_seconds=0.03), ring_frames=2, startup_frames=0)
    client = ChatClient(server.ws_url, mode="duplex")
    client.wait_for(lambda got: got.handshakes == 1)
    active = get_text(server.http_url + "/metrics")
    assert 'personaplex_sessions_active{mode="duplex"} 1' in active
    client.send_pcm(silence(1.0))  # 12 frames at once into a ring of 2: most are dropped
    client.wait_for(lambda got: got.events_of("dropped"))
    client.drain(0.3)
    client.close()
    wait_until(
        lambda: 'personaplex_sessions_active{mode="duplex"} 0' in get_text(server.http_url + "/metrics")
    )
    metrics = get_text(server.http_url + "/metrics")
    assert 'personaplex_sessions_total{mode="duplex"} 1' in metrics
    dropped = float(re.search(r"^personaplex_dropped_frames_total (\S+)$", metrics, re.M).group(1))
    assert dropped >= 8
    count = float(re.search(r"^personaplex_frame_seconds_count (\S+)$", metrics, re.M).group(1))
    assert count == len(client.received.events_of("frame")) >= 2
    assert re.search(r'^personaplex_frame_seconds_bucket\{le="\+Inf"\} [0-9.]+$', metrics, re.M)
    assert "personaplex_model_ready 1" in metrics
    for line in metrics.splitlines():  # every line is a comment or `name{labels} value`
        assert line.startswith("# ") or re.fullmatch(r"[a-z_]+(\{[^}]*\})? [0-9.e+-]+", line), line


def test_openapi_describes_the_endpoints_and_the_websocket(start_server):
    server = start_server()
    schema = get_json(server.http_url + "/openapi.json")
    assert {"/api/health", "/api/status", "/api/voices", "/api/prompts", "/metrics"} <= set(schema["paths"])
    status_schema = schema["components"]["schemas"]["Status"]["properties"]
    assert {"stage", "fraction", "timings", "help", "sessions"} <= set(status_schema)
    description = schema["info"]["description"]
    for documented in ("0x00", "0x05", "/api/chat", "max_steps", "text_prompt"):
        assert documented in description
