"""Data: masks of an encoded record, image-grouped batches, LLaVA JSON with bad records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from asymoe.config import load
from asymoe.data.datamodule import VQADataModule
from asymoe.data.records import DataError, ImageGroupedBatchSampler, Record, encode_record
from asymoe.data.sources import easy_vqa_question_type, load_llava_json
from asymoe.data.tokenizer import WordTokenizer
from conftest import TINY


def test_encoded_masks():
    tokenizer = WordTokenizer.build(["what shape is it ?", "circle"])
    record = Record(
        turns=[("user", "<image>\nwhat shape is it?"), ("assistant", "circle")], image_key="img", origin="t:0"
    )
    enc = encode_record(record, tokenizer, num_image_tokens=3)
    words = [tokenizer.vocab[i] for i in enc.input_ids]
    assert words == [
        "<bos>",
        "<user>",
        "<image>",
        "<image>",
        "<image>",
        "what",
        "shape",
        "is",
        "it",
        "?",
        "<assistant>",
        "circle",
        "<eos>",
    ]
    assert enc.evidence == [False, False] + [True] * 8 + [False, False, False]
    assert enc.answer == [False] * 11 + [True, True]
    assert [tokenizer.vocab[i] if i >= 0 else None for i in enc.labels] == [None] * 11 + ["circle", "<eos>"]
    assert enc.prompt_length == 11
    assert tokenizer.decode(enc.input_ids[11:]) == "circle"


def test_image_marker_count_checked():
    tokenizer = WordTokenizer.build(["hi"])
    record = Record(turns=[("user", "hi"), ("assistant", "hi")], image_key="img", origin="file.json:7")
    with pytest.raises(DataError, match="file.json:7: 0 '<image>' markers for 1 image"):
        encode_record(record, tokenizer, 2)


def test_grouped_batches_hold_whole_images():
    keys = ["a", "a", "b", "c", "c", "c", None, "d"]
    sampler = ImageGroupedBatchSampler(keys, images_per_batch=2, shuffle=True, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(8))
    for batch in batches:
        assert len({keys[i] if keys[i] is not None else ("t", i) for i in batch}) <= 2
    assert len(batches) == len(sampler) == 3
    capped = ImageGroupedBatchSampler(keys, images_per_batch=100, shuffle=False, max_samples_per_batch=3)
    assert list(capped) == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_easy_vqa_split_and_types():
    cfg = load(None, TINY)
    dm = VQADataModule(cfg)
    dm.prepare()
    train_images = {r.image_key for r in dm.splits["train"].records}
    val_images = {r.image_key for r in dm.splits["val"].records}
    assert not train_images & val_images, "validation images are held out"
    assert easy_vqa_question_type("yes") == "yes/no" and easy_vqa_question_type("triangle") == "shape"
    assert easy_vqa_question_type("teal") == "color"


def write_llava(tmp_path, records):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(images / "ok.png")
    (images / "broken.png").write_bytes(b"not a png")
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path, images


GOOD = {
    "image": "ok.png",
    "conversations": [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "nothing"}],
}


def test_llava_json_errors_name_file_and_record(tmp_path):
    bad_records = [
        GOOD,
        {"image": "missing.png", "conversations": GOOD["conversations"]},
        {"image": "broken.png", "conversations": GOOD["conversations"]},
        {"image": "ok.png", "conversations": []},
        {"conversations": [{"from": "human", "value": "hi"}]},
    ]
    path, images = write_llava(tmp_path, bad_records)
    cfg = load(None, TINY + ["data.source=llava_json", f"data.train_path={path}", f"data.image_root={images}"])
    with pytest.raises(DataError, match=f"{path}:1: image not found"):
        VQADataModule(cfg).prepare()
    cfg.data.on_error = "skip"
    dm = VQADataModule(cfg)
    dm.prepare()
    assert len(dm.splits["train"].records) == 1
    assert dm.skipped == {"train": 4}


def test_llava_json_trains_through_cli(tmp_path, capsys):
    from asymoe import cli

    path, images = write_llava(tmp_path, [GOOD] * 6)
    out = tmp_path / "run"
    code = cli.main(
        [
            "fit",
            "moiie",
            *TINY,
            "data.source=llava_json",
            f"data.train_path={path}",
            f"data.val_path={path}",
            f"data.test_path={path}",
            f"data.image_root={images}",
            "trainer.val_check_interval=1.0",
            f"output_dir={out}",
        ]
    )
    assert code == 0
    assert (out / "metrics.json").is_file()
    assert "test accuracy:" in capsys.readouterr().out


def test_llava_json_question_type_and_answer_group(tmp_path):
    """asymoe's optional record keys are read onto the records; a non-string value names the record."""
    tagged = {**GOOD, "question_type": "count", "answer_group": "tail"}
    path, images = write_llava(tmp_path, [GOOD, tagged])
    split = load_llava_json(str(path), str(images), "raise")
    assert [(r.question_type, r.answer_group) for r in split.records] == [(None, None), ("count", "tail")]
    path, images = write_llava(tmp_path, [{**GOOD, "question_type": 3}])
    with pytest.raises(DataError, match=f"{path}:0: 'question_type' must be a string"):
        load_llava_json(str(path), str(images), "raise")
