"""Benchmark scoring on small hand-computed fixtures in each benchmark's own file format."""

from __future__ import annotations

import json

import pytest

from asymoe.cli import main
from asymoe.data.records import DataError
from asymoe.evaluation.formats import score
from asymoe.evaluation.metrics import parse_choice, pope_metrics, vqa_soft_accuracy
from asymoe.evaluation.normalize import normalize_answer
from asymoe.evaluation.report import markdown_table, write_report


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Yes.", "yes"),
        ("Two dogs!", "2 dogs"),
        ("the red, white", "red white"),
        ("dont know", "don't know"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("black-and-white", "black and white"),
        ("An Apple\n", "apple"),
        ("couldntve", "couldn't've"),
    ],
)
def test_vqa_answer_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_vqa_soft_accuracy_leave_one_out():
    split = ["yes"] * 2 + ["no"] * 8
    # Leaving out a "yes" leaves 1 match (1/3), leaving out a "no" 2 (2/3): (2/3 + 16/3) / 10.
    assert vqa_soft_accuracy("yes", split) == pytest.approx(0.6)
    assert vqa_soft_accuracy("No.", split) == pytest.approx(1.0)
    assert vqa_soft_accuracy("maybe", split) == 0.0
    # "two" normalises to "2": 3 subsets with 2 matches (2/3), 7 with 3 (1).
    assert vqa_soft_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_soft_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)


def write(path, payload, jsonl=False):
    path.write_text("\n".join(json.dumps(item) for item in payload) if jsonl else json.dumps(payload))
    return path


def test_vqav2_files(tmp_path):
    def answers(values):
        return [{"answer": value, "answer_confidence": "yes", "answer_id": i + 1} for i, value in enumerate(values)]

    annotations = {"annotations": [
        {"question_id": 1, "answer_type": "yes/no", "answers": answers(["yes"] * 2 + ["no"] * 8)},
        {"question_id": 2, "answer_type": "number", "answers": answers(["2"] * 3 + ["3"] * 7)},
        {"question_id": 3, "answer_type": "other", "answers": answers(["red"] * 10)},
    ]}  # fmt: skip
    predictions = [{"question_id": 1, "answer": "Yes"}, {"question_id": 2, "answer": "two"},
                   {"question_id": 3, "answer": "blue"}]  # fmt: skip
    result = score("vqav2", write(tmp_path / "ann.json", annotations), write(tmp_path / "pred.json", predictions))
    assert result["accuracy"] == pytest.approx((0.6 + 0.9 + 0.0) / 3)
    assert result["accuracy_yes_no"] == pytest.approx(0.6) and result["accuracy_number"] == pytest.approx(0.9)
    assert result["accuracy_other"] == 0.0 and result["coverage"] == 1.0
    write(tmp_path / "bad.json", [{"question_id": 9, "answer": "x"}])
    with pytest.raises(DataError, match="1 predictions for questions the annotations lack"):
        score("vqav2", tmp_path / "ann.json", tmp_path / "bad.json")


def test_gqa_exact_match(tmp_path):
    questions = {"a": {"answer": "left"}, "b": {"answer": "no"}, "c": {"answer": "table"}}
    predictions = [{"questionId": "a", "prediction": "Left."}, {"questionId": "b", "prediction": "yes"}]
    result = score("gqa", write(tmp_path / "q.json", questions), write(tmp_path / "p.json", predictions))
    assert result == {"accuracy": 0.5, "questions": 2.0, "coverage": pytest.approx(2 / 3)}


def test_pope_metrics(tmp_path):
    labels = ["yes", "yes", "yes", "no", "no", "no", "no", "no"]
    answers = [
        "Yes, there is a dog.",
        "No.",
        "yes",
        "There is not a cat.",
        "No, there isn't",
        "Yes",
        "no",
        "I think so. No wait",
    ]  # parsed: y n y n n y n y -> TP 2, FN 1, TN 3, FP 2
    expected = {"accuracy": 5 / 8, "precision": 0.5, "recall": 2 / 3, "f1": 4 / 7, "yes_ratio": 0.5}
    assert pope_metrics(labels, answers) == pytest.approx(expected)
    questions = [{"question_id": i, "image": f"{i}.jpg", "text": "Is there a dog?", "label": label}
                 for i, label in enumerate(labels)]  # fmt: skip
    predictions = [{"question_id": i, "prompt": "", "text": text} for i, text in enumerate(answers)]
    result = score("pope", write(tmp_path / "q.jsonl", questions, True), write(tmp_path / "a.jsonl", predictions, True))
    assert result == pytest.approx({**expected, "questions": 8.0, "coverage": 1.0})


def test_scienceqa_img_multiple_choice(tmp_path):
    problems = {
        "1": {"choices": ["a", "b", "c"], "answer": 2, "image": "image.png", "split": "test"},
        "2": {"choices": ["x", "y"], "answer": 0, "image": "image.png", "split": "test"},
        "3": {"choices": ["p", "q"], "answer": 1, "image": None, "split": "test"},  # no image: not in -IMG
        "4": {"choices": ["a", "b", "c", "d"], "answer": 3, "image": "image.png", "split": "test"},
    }
    answers = [{"question_id": "1", "text": "C"}, {"question_id": "2", "text": "The answer is B."},
               {"question_id": "3", "text": "B"}, {"question_id": "4", "text": "I don't know"}]  # fmt: skip
    result = score("scienceqa", write(tmp_path / "p.json", problems), write(tmp_path / "a.jsonl", answers, True))
    assert result == pytest.approx({"accuracy": 1 / 3, "unparsed": 1.0, "questions": 3.0, "coverage": 1.0})
    assert [parse_choice(t, 4) for t in ("(B)", "D.", "E", "answer is: A")] == [1, 3, None, 0]


def test_report_json_markdown_tensorboard_and_cli(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = write_report({"gqa": {"accuracy": 0.5, "questions": 2.0}}, tmp_path / "out")
    assert results == {"gqa": {"accuracy": 0.5, "questions": 2.0}}
    assert markdown_table(results) == "| benchmark | accuracy | questions |\n|---|---|---|\n| gqa | 50.00 | 2 |\n"
    questions = [{"question_id": 0, "text": "Is there a cat?", "label": "no"},
                 {"question_id": 1, "text": "Is there a dog?", "label": "yes"}]  # fmt: skip
    answers = [{"question_id": 0, "text": "Yes"}, {"question_id": 1, "text": "Yes"}]
    assert main(["evaluate", "pope", str(write(tmp_path / "q.jsonl", questions, True)),
                 str(write(tmp_path / "a.jsonl", answers, True)), "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    assert "| pope | 50.00 |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert set(saved) == {"gqa", "pope"} and saved["pope"]["precision"] == 0.5 and saved["pope"]["yes_ratio"] == 1.0
    events = EventAccumulator(str(tmp_path / "out" / "tb"))
    events.Reload()
    assert events.Scalars("eval/pope/recall")[-1].value == 1.0
    assert main(["evaluate", "vqa", str(tmp_path / "q.jsonl"), str(tmp_path / "a.jsonl")]) == 2
