"""Fuzzed LLaVA-JSON data: every malformed record is a one-line DataError or a counted skip, never a traceback.

Records are generated from a seed: broken JSON files, wrong types in every field, missing,
truncated, random-byte, decompression-bomb, greyscale, palette and RGBA images, empty and non-UTF-8
text, missing and repeated `<image>` markers. Each goes through the reader alone (data.on_error=
raise: the expected error or a record), then all of them through the datamodule with
data.on_error=skip (every bad one counted, every good one batched into finite pixels).
"""

from __future__ import annotations

import json
import random
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asymoe import config as config_lib
from asymoe.data.datamodule import ImageStore, VQADataModule
from asymoe.data.records import DataError, encode_record
from asymoe.data.sources import load_llava_json
from asymoe.data.tokenizer import WordTokenizer
from conftest import TINY

SIZE = 16
OK = None  # expected outcome: a record that trains


def _png_with_size(path: Path, width: int, height: int) -> None:
    """A valid 1x1 PNG whose header claims width x height (a decompression bomb to PIL)."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    path.write_bytes(bytes(data))


def make_images(folder: Path) -> dict[str, str]:
    """Image files by kind; the expected error regex per kind (None: loads, converted to RGB)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.new("L", (SIZE, SIZE), 128).save(folder / "grey.png")
    Image.new("RGBA", (SIZE, SIZE), (255, 0, 0, 0)).save(folder / "rgba.png")
    palette = Image.new("P", (SIZE, SIZE), 3)
    palette.putpalette([0, 0, 0] * 3 + [10, 200, 30] + [0, 0, 0] * 252)  # colour 3 = (10, 200, 30)
    palette.save(folder / "palette.png")
    Image.new("RGB", (SIZE * 3, SIZE), (0, 0, 255)).save(folder / "wide.jpg")
    Image.new("CMYK", (SIZE, SIZE), (0, 255, 0, 0)).save(folder / "cmyk.jpg")
    good = (folder / "rgb.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    jpeg = (folder / "wide.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "noise.png").write_bytes(rng.integers(0, 255, 500, dtype=np.uint8).tobytes())
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    _png_with_size(folder / "bomb.png", 60000, 60000)
    (folder / "a_folder.png").mkdir()
    return {
        "rgb.png": OK,
        "grey.png": OK,
        "rgba.png": OK,
        "palette.png": OK,
        "wide.jpg": OK,
        "cmyk.jpg": OK,
        "truncated.png": r"unreadable image .*truncated\.png",
        "truncated.jpg": r"unreadable image .*truncated\.jpg",
        "noise.png": r"unreadable image .*noise\.png",
        "empty.png": r"unreadable image .*empty\.png",
        "text.png": r"unreadable image .*text\.png",
        "bomb.png": r"unreadable image .*bomb\.png",
        "a_folder.png": r"image not found: .*a_folder\.png",
        "missing.png": r"image not found: .*missing\.png",
    }


def conversation(question: str = "<image>\nWhat colour?", answer: str = "red") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def record_cases(images: dict[str, str], rng: random.Random) -> list[tuple[object, str | None]]:
    """(record, expected error regex or OK): every field broken in every way, plus random text."""
    cases: list[tuple[object, str | None]] = []
    for name, expected in images.items():
        cases.append(({"image": name, "conversations": conversation()}, expected))
    not_a_record = r"record has no 'conversations' list"
    bad_turn = r"turn .* needs 'from' in human\|gpt"
    for value in (None, 1, 2.5, "text", [], [1, 2], True):
        cases.append((value, not_a_record))
        if isinstance(value, list):
            cases.append(({"conversations": value}, bad_turn if value else r"empty conversation"))
        else:
            cases.append(({"conversations": value}, not_a_record))
    for turn in (None, 1, "human", [], {"value": "hi"}, {"from": "robot", "value": "hi"}, {"from": 3, "value": "x"}):
        cases.append(({"conversations": [turn, {"from": "gpt", "value": "a"}]}, bad_turn))
    for value in (1, 2.5, None, [], {"a": 1}, True):
        cases.append(({"conversations": conversation("What?", value)}, r"turn 1: 'value' must be a string"))
        cases.append(({"image": value, "conversations": conversation()}, r"'image' must be a file name|marker but no"))
    for text in ("", "   ", "\n\t"):
        cases.append(({"conversations": conversation(text, "a")}, r"turn 0 is empty"))
        cases.append(({"conversations": conversation("Q?", text)}, r"turn 1 is empty"))
    cases.append(({"conversations": []}, r"empty conversation"))
    cases.append(({"conversations": conversation()[:1]}, r"does not end with an assistant turn"))
    cases.append(({"conversations": conversation()[::-1]}, r"turn 0 is from 'assistant', expected 'user'"))
    cases.append(({"conversations": conversation("<image>\nQ?")}, r"'<image>' marker but no 'image' field"))
    cases.append(({"image": "rgb.png", "conversations": conversation("No marker here?")}, OK))  # marker added
    cases.append(({"image": "rgb.png", "conversations": conversation("<image> <image> Q?")}, r"2 '<image>' markers"))
    cases.append(
        ({"image": "rgb.png", "conversations": conversation("<image>x<image>y<image>")}, r"3 '<image>' markers")
    )
    for key, value in (("question_type", 3), ("answer_group", ["a"])):
        cases.append(({"conversations": conversation("Q?"), key: value}, rf"'{key}' must be a string"))
    alphabet = "abc xyz?!\u00e9\u4e2d\U0001f600\u0000\ud800<>\n"
    while len(cases) < 240:  # random unicode text (NUL, a lone surrogate, emoji) with 0-3 markers
        words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 4))]
        markers = rng.choice([0, 0, 1, 1, 2, 3])
        for _ in range(markers):
            words.insert(rng.randint(0, len(words)), "<image>")
        question = " ".join(words)
        if not question.strip():
            question += "q"
        answer = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 8))) + "z"
        with_image = markers > 0 or rng.random() < 0.5
        record = {"conversations": conversation(question, answer), **({"image": "rgb.png"} if with_image else {})}
        cases.append((record, _markers(markers)))
    return cases


def _markers(count: int) -> str | None:
    """One image: no marker (one is added in front) or one is right; more are an error."""
    return OK if count <= 1 else rf"{count} '<image>' markers for 1 image"


BAD_FILES = {
    "truncated.json": (b'[{"conversations": [{"from": "human", "va', r"cannot read LLaVA JSON \(JSONDecodeError"),
    "latin1.json": ('[{"conversations": [{"from": "human", "value": "caf\xe9"}]}]'.encode("latin-1"), r"not UTF-8"),
    "object.json": (b'{"conversations": []}', r"expected a JSON list of records"),
    "empty.json": (b"", r"cannot read LLaVA JSON"),
    "deep.json": (b"[" * 100000 + b"]" * 100000, r"cannot read LLaVA JSON \(nested too deeply"),
    "nul.json": (b"\x00\x00\x00", r"cannot read LLaVA JSON"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    images = make_images(folder / "images")
    cases = record_cases(images, random.Random(0))
    return folder, cases


def _load_one(folder: Path, index: int, record) -> tuple[object, str | None]:
    path = folder / f"record{index}.json"
    path.write_text(json.dumps([record]))
    try:
        split = load_llava_json(str(path), str(folder / "images"), "raise")
        tokenizer = WordTokenizer.build(text for r in split.records for _, text in r.turns)
        encoded = [encode_record(r, tokenizer, num_image_tokens=4) for r in split.records]
        return (split, encoded), None
    except DataError as error:
        return None, str(error)


def test_each_malformed_record_is_one_line_data_error(corpus):
    folder, cases = corpus
    assert len(cases) >= 200
    started = time.time()
    for index, (record, expected) in enumerate(cases):
        loaded, error = _load_one(folder, index, record)
        if expected is OK:
            assert error is None, (record, error)
            assert len(loaded[1]) == 1
        else:
            assert error is not None, (record, "accepted")
            assert "\n" not in error and f"record{index}.json:0: " in error, error
            assert re.search(expected, error), (record, error)
    assert time.time() - started < 60  # no hang (bombs are refused from their header)


@pytest.mark.parametrize("name, content", sorted(BAD_FILES.items()), ids=sorted(BAD_FILES))
def test_broken_json_files_are_one_line_data_errors(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content[0])
    with pytest.raises(DataError, match=content[1]) as error:
        load_llava_json(str(path), None, "skip")
    assert "\n" not in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize(
    "name, expected_rgb",
    [
        ("grey.png", (128, 128, 128)),
        ("rgba.png", (255, 0, 0)),
        ("palette.png", (10, 200, 30)),
        ("cmyk.jpg", (255, 0, 255)),
    ],
)
def test_greyscale_palette_rgba_and_cmyk_images_load_as_rgb(corpus, name, expected_rgb):
    folder, _ = corpus
    cfg = config_lib.load("asymoe", TINY)
    from asymoe.models.vision import resolve_preprocessing

    store = ImageStore({"x": str(folder / "images" / name)}, resolve_preprocessing(cfg.model.vision))
    pixels = store("x")  # (3, size, size), normalised
    mean, std = store.mean.view(3), store.std.view(3)
    assert pixels.shape[0] == 3
    observed = (pixels.mean(dim=(1, 2)) * std + mean) * 255
    torch.testing.assert_close(observed, torch.tensor(expected_rgb, dtype=torch.float32), atol=1.5, rtol=0)


def test_datamodule_skips_and_counts_every_bad_record(corpus, tmp_path):
    folder, cases = corpus
    path = tmp_path / "all.json"
    path.write_text(json.dumps([record for record, _ in cases]))
    cfg = config_lib.load(
        "asymoe",
        TINY
        + [
            "data.source=llava_json",
            f"data.train_path={path}",
            f"data.image_root={folder / 'images'}",
            "data.on_error=skip",
            "data.limit_train=null",
            "data.images_per_batch=2",
        ],
    )
    datamodule = VQADataModule(cfg)
    datamodule.prepare()
    datamodule.encode(num_image_tokens=4)
    bad = sum(expected is not OK for _, expected in cases)
    assert datamodule.skipped["train"] == bad
    assert len(datamodule.samples["train"]) == len(cases) - bad
    seen = 0
    for batch in datamodule.train_dataloader():
        seen += batch["input_ids"].shape[0]
        if batch["pixel_values"] is not None:
            assert batch["pixel_values"].shape[1] == 3 and torch.isfinite(batch["pixel_values"]).all()
    assert seen == len(cases) - bad
