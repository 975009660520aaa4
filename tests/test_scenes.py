"""The scenes benchmark: determinism, hand-checked answers, the prior shift, POPE, the cache, training runs."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from asymoe import config as config_lib
from asymoe.config.schema import ScenesConfig
from asymoe.data.records import ImageGroupedBatchSampler
from asymoe.data.scenes import FAMILIES, dataset
from asymoe.data.scenes.questions import questions_for
from asymoe.data.scenes.splits import TypeStatistics, pope_negatives
from asymoe.data.scenes.world import SceneObject, object_types
from asymoe.data.sources import load_llava_json
from asymoe.training.metrics import EvalTally
from asymoe.training.run import fit
from conftest import EXPERIMENTS, TINY

SMALL = dict(train_questions=300, val_questions=40, test_questions=60, pope_images=8, questions_per_image=6)
SMALL_OVERRIDES = ["data.source=scenes", *(f"data.scenes.{k}={v}" for k, v in SMALL.items())]


def small(tmp_path: Path, **changes) -> ScenesConfig:
    return ScenesConfig(cache_dir=str(tmp_path), **{**SMALL, **changes})


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_scenes(tmp_path):
    first = files_of(dataset.ensure_dataset(small(tmp_path / "a")))
    again = files_of(dataset.ensure_dataset(small(tmp_path / "b")))
    assert first == again and "images/train/000000.png" in first and "blank.png" in first
    other = files_of(dataset.ensure_dataset(small(tmp_path / "c", seed=1)))
    assert other["images/train/000000.png"] != first["images/train/000000.png"]
    assert other["train.json"] != first["train.json"]


# Four objects (x right, y down): two squares, so "the square" is ambiguous; the red circle and
# the red square share x, so left/right between them is not asked.
SCENE = (
    SceneObject("red", "circle", "large", 0.2, 0.2),
    SceneObject("blue", "square", "small", 0.8, 0.2),
    SceneObject("green", "triangle", "small", 0.5, 0.8),
    SceneObject("red", "square", "large", 0.2, 0.8),
)
EXPECTED = {
    "attribute": {
        "what color is the circle?": "red",
        "what shape is the blue object?": "square",
        "what size is the red square?": "large",
        "what size is the blue square?": "small",
    },
    "existence": {"is there a blue square?": "yes", "is there a blue circle?": "no"},
    "count": {
        "how many squares are there?": "2",
        "how many red objects are there?": "2",
        "how many cyan objects are there?": "0",
    },
    "relation": {
        "is the red circle left of the blue square?": "yes",
        "is the red circle above the red square?": "yes",
        "is the green triangle above the blue square?": "no",
    },
    "closest": {
        "what shape is the object furthest from the red circle?": "triangle",  # 0.67 vs 0.60
        "what color is the object closest to the green triangle?": "red",  # red square, 0.30
        "what shape is the object closest to the green triangle?": "square",
    },
    "compare": {
        "are there more squares than circles?": "yes",
        "are there more circles than triangles?": "no",  # 1 vs 1
        "are there more red objects than blue objects?": "yes",
    },
    "two_hop": {
        "what shape is the blue object right of the red square?": "square",
        "what color is the triangle right of the red square?": "green",
        "what color is the circle left of the green triangle?": "red",
    },
}
AMBIGUOUS = {
    "attribute": ["what color is the square?", "what shape is the red object?"],
    "relation": ["is the red circle left of the red square?"],
    "closest": ["what shape is the object closest to the red circle?"],  # 0.60 and 0.60
    # The red square is level with the red circle: "right of" it is unclear, so nothing is asked.
    "two_hop": [
        "what color is the square right of the red circle?",
        "what color is the square above the green triangle?",
    ],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_hand_built_scene_answers(family):
    asked = {q.text: q.answer for q in questions_for(SCENE, family, margin=0.05, max_objects=6)}
    for text, answer in EXPECTED[family].items():
        assert asked.get(text) == answer, text
    for text in AMBIGUOUS.get(family, []):
        assert text not in asked
    assert all(q.family == family and q.answer in q.answers for q in questions_for(SCENE, family, 0.05, 6))


def majority_accuracy(train, test) -> float:
    answers: dict[str, Counter] = defaultdict(Counter)
    for sample in train.samples:
        answers[sample.question.text][sample.question.answer] += 1
    hits = [
        answers[s.question.text].most_common(1)[0][0] == s.question.answer if s.question.text in answers else False
        for s in test.samples
    ]
    return sum(hits) / len(hits)


def test_prior_shift_defeats_a_question_only_predictor(tmp_path):
    splits = dataset.generate(small(tmp_path, train_questions=6000, test_questions=1500))
    iid = majority_accuracy(splits["train"], splits["test_iid"])
    shifted = majority_accuracy(splits["train"], splits["test_prior_shift"])
    assert iid - shifted >= 0.15, (iid, shifted)
    # Head answers dominate train: the long tail is there.
    assert 0.6 < Counter(s.question.family for s in splits["train"].samples).most_common(1)[0][1] / 6000 * 7 < 1.4
    assert iid > 0.4


def test_pope_negatives_follow_their_sampling():
    scene = SCENE[:3]  # red circle, blue square, green triangle
    present = {o.kind for o in scene}
    others = [t for t in object_types() if t not in present]
    popular, partner = others[0], others[1]
    train = [(SceneObject(*popular, "small", 0.1, 0.1),)] * 5 + [
        (SceneObject(*partner, "small", 0.1, 0.1), scene[0])
    ] * 2
    stats = TypeStatistics.of(train)
    import random

    assert pope_negatives(scene, "popular", stats, random.Random(0))[:2] == [popular, partner]
    assert pope_negatives(scene, "adversarial", stats, random.Random(0))[0] == partner
    negatives = pope_negatives(scene, "random", stats, random.Random(0))
    assert len(set(negatives)) == 3 and not set(negatives) & present


def test_pope_and_group_metrics_by_hand():
    tally = EvalTally()
    outcomes = [("yes", "yes"), ("no", "yes"), ("yes", "yes"), ("yes", "no"), ("no", "no"), ("maybe", "no")]
    for i, (prediction, reference) in enumerate(outcomes):
        tally.update("test_pope_random", prediction, reference, "existence", "head" if i < 2 else "tail")
    metrics = tally.compute("test_pope_random")
    # tp = 2, fn = 1, fp = 1, tn = 2 ("maybe" is not "yes").
    assert metrics["test_pope_random/accuracy"] == pytest.approx(3 / 6)
    assert metrics["test_pope_random/precision"] == pytest.approx(2 / 3)
    assert metrics["test_pope_random/recall"] == pytest.approx(2 / 3)
    assert metrics["test_pope_random/f1"] == pytest.approx(2 / 3)
    assert metrics["test_pope_random/yes_ratio"] == pytest.approx(3 / 6)
    assert metrics["test_pope_random/accuracy_head"] == pytest.approx(1 / 2)
    assert metrics["test_pope_random/accuracy_tail"] == pytest.approx(2 / 4)
    tally.update("test_iid", "red", "Red.", "attribute")
    assert tally.compute("test_iid") == {"test_iid/accuracy": 1.0, "test_iid/accuracy_attribute": 1.0}


def test_interrupted_generation_is_not_taken_as_complete(tmp_path, monkeypatch):
    config = small(tmp_path)

    def interrupted(scenes, directory):
        (directory / "train.json").write_text("[]")
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset, "write_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dataset.ensure_dataset(config)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []  # no partial copy left
    monkeypatch.undo()
    directory = dataset.ensure_dataset(config)
    assert json.loads((directory / "manifest.json").read_text())["questions"]["train"] == SMALL["train_questions"]


def test_llava_files_and_blind_split(tmp_path):
    files = dataset.split_files(dataset.ensure_dataset(small(tmp_path)))
    iid, blind = (load_llava_json(str(files[name]), None, "raise") for name in ("test_iid", "test_blind"))
    assert [r.turns for r in iid.records] == [r.turns for r in blind.records]
    assert set(blind.image_paths.values()) == {str(files["test_blind"].parent / "blank.png")}
    assert {r.question_type for r in iid.records} <= set(FAMILIES)
    assert {r.answer_group for r in iid.records} == {"head", "tail"}
    pope = load_llava_json(str(files["test_pope_adversarial"]), None, "raise")
    assert Counter(r.turns[-1][1] for r in pope.records) == {"yes": 24, "no": 24}


def test_eval_batches_split_one_image_with_many_questions():
    sampler = ImageGroupedBatchSampler(["blank"] * 10, images_per_batch=11, shuffle=False, max_samples_per_batch=4)
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.fixture(scope="module")
def scenes_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("scenes_cache"))


# The vision-language experiments (the intent-recognition task has no images to reason over).
VQA_EXPERIMENTS = [p for p in EXPERIMENTS if config_lib.load(p).task == "vqa"]


@pytest.mark.parametrize("path", VQA_EXPERIMENTS, ids=[p.stem for p in VQA_EXPERIMENTS])
def test_every_experiment_trains_on_scenes(path, scenes_cache, tmp_path):
    overrides = TINY + SMALL_OVERRIDES + [f"data.scenes.cache_dir={scenes_cache}", f"output_dir={tmp_path / 'run'}"]
    metrics = fit(config_lib.load(path, overrides))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for split in dataset.TEST_SPLITS:
        assert 0.0 <= saved[f"{split}/accuracy"] <= 1.0
    assert {f"test_iid/accuracy_{family}" for family in FAMILIES} <= set(saved)
    assert {"test_iid/accuracy_head", "test_iid/accuracy_tail", "test_pope_adversarial/f1", "val/accuracy"} <= set(
        saved
    )
    assert "test_iid/precision" not in saved  # mixed answers: no yes/no metrics
    assert metrics["train/loss"] == metrics["train/loss"]


def test_question_only_reading_has_no_image(scenes_cache, tmp_path):
    from asymoe.data.datamodule import VQADataModule

    cfg = config_lib.load(
        "dense", TINY + SMALL_OVERRIDES + [f"data.scenes.cache_dir={scenes_cache}", "data.drop_images=true"]
    )
    datamodule = VQADataModule(cfg)
    tokenizer = datamodule.prepare()
    datamodule.encode(num_image_tokens=4)
    for name, samples in datamodule.samples.items():
        assert all(s.image_key is None and tokenizer.image_id not in s.input_ids for s in samples), name
    assert len(datamodule.test_dataloader()) == len(dataset.TEST_SPLITS)
