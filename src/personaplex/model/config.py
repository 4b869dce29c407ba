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
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from personaplex.errors import PersonaPlexError

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


class ConfigError(PersonaPlexError, ValueError):
    """A config.json that cannot describe a model this engine can run."""


# Bounds no real model of this family comes near (PersonaPlex 7B: context 3000, dim 4096,
# 32 layers, vocabularies of 32000 and 2048). A config beyond them is damaged or hostile,
# and would make the loader allocate more than any machine has (context 1e9: 512 GB).
_MAX_CONTEXT = 1 << 17
_MAX_WIDTH = 1 << 16
_MAX_LAYERS = 1024
_MAX_VOCABULARY = 1 << 20
_MAX_COUNT = 4096  # heads, codebooks, filters, ratios and other small counts
_UNBOUNDED_INTS = {"existing_text_padding_id": (0, _MAX_VOCABULARY)}
_INT_LIMITS = {
    "context": _MAX_CONTEXT, "dim": _MAX_WIDTH, "depformer_dim": _MAX_WIDTH, "d_model": _MAX_WIDTH,
    "dim_feedforward": 4 * _MAX_WIDTH, "depformer_dim_feedforward": 4 * _MAX_WIDTH, "dimension": _MAX_WIDTH,
    "input_dimension": _MAX_WIDTH, "output_dimension": _MAX_WIDTH, "num_layers": _MAX_LAYERS,
    "depformer_num_layers": _MAX_LAYERS, "card": _MAX_VOCABULARY, "text_card": _MAX_VOCABULARY,
    "bins": _MAX_VOCABULARY, "sample_rate": 384_000,
}
_MAX_SCALE = 1e6  # hidden_scale, max_period, frame_rate ... stay well below


def _check_fields(config: Any) -> None:
    """Every field of a config dataclass has the type it declares, within sane bounds: a
    string where a number belongs, a zero count or an absurd size is refused here, by name,
    before anything is allocated."""
    for spec in fields(config):
        value = getattr(config, spec.name)
        kind = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", str(spec.type))
        where = f"{type(config).__name__}.{spec.name}"
        if kind == "int":
            low, high = _UNBOUNDED_INTS.get(spec.name, (1, _INT_LIMITS.get(spec.name, _MAX_COUNT)))
            _check_int(where, value, low, high)
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 <= value <= _MAX_SCALE:
                raise ConfigError(f"config.json: {spec.name} must be a number from 0 to {_MAX_SCALE:g}, got {value!r} ({where})")
        elif kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"config.json: {spec.name} must be true or false, got {value!r} ({where})")
        elif kind.startswith("tuple"):
            if not isinstance(value, tuple) or not 0 < len(value) <= _MAX_COUNT:
                raise ConfigError(f"config.json: {spec.name} must be a non-empty list of integers, got {value!r} ({where})")
            for item in value:
                _check_int(where, item, 0 if spec.name == "delays" else 1, _MAX_COUNT)


def _check_int(where: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        name = where.split(".")[-1]
        raise ConfigError(f"config.json: {name} must be a whole number from {low} to {high}, got {value!r} ({where})")


def _as_tuple(name: str, value: Any) -> Any:
    """A JSON list as the tuple the dataclass holds; anything else is left for the check."""
    return tuple(value) if isinstance(value, list) else value


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
        _check_fields(self)
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
            kwargs["delays"] = _as_tuple("delays", kwargs["delays"])
        if "hidden_scale" in kwargs and "depformer_dim_feedforward" not in kwargs and "depformer_dim" in kwargs:
            scale, width = kwargs["hidden_scale"], kwargs["depformer_dim"]
            if isinstance(scale, (int, float)) and isinstance(width, int) and math.isfinite(scale):
                kwargs["depformer_dim_feedforward"] = int(scale * width)
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
            width = depformer["dim_feedforward"]
            kwargs["depformer_dim_feedforward"] = width * 3 // 2 if isinstance(width, int) else width
        if "delays" in raw:
            kwargs["delays"] = _as_tuple("delays", raw["delays"])
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

    def __post_init__(self) -> None:
        _check_fields(self)

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

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class QuantizerConfig:
    """Split residual VQ (moshi's `_quantizer_kwargs`): 1 semantic + (n_q - 1) acoustic."""

    dimension: int = 256
    n_q: int = 32
    bins: int = 2048
    input_dimension: int = 512
    output_dimension: int = 512

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class MimiConfig:
    """Shape of the Mimi codec. `num_codebooks` is how many RVQ levels PersonaPlex uses."""

    seanet: SEANetConfig = field(default_factory=SEANetConfig)
    transformer: MimiTransformerConfig = field(default_factory=MimiTransformerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    sample_rate: int = 24000
    frame_rate: float = 12.5
    num_codebooks: int = 8

    def __post_init__(self) -> None:
        _check_fields(self)

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
            if not isinstance(obj, dict):
                raise ConfigError(f"config.json: a Mimi section must be a JSON object, got {obj!r}")
            known = {f.name for f in fields(dc)}
            kwargs = {k: v for k, v in obj.items() if k in known}
            if "ratios" in kwargs:
                kwargs["ratios"] = _as_tuple("ratios", kwargs["ratios"])
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
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to be a model config: restore the original file") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        for section in ("mimi", "temporal", "depformer"):
            if not isinstance(raw.get(section) or {}, dict):
                raise ConfigError(f"{path}: {section} must be a JSON object, got {raw[section]!r}")
        if "quantization" in raw and "temporal" in raw:
            return cls.from_mlx_dict(raw)
        return cls.from_moshi_dict(raw)

    def to_moshi_dict(self) -> dict[str, Any]:
        out = self.lm.to_moshi_dict()
        out["mimi"] = self.mimi.to_moshi_dict()
        return out

