"""Checks of command-line values shared by the subcommands, all cheap, so each runs before a
model loads or a server starts: a bad value costs the user a second, not a 7B load."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from personaplex.errors import PersonaPlexError, UnknownVoiceError
from personaplex.hub import find_voices_dir, local_folder
from personaplex.runtime.validation import MAX_STEPS, MIN_STEPS, check_max_steps, check_text
from personaplex.runtime.voices import VOICE_FILE_SUFFIXES, VOICE_NAMES

MAX_STEPS_HELP = f"{MIN_STEPS}-{MAX_STEPS}"


def reply_frames(text: str) -> int:
    """argparse type of --max-steps: a whole number of 80 ms frames in the one allowed range."""
    try:
        return check_max_steps(int(text))
    except (ValueError, PersonaPlexError):
        raise argparse.ArgumentTypeError(
            f"must be a whole number of 80 ms frames from {MIN_STEPS} to {MAX_STEPS}, got {text!r}"
        ) from None


def tcp_port(text: str) -> int:
    """argparse type of --port: 1-65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65_535:
        raise argparse.ArgumentTypeError(f"must be a TCP port from 1 to 65535, got {text!r}")
    return int(text)


def positive_count(text: str) -> int:
    """argparse type of counts such as --max-sessions: 1 or more."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def command_line_text(flag: str, text: str | None) -> str | None:
    """Text given on the command line, refused if its bytes were not UTF-8 (Python turns
    such bytes into lone surrogates, which the tokenizer cannot read)."""
    return None if text is None else check_text(flag, text)


def writable_output(flag: str, path: Path) -> Path:
    """Refuse an output path that cannot be written, before any work is done: a folder, a
    missing folder (never created silently), or a place we may not write to (/proc, a
    read-only disk)."""
    if path.is_dir():
        raise PersonaPlexError(f"{flag} {path} is a folder: give a file name, e.g. {path / 'reply.wav'}")
    folder = path.parent
    if not folder.is_dir():
        raise PersonaPlexError(f"{flag} {path}: the folder {folder} does not exist: create it first")
    if (path.exists() and not os.access(path, os.W_OK)) or not os.access(folder, os.W_OK):
        raise PersonaPlexError(f"{flag} {path} cannot be written (no permission): choose another place")
    if _is_pseudo_file_system(folder):
        raise PersonaPlexError(f"{flag} {path} is on a system file system, not a disk: choose another place")
    return path


def _is_pseudo_file_system(folder: Path) -> bool:
    """True inside /proc or /sys, where files may look writable but take no audio."""
    resolved = folder.resolve()
    return any(resolved == Path(root) or Path(root) in resolved.parents for root in ("/proc", "/sys"))


def check_device(device: str | None) -> None:
    """Refuse a torch device this machine does not have (checked without loading a model)."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise PersonaPlexError(f"--device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    index = torch.device(device).index
    if kind == "cuda" and not torch.cuda.is_available():
        raise PersonaPlexError(f"--device {device}: this machine has no CUDA GPU (or torch was built without CUDA): use --device cpu")
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise PersonaPlexError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise PersonaPlexError(f"--device {device}: MPS is not available here: use --device cpu")


def check_voice_choice(voice: str, model: str | None) -> None:
    """Refuse a --voice that names no preset and no voice file, before the model loads.

    Presets are known by name; a local model folder may hold more voices (any NAME.pt in
    its voices/), so those count too. A repo's extra voices are only known after download."""
    path = Path(voice)
    if path.suffix.lower() in VOICE_FILE_SUFFIXES and (path.is_file() or len(path.parts) > 1):
        if not path.is_file():
            raise UnknownVoiceError(f"voice file {path} does not exist: check the path")
        return
    name = path.stem if path.suffix.lower() in VOICE_FILE_SUFFIXES else voice
    if name.upper() in VOICE_NAMES:
        return
    folder = local_folder(model)
    voices_dir = find_voices_dir(folder) if folder is not None and folder.is_dir() else None
    if voices_dir is not None and any((voices_dir / f"{name}{suffix}").is_file() for suffix in VOICE_FILE_SUFFIXES):
        return
    raise UnknownVoiceError(
        f"unknown voice {voice!r}: use one of {', '.join(VOICE_NAMES)} (`personaplex voices`), "
        "the path of a .pt/.safetensors voice file, or --voice-wav RECORDING"
    )


def check_local_model_config(model: str | None) -> None:
    """Read a local model folder's config.json now, so a damaged one is named before loading."""
    from personaplex.model.config import ModelConfig

    folder = local_folder(model)
    if folder is not None and folder.is_dir():
        ModelConfig.from_folder(folder)
