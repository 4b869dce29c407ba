"""Persona prefill: batched == stepwise (the reference procedure), cache == fresh, ring contents."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from personaplex.errors import PromptTooLongError
from personaplex.runtime.generation import FrameGenerator, StepInputs
from personaplex.runtime.persona import (
    PROMPT_SILENCE_FRAMES, SILENCE_CODES, SINE_CODES, TEXT_PAD,
    PersonaSnapshot, build_script, prefill_batched, prefill_stepwise,
)
from personaplex.runtime.sampling import SamplingConfig
from personaplex.runtime.voices import load_voice
from tests.fixtures.tiny_lm import random_lm


@pytest.fixture(scope="module")
def parts(engine):
    voice = load_voice("NATF1", engine.voices_dir, dim=engine.lm.config.dim)
    tokens = engine.tokenizer.encode("<system> You enjoy having a good conversation. <system>")
    return engine.lm, voice, tokens


def next_frame_logits(generator: FrameGenerator, user_codes: torch.Tensor) -> torch.Tensor:
    model_input, _, _ = generator.prepare(StepInputs(user=user_codes))
    _, text_logits = generator.lm.forward_temporal(generator.lm.embed_codes(model_input[:, :, None]), generator.temporal)
    return text_logits


@torch.no_grad()
def test_batched_prefill_equals_stepwise_prefill(parts):
    lm, voice, tokens = parts
    script = build_script(lm, tokens, voice=voice)
    stepwise = FrameGenerator(lm, 1, SamplingConfig(greedy=True), seed=0)
    batched = FrameGenerator(lm, 1, SamplingConfig(greedy=True), seed=0)
    prefill_stepwise(stepwise, script)
    prefill_batched(batched, script)
    assert torch.equal(stepwise.ring.tokens, batched.ring.tokens)
    assert torch.equal(stepwise.ring.provided, batched.ring.provided)
    assert torch.equal(stepwise.ring.offset, batched.ring.offset)
    assert torch.equal(stepwise.temporal.slot_positions, batched.temporal.slot_positions)
    assert torch.allclose(stepwise.temporal.keys, batched.temporal.keys, atol=1e-5, rtol=1e-4)
    user = torch.randint(0, 2048, (1, 8))
    assert torch.allclose(next_frame_logits(stepwise, user), next_frame_logits(batched, user), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_batched_prefill_equals_stepwise_prefill_past_the_ring_wrap(parts):
    """With a context just longer than the persona, the conversation after it wraps the KV
    ring three times: from a batched prefill it runs exactly as from the stepwise one."""
    lm, voice, tokens = parts
    persona_frames = len(build_script(lm, tokens, voice=voice).frames)
    short = random_lm(dataclasses.replace(lm.config, context=persona_frames + 2), seed=4)
    script = build_script(short, tokens, voice=voice)
    stepwise = FrameGenerator(short, 1, SamplingConfig(greedy=True), seed=0)
    batched = FrameGenerator(short, 1, SamplingConfig(greedy=True), seed=0)
    prefill_stepwise(stepwise, script)
    prefill_batched(batched, script)
    stepwise.observer, batched.observer = LastTextLogits(), LastTextLogits()
    user = torch.randint(0, 2048, (3 * short.config.context, 1, 8), generator=torch.Generator().manual_seed(2))
    for index, frame in enumerate(user):
        expected, got = stepwise.step(StepInputs(user=frame)), batched.step(StepInputs(user=frame))
        assert torch.equal(got, expected), f"frame {index}"
        assert torch.allclose(batched.observer.logits, stepwise.observer.logits, atol=1e-4, rtol=1e-4), f"frame {index}"


class LastTextLogits:
    """A step observer keeping the latest frame's text logits."""

    logits: torch.Tensor | None = None

    def on_temporal(self, hidden: torch.Tensor, text_logits: torch.Tensor) -> None:
        self.logits = text_logits

    def on_audio_logits(self, step: int, logits: torch.Tensor) -> None:
        pass


@torch.no_grad()
def test_ring_contents_follow_the_reference_frame_by_frame(parts):
    """Replays the reference procedure and checks the ring after each phase."""
    lm, voice, tokens = parts
    script = build_script(lm, tokens, voice=voice)
    gen = FrameGenerator(lm, 1, SamplingConfig(greedy=True))
    gen.begin(script.frames[0].inputs)
    assert gen.ring.tokens[0, :, 0].tolist() == lm.start_tokens().tolist()  # offset 0: start tokens
    assert int(gen.ring.offset[0]) == 1
    for frame in script.frames[1 : script.voice_frames]:
        gen.step(frame.inputs, frame.embedding)
    assert int(gen.ring.offset[0]) == 1 + voice.embeddings.shape[0]
    gen.ring.tokens.copy_(script.ring_after_voice)  # the reference copies the voice's ring in
    slots = gen.ring.slots
    for index, frame in enumerate(script.frames[script.voice_frames :]):
        offset = int(gen.ring.offset[0])
        gen.step(frame.inputs, frame.embedding)
        written = gen.ring.tokens[0, :, offset % slots]
        # Delay-0 streams of this frame are at `offset`; delay-1 streams at `offset + 1`.
        ahead = gen.ring.tokens[0, :, (offset + 1) % slots]
        text_expected = TEXT_PAD if not PROMPT_SILENCE_FRAMES <= index < PROMPT_SILENCE_FRAMES + len(tokens) else tokens[index - PROMPT_SILENCE_FRAMES]
        assert int(written[0]) == text_expected
        assert int(written[1]) == SILENCE_CODES[0] and ahead[2:9].tolist() == list(SILENCE_CODES[1:])
        assert int(written[9]) == SINE_CODES[0] and ahead[10:17].tolist() == list(SINE_CODES[1:])
        assert not gen.ring.provided[0, :, (offset - 1) % slots].any()  # consumed input slot is cleared


@torch.no_grad()
def test_cached_persona_equals_fresh_prefill(engine):
    persona = engine.persona("NATM2", "You enjoy having a good conversation.")
    assert engine.persona("NATM2", "You enjoy having a good conversation.") is persona  # cached
    fresh = FrameGenerator(engine.lm, 1, SamplingConfig(greedy=True))
    voice = load_voice("NATM2", engine.voices_dir, dim=engine.lm.config.dim)
    tokens = engine.tokenizer.encode("<system> You enjoy having a good conversation. <system>")
    prefill_batched(fresh, build_script(engine.lm, tokens, voice=voice))
    restored = FrameGenerator(engine.lm, 1, SamplingConfig(greedy=True))
    persona.restore(restored)
    user = torch.randint(0, 2048, (1, 8))
    assert torch.equal(next_frame_logits(fresh, user), next_frame_logits(restored, user))


@torch.no_grad()
def test_restoring_a_persona_is_a_small_fraction_of_a_prefill(engine):
    import time

    start = time.perf_counter()
    engine._personas.clear()
    persona = engine.persona("VARF3", "You enjoy having a good conversation.")
    prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    persona.restore(FrameGenerator(engine.lm, 1))
    restore_seconds = time.perf_counter() - start
    assert restore_seconds < 0.25 * prefill_seconds


def test_prompt_longer_than_the_context_is_refused(parts):
    lm, voice, _ = parts
    with pytest.raises(PromptTooLongError, match=r"persona needs \d+ frames.*context is 384 frames"):
        build_script(lm, list(range(4, 250)) * 2, voice=voice)


@torch.no_grad()
def test_snapshot_round_trip_into_another_row(parts):
    lm, voice, tokens = parts
    gen = FrameGenerator(lm, 1)
    prefill_batched(gen, build_script(lm, tokens, voice=voice))
    snapshot = PersonaSnapshot.capture(gen)
    batch = FrameGenerator(lm, 3)
    snapshot.restore(batch, row=2)
    assert torch.equal(batch.ring.tokens[2], gen.ring.tokens[0])
    assert int(batch.temporal.next_position[2]) == snapshot.frames
    assert int(batch.temporal.next_position[0]) == 0


def test_wav_voice_prompt(engine, tmp_path):
    from personaplex.audio.io import write_wav

    t = np.arange(int(0.5 * 16000)) / 16000
    path = tmp_path / "my_voice.wav"
    write_wav(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    reply = engine.respond(np.zeros(4000, np.float32), voice_wav=str(path), max_steps=3, seed=0)
    assert reply.audio.shape == (3 * 1920,)
    persona = engine.persona(str(path), engine_default_prompt())
    # 0.5 s at 24 kHz = 7 frames (6.25 rounded up); the first one is spent on start tokens.
    assert persona.frames == 6 + 2 * PROMPT_SILENCE_FRAMES + len(engine.tokenizer.encode(f"<system> {engine_default_prompt()} <system>"))


def engine_default_prompt() -> str:
    from personaplex.runtime.prompts import DEFAULT_PROMPT

    return DEFAULT_PROMPT
