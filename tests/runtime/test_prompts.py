import pytest

from personaplex.errors import PersonaPlexError
from personaplex.runtime.prompts import (
    DEFAULT_PROMPT,
    PROMPT_PRESETS,
    resolve_prompt,
    wrap_system_prompt,
)


def test_presets():
    for name in ("default", "assistant", "focused", "teacher", "customer-service", "conversation"):
        assert PROMPT_PRESETS[name].strip() == PROMPT_PRESETS[name] and PROMPT_PRESETS[name]
    assert DEFAULT_PROMPT == PROMPT_PRESETS["default"]
    assert DEFAULT_PROMPT.startswith("You are a helpful assistant. Answer questions clearly")
    assert PROMPT_PRESETS["teacher"] == (
        "You are a wise and friendly teacher. Answer questions or provide advice in a clear "
        "and engaging way."
    )
    assert PROMPT_PRESETS["conversation"] == "You enjoy having a good conversation."


def test_wrap_system_prompt():
    assert wrap_system_prompt("  Be nice. \n") == "<system> Be nice. <system>"
    assert wrap_system_prompt("<system> Be nice. <system>") == "<system> Be nice. <system>"
    assert wrap_system_prompt("<system>") == "<system> <system> <system>"
    assert wrap_system_prompt("   ") == ""


def test_resolve_prompt():
    assert resolve_prompt() == DEFAULT_PROMPT
    assert resolve_prompt("teacher") == PROMPT_PRESETS["teacher"]
    assert resolve_prompt(None, "Talk like a pirate.") == "Talk like a pirate."
    assert resolve_prompt(text="") == ""
    with pytest.raises(PersonaPlexError, match="unknown prompt preset 'pirate'.*teacher"):
        resolve_prompt("pirate")
    with pytest.raises(PersonaPlexError, match="not both"):
        resolve_prompt("teacher", "text")
