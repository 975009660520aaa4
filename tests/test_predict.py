"""`asymoe predict`: KV-cached greedy decoding gives the uncached decoder's tokens; routing summary; CLI."""

from __future__ import annotations

import json

from PIL import Image

from asymoe.cli import main
from asymoe.export import load_run
from asymoe.predict import build_prompt, cache_is_exact, cached_greedy, predict, uncached_greedy
from test_export import make_run


def test_cached_decoding_matches_uncached_and_routing_sums_to_one(tmp_path):
    make_run(tmp_path / "run", ["model.moe.layers=all"])
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    run = load_run(tmp_path / "run")
    assert cache_is_exact(run.model)
    prompt = build_prompt(run, "what color is the circle ?", tmp_path / "red.png")
    assert int((prompt.ids == run.tokenizer.image_id).sum()) == run.model.num_image_tokens
    eos = run.tokenizer.eos_id
    cached = cached_greedy(run.model, prompt, 8, eos)
    uncached = uncached_greedy(run.model, prompt, 8, eos, run.tokenizer.pad_id)
    assert cached == uncached and len(cached) >= 2
    prediction = predict(run, "what color is the circle ?", tmp_path / "red.png", 8)
    assert prediction.tokens == cached and prediction.cached
    assert set(prediction.routing) == {0, 1}
    vision_router = prediction.routing[1]["vision"]
    assert set(vision_router) == {"vision0", "shared0", "shared1"}
    assert abs(sum(vision_router.values()) - 1.0) < 1e-3
    assert set(prediction.routing[1]["language"]) == {"shared0", "shared1", "language0"}


def test_evidence_experts_decode_without_the_cache(tmp_path):
    make_run(tmp_path / "run", ["model.moe.groups.language.kind=evidence"])
    run = load_run(tmp_path / "run")
    assert not cache_is_exact(run.model)
    prediction = predict(run, "is there a red square ?", None, 4)
    assert not prediction.cached and 1 <= len(prediction.tokens) <= 4


def test_cli_single_question_and_jsonl(tmp_path, capsys):
    make_run(tmp_path / "run", [])
    Image.new("RGB", (64, 64), (0, 0, 255)).save(tmp_path / "blue.png")
    assert (
        main(
            [
                "predict",
                str(tmp_path / "run"),
                "--image",
                str(tmp_path / "blue.png"),
                "--question",
                "what color is it ?",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("routing") and lines[2].strip().startswith("layer 1  vision: vision0")
    # A POPE question file (LLaVA format) answered in batch, then scored by `asymoe evaluate`.
    questions = [{"question_id": 7, "image": "blue.png", "text": "is there a red square ?", "label": "no"},
                 {"question_id": 8, "text": "is there a circle ?", "label": "yes"}]  # fmt: skip
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    argv = ["predict", str(tmp_path / "run"), "--jsonl", str(tmp_path / "q.jsonl"), "--max-new-tokens", "3"]
    assert main(argv) == 0
    answers = capsys.readouterr().out
    assert [json.loads(line)["question_id"] for line in answers.splitlines()] == [7, 8]
    (tmp_path / "a.jsonl").write_text(answers)
    assert main(["evaluate", "pope", str(tmp_path / "q.jsonl"), str(tmp_path / "a.jsonl")]) == 0
    assert "| pope |" in capsys.readouterr().out
    assert main(["predict", str(tmp_path / "run")]) == 2
    assert "needs --question TEXT" in capsys.readouterr().err
