"""personaplex: inference engine, library and voice assistant for NVIDIA PersonaPlex.

The names below load on first use, so that light parts (the audio codecs the server's worker
processes run, the CLI's argument checks) start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LoadProgress": "api", "PersonaPlex": "api", "Response": "api",
    "AudioChunk": "runtime.frames",
    "InvalidAudioError": "errors", "ModelUnavailableError": "errors", "PersonaPlexError": "errors",
    "PromptTooLongError": "errors", "UnknownVoiceError": "errors",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the names for type checkers and editors; at run time __getattr__ loads them
    from .api import LoadProgress, PersonaPlex, Response  # noqa: F401
    from .errors import (  # noqa: F401
        InvalidAudioError, ModelUnavailableError, PersonaPlexError, PromptTooLongError, UnknownVoiceError,
    )
    from .runtime.frames import AudioChunk  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'personaplex' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
