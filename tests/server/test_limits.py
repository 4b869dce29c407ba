"""What one client may cost the server: system prompt length, idle time, malformed
messages, and audio sent faster than real time."""

from __future__ import annotations

import re
import struct
import threading
import time

import pytest

from personaplex.audio.opus import ogg_crc
from personaplex.audio.vad import UtteranceEnded
from personaplex.errors import PersonaPlexError, PromptTooLongError
from personaplex.runtime.prompts import MAX_SYSTEM_PROMPT_CHARS, check_system_prompt
from personaplex.server import protocol
from personaplex.server.protocol import ProtocolError
from personaplex.server.sessions import SessionConfig, SettingsError
from tests.server.fakes import FakeEngine
from tests.server.harness import ChatClient, get_json, get_text, silence, wait_until

LONG_SENTENCE = "You are a helpful assistant who enjoys a good conversation. "

# ---------------------------------------------------------------- system prompt length


def test_the_prompt_bound_counts_characters_then_pieces(engine):
    assert check_system_prompt("You are a helpful assistant.") == "You are a helpful assistant."
    with pytest.raises(PromptTooLongError, match="characters"):
        check_system_prompt("a" * (MAX_SYSTEM_PROMPT_CHARS + 1))
    context = engine.lm.config.context  # 384 frames in the tiny model
    fits = LONG_SENTENCE * 3
    assert check_system_prompt(fits, engine.tokenizer, context) == fits
    with pytest.raises(PromptTooLongError, match=f"context of {context} frames"):
        check_system_prompt(LONG_SENTENCE * 40, engine.tokenizer, context)
    with pytest.raises(PersonaPlexError, match="not valid UTF-8"):
        check_system_prompt("caf\udce9")
    with pytest.raises(PersonaPlexError, match="must be a string"):
        check_system_prompt(42)  # type: ignore[arg-type]


def test_a_persona_that_cannot_fit_is_refused_before_any_model_work(engine):
    """Refused in milliseconds, without waiting for the model (its lock is held here)."""
    outcome: list[BaseException] = []

    def build() -> None:
        try:
            engine.persona("NATF0", LONG_SENTENCE * 2000)  # 120 000 characters
        except BaseException as err:  # noqa: BLE001  (handed to the test thread)
            outcome.append(err)

    cached = len(engine._personas)
    with engine.compute_lock:
        worker = threading.Thread(target=build, daemon=True)
        worker.start()
        worker.join(timeout=5)
        refused_without_the_model = not worker.is_alive()
    worker.join(timeout=60)
    assert refused_without_the_model
    assert isinstance(outcome[0], PromptTooLongError) and "characters" in str(outcome[0])
    assert len(engine._personas) == cached


def test_a_long_prompt_in_the_url_is_refused_at_once(start_server, engine):
    server = start_server(engine)
    client = ChatClient(server.ws_url, mode="duplex", text_prompt=LONG_SENTENCE * 40)  # ~2400 characters
    client.wait_for(lambda got: got.errors, timeout=10)
    assert "context of 384 frames" in client.received.errors[0]
    client.drain(0.5)
    assert client.received.handshakes == 0 and client.connection.close_code == 1008
    assert get_json(server.http_url + "/api/status")["sessions"] == []


def test_a_long_prompt_in_metadata_is_refused_and_the_conversation_goes_on(start_server):
    engine = FakeEngine()
    server = start_server(engine)
    other = ChatClient(server.ws_url, mode="duplex", voice="NATM1")
    client = ChatClient(server.ws_url, mode="turn", max_steps=50)
    for each in (client, other):
        each.wait_for(lambda got: got.handshakes == 1)
    client.send(protocol.metadata({"text_prompt": "x" * 2_000_000}))
    client.wait_for(lambda got: got.errors, timeout=5)
    assert "characters" in client.received.errors[0] and len(client.received.errors[0]) < 300
    client.send(protocol.metadata({"text_prompt": "word " * 3000}))  # few characters, too many pieces
    client.wait_for(lambda got: len(got.errors) == 2, timeout=5)
    assert "context of 3000 frames" in client.received.errors[1]
    # Nothing changed: the session event was not re-sent, and the other conversation runs.
    assert len(client.received.events_of("session")) == 1
    other.send_pcm(silence(0.4))
    other.wait_for(lambda got: len(got.events_of("frame")) == 5)
    client.send(protocol.ping())
    client.wait_for(lambda got: got.pings == 1)
    for each in (client, other):
        each.close()


# ---------------------------------------------------------------- idle clients


@pytest.mark.parametrize("mode", ["turn", "duplex"])
def test_a_silent_client_is_ended_and_its_slot_freed(start_server, mode):
    server = start_server(max_sessions=1, idle_timeout_s=0.5)
    client = ChatClient(server.ws_url, mode=mode)
    client.wait_for(lambda got: got.handshakes == 1)
    client.drain(3.0)
    assert client.closed and any(error.startswith("idle") for error in client.received.errors)
    wait_until(lambda: get_json(server.http_url + "/api/status")["sessions"] == [], timeout=2)
    assert re.search(r"^personaplex_idle_timeouts_total 1(\.0)?$", get_text(server.http_url + "/metrics"), re.M)
    again = ChatClient(server.ws_url, mode=mode)
    again.wait_for(lambda got: got.handshakes == 1)
    again.close()


class EveryBlockIsAnUtterance:
    """A stand-in for the VAD: each block of audio is a whole utterance."""

    def feed(self, pcm):
        return [UtteranceEnded(pcm)]

    def end_now(self):
        return None


def test_a_client_listening_to_a_long_reply_is_not_idle(start_server):
    server = start_server(
        FakeEngine(frame_seconds=0.03), idle_timeout_s=0.5, make_detector=EveryBlockIsAnUtterance
    )
    client = ChatClient(server.ws_url, mode="turn", max_steps=50)  # a 1.5 s reply
    client.wait_for(lambda got: got.handshakes == 1)
    client.send_pcm(silence(0.08))
    client.wait_for(lambda got: got.events_of("reply_end"), timeout=10)
    assert client.received.errors == []
    assert client.received.events_of("reply_end")[0]["reason"] == "done"
    client.drain(2.0)  # silence after the reply: now it is idle
    assert client.closed and client.received.errors[-1].startswith("idle")


# ---------------------------------------------------------------- malformed messages


@pytest.mark.parametrize(
    "message, complaint",
    [
        (b"\x04" + b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'\x04{"seed": 1e999}', "too large"),
        (b'\x04{"max_steps": 1e999}', "too large"),
        (b'\x04{"seed": NaN}', "not JSON"),
        (b'\x04{"seed": -Infinity}', "not JSON"),
        (b'\x04{"seed": 99999999999999999999999999999999999999}', "seed must be between"),
        (b'\x04{"seed": "' + b"9" * 5000 + b'"}', "at most 20 digits"),
        (b'\x04{"max_steps": true}', "max_steps must be an integer"),
        (b'\x04{"max_steps": 60.5}', "max_steps must be an integer"),
        (b'\x04{"text_prompt": {"a": 1}}', "system prompt must be a string"),
        (b'\x04{"voice": "' + b"A" * 100_000 + b'"}', "unknown voice"),
    ],
)
def test_malformed_metadata_gets_an_error_and_the_socket_stays_open(start_server, message, complaint):
    server = start_server()
    client = ChatClient(server.ws_url, mode="turn")
    client.wait_for(lambda got: got.handshakes == 1)
    client.send(message)
    client.wait_for(lambda got: got.errors)
    assert complaint in client.received.errors[0] and len(client.received.errors[0]) < 300
    client.send(protocol.ping())
    client.wait_for(lambda got: got.pings == 1)
    assert not client.closed
    client.close()


@pytest.mark.parametrize(
    "query, complaint",
    [
        ({"seed": "9" * 40}, "at most 20 digits"),
        ({"seed": "9" * 19}, "seed must be between"),
        ({"seed": "-5"}, "seed must be between"),
        ({"max_steps": "1e999"}, "max_steps must be an integer"),
        ({"seed": "٣"}, "seed must be an integer"),  # a digit, but not ASCII
    ],
)
def test_bad_numbers_in_the_url_are_settings_errors(query, complaint):
    with pytest.raises(SettingsError, match=complaint):
        SessionConfig.from_query(query)


def test_a_huge_seed_in_the_url_is_refused_with_a_message(start_server, engine):
    server = start_server(engine)
    client = ChatClient(server.ws_url, mode="duplex", seed="9" * 40)
    client.wait_for(lambda got: got.errors)
    assert client.received.errors[0].startswith("seed must be an integer of at most 20 digits")
    client.drain(0.5)
    assert client.connection.close_code == 1008


def test_metadata_parsing_refuses_what_json_allows_but_numbers_cannot_hold():
    assert protocol.parse_metadata(b'{"seed": 1.0e3}') == {"seed": 1000.0}
    for payload in (b'{"a": 1e400}', b'{"a": Infinity}', b"[" * 50_000):
        with pytest.raises(ProtocolError):
            protocol.parse_metadata(payload)


# ---------------------------------------------------------------- flood


def test_audio_beyond_real_time_is_refused_undecoded_and_others_keep_their_frames(start_server):
    engine = FakeEngine()
    server = start_server(engine)
    calm = ChatClient(server.ws_url, mode="duplex", voice="NATF2")
    flood = ChatClient(server.ws_url, mode="duplex", voice="VARM0")
    for client in (calm, flood):
        client.wait_for(lambda got: got.handshakes == 1)
    started = time.monotonic()
    for _ in range(500):  # 40 s of audio in 80 ms messages, as fast as the socket takes them
        flood.send_pcm(silence(0.08))
    sent_for_s = time.monotonic() - started
    for _ in range(10):
        calm.send_pcm(silence(0.08))
        calm.drain(0.08)
    calm.wait_for(lambda got: len(got.events_of("frame")) == 10)
    flood.wait_for(lambda got: any("faster than real time" in error for error in got.errors))
    metrics = get_text(server.http_url + "/metrics")
    refused_s = float(re.search(r"^personaplex_refused_audio_seconds_total (\S+)$", metrics, re.M)[1])
    # Admitted: at most the 10 s burst plus the time it took to send.
    assert refused_s >= 40 - 10 - sent_for_s - 1.0
    assert calm.received.errors == [] and set(calm.received.text) == {" NATF2"}
    for client in (calm, flood):
        client.close()


def ogg_page(packet: bytes, sequence: int) -> bytes:
    """One Ogg page holding `packet` (under 65 025 bytes), with a correct checksum."""
    lacing = bytes([255] * (len(packet) // 255) + [len(packet) % 255])
    head = struct.pack("<4sBBqIIIB", b"OggS", 0, 0, 0, 1, sequence, 0, len(lacing))
    page = head + lacing + packet
    return page[:22] + struct.pack("<I", ogg_crc(page)) + page[26:]


def test_a_message_claiming_little_audio_in_many_bytes_is_charged_by_its_size(start_server):
    server = start_server()
    client = ChatClient(server.ws_url, mode="duplex")
    client.wait_for(lambda got: got.handshakes == 1)
    # Packets whose first byte claims 2.5 ms of CELT audio, 60 kB each: 0.75 s each at the
    # highest Opus bitrate, so 20 of them overdraw the 10 s burst.
    for sequence in range(20):
        client.send(protocol.audio(ogg_page(b"\x80" + bytes(60_000), sequence)))
    client.wait_for(lambda got: any("faster than real time" in error for error in got.errors))
    client.close()


def test_the_audio_in_a_message_is_read_from_its_packet_headers():
    from personaplex.audio.opus import OpusStreamEncoder, opus_seconds

    encoder = OpusStreamEncoder()
    assert opus_seconds(encoder.encode(silence(0.8))) == pytest.approx(0.8)  # with the header pages
    assert opus_seconds(encoder.encode(silence(0.24))) == pytest.approx(0.24)
    assert opus_seconds(ogg_page(bytes([0x80 | 0x03, 10]) + bytes(100), 0)) == pytest.approx(0.025)


def test_serve_passes_its_idle_timeout(monkeypatch):
    from personaplex.cli import serve
    from tests.server.test_serve_cli import parse

    seen = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **options: None)
    monkeypatch.setattr("personaplex.server.app.create_app", lambda host, settings: seen.setdefault("s", settings))
    serve.run(parse("--asr-model", "none"))
    assert seen.pop("s").idle_timeout_s == 60
    serve.run(parse("--asr-model", "none", "--idle-timeout", "0"))
    assert seen.pop("s").idle_timeout_s is None  # 0: never
    for bad in ("-1", "soon", "inf"):
        with pytest.raises(SystemExit):
            parse("--idle-timeout", bad)
