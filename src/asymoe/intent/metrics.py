"""Intent-recognition metrics as MIntRec reports them (×100), computed from a confusion matrix.

ACC = accuracy; WF1 / WP = F1 / precision per class averaged with weights = true support; R =
recall averaged uniformly over classes. As in scikit-learn (which the MIntRec benchmarks use), the
classes averaged are those that occur among the targets or the predictions, and a ratio with a
zero denominator counts as 0.

MIntRec 2.0 out-of-scope detection: an utterance whose highest softmax probability is below the
threshold is predicted out-of-scope (id = number of in-scope labels); in-scope figures use only
in-scope utterances and the plain argmax, the out-of-scope figures all utterances over the
in-scope labels plus the out-of-scope class: ACC, macro F1, F1 over in-scope classes (F1-IND) and
F1 of the out-of-scope class (F1-OOS).
"""

from __future__ import annotations

import torch


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts, rows = true class, columns = predicted class."""
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).double()


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    defined = denominator > 0
    return torch.where(defined, numerator / torch.where(defined, denominator, 1.0), torch.zeros_like(numerator))


def per_class_scores(matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, recall, F1 and support per class, and which classes occur at all."""
    true_positive = matrix.diagonal()
    support, predicted = matrix.sum(1), matrix.sum(0)
    precision, recall = _ratio(true_positive, predicted), _ratio(true_positive, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support,
        "present": (support + predicted) > 0,
    }


def classification_metrics(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict:
    """acc, wf1, wp, r (×100, floats) and f1_per_class ((C,) tensor in [0, 1])."""
    matrix = confusion_matrix(predictions, targets, num_classes)
    scores = per_class_scores(matrix)
    weights = scores["support"] / scores["support"].sum().clamp(min=1)
    present = scores["present"]
    return {
        "acc": 100 * float(matrix.diagonal().sum() / matrix.sum().clamp(min=1)),
        "wf1": 100 * float((weights * scores["f1"]).sum()),
        "wp": 100 * float((weights * scores["precision"]).sum()),
        "r": 100 * float(scores["recall"][present].mean()) if present.any() else 0.0,
        "f1_per_class": scores["f1"].float(),
    }


def open_set_metrics(probabilities: torch.Tensor, targets: torch.Tensor, threshold: float) -> dict:
    """Out-of-scope figures (×100): `probabilities` (N, K) over in-scope labels, targets in [0, K]."""
    num_in_scope = probabilities.shape[1]
    confidence, predictions = probabilities.max(dim=1)
    predictions = torch.where(confidence < threshold, torch.full_like(predictions, num_in_scope), predictions)
    matrix = confusion_matrix(predictions, targets, num_in_scope + 1)
    scores = per_class_scores(matrix)
    present = scores["present"]
    in_scope_present = present.clone()
    in_scope_present[num_in_scope] = False
    return {
        "acc": 100 * float(matrix.diagonal().sum() / matrix.sum().clamp(min=1)),
        "f1": 100 * float(scores["f1"][present].mean()) if present.any() else 0.0,
        "f1_ind": 100 * float(scores["f1"][in_scope_present].mean()) if in_scope_present.any() else 0.0,
        "f1_oos": 100 * float(scores["f1"][num_in_scope]),
    }
