"""Generate the scenes benchmark once into a cache directory, as LLaVA JSON + PNG images.

Layout of a data set directory (`<cache_dir>/<hash of the generation parameters>/`):
    train.json, val.json, test.json (iid), test_prior_shift.json, test_blind.json,
    test_pope_{random,popular,adversarial}.json   LLaVA conversation records, plus two keys
        LLaVA tooling ignores: "question_type" (the family) and "answer_group" (head | tail)
    images/<split>/<index>.png, blank.png          the scenes; blank.png is the blind control's image
    manifest.json                                   parameters and counts; written last

The whole directory is built under a temporary name and renamed into place, so an interrupted
generation is never mistaken for a complete one; a lock file next to it makes concurrent runs
(grid cells) wait for one generation instead of each doing it. Everything is a function of the
parameters: the same seed gives byte-identical files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from asymoe.data.scenes.splits import (
    POPE_SAMPLINGS,
    AnswerRanking,
    GeneratedSplit,
    Sample,
    TypeStatistics,
    generate_pope,
    generate_split,
    head_answers,
    template,
)
from asymoe.data.scenes.world import Scene, TypePrior, blank_image, render
from asymoe.data.tokenizer import IMAGE_TOKEN

GENERATOR_VERSION = 3
MANIFEST = "manifest.json"
TEST_SPLITS = ("test_iid", "test_prior_shift", "test_blind", *(f"test_pope_{s}" for s in POPE_SAMPLINGS))
# Split name -> its JSON file (the iid test is LLaVA's plain test.json).
SPLIT_FILES = {"train": "train.json", "val": "val.json", "test_iid": "test.json"} | {
    name: f"{name}.json" for name in TEST_SPLITS[1:]
}


def generation_parameters(scenes) -> dict:
    """Everything the generated files depend on (not where they are cached)."""
    params = {k: v for k, v in (asdict(scenes) if hasattr(scenes, "__dataclass_fields__") else dict(scenes)).items()}
    params.pop("cache_dir", None)
    params["families"] = list(params["families"])
    params["generator_version"] = GENERATOR_VERSION
    return params


def default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "asymoe" / "scenes"


def dataset_directory(scenes) -> Path:
    params = generation_parameters(scenes)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(scenes.cache_dir).expanduser() if scenes.cache_dir else default_cache_root()
    return root / digest


def ensure_dataset(scenes) -> Path:
    """The data set directory for `scenes`, generated now if no complete copy exists."""
    final = dataset_directory(scenes)
    if (final / MANIFEST).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # One generator at a time per data set (grid cells start together); the others wait and reuse it.
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / MANIFEST).is_file():
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; a shared cache should be readable
        try:
            write_dataset(scenes, staging)
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _records(split: str, generated: GeneratedSplit, heads: dict[str, set[str]], image_of) -> list[dict]:
    records = []
    for index, sample in enumerate(generated.samples):
        question = sample.question
        records.append(
            {
                "id": f"{split}-{index:06d}",
                "image": image_of(sample),
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_TOKEN}\n{question.text}"},
                    {"from": "gpt", "value": question.answer},
                ],
                "question_type": question.family,
                "answer_group": "head" if question.answer in heads.get(template(question.text), ()) else "tail",
            }
        )
    return records


def _write_images(directory: Path, folder: str, scenes: list[Scene], size: int) -> None:
    (directory / "images" / folder).mkdir(parents=True)
    for index, scene in enumerate(scenes):
        render(scene, size).save(directory / "images" / folder / f"{index:06d}.png", format="PNG")


def _scene_image(folder: str):
    return lambda sample: f"images/{folder}/{sample.scene_index:06d}.png"


def generate(scenes) -> dict[str, GeneratedSplit]:
    """Every split, from the seed alone (no files)."""
    prior = TypePrior.build(scenes.seed, scenes.object_skew, scenes.contexts, scenes.context_boost, scenes.context_size)
    ranking = AnswerRanking(scenes.seed, scenes.answer_skew)
    objects = (scenes.min_objects, scenes.max_objects)
    families = list(scenes.families)

    def split(name: str, count: int, shifted: bool = False) -> GeneratedSplit:
        rng = random.Random(f"{scenes.seed}:{name}")
        return generate_split(
            rng, prior, ranking, families, count, scenes.questions_per_image, objects, scenes.margin, shifted
        )

    out = {
        "train": split("train", scenes.train_questions),
        "val": split("val", scenes.val_questions),
        "test_iid": split("test_iid", scenes.test_questions),
        "test_prior_shift": split("test_prior_shift", scenes.test_questions, shifted=True),
    }
    stats = TypeStatistics.of(out["train"].scenes)
    pope_scenes, probes = generate_pope(random.Random(f"{scenes.seed}:pope"), prior, stats, scenes.pope_images, objects)
    for sampling in POPE_SAMPLINGS:
        out[f"test_pope_{sampling}"] = GeneratedSplit(pope_scenes, probes[sampling])
    return out


def write_dataset(scenes, directory: Path) -> None:
    generated = generate(scenes)
    heads = head_answers(generated["train"].samples)
    size = scenes.image_size
    for folder in ("train", "val", "test_iid", "test_prior_shift"):
        _write_images(directory, folder, generated[folder].scenes, size)
    _write_images(directory, "pope", generated["test_pope_random"].scenes, size)
    blank_image(size).save(directory / "blank.png", format="PNG")
    image_of = {name: _scene_image(name) for name in ("train", "val", "test_iid", "test_prior_shift")}
    image_of["test_blind"] = lambda sample: "blank.png"
    generated["test_blind"] = generated["test_iid"]
    counts = {}
    for name, file in SPLIT_FILES.items():
        records = _records(name, generated[name], heads, image_of.get(name, _scene_image("pope")))
        (directory / file).write_text(json.dumps(records, indent=1, sort_keys=True))
        counts[name] = len(records)
    manifest = {"parameters": generation_parameters(scenes), "questions": counts}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def split_files(directory: Path) -> dict[str, Path]:
    return {name: directory / file for name, file in SPLIT_FILES.items()}


__all__ = ["ensure_dataset", "generate", "split_files", "TEST_SPLITS", "Sample"]
