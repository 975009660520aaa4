"""Greedy exact match: the teacher-forced shortcut agrees with real greedy decoding."""

from __future__ import annotations

import torch

from test_moe import batch, tiny_model

EOS, PAD, MAX_NEW = 2, 0, 3


def reference_from_greedy(model, data, prompt_len: int):
    """Prompt + the model's own greedy answer (+ EOS), as a teacher-forced batch."""
    rows = data["input_ids"].shape[0]
    prompt = data["input_ids"][:, :prompt_len]
    lengths = torch.full((rows,), prompt_len)
    generated = model.generate(
        prompt,
        lengths,
        data["evidence_mask"][:, :prompt_len],
        data["image_index"],
        data["pixel_values"],
        MAX_NEW,
        EOS,
        PAD,
    )
    sequences, labels = [], []
    for row in range(rows):
        answer = generated[row].tolist()
        answer = answer[: answer.index(EOS) + 1] if EOS in answer else answer + [EOS]
        sequences.append(prompt[row].tolist() + answer)
        labels.append([-100] * prompt_len + answer)
    width = max(map(len, sequences))
    ids = torch.tensor([s + [PAD] * (width - len(s)) for s in sequences])
    label_ids = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
    attention = ids != PAD
    attention[:, :prompt_len] = True
    return ids, label_ids, attention, lengths


def test_shortcut_equals_greedy_decoding():
    model = tiny_model([])
    model.eval()
    data = batch(model.num_image_tokens)
    prompt_len = 10
    ids, labels, attention, lengths = reference_from_greedy(model, data, prompt_len)
    evidence = torch.zeros_like(attention)
    evidence[:, :prompt_len] = data["evidence_mask"][:, :prompt_len]
    with torch.no_grad():
        logits = model(
            ids, attention, evidence, attention & ~evidence, data["image_index"], pixel_values=data["pixel_values"]
        ).logits
    # The model's own greedy answers are reproduced exactly.
    assert model.teacher_forced_exact_match(logits, labels, lengths, MAX_NEW).all()
    # Any changed answer token is not.
    wrong = labels.clone()
    first = torch.arange(labels.shape[0]), lengths
    wrong[first] = (labels[first] + 1) % 40
    wrong[first] = torch.where(wrong[first] == 4, 5, wrong[first])
    assert not model.teacher_forced_exact_match(logits, wrong, lengths, MAX_NEW).any()
    # An answer longer than the decoding budget cannot match.
    assert not model.teacher_forced_exact_match(logits, labels, lengths, 0).any()


def test_shortcut_checks_every_answer_position_including_eos():
    """Hand-built logits whose argmax is the reference everywhere; one wrong position (EOS too) breaks the match."""
    model = tiny_model([])
    answers = [[7, 8, EOS], [9, EOS]]  # after a 4-token prompt; both fit the 3-token budget
    labels = torch.full((2, 8), -100)
    logits = torch.zeros(2, 8, 40)
    for row, answer in enumerate(answers):
        for offset, token in enumerate(answer):
            labels[row, 4 + offset] = token
            logits[row, 3 + offset, token] = 5.0  # position p predicts token p + 1
    lengths = torch.tensor([4, 4])
    assert model.teacher_forced_exact_match(logits, labels, lengths, MAX_NEW).all()
    for row, answer in enumerate(answers):
        for offset in range(len(answer)):
            wrong = logits.clone()
            wrong[row, 3 + offset, 11] = 9.0  # greedy now picks token 11 there
            match = model.teacher_forced_exact_match(wrong, labels, lengths, MAX_NEW)
            assert match.tolist() == [row != 0, row != 1], (row, offset)
