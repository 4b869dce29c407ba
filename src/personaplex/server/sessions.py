"""Conversation settings and the table of running conversations (with its limit).

Settings come as query parameters of the websocket URL, so that a conversation is fully
described before it starts (the persona prefill needs the voice and the prompt). The
names the reference web UI uses are accepted too:

| parameter     | meaning                                              | default |
|---------------|------------------------------------------------------|---------|
| `mode`        | `turn` (turn-based) or `duplex` (full-duplex)        | duplex (as the reference) |
| `voice`       | a preset name, e.g. NATM0 (reference: `voice_prompt=NATM0.pt`) | NATM0 |
| `prompt`      | a system-prompt preset name (see GET /api/prompts)   | default |
| `text_prompt` | the system prompt text itself (wins over `prompt`; empty = none) | |
| `max_steps`   | turn-based: frames of each reply, 50-500             | 75 |
| `seed`        | integer seed for reproducible sampling (-1 = random) | random |
| `token`       | the access token, when the server has one            | |

During a turn-based conversation a metadata message (0x04) with any of `voice`,
`prompt`, `text_prompt`, `max_steps`, `seed` changes the settings of the next reply.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

from personaplex.errors import PersonaPlexError, UnknownVoiceError
from personaplex.runtime.prompts import DEFAULT_PROMPT, PROMPT_PRESETS
from personaplex.runtime.voices import VOICE_NAMES

Mode = Literal["turn", "duplex"]
MODES: tuple[Mode, ...] = ("turn", "duplex")
DEFAULT_VOICE = "NATM0"
MIN_STEPS, MAX_STEPS, DEFAULT_STEPS = 50, 500, 75
# The settings a client may change in the middle of a turn-based conversation.
UPDATABLE_SETTINGS = frozenset({"voice", "prompt", "text_prompt", "max_steps", "seed"})


class SettingsError(PersonaPlexError, ValueError):
    """A conversation setting with a value the server cannot use."""


class ServerBusyError(PersonaPlexError, RuntimeError):
    """Every conversation slot is taken."""


@dataclass(frozen=True)
class SessionConfig:
    mode: Mode = "duplex"
    voice: str = DEFAULT_VOICE
    system_prompt: str = DEFAULT_PROMPT
    max_steps: int = DEFAULT_STEPS
    seed: int | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> SessionConfig:
        """Settings from the websocket URL's query parameters (names in the module doc)."""
        mode = query.get("mode", "duplex")
        if mode not in MODES:
            raise SettingsError(f"unknown mode {mode!r}: use 'turn' or 'duplex'")
        return cls(mode=mode).updated(query)  # type: ignore[arg-type]

    def updated(self, changes: Mapping[str, Any]) -> SessionConfig:
        """A copy with the given settings changed, each checked."""
        config = self
        voice = changes.get("voice") or _voice_from_reference_name(changes.get("voice_prompt"))
        if voice:
            config = replace(config, voice=_checked_voice(str(voice)))
        if "text_prompt" in changes:
            config = replace(config, system_prompt=str(changes["text_prompt"]))
        elif changes.get("prompt"):
            config = replace(config, system_prompt=_preset_text(str(changes["prompt"])))
        if changes.get("max_steps") not in (None, ""):
            config = replace(config, max_steps=_checked_steps(changes["max_steps"]))
        if changes.get("seed") not in (None, ""):
            config = replace(config, seed=_checked_seed(changes["seed"]))
        return config

    def describe(self) -> dict[str, Any]:
        """What the session event tells the client about its settings."""
        return {
            "mode": self.mode,
            "voice": self.voice,
            "system_prompt": self.system_prompt,
            "max_steps": self.max_steps,
            "seed": self.seed,
        }


def _voice_from_reference_name(name: Any) -> str | None:
    # The reference UI names voice files: "NATF2.pt".
    if not name:
        return None
    return str(name).removesuffix(".pt")


def _checked_voice(voice: str) -> str:
    # Only presets: a path from a remote client must never reach the file system.
    if voice.upper() not in VOICE_NAMES:
        raise UnknownVoiceError(f"unknown voice {voice!r}: use one of {', '.join(VOICE_NAMES)}")
    return voice.upper()


def _preset_text(name: str) -> str:
    if name not in PROMPT_PRESETS:
        raise SettingsError(
            f"unknown prompt preset {name!r}: use one of {', '.join(PROMPT_PRESETS)} "
            "or give the text as text_prompt"
        )
    return PROMPT_PRESETS[name]


def _checked_steps(value: Any) -> int:
    try:
        steps = int(value)
    except (TypeError, ValueError):
        raise SettingsError(f"max_steps must be an integer, got {value!r}") from None
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise SettingsError(f"max_steps must be between {MIN_STEPS} and {MAX_STEPS}, got {steps}")
    return steps


def _checked_seed(value: Any) -> int | None:
    try:
        seed = int(value)
    except (TypeError, ValueError):
        raise SettingsError(f"seed must be an integer, got {value!r}") from None
    return None if seed == -1 else seed


@dataclass(frozen=True)
class SessionInfo:
    """One running conversation, as GET /api/status lists it."""

    session_id: int
    mode: Mode
    voice: str
    started_at: float

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.session_id,
            "mode": self.mode,
            "voice": self.voice,
            "seconds": round(time.time() - self.started_at, 1),
        }


class SessionManager:
    """Hands out conversation slots up to `limit`; each slot is freed when its socket ends."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the session limit must be at least 1, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._sessions: dict[int, SessionInfo] = {}
        self._ids = itertools.count(1)

    @contextmanager
    def slot(self, config: SessionConfig) -> Iterator[SessionInfo]:
        """Hold a slot for the duration of the `with` block; ServerBusyError if none is free."""
        with self._lock:
            if len(self._sessions) >= self.limit:
                raise ServerBusyError(
                    f"busy: {self.limit} conversation(s) already running, the most this server "
                    "takes; try again when one ends"
                )
            info = SessionInfo(next(self._ids), config.mode, config.voice, time.time())
            self._sessions[info.session_id] = info
        try:
            yield info
        finally:
            with self._lock:
                del self._sessions[info.session_id]

    def active(self) -> list[SessionInfo]:
        with self._lock:
            return list(self._sessions.values())
