"""Multi-stage training: stage 1 changes only the projector; stage 2 starts from its weights (MoE upcycled)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from asymoe import config as config_lib
from asymoe.errors import ConfigError
from asymoe.training.stages import fit_stages

STAGES = (
    "stages=[{name: align, train: [projector], overrides: [model.moe.enabled=false]},"
    " {name: tune, train: [projector, lm, experts, routers]}]"
)


class StartWeights(L.Callback):
    """The model's state at the first training step of each stage."""

    def __init__(self):
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


def final_state(stage_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(stage_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items()}


def test_two_stages_projector_first_then_all_from_its_weights(tiny_overrides):
    cfg = config_lib.load(None, tiny_overrides + [STAGES, "model.moe.layers=[1]"])
    start = StartWeights()
    metrics = fit_stages(cfg, callbacks=[start])
    run = Path(cfg.output_dir)
    align, tune = run / "stages" / "01-align", run / "stages" / "02-tune"
    before, after = start.states[0], final_state(align)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("projector.") for k in changed), changed
    # Stage 2 starts from stage 1's final weights; its MoE layer is upcycled from stage 1's dense FFN.
    second = start.states[1]
    for key, value in after.items():
        if ".layers.1.mlp." not in key:
            torch.testing.assert_close(second[key], value, msg=key)
    dense = [after[f"lm.model.layers.1.mlp.{name}_proj.weight"] for name in ("gate", "up", "down")]
    for group in ("vision", "shared", "language"):
        gate_up = second[f"lm.model.layers.1.mlp.groups.{group}.gate_up_proj"]
        torch.testing.assert_close(gate_up, torch.cat(dense[:2]).expand_as(gate_up))
    tuned = final_state(tune)
    assert not torch.equal(
        tuned["lm.model.layers.0.self_attn.q_proj.weight"], after["lm.model.layers.0.self_attn.q_proj.weight"]
    )
    assert json.loads((run / "metrics.json").read_text())["tune/test/accuracy"] == metrics["test/accuracy"]
    # A rerun skips finished stages.
    stamp = (align / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    assert fit_stages(config_lib.load(f"{run}/config.yaml"))["test/accuracy"] == metrics["test/accuracy"]
    assert (align / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp
    # An unfinished stage (checkpoints, no metrics.json) resumes from its last checkpoint.
    (tune / "metrics.json").unlink()
    resumed = fit_stages(config_lib.load(f"{run}/config.yaml"))
    assert (tune / "metrics.json").is_file() and resumed["tune/test/accuracy"] == metrics["test/accuracy"]
    assert (align / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp


def test_stage_errors_name_the_stage(tiny_overrides):
    cfg = config_lib.load(None, tiny_overrides + ["stages=[{name: a, overrides: [optim.lrr=1]}]"])
    with pytest.raises(ConfigError, match=r"stages\[0\] \(a\): unknown key 'optim.lrr'"):
        fit_stages(cfg)
    cfg = config_lib.load(None, tiny_overrides + ["stages=[{name: a}, {name: a}]"])
    with pytest.raises(ConfigError, match=r"stages\[1\].name='a' must be unique"):
        fit_stages(cfg)


def test_overwrite_is_refused_for_a_multi_stage_run(tmp_path, capsys):
    from asymoe import cli

    code = cli.main(["fit", "experiments/stages/moiie.yaml", "--overwrite", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (
        "asymoe: error: --overwrite does not apply to a multi-stage run; choose a fresh output_dir"
    )
    assert not (tmp_path / "run").exists()
