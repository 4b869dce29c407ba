"""config.json in upstream moshi's format."""

from __future__ import annotations

import dataclasses
import json

import pytest

from personaplex.model.config import ConfigError, LMConfig, ModelConfig
from personaplex.model.mimi import Mimi
from tests.fixtures.tiny_mimi import tiny_mimi_config


def test_defaults_are_personaplex_7b():
    default = ModelConfig()
    lm = default.lm
    assert (lm.dim, lm.num_layers, lm.num_heads, lm.context, lm.dep_q) == (4096, 32, 32, 3000, 16)
    assert lm.hidden_dim == 11264 and lm.depformer_hidden_dim == 2816
    assert default.mimi.frame_samples == 1920 and default.mimi.seanet.hop_length == 960


def test_folder_without_config_gets_the_7b_shape(tmp_path):
    assert ModelConfig.from_folder(tmp_path) == ModelConfig()


def test_moshi_format_fields_and_ignored_keys(tmp_path):
    raw = {
        "dim": 256, "num_heads": 8, "num_layers": 3, "context": 100, "depformer_dim": 64,
        "depformer_num_heads": 4, "delays": [0] + [1] * 16, "moshi_name": "model.safetensors",
        "lm_gen_config": {"temp": 0.5}, "mimi": {"seanet": {"n_filters": 8, "ratios": [4, 4, 4, 4]},
                                                   "transformer": {"num_layers": 2}, "quantizer": {"bins": 512}},
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = ModelConfig.from_folder(tmp_path)
    assert (config.lm.dim, config.lm.num_layers, config.lm.context, config.lm.dep_q) == (256, 3, 100, 16)
    assert config.lm.delays == (0,) + (1,) * 16
    assert config.mimi.seanet.ratios == (4, 4, 4, 4) and config.mimi.seanet.n_filters == 8
    assert config.mimi.transformer.num_layers == 2 and config.mimi.quantizer.bins == 512
    assert config.mimi.transformer.d_model == 512  # absent: the 7B value


def test_round_trip_through_moshi_dict():
    config = ModelConfig(lm=LMConfig(dim=128, num_heads=4, num_layers=2))
    assert ModelConfig.from_moshi_dict(config.to_moshi_dict()) == config


@pytest.mark.parametrize("key, value", [("gating", "gelu"), ("norm", "layer_norm"), ("depformer_pos_emb", "sin")])
def test_other_architectures_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"{key}={value!r}"):
        LMConfig.from_moshi_dict({key: value})


def test_bad_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        ModelConfig.from_folder(tmp_path)


def test_inconsistent_delays():
    with pytest.raises(ConfigError, match="delays has 3 entries"):
        LMConfig(delays=(0, 1, 1))


def test_a_context_without_room_for_the_streaming_ring_is_refused():
    """Streaming rings keep context - 1 steps (NVIDIA's semantics): the LM needs one frame,
    Mimi a whole frame of steps (2), or a query would see no key at all."""
    with pytest.raises(ConfigError, match=r"context must be at least 2 frames, got 1"):
        LMConfig(context=1)
    mimi = tiny_mimi_config()
    short = dataclasses.replace(mimi, transformer=dataclasses.replace(mimi.transformer, context=2))
    with pytest.raises(ConfigError, match=r"context \(2\) must be longer than one frame \(2 steps\)"):
        Mimi(short, device="meta")


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"dim": "256"}, r"dim must be a whole number from 1 to 65536, got '256'"),
        ({"num_heads": 0}, r"num_heads must be a whole number from 1 to 4096, got 0"),
        ({"context": 1e9}, r"context must be a whole number .* got 1000000000.0"),
        ({"context": 10**9}, r"context must be a whole number from 1 to 131072, got 1000000000"),
        ({"num_layers": True}, r"num_layers must be a whole number"),
        ({"hidden_scale": "big"}, r"hidden_scale must be a number"),
        ({"norm_eps": float("nan")}, r"norm_eps must be a number"),
        ({"delays": "0,1"}, r"delays must be a non-empty list of integers"),
        ({"delays": [0, [1]] + [1] * 15}, r"delays must be a whole number"),
        ({"mimi": [1, 2]}, r"mimi must be a JSON object"),
        ({"mimi": {"seanet": "x"}}, r"a Mimi section must be a JSON object"),
        ({"mimi": {"seanet": {"ratios": [8, 0]}}}, r"ratios must be a whole number from 1"),
        ({"mimi": {"transformer": {"num_heads": 0}}}, r"num_heads must be a whole number from 1"),
        ({"mimi": {"sample_rate": -1}}, r"sample_rate must be a whole number from 1"),
    ],
)
def test_bad_values_are_named_before_anything_is_allocated(tmp_path, raw, message):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_folder(tmp_path)


def test_deeply_nested_json_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        ModelConfig.from_folder(tmp_path)


def test_config_errors_are_persona_plex_errors():
    from personaplex.errors import PersonaPlexError

    assert issubclass(ConfigError, PersonaPlexError)
