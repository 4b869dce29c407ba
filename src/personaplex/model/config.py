"""Model shapes: one dataclass for the LM, one for Mimi, PersonaPlex 7B as the default.

A model folder may carry a `config.json` in upstream moshi's format: LM fields at the
top level under moshi's `_lm_kwargs` names, and an optional `mimi` object holding
`seanet`, `transformer` and `quantizer` objects under moshi's kwargs names. Fields that
are absent take the PersonaPlex 7B values; keys we do not model are ignored, except the
ones that would select a different architecture, which are refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# Keys of moshi's `_lm_kwargs` that select architecture variants this engine does not
# implement. A config that asks for another value is refused rather than silently misread.
_LM_FIXED_CHOICES: dict[str, Any] = {
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_multi_linear": True,
    "depformer_weights_per_step": True,
    "causal": True,
    "depformer_causal": True,
    "layer_scale": None,
    "depformer_layer_scale": None,
    "norm_emb": False,
    "bias_proj": False,
}


class ConfigError(ValueError):
    """A config.json that cannot describe a model this engine can run."""


def _gated_hidden(dim: int, dim_feedforward: int) -> int:
    """Width of one half of the SiLU-gated FFN, as moshi's ActivationGating derives it."""
    if dim_feedforward == 4 * dim:
        return (21 * dim) // 8
    return (2 * dim_feedforward) // 3


@dataclass(frozen=True)
class LMConfig:
    """Shape of the PersonaPlex language model (temporal transformer + depformer)."""

    dim: int = 4096
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125
    n_q: int = 16  # audio streams in: 8 agent + 8 user codebooks
    dep_q: int = 16  # depformer steps: 8 agent codebooks + 8 (ignored) user codebooks
    card: int = 2048  # audio vocabulary; id `card` is the audio start token
    text_card: int = 32000  # text vocabulary; id `text_card` is the text start token
    existing_text_padding_id: int = 3
    context: int = 3000  # frames the temporal transformer attends to (240 s)
    max_period: float = 10000.0
    delays: tuple[int, ...] = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)
    depformer_dim: int = 1024
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_dim_feedforward: int = 4224  # int(4.125 * 1024)
    norm_eps: float = 1e-8

    def __post_init__(self) -> None:
        if len(self.delays) != self.n_q + 1:
            raise ConfigError(f"delays has {len(self.delays)} entries, expected n_q + 1 = {self.n_q + 1}")
        if self.dim % self.num_heads or self.depformer_dim % self.depformer_num_heads:
            raise ConfigError("dim must be divisible by num_heads (temporal and depformer)")
        if self.dep_q > self.n_q or self.n_q % 2:
            raise ConfigError(f"need an even n_q >= dep_q, got n_q={self.n_q}, dep_q={self.dep_q}")
        if self.context < 2:  # the streaming ring keeps context - 1 frames
            raise ConfigError(f"context must be at least 2 frames, got {self.context}")

    @property
    def num_codebooks(self) -> int:
        """Streams in the token grid: text + all audio codebooks."""
        return self.n_q + 1

    @property
    def agent_codebooks(self) -> int:
        """Audio codebooks per speaker (8 for PersonaPlex)."""
        return self.n_q // 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return _gated_hidden(self.dim, int(self.hidden_scale * self.dim))

    @property
    def depformer_hidden_dim(self) -> int:
        return _gated_hidden(self.depformer_dim, self.depformer_dim_feedforward)

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @classmethod
    def from_moshi_dict(cls, raw: dict[str, Any]) -> "LMConfig":
        """Read the LM fields of a moshi-format config.json; absent fields keep the 7B values."""
        for key, expected in _LM_FIXED_CHOICES.items():
            if key in raw and raw[key] != expected:
                raise ConfigError(
                    f"config.json sets {key}={raw[key]!r}; this engine implements only {key}={expected!r}"
                )
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        if "delays" in kwargs:
            kwargs["delays"] = tuple(int(d) for d in kwargs["delays"])
        if "hidden_scale" in kwargs and "depformer_dim_feedforward" not in kwargs and "depformer_dim" in kwargs:
            kwargs["depformer_dim_feedforward"] = int(kwargs["hidden_scale"] * kwargs["depformer_dim"])
        return cls(**kwargs)

    @classmethod
    def from_mlx_dict(cls, raw: dict[str, Any]) -> "LMConfig":
        """Read the `temporal` / `depformer` sections of an MLX conversion's config.json."""
        temporal, depformer = raw.get("temporal") or {}, raw.get("depformer") or {}
        kwargs = {name: temporal[name] for name in ("dim", "num_layers", "num_heads", "hidden_scale", "card",
                                                    "text_card", "context", "max_period") if name in temporal}
        renamed = {"dim": "depformer_dim", "num_layers": "depformer_num_layers", "num_heads": "depformer_num_heads",
                   "num_steps": "dep_q"}
        kwargs.update({ours: depformer[theirs] for theirs, ours in renamed.items() if theirs in depformer})
        if "dim_feedforward" in depformer:  # MLX states the gated width; ours is 3/2 of it (moshi's)
            kwargs["depformer_dim_feedforward"] = depformer["dim_feedforward"] * 3 // 2
        if "delays" in raw:
            kwargs["delays"] = tuple(int(d) for d in raw["delays"])
        return cls(**kwargs)

    def to_moshi_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["delays"] = list(self.delays)
        out.pop("norm_eps")
        out.update(_LM_FIXED_CHOICES)
        return out


@dataclass(frozen=True)
class SEANetConfig:
    """Convolutional encoder/decoder of Mimi (moshi's `_seanet_kwargs`)."""

    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    n_residual_layers: int = 1
    ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    true_skip: bool = True

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.ratios:
            hop *= r
        return hop


@dataclass(frozen=True)
class MimiTransformerConfig:
    """The transformers on each side of Mimi's quantizer (moshi's `_transformer_kwargs`)."""

    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    layer_scale: float = 0.01
    context: int = 250
    max_period: float = 10000.0
    dim_feedforward: int = 2048


@dataclass(frozen=True)
class QuantizerConfig:
    """Split residual VQ (moshi's `_quantizer_kwargs`): 1 semantic + (n_q - 1) acoustic."""

    dimension: int = 256
    n_q: int = 32
    bins: int = 2048
    input_dimension: int = 512
    output_dimension: int = 512


@dataclass(frozen=True)
class MimiConfig:
    """Shape of the Mimi codec. `num_codebooks` is how many RVQ levels PersonaPlex uses."""

    seanet: SEANetConfig = field(default_factory=SEANetConfig)
    transformer: MimiTransformerConfig = field(default_factory=MimiTransformerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    sample_rate: int = 24000
    frame_rate: float = 12.5
    num_codebooks: int = 8

    @property
    def frame_samples(self) -> int:
        """PCM samples per codec frame (1920 = 80 ms at 24 kHz)."""
        return int(round(self.sample_rate / self.frame_rate))

    @property
    def encoder_frame_rate(self) -> float:
        return self.sample_rate / self.seanet.hop_length

    @classmethod
    def from_moshi_dict(cls, raw: dict[str, Any]) -> "MimiConfig":
        def pick(dc: type, obj: dict[str, Any] | None) -> Any:
            obj = obj or {}
            known = {f.name for f in fields(dc)}
            kwargs = {k: v for k, v in obj.items() if k in known}
            if "ratios" in kwargs:
                kwargs["ratios"] = tuple(kwargs["ratios"])
            return dc(**kwargs)

        top = {k: raw[k] for k in ("sample_rate", "frame_rate", "num_codebooks") if k in raw}
        return cls(
            seanet=pick(SEANetConfig, raw.get("seanet")),
            transformer=pick(MimiTransformerConfig, raw.get("transformer")),
            quantizer=pick(QuantizerConfig, raw.get("quantizer")),
            **top,
        )

    def to_moshi_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["seanet"]["ratios"] = list(self.seanet.ratios)
        return out


@dataclass(frozen=True)
class ModelConfig:
    """Everything a model folder describes: the LM and the codec."""

    lm: LMConfig = field(default_factory=LMConfig)
    mimi: MimiConfig = field(default_factory=MimiConfig)

    @classmethod
    def from_moshi_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        return cls(lm=LMConfig.from_moshi_dict(raw), mimi=MimiConfig.from_moshi_dict(raw.get("mimi") or {}))

    @classmethod
    def from_mlx_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """An MLX conversion's config.json. Its Mimi is the official file; its `mimi` section
        describes it in its own terms, so only moshi-style nested objects, if any, are read."""
        mimi = {k: v for k, v in (raw.get("mimi") or {}).items() if k in ("seanet", "transformer", "quantizer")}
        return cls(lm=LMConfig.from_mlx_dict(raw), mimi=MimiConfig.from_moshi_dict(mimi))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        """The folder's config.json (moshi's format, or the MLX conversion's) if it has one,
        else the PersonaPlex 7B shape."""
        path = Path(folder) / "config.json"
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        if "quantization" in raw and "temporal" in raw:
            return cls.from_mlx_dict(raw)
        return cls.from_moshi_dict(raw)

    def to_moshi_dict(self) -> dict[str, Any]:
        out = self.lm.to_moshi_dict()
        out["mimi"] = self.mimi.to_moshi_dict()
        return out


PERSONAPLEX_7B = ModelConfig()
