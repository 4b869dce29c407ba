"""The server around the real engine on a tiny random model folder. The model speaks noise
and random text, so these tests check the protocol, frame counts and isolation, not meaning."""

from __future__ import annotations

import numpy as np

from personaplex.server import protocol
from personaplex.server.protocol import ControlAction
from tests.server.harness import ChatClient, get_json, silence, speak, wait_until

FRAME = 1_920


def tone(seconds: float, hz: float) -> np.ndarray:
    t = np.arange(int(seconds * 24_000)) / 24_000
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def run_duplex(client: ChatClient, pcm: np.ndarray) -> None:
    client.wait_for(lambda got: got.handshakes == 1)
    client.send_pcm(pcm)


def test_full_duplex_gives_one_frame_per_microphone_frame(start_server, engine):
    server = start_server(
        engine, ring_frames=64
    )  # no drops: the tiny model is slower than real time on a CPU
    client = ChatClient(server.ws_url, mode="duplex", voice="NATF0", seed=3)
    run_duplex(client, tone(0.48, 300))
    client.wait_for(lambda got: len(got.events_of("frame")) == 6, timeout=60)
    got = client.received
    assert [event["index"] for event in got.events_of("frame")] == list(range(6))
    assert all(event["compute_ms"] > 0 for event in got.events_of("frame"))
    assert got.samples == 6 * FRAME
    assert np.all(np.isfinite(np.concatenate(got.pcm)))
    assert got.errors == []
    client.close()


def test_simultaneous_conversations_do_not_disturb_each_other(start_server, engine):
    """The same conversation (voice, prompt, seed, input) gives the same frames alone and
    while another conversation runs beside it."""
    server = start_server(engine, ring_frames=64)
    mic = tone(0.32, 440)

    alone = ChatClient(server.ws_url, mode="duplex", voice="NATM1", seed=11)
    run_duplex(alone, mic)
    alone.wait_for(lambda got: len(got.events_of("frame")) == 4, timeout=60)
    alone.close()

    together = ChatClient(server.ws_url, mode="duplex", voice="NATM1", seed=11)
    other = ChatClient(server.ws_url, mode="duplex", voice="VARF2", seed=5)
    run_duplex(together, mic)
    run_duplex(other, tone(0.32, 200))
    for client in (together, other):
        client.wait_for(lambda got: len(got.events_of("frame")) == 4, timeout=60)
    assert together.received.text == alone.received.text
    np.testing.assert_allclose(
        np.concatenate(together.received.pcm), np.concatenate(alone.received.pcm), atol=1e-6
    )
    together.close()
    other.close()


def test_closing_mid_conversation_frees_the_slot_and_the_engine(start_server, engine):
    server = start_server(engine, max_sessions=1, ring_frames=64)
    client = ChatClient(server.ws_url, mode="duplex")
    run_duplex(client, silence(2.0))  # 25 frames of work queued
    client.wait_for(lambda got: len(got.events_of("frame")) >= 1, timeout=60)
    client.close()
    wait_until(lambda: get_json(server.http_url + "/api/status")["sessions"] == [], timeout=5)
    # At most the frame in flight finishes: the engine's lock is free again at once.
    assert engine.compute_lock.acquire(timeout=2)
    engine.compute_lock.release()
    again = ChatClient(server.ws_url, mode="duplex")
    again.wait_for(lambda got: got.handshakes == 1, timeout=60)
    again.close()


def test_turn_based_reply_streams_max_steps_frames(start_server, engine, tmp_path):
    server = start_server(engine)
    client = ChatClient(server.ws_url, mode="turn", max_steps=50, seed=1)
    client.wait_for(lambda got: got.handshakes == 1)
    client.send_pcm(np.concatenate([silence(0.2), speak("Hello there.", tmp_path), silence(0.2)]))
    client.wait_for(lambda got: got.events_of("speech_started"))
    client.send(protocol.control(ControlAction.END_TURN))  # do not wait for a second of silence
    client.wait_for(
        lambda got: got.events_of("reply_end") and got.events_of("state")[-1]["state"] == "listening",
        timeout=120,
    )
    got = client.received
    assert got.events_of("reply_end") == [{"type": "reply_end", "frames": 50, "reason": "done"}]
    assert [event["index"] for event in got.events_of("frame")] == list(range(50))
    assert got.samples == 50 * FRAME
    assert [event["state"] for event in got.events_of("state")][-2:] == ["speaking", "listening"]
    client.close()


def test_full_duplex_sessions_share_one_batched_frame(start_server, tiny_folder):
    """`serve --max-sessions 2`: two full-duplex sessions run as rows of one batched frame."""
    from personaplex import PersonaPlex

    batched = PersonaPlex.from_pretrained(tiny_folder, device="cpu", max_sessions=2)
    batched.scheduler.max_wait_s = 0.5
    server = start_server(batched, ring_frames=64)
    clients = [ChatClient(server.ws_url, mode="duplex", voice=voice, seed=1) for voice in ("NATF0", "VARM3")]
    for client, hz in zip(clients, (300, 500)):
        run_duplex(client, tone(0.4, hz))
    for client in clients:
        client.wait_for(lambda got: len(got.events_of("frame")) == 5, timeout=60)
        assert client.received.samples == 5 * FRAME and client.received.errors == []
        client.close()
    assert batched.scheduler.frames_run >= 5
    wait_until(lambda: batched.scheduler.live_rows == 0, timeout=10)
