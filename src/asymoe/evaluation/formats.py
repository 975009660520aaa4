"""Readers of the benchmarks' own files and the scores computed from them (formats: see the package docstring)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from asymoe.data.records import DataError
from asymoe.evaluation.metrics import exact_match, parse_choice, pope_metrics, vqa_soft_accuracy

ID_KEYS = ("question_id", "questionId", "pid", "id")
ANSWER_KEYS = ("answer", "prediction", "text")


def _read_json_or_jsonl(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not JSON ({error.msg})") from None
    return items


def _field(item: dict, keys: tuple[str, ...], path: Path, what: str):
    for key in keys:
        if key in item:
            return item[key]
    raise DataError(f"{path}: an entry has no {what} (looked for {', '.join(keys)}): {str(item)[:80]}")


def read_predictions(path: Path) -> dict[str, str]:
    """question id -> answer text, from a results JSON list or an answer JSONL (LLaVA's format)."""
    items = _read_json_or_jsonl(path)
    if isinstance(items, dict):
        items = [{"question_id": key, "answer": value} for key, value in items.items()]
    return {
        str(_field(item, ID_KEYS, path, "question id")): str(_field(item, ANSWER_KEYS, path, "answer"))
        for item in items
    }


def _paired(annotations: dict[str, object], predictions: dict[str, str], path: Path) -> list[str]:
    unknown = [qid for qid in predictions if qid not in annotations]
    if unknown:
        raise DataError(f"{path}: {len(unknown)} predictions for questions the annotations lack (first: {unknown[0]})")
    if not predictions:
        raise DataError(f"{path}: no predictions")
    return list(predictions)


def _coverage(ids: list[str], annotations: dict) -> dict[str, float]:
    return {"questions": float(len(ids)), "coverage": len(ids) / len(annotations)}


def score_vqav2(annotation_path: Path, prediction_path: Path) -> dict[str, float]:
    data = _read_json_or_jsonl(annotation_path)
    entries = data["annotations"] if isinstance(data, dict) and "annotations" in data else data
    annotations = {str(entry["question_id"]): entry for entry in entries}
    predictions = read_predictions(prediction_path)
    ids = _paired(annotations, predictions, prediction_path)
    by_type: dict[str, list[float]] = {}
    scores = []
    for qid in ids:
        entry = annotations[qid]
        answers = [a["answer"] if isinstance(a, dict) else a for a in entry["answers"]]
        score = vqa_soft_accuracy(predictions[qid], answers)
        scores.append(score)
        by_type.setdefault(entry.get("answer_type", "all"), []).append(score)
    result = {"accuracy": sum(scores) / len(scores), **_coverage(ids, annotations)}
    if len(by_type) > 1:
        result.update({f"accuracy_{kind.replace('/', '_')}": sum(v) / len(v) for kind, v in sorted(by_type.items())})
    return result


def score_gqa(annotation_path: Path, prediction_path: Path) -> dict[str, float]:
    data = _read_json_or_jsonl(annotation_path)
    annotations = data if isinstance(data, dict) else {str(_field(e, ID_KEYS, annotation_path, "id")): e for e in data}
    predictions = read_predictions(prediction_path)
    ids = _paired(annotations, predictions, prediction_path)
    correct = [exact_match(predictions[qid], annotations[qid]["answer"]) for qid in ids]
    return {"accuracy": sum(correct) / len(correct), **_coverage(ids, annotations)}


def score_pope(annotation_path: Path, prediction_path: Path) -> dict[str, float]:
    items = _read_json_or_jsonl(annotation_path)
    annotations = {str(_field(item, ID_KEYS, annotation_path, "question id")): item for item in items}
    predictions = read_predictions(prediction_path)
    ids = _paired(annotations, predictions, prediction_path)
    result = pope_metrics([annotations[qid]["label"] for qid in ids], [predictions[qid] for qid in ids])
    return {**result, **_coverage(ids, annotations)}


def score_scienceqa(annotation_path: Path, prediction_path: Path) -> dict[str, float]:
    problems = _read_json_or_jsonl(annotation_path)
    with_image = {pid: p for pid, p in problems.items() if p.get("image")}
    predictions = read_predictions(prediction_path)
    predictions = {pid: text for pid, text in predictions.items() if pid in with_image or pid not in problems}
    ids = _paired(with_image, predictions, prediction_path)
    chosen = [parse_choice(predictions[pid], len(with_image[pid]["choices"])) for pid in ids]
    correct = [choice == with_image[pid]["answer"] for pid, choice in zip(ids, chosen)]
    return {
        "accuracy": sum(correct) / len(correct),
        "unparsed": float(sum(choice is None for choice in chosen)),
        **_coverage(ids, with_image),
    }


SCORERS: dict[str, Callable[[Path, Path], dict[str, float]]] = {
    "vqav2": score_vqav2,
    "gqa": score_gqa,
    "pope": score_pope,
    "scienceqa": score_scienceqa,
}


def score(benchmark: str, annotation_path: str | Path, prediction_path: str | Path) -> dict[str, float]:
    if benchmark not in SCORERS:
        raise DataError(f"benchmark '{benchmark}' is not known; use one of {', '.join(SCORERS)}")
    try:
        return SCORERS[benchmark](Path(annotation_path), Path(prediction_path))
    except (KeyError, TypeError, AttributeError) as error:
        raise DataError(
            f"{annotation_path}: not a {benchmark} annotation file ({type(error).__name__}: {error})"
        ) from None
