"""Benchmark metrics on already-parsed answers: VQA soft accuracy, exact match, POPE, multiple choice.

- VQA soft accuracy (Antol et al. 2015, VQAv2 evaluation): with the 10 human answers, the accuracy
  of a prediction is the mean over the 10 leave-one-out subsets of 9 answers of min(#matches / 3, 1);
  prediction and human answers are compared after `normalize_answer`.
- POPE (Li et al. 2023): a yes/no answer is "no" when its first sentence holds the word no/not,
  else "yes" (the POPE/LLaVA reading of free-form answers); positive class = yes.
- Multiple choice (ScienceQA): the chosen letter is a bare letter, "(B)", "B." / "B)", or the
  letter after "The answer is"; anything else counts as wrong and is reported as unparsed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from asymoe.evaluation.normalize import normalize_answer

CHOICE_PATTERNS = (re.compile(r"^\(?([A-Z])[\.\):]?$"), re.compile(r"answer is:?\s*\(?([A-Z])\b"))


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    predicted = normalize_answer(prediction)
    human = [normalize_answer(answer) for answer in answers]
    scores = []
    for left_out in range(len(human)):
        matches = sum(answer == predicted for i, answer in enumerate(human) if i != left_out)
        scores.append(min(matches / 3.0, 1.0))
    return sum(scores) / len(scores)


def gqa_normalize(text: str) -> str:
    """GQA answers are single lower-case words or phrases: compare lower-cased, without a final period."""
    return text.strip().rstrip(".").strip().lower()


def exact_match(prediction: str, answer: str) -> bool:
    return gqa_normalize(prediction) == gqa_normalize(answer)


def pope_answer(text: str) -> str:
    first_sentence = text.split(".")[0].replace(",", "")
    words = first_sentence.lower().split()
    return "no" if "no" in words or "not" in words else "yes"


def pope_metrics(labels: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """labels: "yes"/"no"; predictions: free-form answers (parsed with `pope_answer`)."""
    parsed = [pope_answer(text) for text in predictions]
    pairs = list(zip((label.strip().lower() for label in labels), parsed))
    tp = sum(label == "yes" and answer == "yes" for label, answer in pairs)
    fp = sum(label == "no" and answer == "yes" for label, answer in pairs)
    tn = sum(label == "no" and answer == "no" for label, answer in pairs)
    fn = sum(label == "yes" and answer == "no" for label, answer in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / len(pairs),
    }


def parse_choice(text: str, num_choices: int) -> int | None:
    """The 0-based option index a multiple-choice answer names, or None."""
    text = text.strip()
    for pattern in CHOICE_PATTERNS:
        match = pattern.search(text)
        if match:
            index = ord(match.group(1)) - ord("A")
            return index if index < num_choices else None
    return None
