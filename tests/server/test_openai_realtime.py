"""WS /v1/realtime driven by the official `openai` SDK's realtime client, against the
tiny model: session events, voice and instructions, audio in and out, errors as events."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest

from personaplex.server.security import AccessPolicy
from tests.server.fakes import FRAME, FakeEngine
from tests.server.harness import get_text

openai = pytest.importorskip("openai", reason="the openai SDK comes with the test extra")


def pcm16_base64(pcm: np.ndarray) -> str:
    return base64.b64encode((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()).decode()


def tone(seconds: float, hz: float) -> np.ndarray:
    t = np.arange(int(seconds * 24_000)) / 24_000
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def client_for(server, api_key: str = "not-needed-on-localhost") -> openai.AsyncOpenAI:
    # websocket_base_url: the beta client would otherwise use wss:// whatever the base URL.
    return openai.AsyncOpenAI(
        api_key=api_key,
        base_url=server.http_url + "/v1",
        websocket_base_url=server.http_url.replace("http", "ws") + "/v1",
    )


async def next_event(connection, event_type: str, timeout: float = 60.0):
    """The next event of `event_type`, skipping the others."""
    async with asyncio.timeout(timeout):
        async for event in connection:
            if event.type == event_type:
                return event
    raise AssertionError(f"the connection closed before {event_type}")


def test_a_full_duplex_session_with_the_official_sdk(start_server, engine):
    server = start_server(engine, ring_frames=64)

    async def session() -> tuple[list, list[str]]:
        async with client_for(server).realtime.connect(model="personaplex") as connection:
            created = await next_event(connection, "session.created")
            assert created.session.audio.output.voice == "NATM0"
            await connection.session.update(
                session={
                    "type": "realtime",
                    "instructions": "You like trains.",
                    "audio": {"output": {"voice": "VARF1"}},
                }
            )
            updated = await next_event(connection, "session.updated")
            assert updated.session.instructions == "You like trains."
            assert updated.session.audio.output.voice == "VARF1"
            for start in range(0, 6 * FRAME, FRAME):  # 480 ms, streamed as a microphone does
                await connection.input_audio_buffer.append(
                    audio=pcm16_base64(tone(0.48, 300)[start : start + FRAME])
                )
            audio, transcript = [], []
            await next_event(connection, "response.created")
            async with asyncio.timeout(60):
                async for event in connection:
                    if event.type == "response.output_audio.delta":
                        audio.append(np.frombuffer(base64.b64decode(event.delta), dtype="<i2"))
                    elif event.type == "response.output_audio_transcript.delta":
                        transcript.append(event.delta)
                    if sum(len(a) for a in audio) >= 6 * FRAME:
                        break
            return audio, transcript

    audio, _transcript = asyncio.run(session())
    assert [len(block) for block in audio] == [FRAME] * 6
    assert np.abs(np.concatenate(audio)).max() > 0
    assert engine_personas_include(engine, "VARF1", "You like trains.")


def engine_personas_include(engine, voice: str, prompt: str) -> bool:
    return any(key[0] == voice and key[2] == prompt for key in engine._personas)


def test_errors_are_error_events_and_the_session_stays_open(start_server):
    server = start_server(FakeEngine())

    async def session() -> list:
        async with client_for(server).realtime.connect(model="personaplex") as connection:
            await next_event(connection, "session.created")
            errors = []
            await connection.session.update(
                session={"type": "realtime", "audio": {"output": {"voice": "alloy"}}}
            )
            errors.append(await next_event(connection, "error"))
            await connection.response.create()
            errors.append(await next_event(connection, "error"))
            await connection.send({"type": "input_audio_buffer.append", "audio": "not base64!"})
            errors.append(await next_event(connection, "error"))
            await connection.send(
                {
                    "type": "session.update",
                    "session": {"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcmu"}}}},
                }
            )
            errors.append(await next_event(connection, "error"))
            await connection.input_audio_buffer.append(audio=pcm16_base64(tone(0.16, 300)))
            await next_event(connection, "response.output_audio.delta")  # still talking
            await connection.session.update(session={"type": "realtime", "instructions": "too late"})
            errors.append(await next_event(connection, "error"))
            return errors

    errors = asyncio.run(session())
    assert [error.error.code for error in errors] == [
        "invalid_value",
        "unsupported_event",
        "invalid_value",
        "invalid_value",
        "session_locked",
    ]
    assert "unknown voice 'alloy'" in errors[0].error.message
    assert "decides itself when to speak" in errors[1].error.message


def test_the_beta_protocol_gets_the_beta_event_names(start_server):
    server = start_server(FakeEngine())

    async def session() -> list[str]:
        async with client_for(server).beta.realtime.connect(model="personaplex") as connection:
            created = await next_event(connection, "session.created")
            assert created.session.voice == "NATM0"
            await connection.session.update(session={"voice": "NATF3"})
            assert (await next_event(connection, "session.updated")).session.voice == "NATF3"
            await connection.input_audio_buffer.append(audio=pcm16_base64(tone(0.16, 300)))
            await next_event(connection, "response.audio.delta")
            return [(await next_event(connection, "response.audio_transcript.delta")).delta]

    assert asyncio.run(session()) == [" NATF3"]


def test_the_api_key_is_the_servers_token(start_server):
    server = start_server(FakeEngine(), policy=AccessPolicy.create("sekrit"))

    async def first_event(api_key: str):
        async with client_for(server, api_key).realtime.connect(model="personaplex") as connection:
            return json.loads(await connection.recv_bytes())

    assert asyncio.run(first_event("sekrit"))["type"] == "session.created"
    refused = asyncio.run(first_event("wrong"))
    assert refused["type"] == "error" and refused["error"]["code"] == "invalid_api_key"
    metrics = get_text(server.http_url + "/metrics", headers={"Authorization": "Bearer sekrit"})
    assert 'personaplex_sessions_rejected_total{reason="unauthorised"} 1' in metrics
    assert 'personaplex_sessions_total{mode="duplex"} 1' in metrics
