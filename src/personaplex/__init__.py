"""personaplex: inference engine, library and voice assistant for NVIDIA PersonaPlex."""

from .api import AudioChunk, FrameOutput, LoadProgress, PersonaPlex, Response
from .errors import InvalidAudioError, ModelUnavailableError, PersonaPlexError, PromptTooLongError, UnknownVoiceError

__version__ = "0.1.0"
__all__ = [
    "AudioChunk", "FrameOutput", "LoadProgress", "PersonaPlex", "Response",
    "InvalidAudioError", "ModelUnavailableError", "PersonaPlexError", "PromptTooLongError", "UnknownVoiceError",
]
