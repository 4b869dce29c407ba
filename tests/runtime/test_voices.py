import pytest
import safetensors.torch
import torch

from personaplex.errors import UnknownVoiceError
from personaplex.runtime.voices import (
    DEFAULT_VOICE,
    VOICE_NAMES,
    VoicePrompt,
    is_wav_voice,
    load_voice,
    write_voice_pt,
)

DIM = 8


def make_voice(frames: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    embeddings = torch.randn(frames, 1, 1, DIM).bfloat16()
    cache = torch.randint(0, 2048, (1, 17, 4), dtype=torch.int64)
    return embeddings, cache


def test_voice_names():
    assert len(VOICE_NAMES) == 18 and len(set(VOICE_NAMES)) == 18
    assert VOICE_NAMES[:4] == ("NATF0", "NATF1", "NATF2", "NATF3")
    assert "VARM4" in VOICE_NAMES and DEFAULT_VOICE in VOICE_NAMES


def test_preset_pt_roundtrip(tmp_path):
    embeddings, cache = make_voice()
    write_voice_pt(tmp_path / "NATF2.pt", embeddings, cache)
    for argument in ("NATF2", "natf2", "NATF2.pt"):
        voice = load_voice(argument, tmp_path, dim=DIM)
        assert isinstance(voice, VoicePrompt) and voice.name == "NATF2"
        assert torch.equal(voice.embeddings, embeddings)
        assert voice.embeddings.dtype == torch.bfloat16
        assert torch.equal(voice.cache, cache) and voice.cache.dtype == torch.int64


def test_pt_file_by_path_and_custom_name(tmp_path):
    embeddings, cache = make_voice()
    write_voice_pt(tmp_path / "mine.pt", embeddings, cache)
    assert load_voice(tmp_path / "mine.pt", None, dim=DIM).name == "mine"
    assert load_voice(str(tmp_path / "mine.pt"), None, dim=DIM).embeddings.shape == (3, 1, 1, DIM)
    assert load_voice("mine", tmp_path, dim=DIM).name == "mine"


def test_safetensors_mlx_layout_is_normalised(tmp_path):
    embeddings, cache = make_voice(frames=5)
    flat = {"embeddings": embeddings.reshape(5, DIM).float(), "cache": cache[0].to(torch.int32)}
    safetensors.torch.save_file(flat, str(tmp_path / "VARM1.safetensors"))
    voice = load_voice("VARM1", tmp_path, dim=DIM)
    assert voice.embeddings.shape == (5, 1, 1, DIM)
    assert torch.equal(voice.embeddings, embeddings.float())
    assert voice.cache.shape == (1, 17, 4) and voice.cache.dtype == torch.int64
    assert torch.equal(voice.cache, cache)


def test_missing_voice_file_path(tmp_path):
    with pytest.raises(UnknownVoiceError, match="does not exist"):
        load_voice(tmp_path / "gone.pt", tmp_path, dim=DIM)


def test_unknown_name_lists_valid_ones(tmp_path):
    with pytest.raises(UnknownVoiceError, match="unknown voice 'BOB'.*NATF0.*VARM4"):
        load_voice("BOB", tmp_path, dim=DIM)


def test_preset_missing_from_folder(tmp_path):
    with pytest.raises(UnknownVoiceError, match="NATM0 is a preset.*voices.tgz"):
        load_voice("NATM0", tmp_path, dim=DIM)
    with pytest.raises(UnknownVoiceError, match="needs the model folder.s voices/.*voices.tgz in the model folder"):
        load_voice("NATM0", None, dim=DIM)


def test_wav_argument_points_to_voice_wav(tmp_path):
    assert is_wav_voice("me.wav") and is_wav_voice(tmp_path / "x.FLAC")
    assert not is_wav_voice("NATF0")
    with pytest.raises(UnknownVoiceError, match="voice_wav"):
        load_voice("me.wav", tmp_path, dim=DIM)


GOOD_CACHE = torch.zeros(1, 17, 4, dtype=torch.int64)


@pytest.mark.parametrize(
    "embeddings,cache,message",
    [
        (torch.zeros(3, 1, 1, DIM + 1), GOOD_CACHE, "embeddings of shape"),
        (torch.zeros(3, 2, 1, DIM), GOOD_CACHE, "embeddings of shape"),
        (torch.zeros(3, 1, 1, DIM), torch.zeros(1, 9, 4, dtype=torch.int64), "token cache"),
        (torch.zeros(3, 1, 1, DIM), torch.full((1, 17, 4), 0.5), "non-integer"),
    ],
)
def test_wrong_shapes(tmp_path, embeddings, cache, message):
    torch.save({"embeddings": embeddings, "cache": cache}, tmp_path / "v.pt")
    with pytest.raises(UnknownVoiceError, match=message):
        load_voice(tmp_path / "v.pt", None, dim=DIM)


def test_mlx_converter_float_token_cache_is_accepted(tmp_path):
    """The MLX converter stores the int64 cache as float32; integral values load as ids."""
    from safetensors.torch import save_file

    cache = torch.randint(0, 2048, (1, 17, 4)).float()
    save_file({"embeddings": torch.zeros(3, 1, 1, DIM, dtype=torch.float16), "cache": cache}, str(tmp_path / "NATF0.safetensors"))
    voice = load_voice("NATF0", tmp_path, dim=DIM)
    assert voice.cache.dtype == torch.int64 and torch.equal(voice.cache.float(), cache)


def test_corrupt_and_incomplete_files(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(UnknownVoiceError, match="cannot be read"):
        load_voice(tmp_path / "bad.pt", None, dim=DIM)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(UnknownVoiceError, match="cannot be read"):
        load_voice(tmp_path / "bad.safetensors", None, dim=DIM)
    torch.save({"embeddings": torch.zeros(1, 1, 1, DIM)}, tmp_path / "half.pt")
    with pytest.raises(UnknownVoiceError, match="'embeddings' and 'cache'"):
        load_voice(tmp_path / "half.pt", None, dim=DIM)


def test_write_voice_pt_validates(tmp_path):
    with pytest.raises(ValueError, match=r"\[N, 1, 1, dim\]"):
        write_voice_pt(tmp_path / "x.pt", torch.zeros(3, DIM), torch.zeros(1, 17, 4))
    with pytest.raises(ValueError, match="cache"):
        write_voice_pt(tmp_path / "x.pt", torch.zeros(3, 1, 1, DIM), torch.zeros(17, 4))
