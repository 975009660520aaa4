"""Tokenizers with one interface: a word-level tokenizer for scratch LMs, or a local HF tokenizer.

Both expose encode/decode, the special ids the pipeline needs (pad, bos, eos, image placeholder)
and the role markers that frame each turn of a conversation.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from asymoe.config import ConfigError
from asymoe.files import write_text_atomic

IMAGE_TOKEN = "<image>"
_WORD = re.compile(r"<image>|\w+|[^\w\s]")


class Tokenizer(Protocol):
    pad_id: int
    bos_id: int
    eos_id: int
    image_id: int
    user_ids: list[int]
    assistant_ids: list[int]
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: Path) -> None: ...


class WordTokenizer:
    """Lower-cased words and punctuation; vocabulary built from the training text."""

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", IMAGE_TOKEN, "<user>", "<assistant>")
    # The framing `encode_record` writes, as a chat template for the exported tokenizer.
    CHAT_TEMPLATE = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<user>{{ m['content'] }}"
        "{% else %}<assistant>{{ m['content'] }}<eos>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    FILENAME = "tokenizer.json"

    def __init__(self, vocab: list[str]):
        assert tuple(vocab[: len(self.SPECIALS)]) == self.SPECIALS, "vocab must start with the special tokens"
        self.vocab = list(vocab)
        self.index = {token: i for i, token in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.image_id = range(5)
        self.user_ids = [self.index["<user>"]]
        self.assistant_ids = [self.index["<assistant>"]]

    @classmethod
    def build(cls, texts: Iterable[str]) -> WordTokenizer:
        counts = Counter(token for text in texts for token in cls.split(text) if token not in cls.SPECIALS)
        return cls(list(cls.SPECIALS) + sorted(counts))

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(token, self.unk_id) for token in self.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        words = []
        for i in ids:
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            words.append(self.vocab[i])
        return " ".join(words)

    def save(self, directory: Path) -> None:
        # Atomic: another rank of the same run may be loading it (`VQADataModule.prepare`).
        write_text_atomic(Path(directory) / self.FILENAME, json.dumps({"kind": "word", "vocab": self.vocab}))

    @classmethod
    def load(cls, directory: Path) -> WordTokenizer:
        data = json.loads((Path(directory) / cls.FILENAME).read_text())
        return cls(data["vocab"])

    def to_hf(self):
        """The same tokenizer as a transformers PreTrainedTokenizerFast (the `tokenizers` library):
        identical ids for every text, so an exported run loads with AutoTokenizer."""
        from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(self.vocab)}, unk_token="<unk>"))
        backend.normalizer = normalizers.Lowercase()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated")]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            chat_template=self.CHAT_TEMPLATE,
            pad_token="<pad>",
            bos_token="<bos>",
            eos_token="<eos>",
            unk_token="<unk>",
            additional_special_tokens=[IMAGE_TOKEN, "<user>", "<assistant>"],
        )


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory, with `<image>` added as a special token."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"model.language.pretrained_path: cannot load a tokenizer from {path} ({error})"
            ) from None
        if IMAGE_TOKEN not in self.tokenizer.get_vocab():
            self.tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        tok = self.tokenizer
        self.image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.eos_id = tok.eos_token_id
        if self.eos_id is None:
            raise ConfigError(f"model.language.pretrained_path: tokenizer in {path} has no eos token")
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else self.eos_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        markers = chat_markers(tok)
        if markers is None:
            self.user_ids = tok.encode("USER:", add_special_tokens=False)
            self.assistant_ids = tok.encode(" ASSISTANT:", add_special_tokens=False)
        else:
            self.user_ids, self.assistant_ids, self.eos_id = markers

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def save(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(str(Path(directory) / "tokenizer"))


def chat_markers(tokenizer) -> tuple[list[int], list[int], int] | None:
    """(user header, end-of-user + assistant header, end-of-turn id) from the tokenizer's chat template.

    The template is rendered for two exchanges with sentinel contents; what lies between them is
    the framing. A conversation then encodes as <bos> user-header question assistant-header answer
    <end-of-turn>, as the template writes it, except that the template's default system prompt and
    any text after the end-of-turn token (e.g. a newline) are not inserted. None: no template, or
    one whose turns do not end with one special token (the plain `USER: ... ASSISTANT:` framing is used).
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    sentinels = ["\x00q1\x00", "\x00a1\x00", "\x00q2\x00", "\x00a2\x00"]
    messages = [{"role": role, "content": text} for role, text in zip(["user", "assistant"] * 2, sentinels)]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    parts, rest = [], text
    for sentinel in sentinels:
        if sentinel not in rest:
            return None
        before, rest = rest.split(sentinel, 1)
        parts.append(before)
    _, assistant_header, between, second_assistant_header = parts
    end_ids = tokenizer.encode(rest, add_special_tokens=False)
    if assistant_header != second_assistant_header or not end_ids or end_ids[0] not in tokenizer.all_special_ids:
        return None
    end_text = tokenizer.convert_ids_to_tokens(end_ids[0])
    if not between.startswith(end_text):
        return None
    encode = lambda piece: tokenizer.encode(piece, add_special_tokens=False)  # noqa: E731
    user_header = between[len(end_text) :].lstrip("\n")
    return encode(user_header), encode(assistant_header), end_ids[0]
