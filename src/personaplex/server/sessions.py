"""Conversation settings and the table of running conversations (with its limit).

Settings come as query parameters of the websocket URL, so that a conversation is fully
described before it starts (the persona prefill needs the voice and the prompt). The
names the reference web UI uses are accepted too:

| parameter     | meaning                                              | default |
|---------------|------------------------------------------------------|---------|
| `mode`        | `turn` (turn-based) or `duplex` (full-duplex)        | duplex (as the reference) |
| `voice`       | a preset name, e.g. NATM0 (reference: `voice_prompt=NATM0.pt`) | NATM0 |
| `prompt`      | a system-prompt preset name (see GET /api/prompts)   | default |
| `text_prompt` | the system prompt text itself (wins over `prompt`; empty = none; at most 16000 characters and the model's context) | |
| `max_steps`   | turn-based: frames of each reply, 1-500              | 75 |
| `seed`        | integer seed for reproducible sampling, 0 to 2^63-1 (-1 = random) | random |
| `text_temperature`, `text_topk` | text sampling: temperature 0-5 (0 = argmax), top-k 1-32000 | 0.7, 25 |
| `audio_temperature`, `audio_topk` | audio sampling: temperature 0-5 (0 = argmax), top-k 1-2048 | 0.8, 250 |
| `events`      | `1`: also send the metadata events (0x04) of conversation.py | off |
| `token`       | the access token, when the server has one            | |

NVIDIA's web client also sends `text_seed`, `audio_seed`, `pad_mult`, `repetition_penalty`
and `repetition_penalty_context`: they are accepted and ignored (text and audio draw from
one seeded stream, set by `seed`; the model is sampled without padding bonus or repetition
penalty, as NVIDIA's own server does).

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
from personaplex.runtime.prompts import DEFAULT_PROMPT, PROMPT_PRESETS, check_system_prompt
from personaplex.runtime.sampling import SamplingConfig
from personaplex.runtime.validation import DEFAULT_STEPS, MAX_STEPS, MIN_STEPS
from personaplex.runtime.voices import DEFAULT_VOICE, VOICE_NAMES

Mode = Literal["turn", "duplex"]
MODES: tuple[Mode, ...] = ("turn", "duplex")
# The settings a client may change in the middle of a turn-based conversation.
UPDATABLE_SETTINGS = frozenset({"voice", "prompt", "text_prompt", "max_steps", "seed"})
MAX_TEMPERATURE = 5.0
# Sampling query parameters (NVIDIA's client's names); top-k: -> (SamplingConfig field, largest).
TEMPERATURE_PARAMETERS = ("text_temperature", "audio_temperature")  # named as the fields
TOP_K_PARAMETERS = {"text_topk": ("text_top_k", 32_000), "audio_topk": ("audio_top_k", 2_048)}
# Seeds are stored as 64-bit signed integers.
MAX_SEED = 2**63 - 1
MAX_INTEGER_DIGITS = 20


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
    sampling: SamplingConfig = SamplingConfig()
    events: bool = False  # send the 0x04 events: only clients that ask understand them

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> SessionConfig:
        """Settings from the websocket URL's query parameters (names in the module doc)."""
        mode = query.get("mode", "duplex")
        if mode not in MODES:
            raise SettingsError(f"unknown mode {mode!r}: use 'turn' or 'duplex'")
        config = cls(mode=mode, sampling=_sampling_from_query(query), events=_checked_flag(query, "events"))
        return config.updated(query)  # type: ignore[arg-type]

    def updated(self, changes: Mapping[str, Any]) -> SessionConfig:
        """A copy with the given settings changed, each checked."""
        config = self
        voice = changes.get("voice") or _voice_from_reference_name(changes.get("voice_prompt"))
        if voice:
            config = replace(config, voice=_checked_voice(str(voice)))
        if "text_prompt" in changes:
            config = replace(config, system_prompt=_checked_prompt(changes["text_prompt"]))
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
            "text_temperature": self.sampling.text_temperature,
            "text_topk": self.sampling.text_top_k,
            "audio_temperature": self.sampling.audio_temperature,
            "audio_topk": self.sampling.audio_top_k,
        }


def _sampling_from_query(query: Mapping[str, str]) -> SamplingConfig:
    settings: dict[str, Any] = {}
    for name in TEMPERATURE_PARAMETERS:
        if query.get(name) not in (None, ""):
            settings[name] = _checked_temperature(name, query[name])
    for name, (field_name, largest) in TOP_K_PARAMETERS.items():
        if query.get(name) not in (None, ""):
            settings[field_name] = _checked_top_k(name, query[name], largest)
    return SamplingConfig(**settings)


def _checked_temperature(name: str, value: str) -> float:
    try:
        temperature = float(value)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {_shown(value)}") from None
    if not 0.0 <= temperature <= MAX_TEMPERATURE:  # also refuses nan
        raise SettingsError(f"{name} must be between 0 and {MAX_TEMPERATURE:g}, got {value}")
    return temperature


def _checked_top_k(name: str, value: str, largest: int) -> int:
    top_k = _integer(name, value)
    if not 1 <= top_k <= largest:
        raise SettingsError(f"{name} must be between 1 and {largest}, got {top_k}")
    return top_k


def _checked_flag(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name, "0").lower()
    if value not in ("0", "1", "true", "false"):
        raise SettingsError(f"{name} must be 1 or 0, got {value!r}")
    return value in ("1", "true")


def _voice_from_reference_name(name: Any) -> str | None:
    # The reference UI names voice files: "NATF2.pt".
    if not name:
        return None
    return str(name).removesuffix(".pt")


def _checked_voice(voice: str) -> str:
    # Only presets: a path from a remote client must never reach the file system.
    if voice.upper() not in VOICE_NAMES:
        raise UnknownVoiceError(f"unknown voice {_shown(voice)}: use one of {', '.join(VOICE_NAMES)}")
    return voice.upper()


def _preset_text(name: str) -> str:
    if name not in PROMPT_PRESETS:
        raise SettingsError(
            f"unknown prompt preset {_shown(name)}: use one of {', '.join(PROMPT_PRESETS)} "
            "or give the text as text_prompt"
        )
    return PROMPT_PRESETS[name]


def _checked_prompt(value: Any) -> str:
    return check_system_prompt(value)


def _checked_steps(value: Any) -> int:
    steps = _integer("max_steps", value)
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise SettingsError(f"max_steps must be between {MIN_STEPS} and {MAX_STEPS}, got {steps}")
    return steps


def _checked_seed(value: Any) -> int | None:
    seed = _integer("seed", value)
    if seed == -1:
        return None
    if not 0 <= seed <= MAX_SEED:
        raise SettingsError(f"seed must be between 0 and {MAX_SEED} (or -1 for a random one), got {seed}")
    return seed


def _integer(name: str, value: Any) -> int:
    """An integer setting from a query string or JSON: an int, a whole finite number or its digits."""
    if isinstance(value, bool):
        raise SettingsError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and len(value) > MAX_INTEGER_DIGITS:
        raise SettingsError(f"{name} must be an integer of at most {MAX_INTEGER_DIGITS} digits, got {_shown(value)}")
    if isinstance(value, str) and value.isascii():
        try:
            return int(value)
        except ValueError:
            pass
    raise SettingsError(f"{name} must be an integer, got {_shown(value)}")


def _shown(value: Any, limit: int = 40) -> str:
    """A client's value for an error message, cut short: messages must not echo megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


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
