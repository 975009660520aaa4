"""Config loading: extends, overrides, re-loadable output, and one-line errors with exit code 2."""

from __future__ import annotations

import pytest

from asymoe import cli
from asymoe import config as config_lib
from asymoe.config import ConfigError

from conftest import REPO


def test_extends_and_overrides():
    cfg = config_lib.load(REPO / "experiments" / "vanilla_moe.yaml", ["model.moe.routing.top_k=1", "seed=3"])
    assert cfg.experiment == "vanilla_moe"
    assert cfg.model.language.hidden_size == 128  # from base.yaml
    assert cfg.model.moe.groups.shared.num_experts == 4
    assert cfg.model.moe.routing.top_k == 1 and cfg.seed == 3


def test_bare_experiment_name_resolves():
    assert config_lib.load("moiie").experiment == "moiie"


def test_resolved_config_reloads_identically(tmp_path):
    cfg = config_lib.load(REPO / "experiments" / "moiie.yaml", ["model.moe.layers=[0,1]"])
    config_lib.save(cfg, tmp_path / "config.yaml")
    again = config_lib.load(tmp_path / "config.yaml")
    again.source_file = cfg.source_file
    assert config_lib.to_dict(again) == config_lib.to_dict(cfg)


BAD = [
    (["model.moe.rooting.top_k=2"], "unknown key 'model.moe.rooting'", "did you mean 'model.moe.routing'"),
    (["model.moe.routing.top_k=two"], "model.moe.routing.top_k", "two"),
    (["model.moe.routing.top_k=4"], "top_k=4 exceeds the 3 experts eligible for vision tokens", ""),
    (
        ["model.moe.groups.vision.num_experts=0", "model.moe.groups.shared.num_experts=0", "model.moe.groups.language.num_experts=0"],
        "every expert group is empty",
        "",
    ),
    (["model.moe.layers=[0,7]"], "index 7 is outside the language model's 2 layers", ""),
    (["model.moe.layers=every_third"], "model.moe.layers='every_third' is not valid", "every_other_odd"),
    (["model.vision.model_name=resnet_does_not_exist"], "model.vision.model_name='resnet_does_not_exist' is not a timm model", ""),
    (["model.language.pretrained_path=/no/such/dir"], "model.language.pretrained_path: path does not exist: /no/such/dir", ""),
    (["data.source=llava_json", "data.train_path=/no/such.json"], "data.train_path: path does not exist", ""),
    (["model.moe.routing.mode=per_token"], "model.moe.routing.mode='per_token' is not valid", "shared, modality"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' is not valid", ""),
    (["model.moe.groups.shared.geometry=spherical"], "geometry='spherical' is not valid", "lorentz"),
    (["model.moe.groups.shared.curvature=-1"], "curvature must be > 0", ""),
    (["model.moe.geometry_loss.cone_k=1.5"], "cone_k must be in (0, 1)", ""),
    (["model.moe.evidence.alpha_init=1.2"], "alpha_init must be in (0, 1)", ""),
    (["model.moe.routing.vision_tail.enabled=true", "model.moe.routing.vision_tail.top_a=2"], "top_a=2 must be > top_k=2", ""),
    (["model.moe.geometry_loss.align_weight=0.1"], "needs a hyperbolic shared group", ""),
    (["topk=2"], "unknown key 'topk'", ""),
    (["model.moe.enabled=false", "model.moe.routing.vision_tail.enabled=true"], "vision_tail.enabled needs MoE layers", ""),
    (["model.moe.groups.vision.kind=evidence"], "kind='evidence' is only valid for the language group", ""),
]


@pytest.mark.parametrize("overrides,message,hint", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_config_one_line_exit_2(overrides, message, hint, capsys, tmp_path):
    code = cli.main(["params", str(REPO / "experiments" / "moiie.yaml"), *overrides, f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0] and hint in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists(), "no partial output"


def test_missing_file_and_bad_yaml(tmp_path, capsys):
    assert cli.main(["fit", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert cli.main(["fit", str(bad)]) == 2
    assert f"{bad}: not valid YAML" in capsys.readouterr().err
    cyclic = tmp_path / "a.yaml"
    cyclic.write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        config_lib.load(cyclic)


def test_test_command_requires_existing_checkpoint(capsys, tmp_path):
    assert cli.main(["test", "moiie"]) == 2
    assert "ckpt=PATH" in capsys.readouterr().err
    assert cli.main(["test", "moiie", f"ckpt={tmp_path / 'none.ckpt'}"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
