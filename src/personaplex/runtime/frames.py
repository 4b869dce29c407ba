"""What a conversation gets for each 80 ms frame: the one per-frame result type."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..text.tokenizer import TextTokenizer


@dataclass
class AudioChunk:
    pcm: np.ndarray  # [1920] float32, 24 kHz: the agent's audio of this frame
    text: str  # inner-monologue piece of this frame ("" for padding)
    frame_index: int  # frames of this conversation (or of this reply, for turn-based calls)
    elapsed_ms: float  # compute time of the frame that made it (shared by every row of the batch)
    text_token: int = 0
    agent_codes: list[int] = field(default_factory=list)  # the 8 Mimi codes decoded into `pcm`


def monologue_piece(tokenizer: TextTokenizer, text_token: int) -> str:
    """The text a frame's token adds; the text start token (never a word) adds nothing."""
    return tokenizer.piece_text(text_token) if text_token < tokenizer.vocab_size else ""


def chunk_of(tokenizer: TextTokenizer, pcm: np.ndarray, tokens: list[int], frame_index: int,
             elapsed_ms: float) -> AudioChunk:
    """One row's frame from the runner's outputs: pcm [1920], tokens [text, 8 agent codes]."""
    return AudioChunk(pcm=pcm, text=monologue_piece(tokenizer, tokens[0]), frame_index=frame_index,
                      elapsed_ms=elapsed_ms, text_token=tokens[0], agent_codes=tokens[1:])
