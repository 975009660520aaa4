"""The splits of the scenes benchmark: long-tailed train, iid / prior-shift / POPE test sets.

Answer distributions (VQA-CP's construction, Agrawal et al. 2018, made generative): every
question *template* (the text with its colour, shape and size words blanked, e.g. "what color is
the _?", as VQA-CP groups questions by type) gets a fixed random ranking of its answer space.
Train (and val, and the iid test) keep a candidate question with probability (rank + 1)^-skew,
so each template has head answers and a long tail; the prior-shift test reverses the ranking, so
the answers a model could learn from the question alone are the rare ones there. Scenes themselves are drawn from the
same distribution in every split: only the question/answer pairing shifts.

POPE (Li et al. 2023): per image, present objects as "yes" probes and as many absent objects as
"no" probes, the absent ones chosen at random, by popularity (most frequent types in the train
scenes) or adversarially (the types that co-occur most with the objects present).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from asymoe.data.scenes.questions import YES_NO, Question, questions_for
from asymoe.data.scenes.world import COLOURS, SHAPES, SIZES, Scene, TypePrior, object_types, sample_scene

_ATTRIBUTE_WORDS = re.compile(r"\b(" + "|".join((*COLOURS, *SHAPES, *SIZES)) + r")s?\b")
POPE_SAMPLINGS = ("random", "popular", "adversarial")
POPE_PROBES = 3  # positives and negatives per image, as in POPE
PICK_ATTEMPTS = 50


@dataclass
class Sample:
    scene_index: int
    question: Question


@dataclass
class GeneratedSplit:
    scenes: list[Scene]
    samples: list[Sample]


def template(text: str) -> str:
    """The question with its attribute words blanked: "what color is the circle?" -> "what color is the _?"."""
    return _ATTRIBUTE_WORDS.sub("_", text)


class AnswerRanking:
    """Per question template, a fixed random order of its answer space; weight = (rank + 1)^-skew."""

    def __init__(self, seed: int, skew: float):
        self.seed = seed
        self.skew = skew
        self._ranks: dict[str, dict[str, int]] = {}

    def rank(self, question: Question) -> int:
        key = template(question.text)
        ranks = self._ranks.get(key)
        if ranks is None:
            order = list(question.answers)
            random.Random(f"{self.seed}:answers:{key}").shuffle(order)
            ranks = self._ranks[key] = {answer: r for r, answer in enumerate(order)}
        return ranks[question.answer]

    def weight(self, question: Question, shifted: bool) -> float:
        rank = self.rank(question)
        if shifted:
            rank = len(question.answers) - 1 - rank
        return (rank + 1) ** -self.skew


def generate_split(
    rng: random.Random,
    prior: TypePrior,
    ranking: AnswerRanking,
    families: list[str],
    num_questions: int,
    per_image: int,
    object_range: tuple[int, int],
    margin: float,
    shifted: bool = False,
) -> GeneratedSplit:
    """Scenes and their questions: a family uniformly, a question of it uniformly, kept by weight."""
    scenes: list[Scene] = []
    samples: list[Sample] = []
    while len(samples) < num_questions:
        scene = sample_scene(rng, prior, object_range)
        candidates = {family: questions_for(scene, family, margin, object_range[1]) for family in families}
        asked: set[str] = set()
        for _ in range(per_image * 3):
            if len(asked) == per_image or len(samples) == num_questions:
                break
            question = _pick(rng, candidates[rng.choice(families)], asked, ranking, shifted)
            if question is not None:
                asked.add(question.text)
                samples.append(Sample(len(scenes), question))
        if asked:
            scenes.append(scene)
    return GeneratedSplit(scenes, samples)


def _pick(rng: random.Random, pool: list[Question], asked: set[str], ranking: AnswerRanking, shifted: bool):
    """A question of the pool kept with probability its weight (retried, so families stay balanced).

    The answer is drawn uniformly among the pool's answers first, so that a scene's natural bias
    (most object types are absent, "no" to most comparisons) does not add to the designed skew.
    """
    by_answer: dict[str, list[Question]] = {}
    for question in pool:
        by_answer.setdefault(question.answer, []).append(question)
    answers = sorted(by_answer)
    for _ in range(PICK_ATTEMPTS if pool else 0):
        question = rng.choice(by_answer[rng.choice(answers)])
        if question.text not in asked and rng.random() < ranking.weight(question, shifted):
            return question
    return None


@dataclass
class TypeStatistics:
    """Object-type frequency and pairwise co-occurrence in the train scenes (POPE negatives)."""

    frequency: Counter
    cooccurrence: Counter

    @classmethod
    def of(cls, scenes: list[Scene]) -> TypeStatistics:
        frequency, cooccurrence = Counter(), Counter()
        for scene in scenes:
            kinds = [o.kind for o in scene]
            frequency.update(kinds)
            cooccurrence.update((a, b) for a in kinds for b in kinds if a != b)
        return cls(frequency, cooccurrence)


def pope_negatives(scene: Scene, sampling: str, stats: TypeStatistics, rng: random.Random) -> list[tuple[str, str]]:
    """POPE_PROBES absent object types, chosen by `sampling`."""
    present = {o.kind for o in scene}
    absent = [t for t in object_types() if t not in present]
    if sampling == "random":
        return rng.sample(absent, POPE_PROBES)
    if sampling == "popular":
        score = {t: stats.frequency[t] for t in absent}
    else:
        score = {t: sum(stats.cooccurrence[(p, t)] for p in present) for t in absent}
    # Stable order (types in their fixed order) breaks ties deterministically.
    return sorted(absent, key=lambda t: -score[t])[:POPE_PROBES]


def existence_probe(kind: tuple[str, str], present: bool) -> Question:
    colour, shape = kind
    return Question("existence", f"is there a {colour} {shape}?", "yes" if present else "no", YES_NO)


def generate_pope(
    rng: random.Random, prior: TypePrior, stats: TypeStatistics, num_images: int, object_range: tuple[int, int]
) -> tuple[list[Scene], dict[str, list[Sample]]]:
    """POPE probes on fresh scenes: the same positives in every sampling, negatives per sampling."""
    scenes = [sample_scene(rng, prior, (max(object_range[0], POPE_PROBES), object_range[1])) for _ in range(num_images)]
    probes: dict[str, list[Sample]] = {sampling: [] for sampling in POPE_SAMPLINGS}
    for index, scene in enumerate(scenes):
        positives = [o.kind for o in rng.sample(list(scene), POPE_PROBES)]
        for sampling in POPE_SAMPLINGS:
            negatives = pope_negatives(scene, sampling, stats, rng)
            probe = [existence_probe(kind, True) for kind in positives] + [existence_probe(k, False) for k in negatives]
            probes[sampling].extend(Sample(index, question) for question in probe)
    return scenes, probes


def head_answers(samples: list[Sample], coverage: float = 0.5) -> dict[str, set[str]]:
    """Per question template, its most frequent train answers that together cover `coverage` of it."""
    counts: dict[str, Counter] = {}
    for sample in samples:
        counts.setdefault(template(sample.question.text), Counter())[sample.question.answer] += 1
    heads = {}
    for text, counter in counts.items():
        total, covered, head = sum(counter.values()), 0, set()
        for answer, n in sorted(counter.items(), key=lambda item: (-item[1], item[0])):
            if covered >= coverage * total:
                break
            head.add(answer)
            covered += n
        heads[text] = head
    return heads
