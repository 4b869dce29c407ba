"""The four inference calls on the tiny model folder."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from personaplex import InvalidAudioError, PersonaPlexError, UnknownVoiceError
from personaplex.runtime.prompts import PROMPT_PRESETS
from personaplex.runtime.voices import VOICE_NAMES

FRAME = 1920


def speech_like(seconds: float, rate: int = 24000, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    return (0.2 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def test_respond_stream_concatenated_equals_respond(engine):
    audio = speech_like(0.5)
    reply = engine.respond(audio, max_steps=6, seed=3)
    chunks = list(engine.respond_stream(audio, max_steps=6, seed=3))
    assert [c.frame_index for c in chunks] == list(range(6))
    assert all(c.pcm.shape == (FRAME,) and c.pcm.dtype == np.float32 for c in chunks)
    assert np.array_equal(np.concatenate([c.pcm for c in chunks]), reply.audio)
    assert "".join(c.text for c in chunks).strip() == reply.text
    assert len(reply.text_tokens) == 6 and all(len(f.agent_codes) == 8 for f in reply.frames)


def test_same_seed_same_reply_other_seed_other_reply(engine):
    audio = speech_like(0.3)
    a = engine.respond(audio, max_steps=4, seed=1)
    b = engine.respond(audio, max_steps=4, seed=1)
    c = engine.respond(audio, max_steps=4, seed=2)
    assert np.array_equal(a.audio, b.audio)
    assert [f.agent_codes for f in a.frames] != [f.agent_codes for f in c.frames]


def test_async_iteration_of_respond_stream(engine):
    async def collect():
        return [chunk async for chunk in engine.respond_stream(speech_like(0.2), max_steps=3, seed=0)]

    chunks = asyncio.run(collect())
    assert len(chunks) == 3


def test_any_sample_rate_is_resampled(engine):
    reply = engine.respond(speech_like(0.4, rate=16000), sample_rate=16000, max_steps=2, greedy=True)
    assert reply.audio.shape == (2 * FRAME,)


def test_early_stop_after_silent_frames_is_off_by_default(engine):
    assert engine.respond(speech_like(0.2), max_steps=5, seed=0).audio.shape == (5 * FRAME,)


async def _blocks(sizes: list[int]):
    audio = speech_like(sum(sizes) / 24000)
    start = 0
    for size in sizes:
        yield audio[start : start + size]
        start += size
        await asyncio.sleep(0)


def test_realtime_is_lock_step_with_odd_block_sizes(engine):
    sizes = [100, 1919, 2, 3000, 777, 4000, 1]  # 9799 samples -> 5 frames and a partial one
    async def run():
        return [chunk async for chunk in engine.respond_realtime(_blocks(sizes), seed=0)]

    chunks = asyncio.run(run())
    assert len(chunks) == -(-sum(sizes) // FRAME) == 6
    assert [c.frame_index for c in chunks] == list(range(6))
    assert all(c.pcm.shape == (FRAME,) for c in chunks)


def test_realtime_stops_when_the_consumer_stops(engine):
    produced = []

    async def endless():
        while True:
            yield np.zeros(FRAME, np.float32)
            await asyncio.sleep(0)

    async def run():
        stream = engine.respond_realtime(endless(), seed=0)
        async for chunk in stream:
            produced.append(chunk)
            if len(produced) == 3:
                break
        await stream.aclose()

    threads_before = threading.active_count()
    asyncio.run(run())
    assert len(produced) == 3
    # No generation keeps running: the lock is free and no frame is produced afterwards.
    assert engine.compute_lock.acquire(timeout=5)
    engine.compute_lock.release()
    assert threading.active_count() <= threads_before + 1


def test_respond_duplex_is_as_long_as_the_input(engine):
    audio = speech_like(0.7)
    reply = engine.respond_duplex(audio, seed=0)
    assert reply.audio.shape == audio.shape
    assert len(reply.frames) == -(-audio.size // FRAME)


def test_diagnostic_reports_layers_entropies_and_timings(engine):
    audio, info = engine.respond_diagnostic(speech_like(0.2), max_steps=3, seed=0)
    assert audio.shape == (3 * FRAME,)
    listen = [f for f in info.frames if f.phase == "listen"]
    reply = [f for f in info.frames if f.phase == "reply"]
    assert len(listen) == 3 and len(reply) == 3  # 0.2 s = 2.5 frames, padded to 3
    frame = reply[-1]
    assert len(frame.layers) == engine.lm.config.num_layers
    assert all(np.isfinite([s.mean, s.std, s.max_abs]).all() and s.std > 0 for s in frame.layers)
    assert 0 < frame.text_entropy <= np.log(engine.lm.config.text_card) + 1e-3
    assert 0 < frame.audio_entropy <= np.log(engine.lm.config.card) + 1e-3
    assert not info.has_non_finite
    assert {"persona", "encode", "lm", "decode"} <= set(info.phase_seconds)


def test_diagnostic_detects_non_finite_hidden_states(engine):
    weight = engine.lm.transformer.layers[0].gating.linear_out.weight
    saved = weight[0, 0].item()
    try:
        with torch.no_grad():
            weight[0, 0] = float("nan")
        _, info = engine.respond_diagnostic(speech_like(0.1), max_steps=1, seed=0)
    finally:
        with torch.no_grad():
            weight[0, 0] = saved
        engine._personas.clear()  # personas prefilled with the poisoned weight
    assert info.has_non_finite


@pytest.mark.parametrize("voice", VOICE_NAMES)
def test_every_voice_preset(engine, voice):
    assert engine.respond(speech_like(0.1), voice=voice, max_steps=1, seed=0).audio.shape == (FRAME,)


@pytest.mark.parametrize("preset", sorted(PROMPT_PRESETS))
def test_every_prompt_preset(engine, preset):
    assert engine.respond(speech_like(0.1), system_prompt=PROMPT_PRESETS[preset], max_steps=1, seed=0).audio.shape == (FRAME,)


@pytest.mark.parametrize(
    "audio, match",
    [
        (np.zeros(0, np.float32), "empty"),
        (np.full(4800, np.nan, np.float32), "NaN"),
        (np.zeros((2, 4800), np.float32), "stereo|channels|mono"),
        ("hello", "str"),
        (np.zeros(24000 * 300, np.float32), "longer than"),
    ],
)
def test_bad_audio_is_refused_clearly(engine, audio, match):
    with pytest.raises(InvalidAudioError, match=match):
        engine.respond(audio, max_steps=1)


def test_unknown_voice_lists_the_presets(engine):
    with pytest.raises(UnknownVoiceError, match="NATF0"):
        engine.respond(speech_like(0.1), voice="NOBODY", max_steps=1)


def test_bad_max_steps(engine):
    with pytest.raises(PersonaPlexError, match="max_steps"):
        engine.respond(speech_like(0.1), max_steps=0)


def test_over_long_system_prompt(engine):
    from personaplex.errors import PromptTooLongError

    with pytest.raises(PromptTooLongError, match="shorten the system prompt"):
        engine.respond(speech_like(0.1), system_prompt="you are helpful " * 200, max_steps=1)


def test_bad_sample_rate(engine):
    with pytest.raises(InvalidAudioError, match="sample"):
        engine.respond(speech_like(0.1), sample_rate=0, max_steps=1)


def test_mlx_conversion_folder_loads_and_talks(tmp_path, tiny_folder):
    """A folder in the MLX 4-bit layout (tiny, written here) through `from_pretrained`."""
    from personaplex import PersonaPlex
    from personaplex.model.config import LMConfig
    from personaplex.model.quantize import AffineQuantizedLinear
    from tests.fixtures.mlx_folder import make_mlx_model_folder
    from tests.fixtures.tiny_lm import random_lm

    # Every linear input a multiple of the 64-wide groups, as the real model's are.
    lm_config = LMConfig(dim=128, num_heads=4, num_layers=2, hidden_scale=3.0, card=2048, text_card=256,
                         context=384, depformer_dim=128, depformer_num_heads=4, depformer_num_layers=2,
                         depformer_dim_feedforward=384)
    folder = make_mlx_model_folder(tmp_path / "mlx", random_lm(lm_config, seed=1), 4, tiny_folder)

    engine = PersonaPlex.from_pretrained(folder, device="cpu")
    assert engine.lm.config == lm_config
    assert isinstance(engine.lm.transformer.layers[0].self_attn.in_proj, AffineQuantizedLinear)
    assert engine.respond(speech_like(0.2), max_steps=2, seed=0).audio.shape == (2 * FRAME,)


def test_realtime_at_another_sample_rate(engine):
    """16 kHz microphone blocks are resampled as one stream: 1.5 samples out per sample in."""
    sizes = [1280] * 10 + [7, 633]  # 13 440 samples at 16 kHz = 20 160 at 24 kHz -> 11 frames

    async def blocks16k():
        pcm = speech_like(sum(sizes) / 16000, rate=16000)
        start = 0
        for size in sizes:
            yield pcm[start : start + size]
            start += size

    async def run():
        return [chunk async for chunk in engine.respond_realtime(blocks16k(), sample_rate=16000, seed=0)]

    assert len(asyncio.run(run())) == -(-20_160 // FRAME) == 11


def test_realtime_refuses_a_bad_sample_rate(engine):
    async def run():
        async def blocks():
            yield np.zeros(100, np.float32)

        return [chunk async for chunk in engine.respond_realtime(blocks(), sample_rate=-5)]

    with pytest.raises(InvalidAudioError, match="sample"):
        asyncio.run(run())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seed": "1"}, "seed must be an integer from 0 to 2\\*\\*63 - 1"),
        ({"seed": 10**30}, "seed must be an integer .* got 1000000000000000000000000000000"),
        ({"seed": -5}, "seed must be an integer"),
        ({"system_prompt": "be kind \udcff"}, "system_prompt is not valid UTF-8 text"),
        ({"max_steps": 501}, "from 1 to 500"),
    ],
)
def test_bad_library_arguments_are_persona_plex_errors(engine, kwargs, message):
    with pytest.raises(PersonaPlexError, match=message):
        engine.respond(speech_like(0.1), **{"max_steps": 1, **kwargs})


def test_over_long_voice_recording_is_refused_naming_the_voice(engine, tmp_path):
    from personaplex.audio.io import write_wav

    voice = tmp_path / "narrator.wav"
    write_wav(voice, np.zeros(8_000 * 31, np.float32), 8_000)
    with pytest.raises(InvalidAudioError, match="narrator.wav lasts 31.0 s"):
        engine.respond(speech_like(0.1), voice_wav=str(voice), max_steps=1)


def test_respond_stream_reports_each_heard_frame(engine):
    heard = []
    chunks = list(engine.respond_stream(speech_like(0.5), max_steps=2, seed=0, on_listen=lambda: heard.append(1)))
    assert len(heard) == 7 and len(chunks) == 2  # 0.5 s is 7 frames of 80 ms, heard before the reply


@pytest.mark.parametrize("options, message", [
    ({"max_sessions": 0}, "max_sessions must be a positive integer"),
    ({"kv_cache": "int4"}, "unknown KV cache format 'int4'"),
])
def test_bad_engine_options_are_refused_before_loading(tmp_path, options, message):
    from personaplex import PersonaPlex

    # An empty folder: loading would fail differently, so the option was checked first.
    with pytest.raises(PersonaPlexError, match=message):
        PersonaPlex.from_pretrained(tmp_path, device="cpu", **options)
