"""Random LMs whose numbers behave like a trained model's, and how to compare two LMs' logits.

The real weights are gated and never available to the tests or the benchmark, so every
quality number about weight formats is measured on random weights. That only means
something if the random network does not amplify small errors. A plain N(0, 0.02) init of
the 7B shape does: its residual branches are much larger than the residual stream, and the
32 layers turn the bf16 rounding of the activations alone into a 5.6% text-logit error
against float32 (argmax agreement 0.62), where a trained model stays near 1e-2. On such a
network every format looks broken and a real defect could hide in the noise.

`randomize_lm_` draws weights the way a stable trained network is scaled instead: q, k, v
and the FFN input at unit scale (1/sqrt(fan_in)), the projections that write back into the
residual stream scaled down by 1/sqrt(2 * layers) (GPT-2's residual scaling), embeddings
summing to unit scale, heads at unit logit scale. Two kinds of weights:
- "gaussian": every matrix i.i.d. normal;
- "trained-like": the same, then each output row scaled by its own log-normal factor, and a
  few input columns (the same ones for every matrix reading a stream of that width, like a
  trained model's outlier channels) scaled up 8x; norm scales log-normal around 1. Outlier
  columns are what hurts group-wise int4 (a group holding one has a coarse step), per-row
  scales what a per-tensor format would miss.
Weights are rounded to bf16 values (the checkpoint is bf16), so a float32 copy differs from
the bf16 model only by the rounding of the computation.

`teacher_forced_logits` runs an LM over given codes either through `LMModel.forward` or
frame by frame through the streaming API (the KV ring and the depformer steps the serving
path uses); `compare_logits` gives the relative error and greedy agreement of two runs.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
from torch import nn

from .config import LMConfig
from .layers import READABLE_KERNELS, Kernels, RMSNorm
from .lm import LMModel, delay_codes, undelay_logits

WeightKind = Literal["gaussian", "trained-like"]
WEIGHT_KINDS: tuple[str, ...] = ("gaussian", "trained-like")

ROW_SCALE_SPREAD = 0.5  # std of log(row scale): rows differ by about 1.6x (one sigma)
NORM_SCALE_SPREAD = 0.3  # std of log(norm alpha)
OUTLIER_FRACTION = 0.002  # input columns with large weights: 8 of 4096
OUTLIER_GAIN = 8.0

# Layers whose output is added to the residual stream: scaled by 1/sqrt(2 * layers).
_RESIDUAL_WRITERS = re.compile(r"(out_proj|out_projs\.\d+|linear_out)$")


def _log_normal(shape: tuple[int, ...], spread: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Positive factors with mean square 1: exp(spread * z - spread^2)."""
    z = torch.randn(shape, generator=generator, device=device)
    return torch.exp(spread * z - spread**2)


def _outlier_columns(fan_in: int, seed: int) -> torch.Tensor:
    """The outlier input channels of every matrix reading a stream of `fan_in` values."""
    count = round(OUTLIER_FRACTION * fan_in)  # none below 250 inputs (tiny test models)
    return torch.randperm(fan_in, generator=torch.Generator().manual_seed(seed * 1_000_003 + fan_in))[:count]


def _linear_std(name: str, linear: nn.Linear, config: LMConfig) -> float:
    std = linear.in_features**-0.5
    if _RESIDUAL_WRITERS.search(name):
        layers = config.depformer_num_layers if name.startswith("depformer.") else config.num_layers
        std /= math.sqrt(2 * layers)
    return std


def _embedding_std(name: str, config: LMConfig) -> float:
    if name.startswith("depformer"):  # added to depformer_in(hidden): both at 1/sqrt(2)
        return 0.5**0.5
    return config.num_codebooks**-0.5  # 17 streams summed to unit scale


@torch.no_grad()
def fill_linear_(weight: torch.Tensor, std: float, kind: WeightKind, generator: torch.Generator, seed: int = 0) -> None:
    """One weight matrix [out, in]: normal of `std`; for "trained-like" also per-row scales and
    the outlier input columns of its input width (the same for every matrix of that width)."""
    weight.normal_(0.0, std, generator=generator)
    if kind == "trained-like":
        weight.mul_(_log_normal((weight.shape[0], 1), ROW_SCALE_SPREAD, generator, weight.device).to(weight.dtype))
        weight[:, _outlier_columns(weight.shape[1], seed).to(weight.device)] *= OUTLIER_GAIN


@torch.no_grad()
def randomize_lm_(lm: LMModel, kind: WeightKind = "gaussian", seed: int = 0) -> LMModel:
    """Fill every weight of `lm` in place (on its device, in its dtypes); see the module doc."""
    if kind not in WEIGHT_KINDS:
        raise ValueError(f"unknown weight kind {kind!r}; expected one of {WEIGHT_KINDS}")
    trained_like = kind == "trained-like"
    device = lm.text_linear.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, module in lm.named_modules():
        if isinstance(module, nn.Linear):
            fill_linear_(module.weight, _linear_std(name, module, lm.config), kind, generator, seed)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, _embedding_std(name, lm.config), generator=generator)
        elif isinstance(module, RMSNorm):
            alpha = module.alpha
            if trained_like:
                alpha.copy_(_log_normal(tuple(alpha.shape), NORM_SCALE_SPREAD, generator, device))
            else:
                alpha.fill_(1.0)
    for param in lm.parameters():  # values a bf16 checkpoint can hold
        param.copy_(param.to(torch.bfloat16))
    return lm


def build_random_lm(
    config: LMConfig,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    kind: WeightKind = "gaussian",
    seed: int = 0,
) -> LMModel:
    """An LM of `config`'s shape built straight on `device` (no CPU copy) and randomized."""
    with torch.device("meta"):
        lm = LMModel(config, dtype=dtype)
    lm = lm.to_empty(device=device)
    # to_empty leaves the norms' float32 alphas uninitialised like everything else.
    return randomize_lm_(lm, kind, seed).eval().requires_grad_(False)


# --------------------------------------------------------------------------- measuring


def random_codes(config: LMConfig, frames: int, batch: int = 1, seed: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform random token codes [batch, streams, frames] (text and audio vocabularies)."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, config.card, (batch, config.num_codebooks, frames), generator=generator)
    codes[:, 0] = torch.randint(0, config.text_card, (batch, frames), generator=generator)
    return codes.to(device)


@torch.no_grad()
def teacher_forced_logits(
    lm: LMModel, codes: torch.Tensor, streaming: bool = False, kernels: Kernels = READABLE_KERNELS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(text logits [B, 1, T, text_card], audio logits [B, dep_q, T, card]) of `codes` [B, streams, T].

    `streaming=False` is `LMModel.forward` (the whole sequence at once). `streaming=True` feeds
    the same delayed inputs one frame at a time through `forward_temporal` with a KV ring and
    `depformer_step` with the given tokens, as the serving path runs them (with `kernels`);
    the result is aligned like `forward`'s (positions the delays make unpredictable are NaN).
    Streaming sees context - 1 frames, the whole-sequence forward `context` (NVIDIA's
    semantics, `ring_capacity`): the two agree while T < context.
    """
    if not streaming:
        return lm(codes)
    config = lm.config
    batch, _, frames = codes.shape
    start = lm.start_tokens(codes.device)[None, :, None].expand(batch, -1, 1)
    delayed = torch.cat([start, delay_codes(codes, config.delays, start)], dim=2)
    temporal = lm.new_temporal_state(batch)
    depformer = lm.new_depformer_state(batch)
    text, audio = [], []
    for frame in range(frames):
        hidden, text_logits = lm.forward_temporal(lm.embed_codes(delayed[:, :, frame : frame + 1]), temporal, kernels)
        text.append(text_logits[:, 0])
        # Step k reads stream k of the next slot: the text token for k = 0, else codebook k - 1.
        given = delayed[:, :, frame + 1]
        steps = [lm.depformer_step(k, hidden, given[:, k], depformer, kernels) for k in range(config.dep_q)]
        audio.append(torch.stack(steps, dim=1))
    text_logits = torch.stack(text, dim=1)[:, None]
    audio_logits = torch.stack(audio, dim=2)
    return undelay_logits(text_logits, config.delays[:1]), undelay_logits(audio_logits, config.delays[1 : 1 + config.dep_q])


def compare_logits(out: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """How far `out` is from `ref` (each (text, audio) logits as `teacher_forced_logits` returns),
    over the positions both predict, for the text and the audio heads:
    `*_err` ||out - ref|| / ||ref|| over all positions; `*_worst` the same at the worst single
    position (a defect tied to one frame, row or codebook shows there first); `*_agree` the
    fraction of positions whose argmax (the greedy token) is the same."""
    stats: dict[str, float] = {}
    for label, a, b in zip(("text", "audio"), out, ref):
        known = torch.isfinite(b[..., 0])  # the delayed tail is NaN by design
        a, b = a.double()[known], b.double()[known]
        stats[f"{label}_err"] = float((a - b).norm() / b.norm())
        stats[f"{label}_worst"] = float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())
        stats[f"{label}_agree"] = float((a.argmax(-1) == b.argmax(-1)).double().mean())
    return stats
