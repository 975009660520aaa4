"""Conversation records, their encoding into token ids and masks, batching and collation.

Template (one sequence per record):
    <bos> USER {user turn, with <image> expanded to one placeholder per visual token}
          ASSISTANT {answer} <eos> [USER ... ASSISTANT ... <eos>]
- labels: assistant content and its <eos> (everything else -100);
- evidence mask: user-turn content, image placeholders included (never role markers, answers,
  padding): the positions AsyMoE's evidence-priority experts may attend to;
- answer mask: the supervised positions;
- prompt length: everything before the last answer, which evaluation decodes greedily.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch.utils.data import Sampler

from asymoe.data.tokenizer import IMAGE_TOKEN, Tokenizer


class DataError(ValueError):
    """A problem with a data record or file; the message names the file and record."""


@dataclass
class Record:
    turns: list[tuple[str, str]]  # (role, text), role in {"user", "assistant"}, alternating
    image_key: str | None  # key into the split's image store
    origin: str  # "file:index" for error messages
    # The question family (a metric of its own) and head | tail (how common the answer is in train).
    question_type: str | None = None
    answer_group: str | None = None


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    evidence: list[bool]
    answer: list[bool]
    prompt_length: int
    answer_text: str
    image_key: str | None
    question_type: str | None
    answer_group: str | None = None
    origin: str = ""  # the record's "file:index", for reports about a training batch


def encode_record(record: Record, tokenizer: Tokenizer, num_image_tokens: int) -> Encoded:
    ids: list[int] = [tokenizer.bos_id]
    labels: list[int] = [-100]
    evidence: list[bool] = [False]
    answer: list[bool] = [False]
    prompt_length = 0
    images_seen = 0

    def extend(tokens: list[int], supervised: bool, is_evidence: bool) -> None:
        ids.extend(tokens)
        labels.extend(tokens if supervised else [-100] * len(tokens))
        evidence.extend([is_evidence] * len(tokens))
        answer.extend([supervised] * len(tokens))

    for role, text in record.turns:
        if role == "user":
            extend(tokenizer.user_ids, False, False)
            pieces = text.split(IMAGE_TOKEN)
            for i, piece in enumerate(pieces):
                if i > 0:
                    extend([tokenizer.image_id] * num_image_tokens, False, True)
                    images_seen += 1
                if piece.strip():
                    extend(tokenizer.encode(piece), False, True)
        else:
            extend(tokenizer.assistant_ids, False, False)
            prompt_length = len(ids)
            extend(tokenizer.encode(text) + [tokenizer.eos_id], True, False)
    expected_images = 1 if record.image_key is not None else 0
    if images_seen != expected_images:
        raise DataError(f"{record.origin}: {images_seen} '{IMAGE_TOKEN}' markers for {expected_images} image(s)")
    return Encoded(
        input_ids=ids,
        labels=labels,
        evidence=evidence,
        answer=answer,
        prompt_length=prompt_length,
        answer_text=record.turns[-1][1],
        image_key=record.image_key,
        question_type=record.question_type,
        answer_group=record.answer_group,
        origin=record.origin,
    )


def without_image(record: Record) -> Record:
    """The record as a text-only question: no image, no `<image>` marker (the question-only reading)."""
    turns = [(role, " ".join(text.replace(IMAGE_TOKEN, " ").split())) for role, text in record.turns]
    return replace(record, turns=turns, image_key=None)


def check_turns(turns: list[tuple[str, str]], origin: str) -> None:
    if not turns:
        raise DataError(f"{origin}: empty conversation")
    for i, (role, text) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(
                f"{origin}: turn {i} is from '{role}', expected '{expected}' (turns must alternate, user first)"
            )
        if not text.strip():
            raise DataError(f"{origin}: turn {i} is empty")
    if turns[-1][0] != "assistant":
        raise DataError(f"{origin}: conversation does not end with an assistant turn")


class ImageGroupedBatchSampler(Sampler[list[int]]):
    """Batches holding every sample of `images_per_batch` images, so each image is encoded once.

    Image order is shuffled every epoch when `shuffle`; samples without an image are grouped in
    runs of the same size.
    """

    def __init__(
        self,
        image_keys: Sequence[str | None],
        images_per_batch: int,
        shuffle: bool,
        seed: int = 0,
        max_samples_per_batch: int | None = None,
    ):
        groups: dict[object, list[int]] = {}
        for index, key in enumerate(image_keys):
            groups.setdefault(key if key is not None else ("text", index), []).append(index)
        self.groups = list(groups.values())
        if max_samples_per_batch is not None:
            # An image with more questions than fit in a batch (a blind split's one blank image)
            # is encoded once per chunk of its questions.
            step = max_samples_per_batch
            self.groups = [group[i : i + step] for group in self.groups for i in range(0, len(group), step)]
        self.images_per_batch = images_per_batch
        self.max_samples_per_batch = max_samples_per_batch
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        order = list(range(len(self.groups)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
            self.epoch += 1
        batches, current, images = [], [], 0
        for g in order:
            group = self.groups[g]
            full = images == self.images_per_batch or (
                self.max_samples_per_batch is not None
                and current
                and len(current) + len(group) > self.max_samples_per_batch
            )
            if full:
                batches.append(current)
                current, images = [], 0
            current.extend(group)
            images += 1
        if current:
            batches.append(current)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        images = len(self.groups)
        if self.max_samples_per_batch is None:
            return (images + self.images_per_batch - 1) // self.images_per_batch
        assert not self.shuffle, "a sample-capped sampler is for evaluation (fixed order)"
        return len(self._batches())


def make_collate(
    samples: Sequence[Encoded],
    load_image: Callable[[str], torch.Tensor],
    pad_id: int,
    split: str = "train",
) -> Callable[[list[int]], dict]:
    """Collate sample indices into a right-padded batch with one pixel tensor per distinct image.

    `split` names the batch's split, which evaluation reports its metrics under.
    """

    def collate(indices: list[int]) -> dict:
        batch = [samples[i] for i in indices]
        keys: list[str] = []
        slot: dict[str, int] = {}
        image_index = []
        for sample in batch:
            if sample.image_key is None:
                image_index.append(-1)
                continue
            if sample.image_key not in slot:
                slot[sample.image_key] = len(keys)
                keys.append(sample.image_key)
            image_index.append(slot[sample.image_key])
        width = max(len(s.input_ids) for s in batch)
        size = (len(batch), width)
        input_ids = torch.full(size, pad_id, dtype=torch.long)
        labels = torch.full(size, -100, dtype=torch.long)
        attention = torch.zeros(size, dtype=torch.bool)
        evidence = torch.zeros(size, dtype=torch.bool)
        answer = torch.zeros(size, dtype=torch.bool)
        for row, sample in enumerate(batch):
            n = len(sample.input_ids)
            input_ids[row, :n] = torch.tensor(sample.input_ids)
            labels[row, :n] = torch.tensor(sample.labels)
            attention[row, :n] = True
            evidence[row, :n] = torch.tensor(sample.evidence)
            answer[row, :n] = torch.tensor(sample.answer)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention,
            "evidence_mask": evidence,
            "answer_mask": answer,
            "image_index": torch.tensor(image_index, dtype=torch.long),
            "pixel_values": torch.stack([load_image(k) for k in keys]) if keys else None,
            "prompt_lengths": torch.tensor([s.prompt_length for s in batch], dtype=torch.long),
            "answers": [s.answer_text for s in batch],
            "question_types": [s.question_type for s in batch],
            "answer_groups": [s.answer_group for s in batch],
            "split": split,
        }

    return collate
