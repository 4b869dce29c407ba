import time

import pytest

from personaplex.errors import ModelUnavailableError
from personaplex.text.tokenizer import EPAD_ID, PAD_ID, TEXT_TOKENIZER_FILENAME, TextTokenizer
from personaplex.text.stand_in import write_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> TextTokenizer:
    path = tmp_path_factory.mktemp("tok") / TEXT_TOKENIZER_FILENAME
    write_tiny_tokenizer(path)
    return TextTokenizer(path)


def test_filename_matches_checkpoint():
    assert TEXT_TOKENIZER_FILENAME == "tokenizer_spm_32k_3.model"


def test_tiny_tokenizer_layout_and_speed(tmp_path, tokenizer):
    start = time.perf_counter()
    write_tiny_tokenizer(tmp_path / "t.model", vocab_size=128)
    assert time.perf_counter() - start < 5.0
    assert TextTokenizer(tmp_path / "t.model").vocab_size == 128
    assert tokenizer.vocab_size == 256
    pieces = [tokenizer._processor.IdToPiece(i) for i in range(4)]
    assert pieces == ["<unk>", "<s>", "</s>", "<pad>"]


def test_encode_has_no_bos_eos_and_roundtrips(tokenizer):
    text = "<system> You are a helpful assistant. <system>"
    ids = tokenizer.encode(text)
    assert ids and 1 not in ids and 2 not in ids and EPAD_ID not in ids
    assert "".join(tokenizer.piece_text(i) for i in ids).strip() == text


def test_piece_text_rules(tokenizer):
    assert tokenizer.piece_text(EPAD_ID) == "" and tokenizer.piece_text(PAD_ID) == ""
    word_id = tokenizer.encode(" you")[0]
    assert tokenizer.piece_text(word_id).startswith(" ")
    assert all("\u2581" not in tokenizer.piece_text(i) for i in range(4, tokenizer.vocab_size))
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        tokenizer.piece_text(tokenizer.vocab_size)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        TextTokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ModelUnavailableError, match="not a valid SentencePiece model"):
        TextTokenizer(bad)
