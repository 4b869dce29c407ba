"""Voice presets: the precomputed state that makes the model speak in a given voice.

A preset holds `embeddings` [N, 1, 1, dim], the summed input embeddings of the N frames
of the voice prompt, which the engine replays through the temporal transformer, and
`cache` [1, num_codebooks, ring], the token ring buffer right after those frames.
The reference ships them as `voices/NAME.pt` (torch.save of a dict); the MLX port as
`voices/NAME.safetensors` with the same two tensors, possibly other dtypes and shapes.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from personaplex.errors import UnknownVoiceError

VOICE_NAMES: tuple[str, ...] = (
    *(f"NATF{i}" for i in range(4)),
    *(f"NATM{i}" for i in range(4)),
    *(f"VARF{i}" for i in range(5)),
    *(f"VARM{i}" for i in range(5)),
)
DEFAULT_VOICE = "NATM0"
VOICE_FILE_SUFFIXES = (".pt", ".safetensors")
AUDIO_FILE_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")


@dataclass
class VoicePrompt:
    embeddings: torch.Tensor  # [N, 1, 1, dim], as stored (bf16 in the reference files)
    cache: torch.Tensor  # [1, num_codebooks, ring] int64
    name: str


def is_wav_voice(name_or_path: str | Path) -> bool:
    """True when the argument names an audio file, to be encoded into a voice by the engine."""
    return Path(name_or_path).suffix.lower() in AUDIO_FILE_SUFFIXES


def load_voice(
    name_or_path: str | Path,
    voices_dir: str | Path | None,
    dim: int,
    num_codebooks: int = 17,
) -> VoicePrompt:
    """Load a voice by preset name (looked up in `voices_dir`) or from a .pt/.safetensors file.

    Any file `voices_dir/NAME.pt` or `NAME.safetensors` counts as a voice, so voices saved
    with `write_voice_pt` next to the presets load by name too.
    """
    path = _find_voice_file(name_or_path, voices_dir)
    embeddings, cache = _read_voice_tensors(path)
    return VoicePrompt(
        embeddings=_normalise_embeddings(embeddings, dim, path),
        cache=_normalise_cache(cache, num_codebooks, path),
        name=path.stem,
    )


def write_voice_pt(path: str | Path, embeddings: torch.Tensor, cache: torch.Tensor) -> None:
    """Save a voice in the reference format: torch.save({"embeddings", "cache"})."""
    if embeddings.ndim != 4 or embeddings.shape[1:3] != (1, 1):
        raise ValueError(f"voice embeddings must be [N, 1, 1, dim], got {tuple(embeddings.shape)}")
    if cache.ndim != 3 or cache.shape[0] != 1:
        raise ValueError(f"voice cache must be [1, codebooks, ring], got {tuple(cache.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "embeddings": embeddings.detach().cpu().contiguous(),
        "cache": cache.detach().cpu().to(torch.int64).contiguous(),
    }
    torch.save(tensors, path)


def _find_voice_file(name_or_path: str | Path, voices_dir: str | Path | None) -> Path:
    candidate = Path(name_or_path)
    is_voice_file = candidate.suffix.lower() in VOICE_FILE_SUFFIXES
    if is_voice_file and candidate.is_file():
        return candidate
    if is_voice_file and len(candidate.parts) > 1:
        raise UnknownVoiceError(f"voice file {candidate} does not exist: check the path")
    if is_wav_voice(candidate):
        raise UnknownVoiceError(
            f"{name_or_path} is an audio file: pass it as a WAV voice prompt "
            "(voice_wav= / --voice-wav), which the engine encodes into a voice"
        )
    # "NATF2" and the reference's "NATF2.pt" both name the preset NATF2.
    name = candidate.stem if is_voice_file else str(name_or_path)
    if voices_dir is not None:
        for stem in (name, name.upper()):
            for suffix in VOICE_FILE_SUFFIXES:
                path = Path(voices_dir) / f"{stem}{suffix}"
                if path.is_file():
                    return path
    raise UnknownVoiceError(_not_found_message(str(name_or_path), name, voices_dir))


def _not_found_message(argument: str, name: str, voices_dir: str | Path | None) -> str:
    if name.upper() not in VOICE_NAMES:
        return (
            f"unknown voice {argument!r}: use one of {', '.join(VOICE_NAMES)}, "
            "or the path of a .pt/.safetensors voice file"
        )
    if voices_dir is None:
        return (
            f"voice {name} needs the model folder's voices/, which was not found: put the model "
            "repo's voices.tgz in the model folder (it is unpacked into voices/ on load)"
        )
    return (
        f"voice {name} is a preset but {voices_dir} has no {name}.pt or {name}.safetensors: "
        "delete that folder and load again, so the model repo's voices.tgz is unpacked anew"
    )


def _read_voice_tensors(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            tensors = safetensors.torch.load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (
        OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError
    ) as err:
        raise UnknownVoiceError(
            f"voice file {path} cannot be read ({err}): replace it with a valid voice file"
        ) from err
    if not isinstance(tensors, dict) or not {"embeddings", "cache"} <= tensors.keys():
        found = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
        raise UnknownVoiceError(
            f"voice file {path} must hold tensors 'embeddings' and 'cache', found {found}"
        )
    return tensors["embeddings"], tensors["cache"]


def _normalise_embeddings(embeddings: torch.Tensor, dim: int, path: Path) -> torch.Tensor:
    """Reshape to [N, 1, 1, dim]; the MLX port stores [N, dim] (any extra axes must be 1)."""
    shape = tuple(embeddings.shape)
    leading = shape[:-1]
    frame_axes = [size for size in leading if size != 1]
    if embeddings.ndim < 2 or shape[-1] != dim or len(frame_axes) > 1:
        raise UnknownVoiceError(
            f"voice file {path} has embeddings of shape {shape}; this model needs "
            f"[frames, 1, 1, {dim}]: the voice was made for a different model"
        )
    return embeddings.reshape(-1, 1, 1, dim)


def _normalise_cache(cache: torch.Tensor, num_codebooks: int, path: Path) -> torch.Tensor:
    """Reshape to [1, num_codebooks, ring] int64 (the MLX port may drop the batch axis)."""
    if cache.ndim == 2:
        cache = cache.unsqueeze(0)
    if cache.ndim != 3 or cache.shape[0] != 1 or cache.shape[1] != num_codebooks:
        raise UnknownVoiceError(
            f"voice file {path} has a token cache of shape {tuple(cache.shape)}; this model "
            f"needs [1, {num_codebooks}, ring]: the voice was made for a different model"
        )
    # The MLX converter writes every non-bf16 tensor as float32, token ids included.
    if cache.is_floating_point() and not torch.equal(cache, cache.round()):
        raise UnknownVoiceError(f"voice file {path} has a token cache with non-integer values ({cache.dtype})")
    return cache.to(torch.int64)
