"""Sessions: settings from the URL, the slot table and its limit, isolation between
simultaneous conversations, and what a closed socket frees."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from websockets.exceptions import InvalidStatus

from personaplex.errors import GatedModelError, ModelUnavailableError, PersonaPlexError, UnknownVoiceError
from personaplex.runtime.prompts import DEFAULT_PROMPT, PROMPT_PRESETS
from personaplex.server.security import AccessPolicy
from personaplex.server.sessions import (
    ServerBusyError,
    SessionConfig,
    SessionManager,
    SettingsError,
)
from tests.server.fakes import FRAME, FakeEngine, voice_pitch
from tests.server.harness import ChatClient, get_json, get_text, silence, wait_until

RATE = 24_000


# ---------------------------------------------------------------- settings and slots


def test_settings_from_the_query_with_defaults():
    config = SessionConfig.from_query({})
    assert (config.mode, config.voice, config.system_prompt, config.max_steps, config.seed) == (
        "duplex",
        "NATM0",
        DEFAULT_PROMPT,
        75,
        None,
    )
    config = SessionConfig.from_query(
        {"mode": "turn", "voice": "varf3", "prompt": "teacher", "max_steps": "120", "seed": "7"}
    )
    assert (config.mode, config.voice, config.max_steps, config.seed) == ("turn", "VARF3", 120, 7)
    assert config.system_prompt == PROMPT_PRESETS["teacher"]


def test_reference_ui_parameter_names_are_understood():
    config = SessionConfig.from_query(
        {"voice_prompt": "NATF2.pt", "text_prompt": "You enjoy a chat.", "seed": "-1"}
    )
    assert (config.voice, config.system_prompt, config.seed) == ("NATF2", "You enjoy a chat.", None)
    assert SessionConfig.from_query({"text_prompt": ""}).system_prompt == ""


@pytest.mark.parametrize(
    "query, error, complaint",
    [
        ({"mode": "both"}, SettingsError, "unknown mode"),
        ({"voice": "../../etc/passwd"}, UnknownVoiceError, "unknown voice"),
        ({"prompt": "pirate"}, SettingsError, "unknown prompt preset"),
        ({"max_steps": "0"}, SettingsError, "between 1 and 500"),
        ({"max_steps": "501"}, SettingsError, "between 1 and 500"),
        ({"max_steps": "many"}, SettingsError, "integer"),
        ({"seed": "x"}, SettingsError, "integer"),
    ],
)
def test_bad_settings_are_refused(query, error, complaint):
    with pytest.raises(error, match=complaint):
        SessionConfig.from_query(query)


def test_the_slot_table_enforces_its_limit_and_frees_slots():
    manager = SessionManager(limit=2)
    config = SessionConfig()
    with manager.slot(config) as first, manager.slot(config) as second:
        assert first.session_id != second.session_id
        assert len(manager.active()) == 2
        with pytest.raises(ServerBusyError, match="busy"):
            with manager.slot(config):
                pass
    assert manager.active() == []
    with pytest.raises(RuntimeError):
        with manager.slot(config):
            raise RuntimeError("a crashed conversation")
    assert manager.active() == []  # a crash frees its slot too


# ---------------------------------------------------------------- live conversations


def dominant_hz(pcm: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(pcm))
    return float(np.argmax(spectrum) * RATE / len(pcm))


def test_two_simultaneous_conversations_stay_independent(start_server):
    server = start_server()
    first = ChatClient(server.ws_url, mode="duplex", voice="NATF0")
    second = ChatClient(server.ws_url, mode="duplex", voice="VARM4")
    for client in (first, second):
        client.wait_for(lambda got: got.handshakes == 1)
    assert len(get_json(server.http_url + "/api/status")["sessions"]) == 2
    # Interleave their microphones; each gets only its own voice back.
    for _ in range(10):
        first.send_pcm(silence(0.08))
        second.send_pcm(silence(0.08))
        first.drain(0.01)
        second.drain(0.01)
    for client in (first, second):
        client.wait_for(lambda got: len(got.events_of("frame")) == 10)
    for client, voice in ((first, "NATF0"), (second, "VARM4")):
        assert set(client.received.text) == {f" {voice}"}
        assert [event["index"] for event in client.received.events_of("frame")] == list(range(10))
        pcm = np.concatenate(client.received.pcm)
        assert abs(dominant_hz(pcm[FRAME:]) - voice_pitch(voice)) < 5
    first.close()
    second.close()


def test_a_turn_based_and_a_full_duplex_conversation_at_once(start_server, tmp_path):
    engine = FakeEngine()
    server = start_server(engine)
    duplex = ChatClient(server.ws_url, mode="duplex", voice="NATM1")
    turn = ChatClient(server.ws_url, mode="turn", voice="NATF3", max_steps=50)
    duplex.wait_for(lambda got: got.handshakes == 1)
    turn.wait_for(lambda got: got.handshakes == 1)
    turn.send(b"\x03\x01")  # end of turn with nothing said: no reply
    duplex.send_pcm(silence(0.4))
    duplex.wait_for(lambda got: len(got.events_of("frame")) == 5)
    turn.drain(0.2)
    assert turn.received.events_of("frame") == [] and turn.received.text == []
    assert set(duplex.received.text) == {" NATM1"}
    duplex.close()
    turn.close()


def test_closing_the_socket_stops_inference_and_frees_the_slot(start_server):
    engine = FakeEngine(frame_seconds=0.02)
    server = start_server(engine, max_sessions=1)
    client = ChatClient(server.ws_url, mode="duplex")
    client.wait_for(lambda got: got.handshakes == 1)
    client.send_pcm(silence(0.4))
    client.wait_for(lambda got: len(got.events_of("frame")) >= 2)
    assert engine.running == 1
    client.close()
    wait_until(lambda: engine.running == 0, timeout=1.0)
    wait_until(lambda: get_json(server.http_url + "/api/status")["sessions"] == [], timeout=1.0)
    again = ChatClient(server.ws_url, mode="duplex")
    again.wait_for(lambda got: got.handshakes == 1)
    assert again.received.errors == []
    again.close()


def test_beyond_the_limit_the_answer_is_busy(start_server):
    server = start_server(max_sessions=2)
    running = [ChatClient(server.ws_url, mode="duplex") for _ in range(2)]
    for client in running:
        client.wait_for(lambda got: got.handshakes == 1)
    refused = ChatClient(server.ws_url, mode="turn")
    refused.wait_for(lambda got: got.errors)
    assert refused.received.errors[0].startswith("busy:")
    assert refused.received.handshakes == 0
    refused.drain(0.5)
    assert refused.closed and refused.connection.close_code == 1013
    assert 'personaplex_sessions_rejected_total{reason="busy"} 1' in get_text(server.http_url + "/metrics")
    for client in running:
        client.close()


def test_a_crash_in_one_conversation_leaves_the_others_running(start_server):
    class CrashingEngine(FakeEngine):
        async def respond_realtime(self, mic_frames, **settings: Any):
            if settings["voice"] == "VARF0":
                async for _frame in mic_frames:
                    raise RuntimeError("simulated bug")
            async for chunk in super().respond_realtime(mic_frames, **settings):
                yield chunk

    server = start_server(CrashingEngine())
    healthy = ChatClient(server.ws_url, mode="duplex", voice="NATM0")
    doomed = ChatClient(server.ws_url, mode="duplex", voice="VARF0")
    healthy.wait_for(lambda got: got.handshakes == 1)
    doomed.wait_for(lambda got: got.handshakes == 1)
    doomed.send_pcm(silence(0.16))
    doomed.wait_for(lambda got: got.errors)
    assert "internal error" in doomed.received.errors[0]
    doomed.drain(0.5)
    assert doomed.closed and doomed.connection.close_code == 1011
    healthy.send_pcm(silence(0.4))
    healthy.wait_for(lambda got: len(got.events_of("frame")) == 5)
    assert healthy.received.errors == []
    healthy.close()


# ---------------------------------------------------------------- before the model is ready


def test_while_loading_conversations_are_told_to_wait(start_server):
    def slow_loader(progress):
        time.sleep(30)

    server = start_server(loader=slow_loader, wait=False)
    client = ChatClient(server.ws_url)
    client.wait_for(lambda got: got.errors)
    assert client.received.errors[0].startswith("model loading")
    client.drain(0.5)
    assert client.closed and client.connection.close_code == 1013


def test_an_unavailable_model_says_what_to_do(start_server):
    def failing_loader(progress):
        progress(type("P", (), {"stage": "download", "fraction": None, "message": "downloading"})())
        raise GatedModelError("nvidia/personaplex-7b-v1 is gated and no token was found")

    server = start_server(loader=failing_loader, wait=False)
    wait_until(lambda: get_json(server.http_url + "/api/status")["state"] == "error")
    status = get_json(server.http_url + "/api/status")
    assert "gated" in status["error"]
    for step in ("licence", "token", "--model DIR"):
        assert step in status["help"]
    client = ChatClient(server.ws_url)
    client.wait_for(lambda got: got.errors)
    assert "model unavailable" in client.received.errors[0] and "--model DIR" in client.received.errors[0]


@pytest.mark.parametrize(
    "error, shown",
    [
        (RuntimeError("Found no NVIDIA driver on your system"), "RuntimeError: Found no NVIDIA driver"),
        (ModelUnavailableError("huggingface.co cannot be reached, and config.json is not cached"), "cannot be reached"),
        (PersonaPlexError("int4 needs dimensions divisible by 64: use --weights bf16"), "divisible by 64"),
    ],
)
def test_load_failures_other_than_access_get_no_licence_help(start_server, error, shown):
    def failing_loader(progress):
        raise error

    server = start_server(loader=failing_loader, wait=False)
    wait_until(lambda: get_json(server.http_url + "/api/status")["state"] == "error")
    status = get_json(server.http_url + "/api/status")
    assert shown in status["error"] and status["help"] is None
    client = ChatClient(server.ws_url)
    client.wait_for(lambda got: got.errors)
    assert shown in client.received.errors[0] and "licence" not in client.received.errors[0]


# ---------------------------------------------------------------- access


def test_a_token_guards_the_api_and_the_socket(start_server):
    server = start_server(policy=AccessPolicy.create("s3cret"))
    assert get_json(server.http_url + "/api/health")["status"] == "ok"  # open for health checks
    with pytest.raises(Exception, match="401"):
        get_json(server.http_url + "/api/status")
    assert get_json(server.http_url + "/api/status", {"Authorization": "Bearer s3cret"})["state"] == "ready"
    assert get_json(server.http_url + "/api/voices?token=s3cret")["default"] == "NATM0"

    refused = ChatClient(server.ws_url, token="wrong")
    refused.wait_for(lambda got: got.errors)
    assert refused.received.errors[0].startswith("unauthorised")
    refused.drain(0.5)
    assert refused.closed and refused.connection.close_code == 1008

    accepted = ChatClient(server.ws_url, token="s3cret")
    accepted.wait_for(lambda got: got.handshakes == 1)
    accepted.close()


def test_pages_from_other_sites_cannot_open_a_conversation(start_server):
    server = start_server(policy=AccessPolicy.create(None, ["https://app.example.com"]))
    with pytest.raises(InvalidStatus, match="403"):
        ChatClient(server.ws_url, origin="https://evil.example.net")
    for origin in ("https://app.example.com", server.http_url, "http://localhost:3000"):
        client = ChatClient(server.ws_url, origin=origin)
        client.wait_for(lambda got: got.handshakes == 1)
        client.close()
