"""The LM against upstream moshi, and our streaming path against our teacher-forced path."""

from __future__ import annotations

import dataclasses
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from personaplex.model.checkpoint import CheckpointError
from personaplex.model.lm import delay_codes, undelay_logits
from personaplex.model.lm_checkpoint import load_lm
from tests.fixtures.oracle import moshi_lm
from tests.fixtures.tiny_lm import tiny_lm_config, write_tiny_lm


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    valid = ~torch.isnan(ref)
    assert torch.equal(torch.isnan(ours), ~valid), "NaN pattern differs"
    return ((ours[valid].double() - ref[valid].double()).norm() / ref[valid].double().norm()).item()


def random_codes(config, batch: int, frames: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, config.card, (batch, config.num_codebooks, frames), generator=gen)
    codes[:, 0] = torch.randint(0, config.text_card, (batch, frames), generator=gen)
    return codes


@pytest.fixture(scope="module")
def config():
    return tiny_lm_config(context=8)


@pytest.fixture(scope="module")
def lm_file(tmp_path_factory, config):
    path = tmp_path_factory.mktemp("lm") / "model.safetensors"
    write_tiny_lm(path, config, seed=3)
    return path


@pytest.fixture(scope="module")
def lm(lm_file, config):
    return load_lm(lm_file, config, dtype=torch.float32)


def test_teacher_forced_logits_equal_upstream_moshi(lm, lm_file, config):
    reference = moshi_lm(lm_file, config)
    codes = random_codes(config, batch=2, frames=20, seed=0)  # 20 frames > context 8: window slides
    with torch.no_grad():
        expected = reference(codes)
        text_logits, audio_logits = lm(codes)
    assert relative_error(text_logits, expected.text_logits) < 1e-5
    assert relative_error(audio_logits, expected.logits) < 1e-5


def streaming_logits(lm, codes: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The streaming path over the same inputs as `LMModel.forward`, `chunk` frames at a time,
    with the logits aligned as `LMModel.forward` aligns them."""
    batch, _, frames = codes.shape
    start = lm.start_tokens()[None, :, None].expand(batch, -1, 1)
    delayed = torch.cat([start, delay_codes(codes, lm.config.delays, start)], dim=2)
    state = lm.new_temporal_state(batch)
    text, audio = [], []
    for begin in range(0, frames, chunk):
        inputs = delayed[:, :, begin : min(begin + chunk, frames)]
        hidden, text_logits = lm.forward_temporal(lm.embed_codes(inputs), state)
        text.append(text_logits)
        for t in range(inputs.shape[2]):
            dep_state = lm.new_depformer_state(batch)
            targets = delayed[:, :, begin + t + 1]
            frame_logits = []
            for step in range(lm.config.dep_q):
                frame_logits.append(lm.depformer_step(step, hidden[:, t : t + 1], targets[:, step], dep_state))
            audio.append(torch.stack(frame_logits, dim=1))
    delays = lm.config.delays
    text_logits = undelay_logits(torch.cat(text, dim=1)[:, None], delays[:1])
    return text_logits, undelay_logits(torch.stack(audio, dim=2), delays[1 : 1 + lm.config.dep_q])


@pytest.mark.parametrize("chunk", [1, 5, 20])
@pytest.mark.parametrize(
    "frames, upstream_context",
    [(7, 8), (20, 7)],
    ids=["before-the-ring-is-full", "past-the-wrap"],
)
def test_streaming_equals_upstream_with_a_context_one_shorter(lm, lm_file, config, chunk, frames, upstream_context):
    """NVIDIA's ring (context 8) shows a live frame the last 7 frames, one frame or a chunk
    at a time: until 7 frames have been written that is upstream at context 8, after it
    upstream's forward at context 7 (20 frames: the ring wraps twice)."""
    reference = moshi_lm(lm_file, dataclasses.replace(config, context=upstream_context))
    codes = random_codes(config, batch=2, frames=frames, seed=1)
    with torch.no_grad():
        expected = reference(codes)
        text, audio = streaming_logits(lm, codes, chunk)
    assert relative_error(text, expected.text_logits) < 1e-5
    assert relative_error(audio, expected.logits) < 1e-5


def test_rows_are_independent_and_reset(lm, config):
    codes = random_codes(config, batch=2, frames=6, seed=2)
    with torch.no_grad():
        state = lm.new_temporal_state(2)
        _, both = lm.forward_temporal(lm.embed_codes(codes), state)
        state.reset(torch.tensor([True, False]))
        _, again = lm.forward_temporal(lm.embed_codes(codes[:, :, :1]), state)
        solo_state = lm.new_temporal_state(1)
        _, solo = lm.forward_temporal(lm.embed_codes(codes[1:]), solo_state)
    assert torch.allclose(both[1:], solo, atol=1e-5)
    assert torch.allclose(again[0, 0], both[0, 0], atol=1e-5)  # row 0 restarted at position 0
    assert state.next_position.tolist() == [1, 7]


def test_bf16_stays_close_to_float32(lm_file, config, lm):
    lm_bf16 = load_lm(lm_file, config, dtype=torch.bfloat16)
    codes = random_codes(config, batch=1, frames=12, seed=4)
    with torch.no_grad():
        text32, audio32 = lm(codes)
        text16, audio16 = lm_bf16(codes)
    # Measured 7.0e-3 to 7.5e-3 on this tiny model (bf16 keeps 8 bits of mantissa).
    assert relative_error(text16.float(), text32) < 3e-2
    assert relative_error(audio16.float(), audio32) < 3e-2


def test_eight_step_depformer_file_is_widened(tmp_path, lm_file, config, lm):
    state = load_file(str(lm_file))
    narrow = {}
    ddim = config.depformer_dim
    for name, tensor in state.items():
        if name.startswith("depformer.layers.") and name.endswith("in_proj_weight"):
            narrow[name] = tensor[: 8 * 3 * ddim].clone()
        elif name.startswith("depformer.layers.") and name.endswith("out_proj.weight"):
            narrow[name] = tensor[: 8 * ddim].clone()
        elif any(name.startswith(p) for p in ("linears.", "depformer_in.", "depformer_emb.")) or ".gating." in name and name.startswith("depformer."):
            index = int(name.split(".")[1] if not name.startswith("depformer.layers") else name.split(".")[4])
            if index < (7 if name.startswith("depformer_emb.") else 8):
                narrow[name] = tensor
        else:
            narrow[name] = tensor
    path = tmp_path / "moshi8.safetensors"
    save_file(narrow, str(path))
    widened = load_lm(path, config, dtype=torch.float32)
    assert torch.equal(widened.linears[11].weight, lm.linears[3].weight)
    assert torch.equal(widened.depformer.layers[1].self_attn.in_projs[9].weight, lm.depformer.layers[1].self_attn.in_projs[1].weight)
    assert torch.equal(widened.depformer_emb[12].weight, lm.depformer_emb[4].weight)
    assert torch.equal(widened.depformer.layers[0].gating[15].linear_out.weight, lm.depformer.layers[0].gating[7].linear_out.weight)


def rewrite(lm_file, tmp_path, edit) -> str:
    state = load_file(str(lm_file))
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_file(state, str(path))
    return str(path)


def test_missing_key_is_named(tmp_path, lm_file, config):
    path = rewrite(lm_file, tmp_path, lambda s: s.pop("transformer.layers.1.norm2.alpha"))
    with pytest.raises(CheckpointError, match=r"edited.safetensors.*missing keys.*transformer\.layers\.1\.norm2\.alpha"):
        load_lm(path, config)


def test_unexpected_key_is_named(tmp_path, lm_file, config):
    path = rewrite(lm_file, tmp_path, lambda s: s.update(extra_head=torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*extra_head"):
        load_lm(path, config)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path, lm_file, config):
    path = rewrite(lm_file, tmp_path, lambda s: s.update({"text_linear.weight": torch.zeros(10, config.dim)}))
    with pytest.raises(CheckpointError, match=rf"text_linear\.weight: expected \[{config.text_card}, {config.dim}\], found \[10, {config.dim}\]"):
        load_lm(path, config)


def test_truncated_file(tmp_path, lm_file, config):
    data = lm_file.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated"):
        load_lm(path, config)


def test_not_a_safetensors_file(tmp_path, config):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"hello" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"not a safetensors file"):
        load_lm(path, config)


def test_missing_file(tmp_path, config):
    with pytest.raises(CheckpointError, match=r"not found"):
        load_lm(tmp_path / "nope.safetensors", config)


def test_fp8_kv_cache_stays_close_to_full_precision(lm, config):
    codes = random_codes(config, batch=2, frames=12, seed=6)
    logits = {}
    with torch.no_grad():
        for kv_dtype in (torch.float32, torch.float8_e4m3fn):
            state = lm.new_temporal_state(2, dtype=kv_dtype)
            steps = [lm.forward_temporal(lm.embed_codes(codes[:, :, t : t + 1]), state)[1] for t in range(12)]
            logits[kv_dtype] = torch.cat(steps, dim=1)
    assert state.keys.dtype == torch.float8_e4m3fn
    # Measured 3.3e-3 here (e4m3 keeps 3 mantissa bits per cached key/value).
    assert relative_error(logits[torch.float8_e4m3fn].float(), logits[torch.float32]) < 2e-2


def test_keeping_only_the_agent_depformer_steps(lm_file, config, lm):
    agent_only = load_lm(lm_file, config, dtype=torch.float32, depformer_steps=8)
    assert agent_only.config.dep_q == 8 and len(agent_only.linears) == 8
    assert sum(p.numel() for p in agent_only.parameters()) < sum(p.numel() for p in lm.parameters())
    codes = random_codes(config, batch=1, frames=6, seed=8)
    with torch.no_grad():
        text_full, audio_full = lm(codes)
        text_cut, audio_cut = agent_only(codes)
    assert torch.equal(text_cut, text_full)
    assert torch.allclose(audio_cut, audio_full[:, :8], atol=1e-6, equal_nan=True)
    # The cut steps are copies, not views holding the 16-step tensors alive.
    in_proj = agent_only.depformer.layers[0].self_attn.in_projs[0].weight
    assert in_proj.untyped_storage().nbytes() == in_proj.numel() * in_proj.element_size()
