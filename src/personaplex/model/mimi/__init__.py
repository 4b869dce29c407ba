"""Mimi, the neural audio codec of Moshi/PersonaPlex: our PyTorch implementation."""

from personaplex.model.mimi.codec import Mimi, load_mimi
from personaplex.model.mimi.state import MimiStreamState

__all__ = ["Mimi", "MimiStreamState", "load_mimi"]
