"""personaplex: inference engine, library and voice assistant for NVIDIA PersonaPlex."""

__version__ = "0.1.0"
