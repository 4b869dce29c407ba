"""Load the MLX conversions of PersonaPlex (`aufklarer/PersonaPlex-7B-MLX-4bit`, `-8bit`) directly.

Those folders come from soniqo/speech-swift's `scripts/convert_personaplex.py`. The LM is
split over three files, with the official names minus a prefix:
- `temporal.safetensors`: `layers.{i}.…` (official `transformer.layers.{i}.…`) and `out_norm.alpha`;
- `depformer.safetensors`: `layers.{j}.…` (official `depformer.layers.{j}.…`) and `depformer_in.{k}.weight`;
- `embeddings.safetensors`: `text_emb`, `emb.*`, `text_linear`, `linears.*`, `depformer_emb.*`,
  `depformer_text_emb` under their official names.
A quantized matrix `X.weight` (or the stacked `X_weight`) is stored as uint32 words holding
32/bits codes each, lowest bits first, next to `X.scales` and `X.biases` (or `X_scales`,
`X_biases`): fp16 [out, in / group_size], w = q * scale + bias (MLX's affine format). Float
tensors were written through numpy, so bf16 ones come as fp16. `config.json` has a
`quantization` section with `bits` and `group_size`.

On a little-endian machine the bytes of MLX's words are our `Int4Linear`/`Int8Linear`
codes in the same order, so the packed weights are used as they are, without repacking.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .checkpoint import CheckpointError, read_safetensors_shapes
from .config import LMConfig
from .lm import LMModel
from .quantize import AffineQuantizedLinear, Int4Linear, Int8Linear

MLX_LM_FILES = ("temporal.safetensors", "depformer.safetensors", "embeddings.safetensors")

# Names in the files of tensors the depformer file stacks over its steps.
_STACKED = re.compile(r"^depformer\.layers\.(\d+)\.self_attn\.(in_proj|out_proj)$")
# The stacked in-projection is a flat parameter in the official layout: `X_weight`, not `X.weight`.
_FLAT_SUFFIX = re.compile(r"^(.*\.in_proj|.*\.out_proj)_(weight|scales|biases)$")


def _official_name(file_name: str, key: str) -> str:
    """The official (model.safetensors) stem of a key, with `.weight/.scales/.biases` separated."""
    flat = _FLAT_SUFFIX.match(key)
    if flat:
        key = f"{flat.group(1)}.{flat.group(2)}"
    if file_name == "temporal.safetensors" and key.startswith("layers."):
        return "transformer." + key
    if file_name == "depformer.safetensors" and key.startswith("layers."):
        return "depformer." + key
    return key


def read_mlx_quantization(folder: Path) -> tuple[int, int] | None:
    """(bits, group_size) from config.json's `quantization` section; None if it has none."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        section = json.loads(path.read_text()).get("quantization")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a JSON object ({exc})") from exc
    if not section:
        return None
    return int(section.get("bits", 4)), int(section.get("group_size", 64))


def _read_folder(folder: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Every LM tensor of the folder under its official name (quantized ones as .weight/.scales/.biases)."""
    tensors: dict[str, torch.Tensor] = {}
    for file_name in MLX_LM_FILES:
        path = folder / file_name
        read_safetensors_shapes(path)  # missing, not safetensors or truncated: a clear error
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    tensors[_official_name(file_name, key)] = f.get_tensor(key)
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: unreadable safetensors data ({exc})") from exc
    return tensors


def _module_targets(stem: str, steps: int) -> list[str]:
    """Our module names that one official matrix fills: several for the stacked depformer attention."""
    stacked = _STACKED.match(stem)
    if stacked:
        layer, kind = stacked.groups()
        return [f"depformer.layers.{layer}.self_attn.{kind}s.{k}" for k in range(steps)]
    return [stem]


def _quantized_layer(words: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, in_features: int) -> AffineQuantizedLinear:
    """An Int4Linear/Int8Linear holding MLX's packed words as they are (viewed as bytes)."""
    out_features = words.shape[0]
    codes = words.view(torch.uint8)  # little-endian: the words' bytes in input order
    bits = codes.shape[1] * 8 // in_features
    if bits not in (4, 8) or codes.shape[1] * 8 != bits * in_features:
        raise ValueError(f"packed width {words.shape[1]} words does not fit {in_features} inputs at 4 or 8 bits")
    if scales.shape != biases.shape or scales.shape[0] != out_features or in_features % scales.shape[1]:
        raise ValueError(f"scales {list(scales.shape)} / biases {list(biases.shape)} do not fit [{out_features}, {in_features}]")
    group_size = in_features // scales.shape[1]
    cls = Int4Linear if bits == 4 else Int8Linear
    layer = cls(in_features, out_features, group_size, device="meta")
    layer.qweight, layer.scales, layer.biases = codes, scales.to(torch.float16), biases.to(torch.float16)
    return layer


def load_mlx_lm(
    folder: str | Path,
    config: LMConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> LMModel:
    """The LM of an MLX conversion folder, quantized layers kept quantized.

    `config` gives the model's shape (PersonaPlex 7B by default); float tensors are cast to
    `dtype` (norm scales to float32). Raises CheckpointError when a file is missing or
    malformed, a tensor is missing, unexpected or of the wrong shape, or the packed width
    disagrees with config.json's `bits`.
    """
    if sys.byteorder != "little":
        raise CheckpointError("MLX's packed words can only be viewed as bytes on a little-endian machine")
    folder = Path(folder)
    config = config or LMConfig()
    declared = read_mlx_quantization(folder)
    tensors = _read_folder(folder, device)
    with torch.device("meta"):
        model = LMModel(config, dtype=dtype)
    linear_names = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}

    state: dict[str, torch.Tensor] = {}
    stems = sorted({name.rsplit(".", 1)[0] for name in tensors if name.endswith(".scales")})
    for stem in stems:
        try:
            words, scales, biases = (tensors.pop(f"{stem}.{part}") for part in ("weight", "scales", "biases"))
        except KeyError as exc:
            raise CheckpointError(f"{folder}: quantized matrix {stem} lacks its {exc.args[0]}") from exc
        targets = _module_targets(stem, config.dep_q)
        if any(t not in linear_names for t in targets):
            raise CheckpointError(f"{folder}: quantized matrix {stem} has no linear layer in this model")
        parts = zip(words.chunk(len(targets)), scales.chunk(len(targets)), biases.chunk(len(targets)))
        for target, (w, s, b) in zip(targets, parts):
            expected = model.get_submodule(target)
            try:
                layer = _quantized_layer(w, s, b, expected.in_features)
            except ValueError as exc:
                raise CheckpointError(f"{folder}: {stem}: {exc}") from exc
            if layer.out_features != expected.out_features:
                raise CheckpointError(
                    f"{folder}: {stem}: {layer.out_features} outputs per step, the model expects {expected.out_features}")
            if declared and (layer.bits, layer.group_size) != declared:
                raise CheckpointError(
                    f"{folder}: {stem} is {layer.bits}-bit in groups of {layer.group_size}, "
                    f"config.json says {declared[0]}-bit in groups of {declared[1]}")
            parent_name, _, attr = target.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, layer)

    # Everything left is a float tensor under an official name (the stacked attention split per step).
    for name, tensor in tensors.items():
        stem, _, leaf = name.rpartition(".")
        targets = _module_targets(stem, config.dep_q)
        cast = torch.float32 if leaf == "alpha" else dtype
        for target, part in zip(targets, tensor.chunk(len(targets))):
            state[f"{target}.{leaf}"] = part.to(cast)
    expected_state = model.state_dict()
    quantized = {name for name in expected_state if name.rsplit(".", 1)[-1] in ("qweight", "scales", "biases")}
    missing = sorted(set(expected_state) - set(state) - quantized)
    unexpected = sorted(set(state) - set(expected_state))
    wrong = sorted(f"{n}: {list(state[n].shape)} vs {list(expected_state[n].shape)}"
                   for n in set(state) & set(expected_state) if state[n].shape != expected_state[n].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{folder}: does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}, wrong shapes {wrong[:8]}")
    model.load_state_dict(state, strict=False, assign=True)
    return model.eval().requires_grad_(False)
