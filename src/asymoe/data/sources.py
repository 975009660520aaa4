"""Data sources: easy-VQA (shipped inside the `easy-vqa` wheel), LLaVA-format JSON, and the
generated scenes benchmark (written as LLaVA JSON, read back through the same reader).

Each source yields, per split, a list of Records and an image store (key -> file path). A source
names its question types (easy-VQA: yes/no, shape, color; scenes: its question families) on the
records; evaluation reports whichever types the records carry.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from asymoe.config import DataConfig
from asymoe.data.records import DataError, Record, check_turns
from asymoe.data.tokenizer import IMAGE_TOKEN

YES_NO = {"yes", "no"}
SHAPES = {"circle", "rectangle", "triangle"}


@dataclass
class Split:
    records: list[Record]
    image_paths: dict[str, str]
    skipped: int = 0


def easy_vqa_question_type(answer: str) -> str:
    if answer in YES_NO:
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def _easy_vqa_records(questions, answers, image_ids, image_paths, prefix: str, keep_images=None) -> Split:
    records = []
    for index, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids)):
        if keep_images is not None and image_id not in keep_images:
            continue
        key = f"{prefix}/{image_id}"
        records.append(
            Record(
                turns=[("user", f"{IMAGE_TOKEN}\n{question}"), ("assistant", answer)],
                image_key=key,
                origin=f"easy-vqa {prefix} questions.json:{index}",
                question_type=easy_vqa_question_type(answer),
            )
        )
    return Split(records, {f"{prefix}/{i}": p for i, p in image_paths.items()})


def load_easy_vqa(config: DataConfig) -> dict[str, Split]:
    """Train/val: a fixed-seed split of easy-VQA's train images; test: its test set."""
    import easy_vqa

    train_paths = easy_vqa.get_train_image_paths()
    image_ids = sorted(train_paths)
    random.Random(config.split_seed).shuffle(image_ids)
    n_val = max(1, int(round(len(image_ids) * config.val_fraction)))
    val_images, train_images = set(image_ids[:n_val]), set(image_ids[n_val:])
    train_q = easy_vqa.get_train_questions()
    return {
        "train": _easy_vqa_records(*train_q, train_paths, "train", train_images),
        "val": _easy_vqa_records(*train_q, train_paths, "train", val_images),
        "test": _easy_vqa_records(*easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths(), "test"),
    }


def load_llava_json(path: str, image_root: str | None, on_error: str) -> Split:
    """LLaVA conversation JSON: [{"image": rel_path?, "conversations": [{"from": "human"|"gpt", "value": ...}]}]."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"{file}: cannot read LLaVA JSON (not UTF-8: byte {error.start})") from None
    except RecursionError:
        raise DataError(f"{file}: cannot read LLaVA JSON (nested too deeply)") from None
    except (OSError, json.JSONDecodeError) as error:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        raise DataError(f"{file}: cannot read LLaVA JSON ({reason})") from None
    if not isinstance(data, list):
        raise DataError(f"{file}: expected a JSON list of records")
    root = Path(image_root) if image_root else file.parent
    records, images, skipped = [], {}, 0
    problems: dict[Path, str] = {}  # each image checked once (a scene serves ~10 questions): path -> "" or why not
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    for index, item in enumerate(data):
        origin = f"{file}:{index}"
        try:
            if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
                raise DataError(f"{origin}: record has no 'conversations' list")
            turns = []
            for turn in item["conversations"]:
                role = roles.get(turn.get("from")) if isinstance(turn, dict) else None
                if role is None:
                    raise DataError(f"{origin}: turn {turn!r} needs 'from' in human|gpt and a 'value'")
                if not isinstance(turn.get("value", ""), str):
                    raise DataError(f"{origin}: turn {len(turns)}: 'value' must be a string, got {turn['value']!r}")
                turns.append((role, turn.get("value", "")))
            check_turns(turns, origin)
            key = None
            if item.get("image"):
                if not isinstance(item["image"], str):
                    raise DataError(f"{origin}: 'image' must be a file name (a string), got {item['image']!r}")
                image_path = root / item["image"]
                if image_path not in problems:
                    problems[image_path] = _image_problem(image_path)
                if problems[image_path]:
                    raise DataError(f"{origin}: {problems[image_path]}")
                key = str(image_path)
                images[key] = key
                if IMAGE_TOKEN not in turns[0][1]:
                    turns[0] = ("user", f"{IMAGE_TOKEN}\n{turns[0][1]}")
            elif any(IMAGE_TOKEN in text for _, text in turns):
                raise DataError(f"{origin}: '{IMAGE_TOKEN}' marker but no 'image' field")
            records.append(Record(turns=turns, image_key=key, origin=origin, **_optional_strings(item, origin)))
        except DataError:
            if on_error == "raise":
                raise
            skipped += 1
    return Split(records, images, skipped)


def _image_problem(path: Path) -> str:
    """Why an image file cannot be used ("" when it can): missing, or Pillow cannot verify it."""
    if not path.is_file():
        return f"image not found: {path}"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:
        return f"unreadable image {path} ({type(error).__name__})"
    return ""


def _optional_strings(item: dict, origin: str) -> dict[str, str]:
    """asymoe's own record keys, ignored by other LLaVA tooling: question_type, answer_group."""
    found = {}
    for key in ("question_type", "answer_group"):
        value = item.get(key)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{origin}: '{key}' must be a string, got {value!r}")
        if value is not None:
            found[key] = value
    return found


def load_scenes(config: DataConfig, only: set[str] | None = None) -> dict[str, Split]:
    """The scenes benchmark (generated into its cache on first use): train, val and every test split
    (or the splits in `only`)."""
    from asymoe.data.scenes import ensure_dataset, split_files

    directory = ensure_dataset(config.scenes)
    files = split_files(directory)
    return {name: load_llava_json(str(path), None, "raise") for name, path in files.items() if not only or name in only}
