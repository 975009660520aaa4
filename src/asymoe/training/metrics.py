"""Evaluation metrics per split: exact-match accuracy overall, per question type and per answer group,
and, for splits whose every answer is yes/no (POPE probes), the binary metrics with "yes" positive.

Names: `<split>/accuracy`, `<split>/accuracy_<question type>` ("/" in a type becomes "_",
e.g. easy-VQA's `test/accuracy_yes_no`), `<split>/accuracy_head|tail`, and for yes/no splits
`<split>/precision|recall|f1|yes_ratio` (POPE, Li et al. 2023: a prediction other than "yes" counts
as "no"). The tally is plain counting: every rank evaluates the whole split, so it needs no reduction.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

YES, NO = "yes", "no"


def normalise_answer(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def metric_key(name: str) -> str:
    return name.replace("/", "_")


@dataclass
class SplitTally:
    correct: Counter = field(default_factory=Counter)  # key -> correct answers
    total: Counter = field(default_factory=Counter)  # key -> questions
    confusion: Counter = field(default_factory=Counter)  # "tp" | "fp" | "tn" | "fn", "yes" positive
    binary: bool = True  # every reference answer so far is yes/no
    loss_sum: float = 0.0  # batch-mean LM losses weighted by batch size
    loss_weight: int = 0


def binary_metrics(confusion: Counter) -> dict[str, float]:
    """Precision, recall, F1 and the share of "yes" predictions, from yes/no outcomes."""
    tp, fp, fn = confusion["tp"], confusion["fp"], confusion["fn"]
    total = sum(confusion.values())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "yes_ratio": (tp + fp) / total if total else 0.0}


class EvalTally:
    """Counts per split; `update` takes one question's outcome, `compute` returns the named metrics."""

    def __init__(self):
        self.splits: dict[str, SplitTally] = {}

    def update(
        self,
        split: str,
        prediction: str,
        reference: str,
        question_type: str | None = None,
        answer_group: str | None = None,
    ) -> bool:
        """Record one answer (texts compared after normalisation); returns whether it was correct."""
        tally = self.splits.setdefault(split, SplitTally())
        prediction, reference = normalise_answer(prediction), normalise_answer(reference)
        correct = prediction == reference
        keys = ["accuracy"]
        if question_type is not None:
            keys.append(f"accuracy_{metric_key(question_type)}")
        if answer_group is not None:
            keys.append(f"accuracy_{answer_group}")
        for key in keys:
            tally.total[key] += 1
            tally.correct[key] += correct
        tally.binary &= reference in (YES, NO)
        said_yes = prediction == YES
        tally.confusion[("tp" if said_yes else "fn") if reference == YES else ("fp" if said_yes else "tn")] += 1
        return correct

    def add_loss(self, split: str, batch_mean_loss: float, batch_size: int) -> None:
        tally = self.splits.setdefault(split, SplitTally())
        tally.loss_sum += batch_mean_loss * batch_size
        tally.loss_weight += batch_size

    def compute(self, split: str) -> dict[str, float]:
        tally = self.splits.get(split)
        if tally is None:
            return {}
        metrics = {f"{split}/{key}": tally.correct[key] / n for key, n in tally.total.items()}
        if tally.loss_weight:
            metrics[f"{split}/lm_loss"] = tally.loss_sum / tally.loss_weight
        if tally.binary and tally.total:
            metrics.update({f"{split}/{key}": value for key, value in binary_metrics(tally.confusion).items()})
        return metrics

    def reset(self) -> None:
        self.splits = {}
