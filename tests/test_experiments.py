"""Every experiment YAML builds and trains 2 steps; a run leaves the expected files and TensorBoard tags."""

from __future__ import annotations

import json
from pathlib import Path

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
    saved = json.loads((Path(run_dir) / "metrics.json").read_text())
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
        "routing/layer01/share/language/expert0",
        "routing/layer01/balance_P/vision/expert2",
    }
    assert expected <= scalars, expected - scalars
    assert not any("/balance_f/" in tag for tag in scalars), "balance f is the share/<router> series, logged once"
    images = set(events.Tags()["images"])
    assert {"routing_heatmap/vision", "routing_heatmap/language"} <= images


def test_checkpoint_reproduces_test_accuracy(tiny_overrides, capsys):
    """`asymoe test` on the run's best checkpoint gives the accuracy the run reported."""
    from asymoe import cli

    cfg = config_lib.load("vanilla_moe", tiny_overrides)
    metrics = fit(cfg)
    best = json.loads((Path(cfg.output_dir) / "metrics.json").read_text())["best_checkpoint"]
    assert best and best.endswith(".ckpt")
    code = cli.main(["test", "vanilla_moe", *tiny_overrides, f"ckpt={best}"])
    assert code == 0
    out = capsys.readouterr().out
    reported = json.loads(out[out.index("{") :])
    assert reported["test/accuracy"] == pytest.approx(metrics["test/accuracy"], abs=1e-6)


def test_logging_switches(tiny_overrides):
    cfg = config_lib.load("moiie", tiny_overrides + ["logging.routing_images=false"])
    fit(cfg)
    events = EventAccumulator(f"{cfg.output_dir}/tb", size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == [] and "routing/layer01/entropy/vision" in events.Tags()["scalars"]
    cfg = config_lib.load(
        "moiie",
        [o for o in tiny_overrides if not o.startswith("output_dir=")]
        + [f"output_dir={cfg.output_dir}_nolog", "logging.tensorboard=false"],
    )
    metrics = fit(cfg)
    assert not Path(cfg.output_dir, "tb").exists()
    assert 0.0 <= metrics["test/accuracy"] <= 1.0


def test_adamw_runs_fused_where_torch_has_the_kernel(tiny_overrides):
    """optim.fused: null takes AdamW's fused kernel on CPU, keeping every parameter group's settings;
    true and false are obeyed; a device or dtype without the kernel gets the loop."""
    import lightning as L
    import torch

    from asymoe.training.module import fused_adamw

    seen = {}

    class Optimizer(L.Callback):
        def on_train_start(self, trainer, pl_module):
            optimizer = trainer.optimizers[0]
            seen["fused"] = optimizer.defaults["fused"]
            seen["groups"] = {group["name"]: (group["lr"], group["weight_decay"]) for group in optimizer.param_groups}
            seen["fused_groups"] = {group.get("fused") for group in optimizer.param_groups}

    cfg = config_lib.load("moiie", [*tiny_overrides, "optim.lr_router=0.004", "optim.weight_decay=0.05"])
    fit(cfg, callbacks=[Optimizer()])
    assert seen["fused"] is True and seen["fused_groups"] == {True}
    assert seen["groups"]["lm"][1] == 0.05 and seen["groups"]["lm_no_decay"][1] == 0.0
    assert seen["groups"]["router"][0] == pytest.approx(seen["groups"]["lm"][0] * 0.004 / cfg.optim.lr)
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    assert fused_adamw(None, [cpu]) and not fused_adamw(None, [cpu, meta])
    assert not fused_adamw(None, [torch.zeros(2, dtype=torch.long)])
    assert fused_adamw(True, [meta]) and not fused_adamw(False, [cpu])
