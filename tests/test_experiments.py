"""Every experiment YAML builds and trains 2 steps; a run leaves the expected files and TensorBoard tags."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from asymoe import config as config_lib
from asymoe.training.run import fit

from conftest import EXPERIMENTS


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_trains_two_steps(path, tiny_overrides):
    cfg = config_lib.load(path, tiny_overrides)
    metrics = fit(cfg)
    run_dir = cfg.output_dir
    saved = json.loads((__import__("pathlib").Path(run_dir) / "metrics.json").read_text())
    assert saved["test/accuracy"] == pytest.approx(metrics["test/accuracy"])
    assert 0.0 <= metrics["test/accuracy"] <= 1.0
    assert metrics["train/loss"] == metrics["train/loss"]  # finite, not NaN
    assert metrics["params/total"] > 0
    reloaded = config_lib.load(f"{run_dir}/config.yaml")
    assert config_lib.to_dict(reloaded)["model"] == config_lib.to_dict(cfg)["model"]


def test_tensorboard_tags(tiny_overrides):
    cfg = config_lib.load("moiie", tiny_overrides)
    fit(cfg)
    events = EventAccumulator(f"{cfg.output_dir}/tb", size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/lm_loss",
        "train/aux/balance_vision",
        "train/aux/balance_language",
        "val/accuracy",
        "val/lm_loss",
        "test/accuracy",
        "test/accuracy_yes_no",
        "test/accuracy_shape",
        "test/accuracy_color",
        "params/total",
        "params/activated_per_vision_token",
        "params/activated_per_language_token",
        "routing/layer01/entropy/vision",
        "routing/layer01/entropy/language",
        "routing/layer01/share/vision/expert0",
        "routing/layer01/share/language/expert2",
        "routing/layer01/balance_f/language/expert0",
        "routing/layer01/balance_P/vision/expert2",
    }
    assert expected <= scalars, expected - scalars
    images = set(events.Tags()["images"])
    assert {"routing_heatmap/vision", "routing_heatmap/language"} <= images
