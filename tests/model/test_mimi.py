"""Mimi codec: equal to upstream moshi (the oracle) on a tiny random checkpoint, streaming
state handling, and loader errors."""

from __future__ import annotations

import dataclasses
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from personaplex.model.checkpoint import CheckpointError
from personaplex.model.config import MimiConfig
from personaplex.hub import MIMI_FILENAME
from personaplex.model.mimi import Mimi, MimiStreamState, load_mimi
from personaplex.model.mimi.codec import is_used_key, module_key, official_tensor_shapes
from personaplex.model.mimi.quantizer import Codebook
from personaplex.model.layers import READABLE_KERNELS, Kernels, rope, rope_angles
from personaplex.model.mimi.transformer import MimiTransformer
from tests.gpu.common import GemvRows, interpreter_or_skip
from tests.fixtures.tiny_mimi import moshi_mimi, random_mimi_tensors, test_audio, tiny_mimi_config, write_tiny_mimi

FRAME = 1920
STREAM_FRAMES = 12  # 24 steps: the tiny ring (context 8, 7 slots) wraps three times


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def frames_of(pcm: torch.Tensor) -> list[torch.Tensor]:
    return list(pcm.split(FRAME, dim=-1))


@pytest.fixture(scope="module")
def config() -> MimiConfig:
    return tiny_mimi_config()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, config) -> Path:
    path = tmp_path_factory.mktemp("mimi") / MIMI_FILENAME
    write_tiny_mimi(path, config, seed=0)
    return path


@pytest.fixture(scope="module")
def mimi(checkpoint, config) -> Mimi:
    return load_mimi(checkpoint, config)


@pytest.fixture(scope="module")
def upstream(checkpoint, config):
    return moshi_mimi(checkpoint, config)


@pytest.fixture(scope="module")
def pcm() -> torch.Tensor:
    return test_audio(2, STREAM_FRAMES * FRAME, seed=1)


@pytest.fixture(scope="module")
def codes(mimi, pcm) -> torch.Tensor:
    return mimi.encode(pcm)


def stream_encode(model: Mimi, pcm: torch.Tensor, state: MimiStreamState | None = None) -> torch.Tensor:
    state = state or model.init_stream(pcm.shape[0])
    return torch.cat([model.encode_step(frame, state) for frame in frames_of(pcm)], dim=-1)


def stream_decode(model: Mimi, codes: torch.Tensor, state: MimiStreamState | None = None) -> torch.Tensor:
    state = state or model.init_stream(codes.shape[0])
    return torch.cat([model.decode_step(codes[..., i : i + 1], state) for i in range(codes.shape[-1])], dim=-1)


# ----- checkpoint layout ---------------------------------------------------------------


def _upstream_file_layout(model) -> dict[str, tuple[int, ...]]:
    """moshi's state_dict under the official file's names (older attention names)."""
    renamed = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"self_attn\.in_projs\.0\.weight$", "self_attn.in_proj_weight", key)
        key = re.sub(r"self_attn\.out_projs\.0\.weight$", "self_attn.out_proj.weight", key)
        renamed[key] = tuple(value.shape)
    return renamed


def test_official_layout_is_upstream_state_dict_for_the_real_shape():
    loaders = pytest.importorskip("moshi.models.loaders")
    with torch.device("meta"):
        upstream = loaders.get_mimi(None, device="meta")
    assert official_tensor_shapes(MimiConfig()) == _upstream_file_layout(upstream)


def test_official_layout_is_upstream_state_dict_for_the_tiny_shape(upstream, config):
    assert official_tensor_shapes(config) == _upstream_file_layout(upstream)


@pytest.mark.parametrize("mimi_config", [MimiConfig(), tiny_mimi_config(), tiny_mimi_config(num_codebooks=3)])
def test_used_file_keys_map_onto_our_parameters(mimi_config):
    ours = {name: tuple(t.shape) for name, t in Mimi(mimi_config, device="meta").state_dict().items()}
    used = {
        module_key(key): shape for key, shape in official_tensor_shapes(mimi_config).items() if is_used_key(key, mimi_config)
    }
    assert used == ours


# ----- equal to upstream -----------------------------------------------------------------


def test_whole_clip_encode_equals_upstream(mimi, upstream):
    pcm = test_audio(2, 7 * FRAME + 555, seed=2)  # not a whole number of frames: padded like upstream
    codes = mimi.encode(pcm)
    with torch.no_grad():
        expected = upstream.encode(pcm)
    assert codes.dtype == torch.int64 and codes.shape == (2, 8, 8)
    assert torch.equal(codes, expected)
    assert all(len(row.unique()) > 1 for row in codes[0]), "degenerate fixture: a codebook level is constant"


def test_whole_clip_decode_equals_upstream(mimi, upstream, codes):
    pcm = mimi.decode(codes)
    with torch.no_grad():
        expected = upstream.decode(codes)
    assert pcm.dtype == torch.float32 and pcm.shape == (2, 1, STREAM_FRAMES * FRAME)
    assert rel_error(pcm, expected) < 1e-4
    assert pcm.abs().max() > 0.05  # not a silent decoder


def test_decode_with_fewer_codebooks_equals_upstream(mimi, upstream, codes):
    with torch.no_grad():
        expected = upstream.decode(codes[:, :3])
    assert rel_error(mimi.decode(codes[:, :3]), expected) < 1e-4


def frames_before_the_ring_is_full(config: MimiConfig) -> int:
    """Streaming frames (2 steps each) after which at most context - 1 steps have been
    written: until then NVIDIA's ring, upstream's and the whole-clip mask all agree."""
    return (config.transformer.context - 1) // 2


@pytest.fixture(scope="module")
def upstream_one_shorter(checkpoint, config):
    """Upstream at context - 1: its ring then shows what NVIDIA's ring of `context` shows."""
    return moshi_mimi(checkpoint, with_context(config, config.transformer.context - 1))


def with_context(config: MimiConfig, context: int) -> MimiConfig:
    return dataclasses.replace(config, transformer=dataclasses.replace(config.transformer, context=context))


def upstream_stream_encode(model, pcm: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), model.streaming(pcm.shape[0]):
        return torch.cat([model.encode(frame) for frame in frames_of(pcm)], dim=-1)


def upstream_stream_decode(model, codes: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), model.streaming(codes.shape[0]):
        return torch.cat([model.decode(codes[..., i : i + 1]) for i in range(codes.shape[-1])], dim=-1)


def test_streaming_equals_upstream_streaming_until_the_ring_is_full(mimi, upstream, config, pcm, codes):
    frames = frames_before_the_ring_is_full(config)
    head_pcm, head_codes = pcm[..., : frames * FRAME], codes[..., :frames]
    assert torch.equal(stream_encode(mimi, head_pcm), upstream_stream_encode(upstream, head_pcm))
    assert rel_error(stream_decode(mimi, head_codes), upstream_stream_decode(upstream, head_codes)) < 1e-6


def test_streaming_equals_upstream_one_shorter_past_the_wrap(mimi, upstream_one_shorter, pcm, codes):
    """12 frames = 24 steps through a ring of 7: NVIDIA's semantics, from the codec's side."""
    assert torch.equal(stream_encode(mimi, pcm), upstream_stream_encode(upstream_one_shorter, pcm))
    assert rel_error(stream_decode(mimi, codes), upstream_stream_decode(upstream_one_shorter, codes)) < 1e-6


def brute_force_stream(transformer: MimiTransformer, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """NVIDIA's streaming rule on a full history (no ring): every key ever computed is kept,
    and a query at q of a call whose last position is P sees the key at k iff
    k <= q and P - k < context - 1. x [B, d_model, T] in calls of `chunk` steps."""
    context = transformer.config.context
    history: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []) for _ in transformer.layers]
    outputs = []
    for begin in range(0, x.shape[-1], chunk):
        h = x[..., begin : begin + chunk].transpose(1, 2)
        batch, steps, dim = h.shape
        positions = torch.arange(begin, begin + steps)
        for layer, (keys, values) in zip(transformer.layers, history):
            q, k, v = layer.self_attn._qkv(layer.norm1(h))
            cos, sin = rope_angles(positions[None].expand(batch, -1), dim // layer.self_attn.num_heads,
                                   transformer.config.max_period)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            keys.append(k)
            values.append(v)
            key_positions = torch.arange(begin + steps)
            visible = (key_positions[None, :] <= positions[:, None]) & (positions[-1] - key_positions[None, :] < context - 1)
            out = torch.nn.functional.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2), visible)
            h = h + layer.layer_scale_1(layer.self_attn.out_proj(out.transpose(1, 2).reshape(batch, steps, dim)))
            h = layer._feed_forward(h)
        outputs.append(h.transpose(1, 2))
    return torch.cat(outputs, dim=-1)


@pytest.mark.parametrize("kernels", [READABLE_KERNELS, Kernels.fast()], ids=["readable", "ring-kernel"])
@pytest.mark.parametrize("chunk", [2, 1, 3])
def test_streaming_transformer_follows_the_reference_rule_past_the_wrap(mimi, chunk, kernels):
    """Two steps per call as the codec runs it (and 1, 3), 30 steps through a ring of 7; the
    readable code and the fast frame's Triton kernels (on the CPU, in Triton's interpreter): the
    ring attention, and at two rows (one step of two rows) the GEMV for the linears."""
    if kernels.ring_attention:
        interpreter_or_skip("cpu")
    transformer = mimi.encoder_transformer
    x = torch.randn(2, transformer.config.d_model, 30, generator=torch.Generator().manual_seed(3))
    state = transformer.new_state(2, x.device, x.dtype)
    with torch.no_grad():
        streamed = torch.cat([transformer(x[..., i : i + chunk], state, kernels) for i in range(0, 30, chunk)], dim=-1)
        expected = brute_force_stream(transformer, x, chunk)
    assert rel_error(streamed, expected) < 1e-6


def test_streaming_equals_whole_clip_until_the_ring_is_full(mimi, config, pcm, codes):
    # A streaming step writes its 2 positions into the ring before attending, so once it has
    # wrapped a step's queries see fewer keys than the whole-clip mask allows.
    frames = frames_before_the_ring_is_full(config)
    assert torch.equal(stream_encode(mimi, pcm[..., : frames * FRAME]), codes[..., :frames])
    whole = mimi.decode(codes[..., :frames])
    assert rel_error(stream_decode(mimi, codes[..., :frames]), whole) < 1e-5


# ----- batching and per-row state --------------------------------------------------------


def test_batch_rows_equal_single_row_runs(mimi, pcm, codes):
    batch_codes = stream_encode(mimi, pcm)
    batch_pcm = stream_decode(mimi, codes)
    for row in range(2):
        assert torch.equal(stream_encode(mimi, pcm[row : row + 1]), batch_codes[row : row + 1])
        assert rel_error(stream_decode(mimi, codes[row : row + 1]), batch_pcm[row : row + 1]) < 1e-5


def test_reset_restarts_only_the_selected_rows(mimi, pcm, codes):
    state = mimi.init_stream(2)
    head, tail = 5, 5  # 5 frames before the reset, so the rings have wrapped
    stream_encode(mimi, pcm[..., : head * FRAME], state)
    stream_decode(mimi, codes[..., :head], state)
    state.reset(torch.tensor([True, False]))
    new_pcm = test_audio(2, tail * FRAME, seed=7)
    got_codes = stream_encode(mimi, new_pcm, state)
    got_pcm = stream_decode(mimi, codes[..., head : head + tail], state)

    # Row 0 behaves like a fresh stream fed only the new input...
    assert torch.equal(got_codes[:1], stream_encode(mimi, new_pcm[:1]))
    assert rel_error(got_pcm[:1], stream_decode(mimi, codes[:1, :, head : head + tail])) < 1e-5
    # ...row 1 like a stream that was never interrupted.
    unbroken = mimi.init_stream(1)
    expected_codes = stream_encode(mimi, torch.cat([pcm[1:, :, : head * FRAME], new_pcm[1:]], dim=-1), unbroken)
    expected_pcm = stream_decode(mimi, codes[1:, :, : head + tail], unbroken)
    assert torch.equal(got_codes[1:], expected_codes[..., head:])
    assert rel_error(got_pcm[1:], expected_pcm[..., head * FRAME :]) < 1e-5


def test_reset_all_rows_equals_a_new_state(mimi, pcm):
    state = mimi.init_stream(2)
    stream_encode(mimi, pcm[..., : 3 * FRAME], state)
    state.reset()
    assert torch.equal(stream_encode(mimi, pcm, state), stream_encode(mimi, pcm))


def test_encoder_and_decoder_sides_are_independent(mimi, pcm, codes):
    state = mimi.init_stream(2)
    stream_decode(mimi, codes[..., :3], state)  # decoding must not disturb encoding
    assert torch.equal(stream_encode(mimi, pcm, state), stream_encode(mimi, pcm))


@pytest.mark.parametrize(
    "rows", [torch.tensor([1, 0]), torch.tensor([True]), torch.tensor([[True, False]])], ids=["int", "short", "2d"]
)
def test_reset_rejects_a_bad_mask(mimi, rows):
    with pytest.raises(ValueError, match=r"bool mask of shape \[2\]"):
        mimi.init_stream(2).reset(rows)


class _FailOnHostSync(TorchDispatchMode):
    """Fails on any op that copies a device value to the host (`.item()`, `bool(t)`, ...)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host synchronisation inside a streaming step")
        return func(*args, **(kwargs or {}))


def test_steps_do_not_synchronise_and_update_state_in_place(mimi, pcm, codes):
    state = mimi.init_stream(2)
    tensors = [*state.encoder.seanet, state.encoder.resample, *state.encoder.transformer.keys, state.encoder.transformer.offset]
    tensors += [*state.decoder.seanet, state.decoder.resample, *state.decoder.transformer.values]
    pointers = [t.data_ptr() for t in tensors]
    with _FailOnHostSync():
        for i, frame in enumerate(frames_of(pcm)[:5]):
            mimi.encode_step(frame, state)
            mimi.decode_step(codes[..., i : i + 1], state)
        state.reset(torch.tensor([False, True]))
    assert [t.data_ptr() for t in tensors] == pointers
    assert state.encoder.transformer.offset.tolist() == [10, 0]


def test_one_conversation_runs_its_one_and_two_row_products_through_the_gemv(mimi, pcm, codes):
    """With the fast frame's kernels, one conversation's encode and decode steps send every
    product of both transformers (two 25 Hz steps a frame) to the GEMV as two rows (in Triton's
    interpreter here), and so do the convolutions run as products that have one or two output
    samples a frame (the transposed ones with their weights kept for the product, as the frame
    runner keeps them), and give what the readable steps give."""
    interpreter_or_skip("cpu")
    mimi.keep_product_weights()
    fast_state, readable_state = mimi.init_stream(1), mimi.init_stream(1)
    encoder_products = [2] * 4 * len(mimi.encoder_transformer.layers)
    decoder_products = [2] * 4 * len(mimi.decoder_transformer.layers)
    # The encoder's last two convolutions (two 25 Hz samples), then its transformer and the
    # 12.5 Hz conv (one sample); the decoder's transformer, then its first convolution and its
    # first transposed one.
    expected = [2, 2] + encoder_products + [1] + decoder_products + [2, 2]
    for i, frame in enumerate(frames_of(pcm[:1])[:3]):
        with GemvRows() as gemv:
            fast_codes = mimi.encode_step(frame, fast_state, Kernels.fast())
            fast_pcm = mimi.decode_step(codes[:1, :, i : i + 1], fast_state, Kernels.fast())
        assert gemv.rows == expected
        assert torch.equal(fast_codes, mimi.encode_step(frame, readable_state))
        assert rel_error(fast_pcm, mimi.decode_step(codes[:1, :, i : i + 1], readable_state)) < 1e-5


# ----- dtypes ------------------------------------------------------------------------------


def test_bfloat16_stays_close_to_float32(checkpoint, config, mimi, pcm, codes):
    half = load_mimi(checkpoint, config, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.quantizer.dtype == torch.float32
    half_codes, full_codes = stream_encode(half, pcm), stream_encode(mimi, pcm)
    # Measured on this fixture (24 frames x 8 levels): 96% of semantic codes and 92% of all
    # codes agree (~93% whole-clip); flips are near-ties of the random codebooks.
    assert (half_codes[:, 0] == full_codes[:, 0]).float().mean() >= 0.9
    assert (half_codes == full_codes).float().mean() >= 0.85
    assert (half.encode(pcm) == codes).float().mean() >= 0.85
    # Decoding the same codes: measured relative error 1.1% (whole clip and streaming).
    assert rel_error(half.decode(codes), mimi.decode(codes)) < 0.03
    assert rel_error(stream_decode(half, codes), stream_decode(mimi, codes)) < 0.03


def test_dead_codes_are_clamped_not_divided_by_zero():
    codebook = Codebook(3, 2)
    codebook.embedding_sum = torch.tensor([[2.0, 4.0], [0.0, 0.0], [1e-6, 0.0]])
    codebook.cluster_usage = torch.tensor([2.0, 0.0, 0.0])
    assert torch.equal(codebook.vectors(), torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.1, 0.0]]))


# ----- bad input ----------------------------------------------------------------------------


def test_bad_audio_and_codes_are_refused(mimi):
    with pytest.raises(ValueError, match="pcm must be a float tensor"):
        mimi.encode(torch.zeros(1, FRAME))
    with pytest.raises(ValueError, match="pcm must be a float tensor"):
        mimi.encode(torch.zeros(1, 2, FRAME))
    with pytest.raises(ValueError, match="empty audio"):
        mimi.encode(torch.zeros(1, 1, 0))
    with pytest.raises(ValueError, match=r"shape \[1, 1, 1920\], got \[1, 1, 960\]"):
        mimi.encode_step(torch.zeros(1, 1, 960), mimi.init_stream(1))
    with pytest.raises(ValueError, match="integer tensor"):
        mimi.decode(torch.zeros(1, 8, 2))
    with pytest.raises(ValueError, match="zero frames"):
        mimi.decode(torch.zeros(1, 8, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="9 codebooks, expected 1 to 8"):
        mimi.decode(torch.zeros(1, 9, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        mimi.decode(torch.full((1, 8, 2), 64))
    with pytest.raises(ValueError, match=r"shape \[2, 8, 1\], got \[1, 8, 1\]"):
        mimi.decode_step(torch.zeros(1, 8, 1, dtype=torch.long), mimi.init_stream(2))


# ----- loader -------------------------------------------------------------------------------


def _save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(tensors, str(path))
    return path


def test_loader_reads_device_and_dtype_without_touching_unused_keys(checkpoint, config):
    half = load_mimi(checkpoint, config, dtype=torch.bfloat16)
    assert {p.device.type for p in half.parameters()} == {"cpu"}
    assert half.encoder.model[0].weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in half.parameters())
    # The file has 12 levels; only the 8 in use are built.
    assert len(half.quantizer.rvq_rest.layers) == 7


def test_a_file_without_the_unused_tensors_loads(tmp_path, config, codes, mimi):
    tensors = {k: v for k, v in random_mimi_tensors(config, seed=0).items() if is_used_key(k, config)}
    trimmed = load_mimi(_save(tensors, tmp_path / "trimmed.safetensors"), config)
    pcm = test_audio(1, 2 * FRAME, seed=3)
    assert torch.equal(trimmed.encode(pcm), mimi.encode(pcm))


def test_missing_key_is_named(tmp_path, config):
    tensors = random_mimi_tensors(config, seed=0)
    del tensors["decoder_transformer.transformer.layers.1.linear2.weight"]
    path = _save(tensors, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"missing.safetensors.*missing keys \[decoder_transformer\.transformer\.layers\.1\.linear2\.weight\]"):
        load_mimi(path, config)


def test_unexpected_key_is_named(tmp_path, config):
    tensors = random_mimi_tensors(config, seed=0)
    tensors["encoder.model.0.conv.conv.weight_g"] = torch.zeros(4, 1, 1)
    path = _save(tensors, tmp_path / "unexpected.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected.safetensors.*unexpected keys \[encoder\.model\.0\.conv\.conv\.weight_g\]"):
        load_mimi(path, config)


def test_wrong_shape_names_expected_and_found(tmp_path, config):
    tensors = random_mimi_tensors(config, seed=0)
    tensors["quantizer.rvq_first.input_proj.weight"] = torch.zeros(16, 30, 1)
    path = _save(tensors, tmp_path / "shape.safetensors")
    with pytest.raises(
        CheckpointError, match=r"shape.safetensors.*quantizer\.rvq_first\.input_proj\.weight: expected \[16, 32, 1\], found \[16, 30, 1\]"
    ):
        load_mimi(path, config)


def test_the_real_shape_refuses_the_tiny_file(checkpoint):
    with pytest.raises(CheckpointError, match="missing keys .* and \\d+ more"):
        load_mimi(checkpoint)


def test_truncated_file_is_reported(tmp_path, checkpoint, config):
    data = checkpoint.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated.safetensors: file is truncated"):
        load_mimi(path, config)


@pytest.mark.parametrize(
    "content",
    [b"", b"PK\x03\x04 a zip file, not tensors", struct.pack("<Q", 12) + b"not json at all"],
    ids=["empty", "zip", "bad-json"],
)
def test_not_a_safetensors_file_is_reported(tmp_path, config, content):
    path = tmp_path / "bogus.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bogus.safetensors: not a safetensors file"):
        load_mimi(path, config)


def test_absent_file_is_reported(tmp_path, config):
    with pytest.raises(CheckpointError, match="nowhere.safetensors: checkpoint file not found"):
        load_mimi(tmp_path / "nowhere.safetensors", config)


def test_fixture_matches_the_file_it_writes(checkpoint, config):
    assert set(load_file(str(checkpoint))) == set(official_tensor_shapes(config))
