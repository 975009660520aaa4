"""Scenes of coloured shapes: sampling, geometry and rendering (the Sort-of-CLEVR / CLEVR design family).

A scene holds a few objects, each a (colour, shape) *type* that occurs at most once per scene, so
"the red square" always names one object. Object types are not equally likely and co-occur: each
scene draws one of a few *contexts*, each boosting a fixed subset of types. That gives POPE's
"popular" and "adversarial" (co-occurring) negatives something to measure.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from asymoe.data.records import DataError

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 35),
    "purple": (145, 60, 185),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
BACKGROUND = (128, 128, 128)
# Object half-extent as a fraction of the image side, per size; positions keep objects inside.
HALF_EXTENT = {"small": 0.075, "large": 0.125}
SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges, still deterministic


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    x: float  # centre, in [0, 1] of the image width (left -> right)
    y: float  # centre, in [0, 1] of the image height (top -> bottom)

    @property
    def kind(self) -> tuple[str, str]:
        return self.colour, self.shape

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


Scene = tuple[SceneObject, ...]
ObjectType = tuple[str, str]


def object_types() -> list[ObjectType]:
    return [(colour, shape) for colour in COLOURS for shape in SHAPES]


def distance(a: SceneObject, b: SceneObject) -> float:
    return math.hypot(a.x - b.x, a.y - b.y)


@dataclass(frozen=True)
class TypePrior:
    """How often each object type appears: a popularity weight per type and per-context boosts."""

    popularity: dict[ObjectType, float]
    contexts: tuple[frozenset, ...]
    boost: float

    @classmethod
    def build(cls, seed: int, skew: float, num_contexts: int, boost: float, context_size: int) -> TypePrior:
        rng = random.Random(f"{seed}:types")
        types = object_types()
        rng.shuffle(types)
        popularity = {t: (rank + 1) ** -skew for rank, t in enumerate(types)}
        contexts = tuple(frozenset(rng.sample(types, context_size)) for _ in range(num_contexts))
        return cls(popularity, contexts, boost)

    def weights(self, context: int) -> dict[ObjectType, float]:
        boosted = self.contexts[context] if self.contexts else frozenset()
        return {t: w * (self.boost if t in boosted else 1.0) for t, w in self.popularity.items()}


def sample_scene(rng: random.Random, prior: TypePrior, num_objects: tuple[int, int]) -> Scene:
    """Distinct object types drawn by weight, sizes uniform, non-overlapping positions."""
    count = rng.randint(*num_objects)
    weights = prior.weights(rng.randrange(len(prior.contexts))) if prior.contexts else dict(prior.popularity)
    chosen: list[ObjectType] = []
    for _ in range(count):
        candidates = [t for t in weights if t not in chosen]
        chosen.append(rng.choices(candidates, [weights[t] for t in candidates])[0])
    sizes = [rng.choice(SIZES) for _ in chosen]
    for _ in range(100):  # a crowded layout can block the last objects: lay the scene out again
        positions = _place(rng, sizes)
        if positions is not None:
            return tuple(SceneObject(c, s, size, x, y) for (c, s), size, (x, y) in zip(chosen, sizes, positions))
    raise DataError(f"data.scenes: {count} objects do not fit in a scene; lower data.scenes.max_objects")


def _place(rng: random.Random, sizes: list[str]) -> list[tuple[float, float]] | None:
    """Non-overlapping centres (with a gap) for objects of these sizes, or None if one found no room."""
    placed: list[tuple[float, float, float]] = []
    for size in sizes:
        half = HALF_EXTENT[size]
        for _ in range(200):
            x, y = round(rng.uniform(half, 1 - half), 4), round(rng.uniform(half, 1 - half), 4)
            if all(math.hypot(x - px, y - py) > half + other + 0.02 for px, py, other in placed):
                placed.append((x, y, half))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def render(scene: Scene, size: int) -> Image.Image:
    """The scene as an RGB image of `size` x `size` pixels."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        cx, cy, half = obj.x * big, obj.y * big, HALF_EXTENT[obj.size] * big
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=colour)
        elif obj.shape == "square":
            side = half * 0.9  # a square of equal area to the circle would look larger
            draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=colour)
        else:
            draw.polygon(((cx, cy - half), (cx - half, cy + half * 0.8), (cx + half, cy + half * 0.8)), fill=colour)
    return image.resize((size, size), Image.BOX)


def blank_image(size: int) -> Image.Image:
    return Image.new("RGB", (size, size), BACKGROUND)
