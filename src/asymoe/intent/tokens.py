"""Text tokenisation for the intent encoder: `[CLS] [slot]*K text [SEP] [PAD]...`.

Two sources, one interface: the framework's word-level tokenizer built from the training split
and the label descriptions (for the scratch BERT; nothing is downloaded), or the tokenizer saved
in the local `intent.text_encoder.pretrained_path` directory. The K slot positions hold a
reserved token whose embedding the anchor outputs are added to; with anchors off there are none.
Word-level: `<bos>` / `<eos>` serve as CLS / SEP and the framework's `<image>` placeholder (a
position filled from another modality) as the slot token.
"""

from __future__ import annotations

from pathlib import Path

from asymoe.data.tokenizer import WordTokenizer
from asymoe.errors import ConfigError

SLOT_TOKEN = "[ANCHOR]"


class IntentTokenizer:
    def __init__(self, word: WordTokenizer | None = None, pretrained_path: str | None = None):
        assert (word is None) != (pretrained_path is None)
        self.word, self.hf = word, None
        if word is not None:
            self.cls_id, self.sep_id, self.pad_id, self.slot_id = word.bos_id, word.eos_id, word.pad_id, word.image_id
            return
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(pretrained_path), local_files_only=True)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"intent.text_encoder.pretrained_path: cannot load a tokenizer from {pretrained_path} ({error})"
            ) from None
        if SLOT_TOKEN not in self.hf.get_vocab():
            self.hf.add_special_tokens({"additional_special_tokens": [SLOT_TOKEN]})
        self.cls_id, self.sep_id, self.pad_id = self.hf.cls_token_id, self.hf.sep_token_id, self.hf.pad_token_id
        if None in (self.cls_id, self.sep_id, self.pad_id):
            raise ConfigError(
                f"intent.text_encoder.pretrained_path: the tokenizer in {pretrained_path} lacks a cls, sep or pad token"
            )
        self.slot_id = self.hf.convert_tokens_to_ids(SLOT_TOKEN)

    @classmethod
    def build(cls, texts: list[str], pretrained_path: str | None) -> IntentTokenizer:
        if pretrained_path is not None:
            return cls(pretrained_path=pretrained_path)
        return cls(word=WordTokenizer.build(texts))

    @property
    def vocab_size(self) -> int:
        return self.word.vocab_size if self.word is not None else len(self.hf)

    def encode(self, text: str, max_length: int, slots: int = 0) -> list[int]:
        """`[CLS] [slot]*slots tokens [SEP]` padded to max_length + slots; text truncated to fit."""
        tokens = self.word.encode(text) if self.word is not None else self.hf.encode(text, add_special_tokens=False)
        ids = [self.cls_id] + [self.slot_id] * slots + tokens[: max_length - 2] + [self.sep_id]
        return ids + [self.pad_id] * (max_length + slots - len(ids))

    def save(self, directory: Path) -> None:
        if self.word is not None:
            self.word.save(directory)
        else:
            self.hf.save_pretrained(str(Path(directory) / "tokenizer"))
