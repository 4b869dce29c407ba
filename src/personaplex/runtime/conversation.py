"""One conversation: a persona-primed generator plus Mimi streaming state, advanced frame by frame.

A frame: Mimi encodes 1920 user samples into 8 codes, the LM steps (user codes provided,
text and agent audio sampled), Mimi decodes the 8 agent codes into 1920 samples.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model.lm import LMModel
from ..model.mimi import Mimi
from ..text.tokenizer import TextTokenizer
from .generation import FrameGenerator, StepInputs, StepOutput
from .persona import SILENCE_CODES, TEXT_PAD, PersonaSnapshot
from .sampling import SamplingConfig


@dataclass
class FrameResult:
    index: int  # frames since the persona ended
    pcm: np.ndarray | None  # [frame_samples] float32 agent audio, None when not decoded
    text_token: int
    text: str
    agent_codes: list[int]
    timings_ms: dict[str, float] = field(default_factory=dict)


class Conversation:
    """Not thread-safe by itself: the engine's `compute_lock` serialises model work across
    conversations, so many can be driven from different threads."""

    def __init__(self, lm: LMModel, mimi: Mimi, tokenizer: TextTokenizer, persona: PersonaSnapshot,
                 sampling: SamplingConfig, seed: int | None, compute_lock: threading.Lock):
        self.lm, self.mimi, self.tokenizer = lm, mimi, tokenizer
        self.lock = compute_lock
        with self.lock:
            self.generator = FrameGenerator(lm, 1, sampling, agent_only=True, seed=seed)
            persona.restore(self.generator)
            self.codec_state = mimi.init_stream(1)
        device = self.generator.device
        self.silence_codes = torch.tensor([SILENCE_CODES], dtype=torch.long, device=device)
        self.pad_text = torch.full((1, 1), TEXT_PAD, dtype=torch.long, device=device)
        self.frames_done = 0

    @property
    def frame_samples(self) -> int:
        return self.mimi.config.frame_samples

    @torch.no_grad()
    def step(self, user_pcm: np.ndarray, *, agent_listens: bool = False, decode: bool = True,
             on_output: Callable[[StepOutput], None] | None = None) -> FrameResult:
        """Advance one frame with `user_pcm` [frame_samples] from the microphone.

        `agent_listens` holds the agent at silence (text PAD, SILENCE codes) for this frame,
        as the turn-based mode does while the user speaks.
        """
        with self.lock:
            timings = {}
            start = time.perf_counter()
            pcm = torch.from_numpy(np.ascontiguousarray(user_pcm, dtype=np.float32)).to(self.generator.device)
            user_codes = self.mimi.encode_step(pcm.view(1, 1, -1).to(self.mimi.dtype), self.codec_state)
            timings["encode"] = _lap(start, pcm)
            inputs = StepInputs(user=user_codes[:, :, 0])
            if agent_listens:
                inputs.text, inputs.agent = self.pad_text, self.silence_codes
            lm_start = time.perf_counter()
            output = self.generator.step(inputs)
            if on_output is not None:
                on_output(output)
            timings["lm"] = _lap(lm_start, output.tokens)
            agent_pcm = None
            if decode and bool(output.valid[0]):
                decode_start = time.perf_counter()
                agent_codes = output.tokens[:, 1 : 1 + self.lm.config.agent_codebooks, None]
                decoded = self.mimi.decode_step(agent_codes, self.codec_state)
                agent_pcm = decoded[0, 0].float().cpu().numpy()
                timings["decode"] = (time.perf_counter() - decode_start) * 1e3
        return self._result(output, agent_pcm, timings)

    def _result(self, output: StepOutput, agent_pcm: np.ndarray | None, timings: dict[str, float]) -> FrameResult:
        tokens = output.tokens[0].tolist()
        text_token = tokens[0]
        result = FrameResult(
            index=self.frames_done,
            pcm=agent_pcm,
            text_token=text_token,
            text=monologue_piece(self.tokenizer, text_token),
            agent_codes=tokens[1:],
            timings_ms=timings,
        )
        self.frames_done += 1
        return result


def monologue_piece(tokenizer: TextTokenizer, text_token: int) -> str:
    """The text a frame's token adds; the text start token (never a word) adds nothing."""
    return tokenizer.piece_text(text_token) if text_token < tokenizer.vocab_size else ""


def _lap(start: float, result: torch.Tensor) -> float:
    if result.is_cuda:
        torch.cuda.synchronize(result.device)
    return (time.perf_counter() - start) * 1e3
