"""Question families over a scene: every question a scene answers unambiguously, with its answer.

Families (each reported as its own metric, `accuracy_<family>`):
- attribute: "what color is the circle?" (only when one circle is present), "what shape is the
  red object?", "what size is the red circle?";
- existence: "is there a red circle?";
- count: "how many circles are there?", "how many red objects are there?";
- relation: "is the red circle left of the blue square?" (left / right / above / below; asked only
  when the two centres differ by more than the margin along that axis);
- closest: "what shape is the object closest to the red circle?" (closest / furthest; asked only
  when the runner-up is at least the margin further / nearer);
- compare: "are there more circles than squares?", "... more red objects than blue objects?";
- two_hop: "what color is the circle left of the blue square?" (a filter, a relation, a query:
  asked only when exactly one circle lies beyond the margin on that side and none within it).

Objects are named by colour and shape, which identify one object (types are unique in a scene).
Each question carries its answer space, so that splits can shape the answer distribution per
question text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

from asymoe.config.schema import SceneFamily
from asymoe.data.scenes.world import COLOURS, SHAPES, SIZES, Scene, SceneObject, distance

FAMILIES: tuple[str, ...] = get_args(SceneFamily)
YES_NO = ("yes", "no")
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Question:
    family: str
    text: str
    answer: str
    answers: tuple[str, ...]  # every answer this question text can have


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def offset(a: SceneObject, b: SceneObject, relation: str) -> float:
    """How far `a` lies beyond `b` in the direction of `relation` (negative: the other side)."""
    return {"left of": b.x - a.x, "right of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[relation]


def attribute(scene: Scene, margin: float, max_objects: int) -> list[Question]:
    questions = []
    for shape in SHAPES:
        matching = [o for o in scene if o.shape == shape]
        if len(matching) == 1:
            questions.append(Question("attribute", f"what color is the {shape}?", matching[0].colour, tuple(COLOURS)))
    for colour in COLOURS:
        matching = [o for o in scene if o.colour == colour]
        if len(matching) == 1:
            questions.append(Question("attribute", f"what shape is the {colour} object?", matching[0].shape, SHAPES))
    for obj in scene:
        questions.append(Question("attribute", f"what size is the {obj.name}?", obj.size, SIZES))
    return questions


def existence(scene: Scene, margin: float, max_objects: int) -> list[Question]:
    present = {o.kind for o in scene}
    return [
        Question("existence", f"is there a {colour} {shape}?", _yes_no((colour, shape) in present), YES_NO)
        for colour in COLOURS
        for shape in SHAPES
    ]


def count(scene: Scene, margin: float, max_objects: int) -> list[Question]:
    questions = []
    shape_counts = tuple(str(n) for n in range(max_objects + 1))
    for shape in SHAPES:
        n = sum(o.shape == shape for o in scene)
        questions.append(Question("count", f"how many {shape}s are there?", str(n), shape_counts))
    colour_counts = tuple(str(n) for n in range(min(len(SHAPES), max_objects) + 1))
    for colour in COLOURS:
        n = sum(o.colour == colour for o in scene)
        questions.append(Question("count", f"how many {colour} objects are there?", str(n), colour_counts))
    return questions


def relation(scene: Scene, margin: float, max_objects: int) -> list[Question]:
    questions = []
    for a in scene:
        for b in scene:
            if a is b:
                continue
            for rel in RELATIONS:
                beyond = offset(a, b, rel)
                if abs(beyond) > margin:
                    text = f"is the {a.name} {rel} the {b.name}?"
                    questions.append(Question("relation", text, _yes_no(beyond > 0), YES_NO))
    return questions


def closest(scene: Scene, margin: float, max_objects: int) -> list[Question]:
    questions = []
    for ref in scene:
        others = sorted((o for o in scene if o is not ref), key=lambda o: distance(o, ref))
        if len(others) < 2:
            continue
        for word, first, runner_up in (("closest to", others[0], others[1]), ("furthest from", others[-1], others[-2])):
            if abs(distance(first, ref) - distance(runner_up, ref)) <= margin:
                continue
            questions.append(
                Question("closest", f"what shape is the object {word} the {ref.name}?", first.shape, SHAPES)
            )
            text = f"what color is the object {word} the {ref.name}?"
            questions.append(Question("closest", text, first.colour, tuple(COLOURS)))
    return questions


def compare(scene: Scene, margin: float, max_objects: int) -> list[Question]:
    questions = []
    for a in SHAPES:
        for b in SHAPES:
            if a != b:
                more = sum(o.shape == a for o in scene) > sum(o.shape == b for o in scene)
                questions.append(Question("compare", f"are there more {a}s than {b}s?", _yes_no(more), YES_NO))
    for a in COLOURS:
        for b in COLOURS:
            if a != b:
                more = sum(o.colour == a for o in scene) > sum(o.colour == b for o in scene)
                text = f"are there more {a} objects than {b} objects?"
                questions.append(Question("compare", text, _yes_no(more), YES_NO))
    return questions


def _unique_beyond(candidates: list[SceneObject], ref: SceneObject, rel: str, margin: float) -> SceneObject | None:
    """The one candidate beyond `ref` by more than the margin, if every other is clearly not."""
    beyond = [o for o in candidates if offset(o, ref, rel) > margin]
    unclear = [o for o in candidates if abs(offset(o, ref, rel)) <= margin]
    return beyond[0] if len(beyond) == 1 and not unclear else None


def two_hop(scene: Scene, margin: float, max_objects: int) -> list[Question]:
    questions = []
    for ref in scene:
        others = [o for o in scene if o is not ref]
        for rel in RELATIONS:
            for shape in SHAPES:
                target = _unique_beyond([o for o in others if o.shape == shape], ref, rel, margin)
                if target is not None:
                    text = f"what color is the {shape} {rel} the {ref.name}?"
                    questions.append(Question("two_hop", text, target.colour, tuple(COLOURS)))
            for colour in COLOURS:
                target = _unique_beyond([o for o in others if o.colour == colour], ref, rel, margin)
                if target is not None:
                    text = f"what shape is the {colour} object {rel} the {ref.name}?"
                    questions.append(Question("two_hop", text, target.shape, SHAPES))
    return questions


FAMILY_QUESTIONS: dict[str, Callable[[Scene, float, int], list[Question]]] = {
    "attribute": attribute,
    "existence": existence,
    "count": count,
    "relation": relation,
    "closest": closest,
    "compare": compare,
    "two_hop": two_hop,
}
assert tuple(FAMILY_QUESTIONS) == FAMILIES


def questions_for(scene: Scene, family: str, margin: float, max_objects: int) -> list[Question]:
    """Every unambiguous question of `family` about `scene`."""
    return FAMILY_QUESTIONS[family](scene, margin, max_objects)
