"""Reading safetensors checkpoints with errors that name the file and the tensor.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each
tensor name to its dtype, shape and byte range, then the raw tensor data. We check the
header ourselves before handing the file to `safetensors`, so that a truncated download or
a file of another format fails with a message saying so instead of a parser error.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from personaplex.errors import PersonaPlexError

Shape = tuple[int, ...]

# Larger headers than this are not produced by any real writer; a bigger length almost
# always means the first 8 bytes were not a safetensors header at all.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_MAX_LISTED = 8  # keys named in one error message before summarising the rest


class CheckpointError(PersonaPlexError, ValueError):
    """A checkpoint file that is missing, malformed, or does not fit the model."""


def read_safetensors_shapes(path: str | Path) -> dict[str, Shape]:
    """Tensor name -> shape, from the header only (no tensor data is read).

    Raises CheckpointError if the file is absent, not a safetensors file, or shorter than its
    header says (a truncated download).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    file_size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({file_size} bytes, too short for a header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, file_size - 8):
            raise CheckpointError(
                f"{path}: not a safetensors file (header length {header_len} does not fit in {file_size} bytes)"
            )
        raw_header = f.read(header_len)
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")

    shapes: dict[str, Shape] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from exc
        shapes[name] = shape
        data_end = max(data_end, end, begin)
    available = file_size - 8 - header_len
    if data_end > available:
        raise CheckpointError(
            f"{path}: file is truncated: its header describes {data_end} bytes of tensor data "
            f"but only {available} are present"
        )
    return shapes


def check_tensor_shapes(
    path: str | Path,
    found: Mapping[str, Shape],
    required: Mapping[str, Shape],
    optional: Mapping[str, Shape] | None = None,
) -> None:
    """Raise CheckpointError unless `found` holds every required tensor and nothing unknown,
    all with the expected shapes. `optional` tensors may be absent; if present their shape is
    checked too."""
    optional = optional or {}
    missing = sorted(set(required) - set(found))
    unexpected = sorted(set(found) - set(required) - set(optional))
    expected = {**optional, **required}
    mismatched = [
        f"{name}: expected {list(expected[name])}, found {list(shape)}"
        for name, shape in sorted(found.items())
        if name in expected and tuple(shape) != tuple(expected[name])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    if mismatched:
        problems.append(f"wrong shapes: {_listing(mismatched)}")
    if problems:
        raise CheckpointError(f"{path}: does not match the model: " + "; ".join(problems))


def load_safetensors(
    path: str | Path,
    names: Iterable[str],
    device: torch.device | str,
    dtype_of: Callable[[str], torch.dtype],
) -> dict[str, torch.Tensor]:
    """Read the named tensors straight onto `device`, each cast to `dtype_of(name)`.

    Call `read_safetensors_shapes` (and usually `check_tensor_shapes`) first: this function
    assumes the header has been validated.
    """
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in names:
                out[name] = f.get_tensor(name).to(dtype_of(name))
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: unreadable safetensors data ({exc})") from exc
    return out


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"[{shown}" + (f", ... and {more} more]" if more > 0 else "]")
