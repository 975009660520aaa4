"""The input conditions the analysis compares with the real (image, question) pairs.

- blank image: every image replaced by the all-zero tensor in the encoder's normalised input
  space, i.e. a flat image of the preprocessing mean colour (no content, ordinary statistics);
- memory-driven context (Eq. 4's f_mem): the blank image, and the question tokens (the prompt's
  language evidence positions) permuted at random within each sequence, so every sequence keeps
  its length, its template and its multiset of words but loses their order and the image;
- swapped image: each question is asked about another image of the analysed questions for which
  the same question (identical prompt tokens) has a different correct answer; a question without
  such a partner is left out of the swap measurements.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from asymoe.data.records import Encoded
from asymoe.training.metrics import normalise_answer

REJECTION_TRIES = 32


def blank_images(batch: dict) -> dict:
    """The batch with every image blanked (all-zero normalised pixels)."""
    pixels = batch["pixel_values"]
    return {**batch, "pixel_values": None if pixels is None else torch.zeros_like(pixels)}


def shuffled_question(batch: dict, image_token_id: int, generator: torch.Generator) -> dict:
    """The batch with its question tokens (language evidence positions) permuted within each sequence."""
    input_ids = batch["input_ids"].clone()
    question = batch["evidence_mask"] & batch["attention_mask"] & (input_ids != image_token_id)  # (B, S)
    for row in range(input_ids.shape[0]):
        positions = torch.where(question[row])[0]
        order = torch.randperm(positions.numel(), generator=generator).to(positions.device)
        input_ids[row, positions] = input_ids[row, positions[order]]
    return {**batch, "input_ids": input_ids}


def question_key(sample: Encoded, image_token_id: int) -> tuple[int, ...]:
    """The question's identity: its prompt's language evidence tokens, in order."""
    return tuple(
        token
        for token, is_evidence in zip(sample.input_ids[: sample.prompt_length], sample.evidence)
        if is_evidence and token != image_token_id
    )


def swap_partners(samples: Sequence[Encoded], image_token_id: int, seed: int = 0) -> list[int | None]:
    """For each sample, another sample with the same question, another image and another answer (or None)."""
    rng = random.Random(seed)
    keys = [question_key(sample, image_token_id) for sample in samples]
    answers = [normalise_answer(sample.answer_text) for sample in samples]
    by_question: dict[tuple[int, ...], list[int]] = {}
    for index, key in enumerate(keys):
        by_question.setdefault(key, []).append(index)

    def fits(i: int, j: int) -> bool:
        return answers[j] != answers[i] and samples[j].image_key != samples[i].image_key

    partners: list[int | None] = []
    for i, key in enumerate(keys):
        pool = by_question[key]
        choice = next((j for j in (rng.choice(pool) for _ in range(REJECTION_TRIES)) if fits(i, j)), None)
        if choice is None:  # rare answers: fall back to the exact candidate list
            candidates = [j for j in pool if fits(i, j)]
            choice = rng.choice(candidates) if candidates else None
        partners.append(choice)
    return partners
