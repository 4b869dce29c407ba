"""Mimi, the neural audio codec of Moshi/PersonaPlex: our PyTorch implementation."""

from personaplex.model.mimi.codec import MIMI_FILENAME, Mimi, load_mimi
from personaplex.model.mimi.state import MimiStreamState

__all__ = ["MIMI_FILENAME", "Mimi", "MimiStreamState", "load_mimi"]
