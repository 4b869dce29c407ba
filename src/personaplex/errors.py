"""Errors a user of the library can act on. Each message names the problem and the fix."""


class PersonaPlexError(Exception):
    """Base class for every error this package raises on purpose."""


class InvalidAudioError(PersonaPlexError, ValueError):
    """Audio that cannot be used: empty, NaN/Inf, not mono, wrong type, too long."""


class UnknownVoiceError(PersonaPlexError, KeyError):
    """A voice name that is neither a preset nor a readable file."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PromptTooLongError(PersonaPlexError, ValueError):
    """A persona (voice + system prompt) that does not fit the model's context."""


class ModelUnavailableError(PersonaPlexError, RuntimeError):
    """The model files cannot be had: offline, gated repo, licence not accepted, bad folder."""


class GatedModelError(ModelUnavailableError):
    """The model repo is gated and this machine has no access yet (licence or token missing)."""
