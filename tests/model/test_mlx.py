"""Loading MLX conversion folders: a tiny one written here from MLX's documented format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from personaplex.model.checkpoint import CheckpointError
from personaplex.model.lm import LMModel
from personaplex.model.mlx import load_mlx_lm
from personaplex.model.quantize import AffineQuantizedLinear
from tests.fixtures.tiny_lm import official_state_dict
from tests.model.test_quantize import logit_stats, quant_config, random_codes, random_model

GROUP_SIZE = 64


def mlx_quantize(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MLX's affine quantization as its docs define it: per group of GROUP_SIZE inputs,
    w ~ scale * q + bias, q in [0, 2^bits); codes packed into uint32 words, 32/bits per word,
    the first code in the lowest bits. Returns (words, scales, biases, dequantized weight)."""
    rows, cols = weight.shape
    top = 2**bits - 1
    groups = weight.astype(np.float32).reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    low, high = groups.min(-1), groups.max(-1)
    scales = ((high - low) / top).astype(np.float16)
    biases = low.astype(np.float16)
    safe = np.where(scales == 0, 1, scales).astype(np.float32)
    codes = np.clip(np.rint((groups - biases[..., None]) / safe[..., None]), 0, top).astype(np.uint32)
    per_word = 32 // bits
    codes = codes.reshape(rows, cols // per_word, per_word)
    words = np.zeros((rows, cols // per_word), dtype=np.uint32)
    for i in range(per_word):
        words |= codes[..., i] << np.uint32(bits * i)
    dequantized = codes.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE) * scales[..., None].astype(np.float32)
    dequantized = (dequantized + biases[..., None].astype(np.float32)).reshape(rows, cols)
    return words, scales, biases, dequantized


def is_quantized_in_mlx(name: str) -> bool:
    """What soniqo/speech-swift's converter quantizes: temporal and depformer matrices, depformer_in."""
    matrix = name.endswith(("in_proj_weight", ".weight")) and any(
        part in name for part in ("in_proj", "out_proj", "linear_in", "linear_out"))
    return (name.startswith(("transformer.", "depformer.")) and matrix) or name.startswith("depformer_in.")


def write_mlx_folder(folder: Path, model: LMModel, bits: int) -> dict[str, np.ndarray]:
    """The folder layout of aufklarer/PersonaPlex-7B-MLX-*; returns official name -> dequantized weight."""
    folder.mkdir()
    files: dict[str, dict[str, np.ndarray]] = {"temporal": {}, "depformer": {}, "embeddings": {}}
    dequantized = {}
    for name, tensor in official_state_dict(model).items():
        if name.startswith(("transformer.", "out_norm.")):
            file, key = "temporal", name.removeprefix("transformer.")
        elif name.startswith(("depformer.", "depformer_in.")):
            file, key = "depformer", name.removeprefix("depformer.")
        else:
            file, key = "embeddings", name
        array = tensor.float().numpy()
        if is_quantized_in_mlx(name):
            words, scales, biases, dequantized[name] = mlx_quantize(array, bits)
            stem = key[: -len("_weight")] + "_" if key.endswith("_weight") else key[: -len("weight")]
            files[file][key] = words
            files[file][stem + "scales"] = scales
            files[file][stem + "biases"] = biases
        else:
            files[file][key] = array.astype(np.float16)  # the converter writes bf16 through numpy as fp16
    for file, tensors in files.items():
        save_file(tensors, str(folder / f"{file}.safetensors"))
    config = {"model_type": "personaplex", "quantization": {"bits": bits, "group_size": GROUP_SIZE,
                                                           "quantized_components": ["temporal", "depformer"]}}
    (folder / "config.json").write_text(json.dumps(config))
    return dequantized


@pytest.mark.parametrize("bits", [4, 8])
def test_mlx_folder_loads_quantized(tmp_path: Path, bits: int) -> None:
    model = random_model()
    dequantized = write_mlx_folder(tmp_path / "mlx", model, bits)
    loaded = load_mlx_lm(tmp_path / "mlx", quant_config(), dtype=torch.float32)

    in_proj = loaded.transformer.layers[1].self_attn.in_proj
    assert isinstance(in_proj, AffineQuantizedLinear) and in_proj.bits == bits and in_proj.group_size == GROUP_SIZE
    assert torch.equal(in_proj.dequantized_weight(), torch.from_numpy(dequantized["transformer.layers.1.self_attn.in_proj_weight"]))
    stacked = torch.from_numpy(dequantized["depformer.layers.0.self_attn.in_proj_weight"]).chunk(16)
    for step in (0, 7, 15):
        assert torch.equal(loaded.depformer.layers[0].self_attn.in_projs[step].dequantized_weight(), stacked[step])
    gating = loaded.depformer.layers[1].gating[3].linear_out
    assert torch.equal(gating.dequantized_weight(), torch.from_numpy(dequantized["depformer.layers.1.gating.3.linear_out.weight"]))
    assert isinstance(loaded.depformer_in[5], AffineQuantizedLinear)
    assert type(loaded.text_linear) is torch.nn.Linear and type(loaded.linears[0]) is torch.nn.Linear

    # Within the quantization error of the float model (bounds of test_quantize's int4/int8 rows;
    # the fp16 float tensors of the MLX files add little).
    codes = random_codes(quant_config())
    stats = logit_stats(loaded, model(codes), codes)
    text_bound, audio_bound = (1.5e-2, 8e-2) if bits == 4 else (2e-3, 6e-3)
    assert stats["text_err"] < text_bound and stats["audio_err"] < audio_bound, stats


def test_mlx_folder_errors(tmp_path: Path) -> None:
    folder = tmp_path / "mlx"
    write_mlx_folder(folder, random_model(), 4)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization"]["bits"] = 8
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json says 8-bit"):
        load_mlx_lm(folder, quant_config())
    config_path.unlink()
    load_mlx_lm(folder, quant_config())  # without config.json the packing speaks for itself
    (folder / "embeddings.safetensors").unlink()
    with pytest.raises(CheckpointError, match="embeddings.safetensors: checkpoint file not found"):
        load_mlx_lm(folder, quant_config())


def test_mlx_folder_of_another_shape_is_refused(tmp_path: Path) -> None:
    write_mlx_folder(tmp_path / "mlx", random_model(), 4)
    other = type(quant_config())(**{**quant_config().__dict__, "num_layers": 1})
    with pytest.raises(CheckpointError, match="no linear layer in this model"):
        load_mlx_lm(tmp_path / "mlx", other)
