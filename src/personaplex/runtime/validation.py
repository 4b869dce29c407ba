"""Checks of the values a caller hands the engine, shared by the library, the CLI and the
server so that each rule is stated once. Each raises PersonaPlexError with one line saying
what is wrong and what to pass instead."""

from __future__ import annotations

from typing import Any

from personaplex.errors import PersonaPlexError

# Reply length of a turn, in 80 ms frames: up to 40 s. The page, `chat`, the server's
# `max_steps` setting, `respond --max-steps` and the library all use this range.
MIN_STEPS, MAX_STEPS, DEFAULT_STEPS = 1, 500, 75


def check_max_steps(max_steps: Any) -> int:
    """A reply length in frames, within MIN_STEPS..MAX_STEPS."""
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or not MIN_STEPS <= max_steps <= MAX_STEPS:
        raise PersonaPlexError(
            f"max_steps must be a whole number of 80 ms frames from {MIN_STEPS} to {MAX_STEPS}, got {max_steps!r}"
        )
    return max_steps


def check_text(name: str, text: Any) -> str:
    """Text the tokenizer will read: a str that is valid Unicode (no lone surrogates, which
    is what bytes that are not UTF-8 become in a command line)."""
    if not isinstance(text, str):
        raise PersonaPlexError(f"{name} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PersonaPlexError(
            f"{name} is not valid UTF-8 text (character {err.start} is {text[err.start]!r}, part of no "
            "character): save or type it as UTF-8"
        ) from None
    return text
