"""Other clients of /api/chat: reference-protocol clients (NVIDIA's web client, LiveKit's
plugin), another page served with --static, the token cookie, NVIDIA's sampling parameters,
close codes that say whether to retry, and the audio a client sends before the handshake."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from personaplex.server.closing import MAX_REASON_BYTES, close_reason
from personaplex.server.conversation import PcmRing
from personaplex.server.security import TOKEN_COOKIE, AccessPolicy
from tests.server.fakes import FRAME, FakeEngine
from tests.server.harness import ChatClient, get_json, get_text, silence


def tone(seconds: float, hz: float) -> np.ndarray:
    t = np.arange(int(seconds * 24_000)) / 24_000
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


# ---------------------------------------------------------------- events only on request


def test_a_reference_client_gets_only_handshake_audio_and_text(start_server, engine):
    server = start_server(engine, ring_frames=64)
    client = ChatClient(server.ws_url, events=0, voice_prompt="NATF2.pt", text_prompt="Be brief.", seed=2)
    client.wait_for(lambda got: got.handshakes == 1, timeout=60)
    client.send_pcm(tone(0.48, 300))
    client.wait_for(lambda got: got.samples >= 5 * FRAME, timeout=60)
    client.drain(0.3)
    got = client.received
    assert got.events == [] and got.errors == [] and got.pings == 0
    assert got.handshakes == 1 and got.audio_messages > 0
    client.close()


def test_a_client_that_asks_gets_the_events(start_server):
    server = start_server()
    client = ChatClient(server.ws_url, events=1)
    client.wait_for(lambda got: got.events_of("session") and got.events_of("state"))
    assert client.received.events_of("session")[0]["mode"] == "duplex"
    client.close()
    refused = ChatClient(server.ws_url, events="yes please")
    code, reason = refused.wait_closed()
    assert code == 1008 and "events must be 1 or 0" in reason


# ---------------------------------------------------------------- serve --static


def test_static_folder_is_served_at_the_root_beside_the_api(start_server, tmp_path):
    (tmp_path / "index.html").write_text("<html>another client</html>")
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "app.js").write_text("console.log('hi')")
    server = start_server(static_dir=tmp_path)
    assert get_text(server.http_url + "/") == "<html>another client</html>"
    assert get_text(server.http_url + "/assets/app.js") == "console.log('hi')"
    assert get_json(server.http_url + "/api/health")["model_ready"] is True
    client = ChatClient(server.ws_url)  # the same origin serves the conversation
    client.wait_for(lambda got: got.handshakes == 1)
    client.close()


def test_serve_refuses_a_static_folder_that_is_not_there(tmp_path, capsys):
    from personaplex.cli.main import main

    assert main(["serve", "--static", str(tmp_path / "nope"), "--asr-model", "none"]) == 1
    printed = capsys.readouterr().err.strip()
    assert len(printed.splitlines()) == 1 and "--static" in printed and "index.html" in printed


# ---------------------------------------------------------------- tokens from a cookie


def open_page(url: str) -> tuple[str, str | None]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode(), response.headers.get("set-cookie")


def test_a_page_opened_with_the_token_sets_a_cookie_the_websocket_and_api_accept(start_server):
    server = start_server(policy=AccessPolicy.create("sekrit"))
    _page, cookie = open_page(server.http_url + "/?token=sekrit")
    assert cookie is not None and cookie.startswith(f"{TOKEN_COOKIE}=sekrit;")
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    jar = {"Cookie": f"{TOKEN_COOKIE}=sekrit"}
    assert get_json(server.http_url + "/api/voices", headers=jar)["default"]
    client = ChatClient(server.ws_url, headers=jar)  # no ?token=, as NVIDIA's client connects
    client.wait_for(lambda got: got.handshakes == 1)
    client.close()

    bearer = ChatClient(server.ws_url, headers={"Authorization": "Bearer sekrit"})
    bearer.wait_for(lambda got: got.handshakes == 1)
    bearer.close()


def test_a_wrong_token_sets_no_cookie_and_a_wrong_cookie_is_refused(start_server):
    server = start_server(policy=AccessPolicy.create("sekrit"))
    _page, cookie = open_page(server.http_url + "/?token=guess")
    assert cookie is None
    with pytest.raises(urllib.error.HTTPError) as refused:
        get_json(server.http_url + "/api/voices", headers={"Cookie": f"{TOKEN_COOKIE}=guess"})
    assert refused.value.code == 401
    client = ChatClient(server.ws_url, headers={"Cookie": f"{TOKEN_COOKIE}=guess"})
    code, reason = client.wait_closed()
    assert code == 1008 and "unauthorised" in reason


# ---------------------------------------------------------------- NVIDIA's sampling parameters

NVIDIA_CLIENT_QUERY = {  # what NVIDIA's web client sends, besides the persona
    "text_temperature": 0.7,
    "text_topk": 25,
    "audio_temperature": 0.8,
    "audio_topk": 250,
    "pad_mult": 0,
    "repetition_penalty_context": 64,
    "repetition_penalty": 1,
    "text_seed": 776919,
    "audio_seed": 278161,
}


def duplex_reply(server, **query) -> tuple[np.ndarray, str]:
    client = ChatClient(server.ws_url, **query)
    client.wait_for(lambda got: got.handshakes == 1, timeout=60)
    client.send_pcm(tone(0.4, 300))
    client.wait_for(lambda got: len(got.events_of("frame")) == 5, timeout=60)
    client.close()
    return np.concatenate(client.received.pcm), "".join(client.received.text)


def test_zero_temperatures_make_the_reply_independent_of_the_seed(start_server, engine):
    server = start_server(engine, ring_frames=64)
    argmax = {**NVIDIA_CLIENT_QUERY, "text_temperature": 0, "audio_temperature": 0}
    first = duplex_reply(server, seed=1, **argmax)
    second = duplex_reply(server, seed=2, **argmax)
    np.testing.assert_allclose(first[0], second[0], atol=1e-6)
    assert first[1] == second[1]
    sampled = duplex_reply(server, seed=2, **NVIDIA_CLIENT_QUERY)  # the reference defaults sample
    assert not np.allclose(sampled[0], second[0], atol=1e-6)


def test_sampling_parameters_reach_the_engine(start_server):
    engine = FakeEngine()
    server = start_server(engine)
    client = ChatClient(server.ws_url, text_temperature=0.5, text_topk=10, audio_topk=100)
    client.wait_for(lambda got: got.events_of("session"))
    client.close()
    sampling = engine.realtime_calls[-1]["sampling"]
    assert (sampling.text_temperature, sampling.text_top_k) == (0.5, 10)
    assert (sampling.audio_temperature, sampling.audio_top_k) == (0.8, 100)  # the reference default


@pytest.mark.parametrize(
    "query, complaint",
    [
        ({"text_topk": 0}, "text_topk must be between 1 and 32000"),
        ({"audio_topk": 4096}, "audio_topk must be between 1 and 2048"),
        ({"audio_temperature": "warm"}, "audio_temperature must be a number"),
        ({"text_temperature": "nan"}, "text_temperature must be between 0 and 5"),
        ({"text_temperature": -1}, "text_temperature must be between 0 and 5"),
    ],
)
def test_bad_sampling_parameters_are_refused_with_their_reason(start_server, query, complaint):
    server = start_server()
    client = ChatClient(server.ws_url, **query)
    code, reason = client.wait_closed()
    assert code == 1008 and complaint in reason
    assert client.received.errors == [reason]


# ---------------------------------------------------------------- close codes


def test_busy_and_loading_say_try_later(start_server):
    server = start_server(max_sessions=1)
    first = ChatClient(server.ws_url)
    first.wait_for(lambda got: got.handshakes == 1)
    code, reason = ChatClient(server.ws_url, events=0).wait_closed()
    assert code == 1013 and reason.startswith("busy")
    first.close()

    loading = start_server(loader=lambda progress: time.sleep(30), wait=False)
    code, reason = ChatClient(loading.ws_url).wait_closed()
    assert code == 1013 and "loading" in reason


def test_a_persona_that_does_not_fit_says_do_not_retry(start_server, engine):
    server = start_server(engine)
    client = ChatClient(server.ws_url, events=0, text_prompt="talk " * 600)
    code, reason = client.wait_closed(timeout=60)
    assert code == 1008 and "prompt" in reason
    assert len(reason.encode()) <= MAX_REASON_BYTES


def test_an_engine_failure_closes_with_1011(start_server):
    server = start_server(FakeEngine(fail_at_frame=2))
    client = ChatClient(server.ws_url)
    client.wait_for(lambda got: got.handshakes == 1)
    client.send_pcm(silence(0.4))
    code, reason = client.wait_closed()
    # The exception's text stays in the server log: it may name the server's files.
    assert code == 1011 and reason == "internal error (RuntimeError); the server log has the details"
    assert client.received.errors == [reason]


def test_close_reasons_fit_a_close_frame():
    assert close_reason("short") == "short"
    long = close_reason("é" * 200)
    assert len(long.encode()) <= MAX_REASON_BYTES and long.endswith("...")


# ---------------------------------------------------------------- audio before the handshake


def test_audio_sent_during_the_persona_prefill_is_kept(start_server):
    """A client that speaks before the handshake (or queues and sends it in one burst) is
    heard in full, although the ring keeps only 640 ms while the engine runs."""
    engine = FakeEngine(persona_seconds=1.0)
    server = start_server(engine, ring_frames=8)
    client = ChatClient(server.ws_url)
    client.send_pcm(tone(2.0, 440))  # during the 1 s prefill: 25 frames
    client.wait_for(lambda got: len(got.events_of("frame")) == 25, timeout=30)
    client.drain(0.3)
    assert len(client.received.events_of("frame")) == 25 and not client.received.events_of("dropped")
    assert min(engine.realtime_input_peaks[:24]) > 0.2  # the speech itself, not silence
    client.close()


def test_startup_audio_is_kept_up_to_its_bound_then_live_audio_is_capped():
    async def scenario() -> None:
        # No grace after the handshake: from then on, live audio only.
        ring = PcmRing(capacity_samples=2 * FRAME, startup_samples=5 * FRAME, startup_grace_s=0.0)
        assert ring.write(np.ones(4 * FRAME)) == 0  # before the handshake: kept
        assert ring.write(np.ones(3 * FRAME)) == 0  # 1 more kept, 2 live
        assert ring.write(np.full(FRAME, 2.0)) == FRAME  # the oldest live frame goes
        assert ring.seconds(24_000) == 7 * FRAME / 24_000
        kept = [await ring.read(FRAME) for _ in range(5)]
        assert all(np.all(frame == 1.0) for frame in kept)
        ring.handshake_sent()
        assert ring.write(np.full(2 * FRAME, 3.0)) == 2 * FRAME
        assert np.all(await ring.read(2 * FRAME) == 3.0)

    asyncio.run(scenario())
