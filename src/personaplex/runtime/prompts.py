"""System prompts: the text persona, fed to the model one SentencePiece piece per frame.

PersonaPlex was trained on a fixed assistant role ("wise and friendly teacher"),
customer-service roles ("You work for X which is a Y and your name is Z. Information: ...")
and casual conversations ("You enjoy having a good conversation. ..."): presets stay
close to those styles, which the model follows best.
"""

from __future__ import annotations

from typing import Protocol

from personaplex.errors import PersonaPlexError, PromptTooLongError
from personaplex.runtime.validation import check_text

_SYSTEM_TAG = "<system>"
# The real model's context is 3000 frames, one piece per frame, and an English piece averages
# about four characters: no prompt longer than this can fit, and checking the length first
# keeps a huge text from being tokenized at all.
MAX_SYSTEM_PROMPT_CHARS = 16_000


class PieceTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

PROMPT_PRESETS: dict[str, str] = {
    "default": (
        "You are a helpful assistant. Answer questions clearly and concisely. Listen carefully "
        "to what the user says, then respond directly to their question or request. "
        "Stay on topic. Be concise."
    ),
    "assistant": "You are a helpful assistant. Answer questions clearly and concisely.",
    "focused": (
        "You are a helpful assistant. Listen carefully to what the user says, then respond "
        "directly to their question or request. Stay on topic. Be concise."
    ),
    "teacher": (
        "You are a wise and friendly teacher. Answer questions or provide advice in a clear "
        "and engaging way."
    ),
    "customer-service": (
        "You work for Brightline Internet which is an internet service provider and your name "
        "is Maya Chen. Information: Verify the customer's name and account number. Plans: "
        "Basic 100 Mbps ($40/month) and Fiber 1 Gbps ($70/month). A technician visit costs $50 "
        "and is free for Fiber customers. Support is open every day from 8 AM to 10 PM."
    ),
    "conversation": "You enjoy having a good conversation.",
    "astronaut": (
        "You enjoy having a good conversation. Have a technical discussion about fixing a "
        "reactor core on a spaceship to Mars. You are an astronaut on a Mars mission. Your name "
        "is Alex. You are already dealing with a reactor core meltdown on a Mars mission. "
        "Several ship systems are failing, and continued instability will lead to catastrophic "
        "failure. You explain what is happening and you urgently ask for help thinking through "
        "how to stabilize the reactor."
    ),
}
DEFAULT_PROMPT = PROMPT_PRESETS["default"]


def wrap_system_prompt(text: str) -> str:
    """The text as the model saw it in training: `<system> TEXT <system>`.

    Text already wrapped is returned stripped but otherwise unchanged (as the reference
    does), and blank text gives "" (no system prompt at all, also as the reference does).
    """
    cleaned = text.strip()
    if not cleaned:
        return ""
    wrapped = len(cleaned) > len(_SYSTEM_TAG) and cleaned.startswith(_SYSTEM_TAG)
    if wrapped and cleaned.endswith(_SYSTEM_TAG):
        return cleaned
    return f"{_SYSTEM_TAG} {cleaned} {_SYSTEM_TAG}"


def resolve_prompt(preset: str | None = None, text: str | None = None) -> str:
    """The system prompt text from a preset name or free text (not both); default if neither."""
    if preset is not None and text is not None:
        raise PersonaPlexError("give either a prompt preset or a system prompt text, not both")
    if text is not None:
        return text
    if preset is None:
        return DEFAULT_PROMPT
    if preset not in PROMPT_PRESETS:
        raise PersonaPlexError(
            f"unknown prompt preset {preset!r}: use one of {', '.join(PROMPT_PRESETS)}"
        )
    return PROMPT_PRESETS[preset]


def check_system_prompt(
    text: str, tokenizer: PieceTokenizer | None = None, context_frames: int | None = None,
    name: str = "the system prompt",
) -> str:
    """`text` if it can be a system prompt, else PersonaPlexError (PromptTooLongError when long).

    Always checked: a str, valid Unicode, at most MAX_SYSTEM_PROMPT_CHARS characters. Given
    the model's tokenizer and context, also its pieces: one frame each, plus the silence
    around them, must leave room in the context (the voice comes on top and is checked when
    the persona is built). Milliseconds, with no model work: call it before anything else.
    """
    check_text(name, text)
    if len(text) > MAX_SYSTEM_PROMPT_CHARS:
        raise PromptTooLongError(
            f"the system prompt has {len(text)} characters, more than the {MAX_SYSTEM_PROMPT_CHARS} "
            "that can fit in the model's context: shorten the system prompt"
        )
    if tokenizer is None or context_frames is None or not text.strip():
        return text
    from personaplex.runtime.persona import PROMPT_SILENCE_FRAMES  # needs torch: only with a model

    pieces = len(tokenizer.encode(wrap_system_prompt(text)))
    room = context_frames - 2 * PROMPT_SILENCE_FRAMES - 1
    if pieces > room:
        raise PromptTooLongError(
            f"the system prompt is {pieces} pieces long but the model's context of {context_frames} "
            f"frames leaves room for at most {room}: shorten the system prompt"
        )
    return text
