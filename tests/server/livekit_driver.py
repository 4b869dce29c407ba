"""Drives LiveKit's PersonaPlex RealtimeModel (livekit-plugins-nvidia) against a server,
outside a LiveKit room. Run by test_livekit.py with the python of the plugin's own venv,
so it imports nothing from this repository. Prints one JSON line of what it saw.

    python livekit_driver.py talk WS_URL VOICE PROMPT INPUT_RATE [TOKEN]
    python livekit_driver.py refused WS_URL VOICE PROMPT SECONDS
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import aiohttp
import numpy as np
from livekit import rtc
from livekit.plugins.nvidia.experimental.realtime import RealtimeModel

OUTPUT_RATE = 24_000


class WarningCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def tone_frames(rate: int, seconds: float, hz: float = 330.0) -> list[rtc.AudioFrame]:
    """10 ms microphone frames of a tone, as a LiveKit room delivers them."""
    samples_per_frame = rate // 100
    t = np.arange(int(rate * seconds)) / rate
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16)
    return [
        rtc.AudioFrame(pcm[i : i + samples_per_frame].tobytes(), rate, 1, samples_per_frame)
        for i in range(0, len(pcm) - samples_per_frame + 1, samples_per_frame)
    ]


async def talk(url: str, voice: str, prompt: str, input_rate: int, token: str | None) -> dict:
    """Speak 1.5 s, and collect the model's audio and text until 1 s of audio came back."""
    warnings = WarningCounter()
    logging.getLogger("livekit.plugins.nvidia").addHandler(warnings)
    audio_samples, text, errors = 0, [], []
    enough = asyncio.Event()

    async def read_generation(event) -> None:
        nonlocal audio_samples
        async for message in event.message_stream:

            async def read_text(stream=message.text_stream) -> None:
                async for piece in stream:
                    text.append(piece)

            text_task = asyncio.create_task(read_text())
            async for frame in message.audio_stream:
                assert frame.sample_rate == OUTPUT_RATE
                audio_samples += frame.samples_per_channel
                if audio_samples >= OUTPUT_RATE:
                    enough.set()
            await text_task

    # The plugin's URL has no room for a token: the session's default header carries it.
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        model = RealtimeModel(base_url=url, voice=voice, text_prompt=prompt, seed=1, http_session=http)
        session = model.session()
        session.on("generation_created", lambda event: asyncio.create_task(read_generation(event)))
        session.on("error", lambda event: errors.append(str(event.error)))
        for frame in tone_frames(input_rate, 1.5):
            session.push_audio(frame)
            await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(enough.wait(), timeout=90)
        finally:
            await session.aclose()
            await model.aclose()
    return {
        "audio_samples": audio_samples,
        "text": "".join(text),
        "errors": errors,
        "warnings": warnings.messages,
    }


async def refused(url: str, voice: str, prompt: str, seconds: float) -> dict:
    """Count the plugin's connections and error events while the server refuses it."""
    connects, errors = 0, []

    async def on_request_start(*_args) -> None:
        nonlocal connects
        connects += 1

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    async with aiohttp.ClientSession(trace_configs=[trace]) as http:
        model = RealtimeModel(base_url=url, voice=voice, text_prompt=prompt, http_session=http)
        session = model.session()
        session.on("error", lambda event: errors.append(str(event.error)))
        session.push_audio(tone_frames(OUTPUT_RATE, 0.1)[0])
        await asyncio.sleep(seconds)
        await session.aclose()
        await model.aclose()
    return {"connects": connects, "errors": errors}


def main() -> None:
    mode, url, voice, prompt, number, *token = sys.argv[1:]
    if mode == "talk":
        result = asyncio.run(talk(url, voice, prompt, int(number), token[0] if token else None))
    else:
        result = asyncio.run(refused(url, voice, prompt, float(number)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
