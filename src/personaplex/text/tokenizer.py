"""The text side of the model: SentencePiece tokens in (system prompt), pieces out (monologue)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece

from personaplex.errors import ModelUnavailableError

TEXT_TOKENIZER_FILENAME = "tokenizer_spm_32k_3.model"
# Ids 0..3 of the PersonaPlex tokenizer are EPAD, BOS, EOS, PAD. In the text stream the
# model emits PAD while no word is due and EPAD just before a word starts: neither is text.
EPAD_ID = 0
PAD_ID = 3
_SILENT_IDS = frozenset({EPAD_ID, PAD_ID})
_WORD_BOUNDARY = "\u2581"  # SentencePiece's "▁", which marks a leading space


class TextTokenizer:
    """A SentencePiece model with the two operations PersonaPlex needs."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ModelUnavailableError(
                f"text tokenizer {path} does not exist: the model folder needs "
                f"{TEXT_TOKENIZER_FILENAME} (download it from the model repo)"
            )
        self.path = path
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.Load(str(path))
        except (RuntimeError, OSError) as err:
            raise ModelUnavailableError(
                f"text tokenizer {path} is not a valid SentencePiece model ({err}): "
                "download it again"
            ) from err

    @property
    def vocab_size(self) -> int:
        return self._processor.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS: the system prompt is fed as plain pieces."""
        return list(self._processor.EncodeAsIds(text))

    def piece_text(self, token_id: int) -> str:
        """The text one generated token contributes: "" for padding, its piece otherwise."""
        if token_id in _SILENT_IDS:
            return ""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(
                f"text token {token_id} is outside the tokenizer's vocabulary "
                f"(0..{self.vocab_size - 1}): the model and tokenizer do not match"
            )
        return self._processor.IdToPiece(token_id).replace(_WORD_BOUNDARY, " ")
