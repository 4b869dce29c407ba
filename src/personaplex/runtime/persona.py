"""Persona prefill: the voice prompt and the system prompt, played into the model before the user speaks.

The reference (`LMGen.step_system_prompts`) runs, frame by frame:
1. the voice: a preset's stored embeddings replayed through the temporal transformer (then
   its stored token ring copied in), or a WAV's Mimi codes as the agent's audio;
2. 6 frames of silence: agent = SILENCE codes, text = PAD, user = SINE codes;
3. the system prompt, one SentencePiece piece per frame in the text stream;
4. 6 more frames of silence.
Every stream of every prompt frame is provided, so nothing sampled is ever kept: the whole
prefill is a pure function of (voice, prompt). We therefore run it once as a single batched
forward and keep the resulting state (`PersonaSnapshot`) for every conversation that starts
with the same persona.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PromptTooLongError
from ..model.lm import LMModel
from .generation import FrameGenerator, StepInputs
from .voices import VoicePrompt

# Mimi codes of one frame of silence (the agent's "not speaking") and of a 440 Hz tone
# (the user's stream during prompts), as the reference defines them for the official codec.
SILENCE_CODES = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
SINE_CODES = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
TEXT_PAD = 3
PROMPT_SILENCE_FRAMES = 6  # 0.5 s at 12.5 Hz, before and after the system prompt


@dataclass
class PromptFrame:
    inputs: StepInputs
    embedding: torch.Tensor | None = None  # [1, 1, dim]: replaces the token input (voice replay)


@dataclass
class PersonaScript:
    """The prompt frames in order. The first goes to `FrameGenerator.begin` (no forward);
    after the first `voice_frames`, the ring is replaced by `ring_after_voice` if given."""

    frames: list[PromptFrame]
    voice_frames: int
    ring_after_voice: torch.Tensor | None  # [1, streams, slots]


def _codes(values: tuple[int, ...], device) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.long, device=device)


def _silence_frame(device) -> PromptFrame:
    return PromptFrame(StepInputs(text=torch.full((1, 1), TEXT_PAD, device=device), agent=_codes(SILENCE_CODES, device), user=_codes(SINE_CODES, device)))


def build_script(
    lm: LMModel,
    prompt_tokens: list[int],
    voice: VoicePrompt | None = None,
    voice_codes: torch.Tensor | None = None,
) -> PersonaScript:
    """Prompt frames for a preset voice (`voice`) or a WAV voice's codes [8, N] (`voice_codes`)."""
    device = lm.text_linear.weight.device
    pad = torch.full((1, 1), TEXT_PAD, device=device)
    frames: list[PromptFrame] = []
    ring_after_voice = None
    if voice is not None:
        # The reference replays embeddings through `step_embeddings`, whose provided tokens are
        # the start tokens (text PAD); its offset-0 step consumes no embedding.
        start = lm.start_tokens(device)[None]
        dummy = StepInputs(text=pad, agent=start[:, 1:9], user=start[:, 9:17])
        frames.append(PromptFrame(dummy))
        embeddings = voice.embeddings.to(device=device, dtype=lm.activation_dtype)
        frames.extend(PromptFrame(dummy, embeddings[i].reshape(1, 1, -1)) for i in range(embeddings.shape[0]))
        ring_after_voice = voice.cache.to(device)
    elif voice_codes is not None:
        sine = _codes(SINE_CODES, device)
        frames.extend(PromptFrame(StepInputs(text=pad, agent=voice_codes[:, i][None].to(device), user=sine)) for i in range(voice_codes.shape[1]))
    voice_frames = len(frames)
    frames.extend(_silence_frame(device) for _ in range(PROMPT_SILENCE_FRAMES))
    sine = _codes(SINE_CODES, device)
    silence = _codes(SILENCE_CODES, device)
    frames.extend(PromptFrame(StepInputs(text=torch.tensor([[t]], device=device), agent=silence, user=sine)) for t in prompt_tokens)
    frames.extend(_silence_frame(device) for _ in range(PROMPT_SILENCE_FRAMES))
    # The persona must leave room in the context for the conversation itself.
    if len(frames) >= lm.config.context:
        raise PromptTooLongError(
            f"the persona needs {len(frames)} frames (voice + system prompt of {len(prompt_tokens)} pieces) "
            f"but the model's context is {lm.config.context} frames: shorten the system prompt"
        )
    return PersonaScript(frames, voice_frames, ring_after_voice)


def _each_frame(generator: FrameGenerator, script: PersonaScript, run_frame) -> None:
    generator.begin(script.frames[0].inputs)
    for index, frame in enumerate(script.frames[1:], start=1):
        if index == script.voice_frames and script.ring_after_voice is not None:
            generator.ring.tokens.copy_(script.ring_after_voice.expand_as(generator.ring.tokens))
        run_frame(frame)


def prefill_stepwise(generator: FrameGenerator, script: PersonaScript) -> None:
    """The reference procedure: one full step (transformer, depformer, sampling) per frame."""

    def run_frame(frame: PromptFrame) -> None:
        embedding = None if frame.embedding is None else frame.embedding.expand(generator.batch_size, -1, -1)
        generator.step(frame.inputs, embedding)

    _each_frame(generator, script, run_frame)


def prefill_batched(generator: FrameGenerator, script: PersonaScript) -> None:
    """Same state as `prefill_stepwise`: ring bookkeeping per frame, then ONE temporal forward."""
    chunk: list[torch.Tensor] = []

    def run_frame(frame: PromptFrame) -> None:
        chunk.append(generator.provide_prompt_frame(frame.inputs, frame.embedding))

    _each_frame(generator, script, run_frame)
    if chunk:
        generator.lm.forward_temporal(torch.cat(chunk, dim=1), generator.temporal)


@dataclass
class PersonaSnapshot:
    """The state a persona leaves (batch row 0): only the filled KV slots are kept."""

    keys: torch.Tensor  # [layers, heads, frames, head_dim]
    values: torch.Tensor
    ring_tokens: torch.Tensor  # [streams, slots]
    ring_provided: torch.Tensor
    offset: int
    frames: int

    @classmethod
    def capture(cls, generator: FrameGenerator) -> "PersonaSnapshot":
        temporal = generator.temporal
        frames = int(temporal.next_position[0])
        if frames > temporal.capacity:
            raise PromptTooLongError("the persona overflowed the context")
        return cls(
            keys=temporal.keys[:, 0, :, :frames].clone(),
            values=temporal.values[:, 0, :, :frames].clone(),
            ring_tokens=generator.ring.tokens[0].clone(),
            ring_provided=generator.ring.provided[0].clone(),
            offset=int(generator.ring.offset[0]),
            frames=frames,
        )

    def restore(self, generator: FrameGenerator, row: int = 0) -> None:
        """Start conversation `row` of `generator` right after this persona."""
        temporal = generator.temporal
        temporal.reset(torch.arange(generator.batch_size, device=temporal.next_position.device) == row)
        temporal.keys[:, row, :, : self.frames] = self.keys
        temporal.values[:, row, :, : self.frames] = self.values
        temporal.slot_positions[row, : self.frames] = torch.arange(self.frames, device=temporal.slot_positions.device)
        temporal.next_position[row] = self.frames
        generator.ring.tokens[row] = self.ring_tokens
        generator.ring.provided[row] = self.ring_provided
        generator.ring.offset[row] = self.offset
