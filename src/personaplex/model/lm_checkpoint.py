"""The LM's official checkpoint layout (`model.safetensors`) and how it maps onto `LMModel`.

The file stacks each depformer layer's per-step attention weights into one tensor
(`self_attn.in_proj_weight` = steps x [3*dim, dim], `self_attn.out_proj.weight` =
steps x [dim, dim]) and names the temporal in-projection `in_proj_weight`; our modules hold
one `nn.Linear` per matrix. Everything else has the same name in both. A file with an
8-step depformer (original Moshi) is widened to 16 steps by reusing steps 0-7 for 8-15,
as the PersonaPlex loader does (and a zero input embedding for step 8, which it lacks).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Iterator

import torch

from .checkpoint import CheckpointError, Shape, check_tensor_shapes, load_safetensors, read_safetensors_shapes
from .config import LMConfig
from .lm import LMModel


_DEP_ATTN = re.compile(r"^depformer\.layers\.(\d+)\.self_attn\.(in_proj_weight|out_proj\.weight)$")
_PER_STEP = re.compile(r"^(depformer\.layers\.\d+\.gating|linears|depformer_in|depformer_emb)\.(\d+)\.(.*)$")


def official_lm_shapes(config: LMConfig, depformer_steps: int | None = None) -> dict[str, Shape]:
    """Every tensor of an official LM file for `config`, with its shape."""
    c = config
    steps = c.dep_q if depformer_steps is None else depformer_steps
    d, dd = c.dim, c.depformer_dim
    shapes: dict[str, Shape] = {
        "text_emb.weight": (c.text_card + 1, d),
        "out_norm.alpha": (1, 1, d),
        "text_linear.weight": (c.text_card, d),
        "depformer_text_emb.weight": (c.text_card + 1, dd),
    }
    for n in range(c.n_q):
        shapes[f"emb.{n}.weight"] = (c.card + 1, d)
    for i in range(c.num_layers):
        p = f"transformer.layers.{i}."
        shapes[p + "self_attn.in_proj_weight"] = (3 * d, d)
        shapes[p + "self_attn.out_proj.weight"] = (d, d)
        shapes[p + "gating.linear_in.weight"] = (2 * c.hidden_dim, d)
        shapes[p + "gating.linear_out.weight"] = (d, c.hidden_dim)
        shapes[p + "norm1.alpha"] = shapes[p + "norm2.alpha"] = (1, 1, d)
    for k in range(steps):
        shapes[f"depformer_in.{k}.weight"] = (dd, d)
        shapes[f"linears.{k}.weight"] = (c.card, dd)
        if k < steps - 1:
            shapes[f"depformer_emb.{k}.weight"] = (c.card + 1, dd)
    for j in range(c.depformer_num_layers):
        p = f"depformer.layers.{j}."
        shapes[p + "self_attn.in_proj_weight"] = (steps * 3 * dd, dd)
        shapes[p + "self_attn.out_proj.weight"] = (steps * dd, dd)
        shapes[p + "norm1.alpha"] = shapes[p + "norm2.alpha"] = (1, 1, dd)
        for k in range(steps):
            shapes[p + f"gating.{k}.linear_in.weight"] = (2 * c.depformer_hidden_dim, dd)
            shapes[p + f"gating.{k}.linear_out.weight"] = (dd, c.depformer_hidden_dim)
    return shapes


def _file_depformer_steps(found: dict[str, Shape], config: LMConfig) -> int:
    """How many depformer steps the file holds (16 for PersonaPlex, 8 for original Moshi)."""
    stacked = found.get("depformer.layers.0.self_attn.in_proj_weight")
    if stacked is None or stacked[0] % (3 * config.depformer_dim):
        return config.dep_q
    steps = stacked[0] // (3 * config.depformer_dim)
    return steps if steps in (config.dep_q, 8) and steps <= config.dep_q else config.dep_q


def official_to_module(name: str, tensor: torch.Tensor, file_steps: int, dep_q: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Module parameter names (and tensors) that one official tensor provides."""
    attn = _DEP_ATTN.match(name)
    if attn:
        layer, kind = attn.groups()
        target = "in_projs" if kind == "in_proj_weight" else "out_projs"
        per_step = tensor.chunk(file_steps, dim=0)
        for k in range(dep_q):
            # Cut to fewer steps, a view would keep the whole stacked tensor alive: copy instead.
            step_weight = per_step[k % file_steps]
            yield f"depformer.layers.{layer}.self_attn.{target}.{k}.weight", step_weight.clone() if file_steps > dep_q else step_weight
        return
    if name.endswith(".self_attn.in_proj_weight"):
        yield name.replace("in_proj_weight", "in_proj.weight"), tensor
        return
    per_step_match = _PER_STEP.match(name)
    if per_step_match:
        prefix, k, rest = per_step_match.groups()
        count = dep_q - 1 if prefix == "depformer_emb" else dep_q
        # Same steps: k itself. A narrow file: k, k + 8, ... A model cut to fewer steps: k if kept.
        for target in range(int(k), count, file_steps):
            yield f"{prefix}.{target}.{rest}", tensor
        return
    yield name, tensor


def load_lm(
    path: str | Path,
    config: LMConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    depformer_steps: int | None = None,
) -> LMModel:
    """Load an official `model.safetensors` into an `LMModel` on `device` in `dtype`.

    The model is built on the meta device and each tensor is read, converted and assigned
    one at a time, so peak memory stays near one copy of the weights. `depformer_steps=8`
    keeps only the agent's depformer steps, all that inference runs (the 8 user-audio steps
    are always overridden by the real user tokens): 1.4 GB less in bf16 for the 7B model.
    """
    config = config or LMConfig()
    found = read_safetensors_shapes(path)
    file_steps = _file_depformer_steps(found, config)
    check_tensor_shapes(path, found, official_lm_shapes(config, file_steps))
    if depformer_steps is not None:
        config = dataclasses.replace(config, dep_q=depformer_steps)
    with torch.device("meta"):
        model = LMModel(config, dtype=dtype)
    # Norm scales stay float32: the norms compute in float32 anyway.
    official = load_safetensors(path, found, device, lambda name: torch.float32 if name.endswith("alpha") else dtype)
    state: dict[str, torch.Tensor] = {}
    for name in list(official):
        state.update(official_to_module(name, official.pop(name), file_steps, config.dep_q))
    if file_steps < config.dep_q:
        # Step `file_steps` (the first user codebook) reads the last agent codebook through an
        # embedding the narrow file does not have. It only shapes predictions of the user's
        # audio, which inference always replaces with the real user tokens: zeros are safe.
        filler = state["depformer_emb.0.weight"]
        state[f"depformer_emb.{file_steps - 1}.weight"] = torch.zeros_like(filler)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # only reachable if official_lm_shapes and LMModel disagree
        raise CheckpointError(f"{path}: {exc}") from exc
    return model.eval().requires_grad_(False)
