"""The Mimi codec: 24 kHz mono PCM <-> 12.5 Hz frames of RVQ codes, whole clips or streaming.

    encode: PCM -> SEANet encoder (25 Hz) -> transformer -> conv downsample x2 (12.5 Hz) -> RVQ
    decode: RVQ vectors -> conv-transpose upsample x2 (25 Hz) -> transformer -> SEANet decoder

Streaming steps take exactly one frame (1920 samples / one code column) per call and keep all
their state in a `MimiStreamState` allocated up front; a whole-clip call is the same
computation from a fresh state, except that its transformer attends over the clip in one go.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from personaplex.model.checkpoint import check_tensor_shapes, load_safetensors, read_safetensors_shapes
from personaplex.model.config import ConfigError, MimiConfig
from personaplex.model.layers import READABLE_KERNELS, Kernels
from personaplex.model.mimi.conv import StreamingConv1d, StreamingConvTranspose1d
from personaplex.model.mimi.quantizer import SplitResidualVQ
from personaplex.model.mimi.seanet import SEANetDecoder, SEANetEncoder
from personaplex.model.mimi.state import CodecSideState, MimiStreamState
from personaplex.model.mimi.transformer import MimiTransformer



def _check_config(config: MimiConfig) -> int:
    """Validate the shapes this implementation relies on; return the resampling stride."""
    s, t, q = config.seanet, config.transformer, config.quantizer
    if not (s.dimension == t.d_model == q.input_dimension == q.output_dimension):
        raise ConfigError(
            "Mimi needs seanet.dimension == transformer.d_model == quantizer.input_dimension == "
            f"quantizer.output_dimension, got {s.dimension}, {t.d_model}, {q.input_dimension}, {q.output_dimension}"
        )
    if t.d_model % t.num_heads or (t.d_model // t.num_heads) % 2:
        raise ConfigError(f"Mimi transformer head width must be even: d_model={t.d_model}, num_heads={t.num_heads}")
    samples = config.sample_rate / config.frame_rate
    stride = config.frame_samples // s.hop_length
    if samples != config.frame_samples or stride * s.hop_length != config.frame_samples or stride < 2:
        raise ConfigError(
            f"a Mimi frame ({samples} samples) must be a whole multiple (>= 2) of the SEANet hop ({s.hop_length})"
        )
    if t.context <= stride:  # a streaming step's ring (context - 1 slots) must hold the whole frame
        raise ConfigError(f"Mimi transformer context ({t.context}) must be longer than one frame ({stride} steps)")
    if not 2 <= config.num_codebooks <= q.n_q:
        raise ConfigError(f"num_codebooks must be in [2, {q.n_q}], got {config.num_codebooks}")
    return stride


class Mimi(nn.Module):
    def __init__(self, config: MimiConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        stride = _check_config(config)
        dim, q = config.seanet.dimension, config.quantizer
        factory = {"device": device, "dtype": dtype}
        self.encoder = SEANetEncoder(config.seanet, **factory)
        self.encoder_transformer = MimiTransformer(config.transformer, **factory)
        self.downsample = StreamingConv1d(dim, dim, 2 * stride, stride, bias=False, replicate_pad=True, **factory)
        # Codes are the interface to the LM: distances always in float32, whatever the dtype.
        self.quantizer = SplitResidualVQ(
            config.num_codebooks, q.bins, q.dimension, q.input_dimension, q.output_dimension, device, torch.float32
        )
        self.upsample = StreamingConvTranspose1d(dim, dim, 2 * stride, stride, groups=dim, bias=False, **factory)
        self.decoder_transformer = MimiTransformer(config.transformer, **factory)
        self.decoder = SEANetDecoder(config.seanet, **factory)

    def keep_product_weights(self) -> None:
        """Keep each transposed convolution's weight also as the matrix its product reads
        (`StreamingConvTranspose1d.keep_product_weight`): the frame runner does when its kernels
        run convolutions as products. Costs a second copy of those weights (42 MB at Mimi's size)."""
        for conv in self.decoder.convs:
            if isinstance(conv, StreamingConvTranspose1d):
                conv.keep_product_weight()

    @property
    def frame_samples(self) -> int:
        return self.config.frame_samples

    @property
    def num_codebooks(self) -> int:
        return self.config.num_codebooks

    @property
    def dtype(self) -> torch.dtype:
        return self.downsample.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.downsample.weight.device

    # ----- whole clips -------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, pcm: torch.Tensor) -> torch.Tensor:
        """pcm [B, 1, T] float -> codes [B, num_codebooks, ceil(T / 1920)] int64.

        The clip is zero-padded at the end to whole frames. Equal to upstream's whole-clip
        encode; equal to `encode_step` frame by frame only for the first context/2 frames
        (10 s): see `Attention.step`. The reference encodes WAV voice prompts frame by frame,
        so use `encode_step` to reproduce it. Attention memory grows with T^2."""
        self._check_pcm(pcm)
        batch, _, length = pcm.shape
        if length == 0:
            raise ValueError("cannot encode empty audio (T = 0)")
        padded = math.ceil(length / self.frame_samples) * self.frame_samples
        x = F.pad(pcm.to(self.device, self.dtype), (0, padded - length))
        x = self.encoder(x, self.encoder.new_state(batch, self.device, self.dtype))
        x = self.encoder_transformer(x)
        fresh = torch.ones(batch, dtype=torch.bool, device=self.device)
        x = self.downsample(x, self.downsample.new_state(batch, self.device, self.dtype), fresh)
        return self.quantizer.encode(x)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, F] (K <= num_codebooks, values in [0, bins)) -> pcm [B, 1, F * 1920] float32."""
        self._check_codes(codes)
        if codes.shape[-1] == 0:
            raise ValueError("cannot decode zero frames (F = 0)")
        bins, low, high = self.config.quantizer.bins, int(codes.min()), int(codes.max())
        if low < 0 or high >= bins:
            raise ValueError(f"codes must lie in [0, {bins}), got values in [{low}, {high}]")
        batch = codes.shape[0]
        x = self.quantizer.decode(codes.to(self.device)).to(self.dtype)
        x = self.upsample(x, self.upsample.new_state(batch, self.device, self.dtype))
        x = self.decoder_transformer(x)
        x = self.decoder(x, self.decoder.new_state(batch, self.device, self.dtype))
        return x.float()

    # ----- streaming ---------------------------------------------------------------------

    def init_stream(self, batch_size: int) -> MimiStreamState:
        """Zeroed state for `batch_size` independent streams, on the model's device/dtype."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        b, device, dtype = batch_size, self.device, self.dtype
        return MimiStreamState(
            encoder=CodecSideState(
                seanet=self.encoder.new_state(b, device, dtype),
                resample=self.downsample.new_state(b, device, dtype),
                transformer=self.encoder_transformer.new_state(b, device, dtype),
            ),
            decoder=CodecSideState(
                seanet=self.decoder.new_state(b, device, dtype),
                resample=self.upsample.new_state(b, device, dtype),
                transformer=self.decoder_transformer.new_state(b, device, dtype),
            ),
        )

    @torch.no_grad()
    def encode_step(self, pcm: torch.Tensor, state: MimiStreamState, kernels: Kernels = READABLE_KERNELS) -> torch.Tensor:
        """One frame: pcm [B, 1, 1920] -> codes [B, num_codebooks, 1]. Updates state.encoder.
        `kernels`: which attention and linear kernels its transformer's steps use, and whether
        its convolutions run as products."""
        self._check_pcm(pcm)
        self._check_step_shape("pcm", pcm, (state.batch_size, 1, self.frame_samples))
        side = state.encoder
        # A row that has not been fed since its reset starts the downsampling conv by
        # repeating its first sample (upstream's "replicate" padding).
        fresh = side.transformer.offset == 0
        x = self.encoder(pcm.to(self.dtype), side.seanet, kernels)
        x = self.encoder_transformer(x, side.transformer, kernels)
        x = self.downsample(x, side.resample, fresh, kernels)
        return self.quantizer.encode(x)

    @torch.no_grad()
    def decode_step(self, codes: torch.Tensor, state: MimiStreamState, kernels: Kernels = READABLE_KERNELS) -> torch.Tensor:
        """One frame: codes [B, K, 1] -> pcm [B, 1, 1920] float32. Updates state.decoder.
        Codes are not range-checked here (that would synchronise with the device)."""
        self._check_codes(codes)
        self._check_step_shape("codes", codes, (state.batch_size, codes.shape[1], 1))
        side = state.decoder
        x = self.quantizer.decode(codes).to(self.dtype)
        x = self.upsample(x, side.resample, kernels)
        x = self.decoder_transformer(x, side.transformer, kernels)
        x = self.decoder(x, side.seanet, kernels)
        return x.float()

    # ----- input checks (shapes and dtypes only: no device synchronisation) -------------

    def _check_pcm(self, pcm: torch.Tensor) -> None:
        if pcm.dim() != 3 or pcm.shape[1] != self.config.seanet.channels or not pcm.is_floating_point():
            raise ValueError(f"pcm must be a float tensor [B, 1, T], got {pcm.dtype} {list(pcm.shape)}")

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.dim() != 3 or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor [B, K, F], got {codes.dtype} {list(codes.shape)}")
        if not 1 <= codes.shape[1] <= self.num_codebooks:
            raise ValueError(f"codes has {codes.shape[1]} codebooks, expected 1 to {self.num_codebooks}")

    @staticmethod
    def _check_step_shape(name: str, x: torch.Tensor, expected: tuple[int, ...]) -> None:
        if tuple(x.shape) != expected:
            raise ValueError(f"{name} for one streaming step must have shape {list(expected)}, got {list(x.shape)}")


# ----- the official checkpoint -----------------------------------------------------------

Shape = tuple[int, ...]

# Upstream wraps each layer in one to three modules (StreamingConv1d > NormConv1d > Conv1d,
# ProjectedTransformer > StreamingTransformer, ResidualVectorQuantization > EuclideanCodebook);
# their names are the only difference between the file's keys and ours.
_UPSTREAM_WRAPPERS = frozenset({"conv", "convtr", "transformer", "vq", "_codebook"})


def module_key(file_key: str) -> str:
    """Our parameter name for a key of the official file."""
    return ".".join(part for part in file_key.split(".") if part not in _UPSTREAM_WRAPPERS)


def official_tensor_shapes(config: MimiConfig) -> dict[str, Shape]:
    """Every tensor in the official Mimi checkpoint for `config` (all `quantizer.n_q` levels)."""
    s, t, q = config.seanet, config.transformer, config.quantizer
    shapes: dict[str, Shape] = {}

    def conv(prefix: str, c_in: int, c_out: int, kernel: int, bias: bool = True) -> None:
        shapes[f"{prefix}.weight"] = (c_out, c_in, kernel)
        if bias:
            shapes[f"{prefix}.bias"] = (c_out,)

    def resnet_blocks(side: str, index: int, dim: int) -> int:
        for _ in range(s.n_residual_layers):
            conv(f"{side}.model.{index}.block.1.conv.conv", dim, dim // s.compress, s.residual_kernel_size)
            conv(f"{side}.model.{index}.block.3.conv.conv", dim // s.compress, dim, 1)
            index += 1
        return index

    # Encoder: conv, then per ratio (reversed): residual blocks, ELU, strided conv; ELU, conv.
    width = s.n_filters
    conv("encoder.model.0.conv.conv", s.channels, width, s.kernel_size)
    index = 1
    for ratio in reversed(s.ratios):
        index = resnet_blocks("encoder", index, width)
        conv(f"encoder.model.{index + 1}.conv.conv", width, 2 * width, 2 * ratio)
        index, width = index + 2, 2 * width
    conv(f"encoder.model.{index + 1}.conv.conv", width, s.dimension, s.last_kernel_size)

    # Decoder: conv, then per ratio: ELU, transposed conv, residual blocks; ELU, conv.
    conv("decoder.model.0.conv.conv", s.dimension, width, s.kernel_size)
    index = 1
    for ratio in s.ratios:
        shapes[f"decoder.model.{index + 1}.convtr.convtr.weight"] = (width, width // 2, 2 * ratio)
        shapes[f"decoder.model.{index + 1}.convtr.convtr.bias"] = (width // 2,)
        width //= 2
        index = resnet_blocks("decoder", index + 2, width)
    conv(f"decoder.model.{index + 1}.conv.conv", width, s.channels, s.last_kernel_size)

    stride = config.frame_samples // s.hop_length
    conv("downsample.conv.conv.conv", s.dimension, s.dimension, 2 * stride, bias=False)
    shapes["upsample.convtr.convtr.convtr.weight"] = (s.dimension, 1, 2 * stride)  # depthwise

    d, ff = t.d_model, t.dim_feedforward
    for side in ("encoder_transformer", "decoder_transformer"):
        for i in range(t.num_layers):
            layer = f"{side}.transformer.layers.{i}"
            shapes[f"{layer}.self_attn.in_proj_weight"] = (3 * d, d)
            shapes[f"{layer}.self_attn.out_proj.weight"] = (d, d)
            shapes[f"{layer}.linear1.weight"] = (ff, d)
            shapes[f"{layer}.linear2.weight"] = (d, ff)
            for norm in ("norm1", "norm2"):
                shapes[f"{layer}.{norm}.weight"] = (d,)
                shapes[f"{layer}.{norm}.bias"] = (d,)
            shapes[f"{layer}.layer_scale_1.scale"] = (d,)
            shapes[f"{layer}.layer_scale_2.scale"] = (d,)

    for rvq, levels in (("rvq_first", 1), ("rvq_rest", q.n_q - 1)):
        shapes[f"quantizer.{rvq}.input_proj.weight"] = (q.dimension, q.input_dimension, 1)
        shapes[f"quantizer.{rvq}.output_proj.weight"] = (q.output_dimension, q.dimension, 1)
        for level in range(levels):
            codebook = f"quantizer.{rvq}.vq.layers.{level}._codebook"
            shapes[f"{codebook}._initialized"] = (1,)
            shapes[f"{codebook}.cluster_usage"] = (q.bins,)
            shapes[f"{codebook}.embedding_sum"] = (q.bins, q.dimension)
    return shapes


def is_used_key(file_key: str, config: MimiConfig) -> bool:
    """False for the file's tensors inference never reads: the training-time `_initialized`
    flags and the codebooks past `num_codebooks`."""
    if file_key.endswith("._initialized"):
        return False
    prefix = "quantizer.rvq_rest.vq.layers."
    if file_key.startswith(prefix):
        return int(file_key[len(prefix) :].split(".")[0]) < config.num_codebooks - 1
    return True


def load_mimi(
    path: str | Path,
    config: MimiConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Mimi:
    """Load the official Mimi safetensors straight onto `device` in `dtype` (the quantizer
    stays float32). Raises CheckpointError naming the file and the offending keys."""
    config = config or MimiConfig()
    layout = official_tensor_shapes(config)
    used = {key: shape for key, shape in layout.items() if is_used_key(key, config)}
    unused = {key: shape for key, shape in layout.items() if key not in used}
    check_tensor_shapes(path, read_safetensors_shapes(path), required=used, optional=unused)

    def dtype_of(key: str) -> torch.dtype:
        return torch.float32 if key.startswith("quantizer.") else dtype

    tensors = load_safetensors(path, used, device, dtype_of)
    model = Mimi(config, device="meta", dtype=dtype)
    model.load_state_dict({module_key(key): value for key, value in tensors.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
