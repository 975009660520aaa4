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
        [
            "model.moe.groups.vision.num_experts=0",
            "model.moe.groups.shared.num_experts=0",
            "model.moe.groups.language.num_experts=0",
        ],
        "every expert group is empty",
        "",
    ),
    (["model.moe.layers=[0,7]"], "index 7 is outside the language model's 2 layers", ""),
    (["model.moe.layers=every_third"], "model.moe.layers='every_third' is not valid", "every_other_odd"),
    (
        ["model.vision.model_name=resnet_does_not_exist"],
        "model.vision.model_name='resnet_does_not_exist' is not a timm model",
        "",
    ),
    (
        ["model.language.pretrained_path=/no/such/dir"],
        "model.language.pretrained_path: path does not exist: /no/such/dir",
        "",
    ),
    (["data.source=llava_json", "data.train_path=/no/such.json"], "data.train_path: path does not exist", ""),
    (["model.moe.routing.mode=per_token"], "model.moe.routing.mode='per_token' is not valid", "shared, modality"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' is not valid", ""),
    (["model.moe.groups.shared.geometry=spherical"], "geometry='spherical' is not valid", "lorentz"),
    (["model.moe.groups.shared.curvature=-1"], "curvature must be > 0", ""),
    (["model.moe.geometry_loss.cone_k=1.5"], "cone_k must be in (0, 1)", ""),
    (["model.moe.evidence.alpha_init=1.2"], "alpha_init must be in (0, 1)", ""),
    (
        ["model.moe.routing.vision_tail.enabled=true", "model.moe.routing.vision_tail.top_a=2"],
        "top_a=2 must be > top_k=2",
        "",
    ),
    (["model.moe.geometry_loss.align_weight=0.1"], "needs a hyperbolic shared group", ""),
    (["topk=2"], "unknown key 'topk'", ""),
    (
        ["model.moe.enabled=false", "model.moe.routing.vision_tail.enabled=true"],
        "vision_tail.enabled needs MoE layers",
        "",
    ),
    (["model.moe.groups.vision.kind=evidence"], "kind='evidence' is only valid for the language group", ""),
    (["model.vision.mean={a: 1}"], "key 'model.vision.mean' needs a list, got {'a': 1}", ""),  # an optional list
    (["optim.fused=maybe"], "key 'optim.fused' has a wrong value 'maybe'", "not a valid bool"),
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


# ---------------------------------------------------------------------------------------------
# Keys that would do nothing are refused, each with the reason


INERT = [
    (
        ["model.moe.groups.vision.curvature=2.0"],
        "model.moe.groups.vision.curvature=2.0 has no effect: curvature applies only to a hyperbolic shared group",
    ),
    (
        ["model.moe.groups.language.learn_curvature=false"],
        "model.moe.groups.language.learn_curvature=false has no effect",
    ),
    (
        ["model.moe.groups.shared.curvature=0.5"],
        "curvature=0.5 has no effect: model.moe.groups.shared.geometry is 'euclidean'",
    ),
    (
        ["model.moe.groups.shared.kind=evidence"],
        "kind='evidence' is only valid for the language group (shared experts are always ffn)",
    ),
    (
        ["model.moe.routing.balance_coef.all=0.05"],
        "balance_coef.all=0.05 has no effect in routing.mode='modality', whose router(s) are vision, language",
    ),
    (
        ["model.moe.routing.mode=shared", "model.moe.routing.balance_coef.vision=0.01"],
        "balance_coef.vision=0.01 has no effect in routing.mode='shared', whose router(s) are all",
    ),
    (
        ["model.moe.routing.vision_tail.top_a=3"],
        "vision_tail.top_a=3 has no effect while model.moe.routing.vision_tail.enabled=false",
    ),
    (["source_file=elsewhere.yaml"], "overrides: 'source_file' is not a config key: load() records the file"),
]


@pytest.mark.parametrize("overrides,message", INERT, ids=[m[:40] for _, m in INERT])
def test_key_without_effect_is_refused(overrides, message):
    with pytest.raises(ConfigError) as caught:
        config_lib.load("moiie", overrides)
    assert message in str(caught.value)


def test_keys_with_effect_are_accepted():
    cfg = config_lib.load(
        "moiie", ["model.moe.groups.shared.geometry=lorentz", "model.moe.groups.shared.curvature=0.5"]
    )
    assert cfg.model.moe.groups.shared.curvature == 0.5
    # Defaults of a router the mode does not build are fine: a saved config carries them.
    cfg = config_lib.load("vanilla_moe")
    assert cfg.model.moe.routing.balance_coef == {"all": 0.01, "vision": 0.001, "language": 0.001}
    assert cfg.source_file.endswith("vanilla_moe.yaml")


def test_saved_config_of_every_experiment_reloads(tmp_path):
    """Saved and reloaded, every experiment's config is the same; `to_dict`'s walk over the dataclasses
    gives exactly what OmegaConf's conversion does (values and their types: lists, not tuples)."""
    from omegaconf import OmegaConf

    for path in sorted((REPO / "experiments").glob("*.yaml")):
        cfg = config_lib.load(path, ["model.vision.mean=[0.5, 0.5, 0.5]", "trainer.devices=[0]"])
        config_lib.save(cfg, tmp_path / "config.yaml")
        plain = config_lib.to_dict(cfg)
        assert config_lib.to_dict(config_lib.load(tmp_path / "config.yaml")) == plain, path.stem
        through_omegaconf = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        assert plain == through_omegaconf and repr(plain) == repr(through_omegaconf), path.stem


# LTDR's top-a belongs to the vision router; issue 15's layout: vision 2 + shared 1 + language 1.
LTDR_LAYOUT = [
    "model.moe.groups.vision.num_experts=2",
    "model.moe.groups.shared.num_experts=1",
    "model.moe.groups.language.num_experts=1",
    "model.moe.routing.vision_tail.enabled=true",
]


def test_ltdr_top_a_bounded_by_the_vision_router():
    # The language router has only 2 eligible experts; top_a=3 is valid because it never gets top-a.
    cfg = config_lib.load("moiie", LTDR_LAYOUT + ["model.moe.routing.vision_tail.top_a=3"])
    assert cfg.model.moe.routing.vision_tail.top_a == 3
    with pytest.raises(ConfigError, match=r"top_a=4 must be > top_k=2 and <= the 3 experts eligible for vision tokens"):
        config_lib.load("moiie", LTDR_LAYOUT + ["model.moe.routing.vision_tail.top_a=4"])
    # Shared mode: the one router sees all 4 experts.
    assert config_lib.load("ltdr", ["model.moe.routing.vision_tail.top_a=4"]).model.moe.routing.vision_tail.top_a == 4
    with pytest.raises(ConfigError, match=r"top_a=5 must be > top_k=2 and <= the 4 experts"):
        config_lib.load("ltdr", ["model.moe.routing.vision_tail.top_a=5"])


def test_layout_topology_and_layer_patterns():
    from asymoe import layout

    assert layout.eligible_groups("modality", "vision") == ("vision", "shared")
    assert layout.eligible_groups("modality", "language") == ("shared", "language")
    assert layout.eligible_groups("shared", "vision") == ("vision", "shared", "language")
    assert layout.router_names("shared") == ("all",) and layout.router_names("modality") == ("vision", "language")
    counts = {"vision": 2, "shared": 1, "language": 1}
    assert layout.eligible_experts(counts, "modality", "vision") == 3
    assert layout.eligible_experts(counts, "modality", "language") == 2
    assert layout.eligible_experts(counts, "shared", "language") == 4
    expected = {
        "every_other_odd": [1, 3],
        "every_other_even": [0, 2],
        "all": [0, 1, 2, 3],
        "first_half": [0, 1],
        "second_half": [2, 3],
    }
    assert {p: layout.moe_layer_indices(p, 4) for p in layout.LAYER_PATTERNS} == expected
    assert layout.moe_layer_indices([-1, 0, 3], 4) == [0, 3]
    # MoE-LLaVA's placement on the 2-layer base LM: layer 0 only.
    vanilla = config_lib.load("vanilla_moe").model
    assert layout.moe_layer_indices(vanilla.moe.layers, vanilla.language.num_layers) == [0]


def test_choices_come_from_the_schema():
    assert config_lib.choices("model.moe.routing.mode") == ("shared", "modality")
    assert config_lib.choices("model.moe.routing.balance_modalities[0]") == ("vision", "language")
    assert config_lib.choices("model.moe.groups.shared.geometry") == ("euclidean", "lorentz", "poincare")
    assert config_lib.choices("trainer.strategy") == ("auto", "ddp", "fsdp", "fsdp2")
    assert config_lib.choices("seed") is None and config_lib.choices("no.such.key") is None


def test_override_syntax_round_trips():
    values = ["abc", "32", "true", "null", "a b", "[", "x: y", 3, 1.5, True, None, [0, 1], {"vision": 0.01}, ""]
    for value in values:
        item = config_lib.format_override("k", value)
        assert config_lib.parse_overrides([item]).k == value, item
    with pytest.raises(ConfigError, match=r"grid.yaml: unknown key 'model.moe.rooting'"):
        config_lib.check_overrides(["model.moe.rooting.top_k=1"], "grid.yaml")
    with pytest.raises(
        ConfigError, match=r"model.moe.routing.mode='per_token' is not valid; use one of shared, modality"
    ):
        config_lib.check_overrides(["model.moe.routing.mode=per_token"])
    for bad in ("noequals", "=1", "a..b=1", " =1"):
        with pytest.raises(ConfigError, match="key.sub=value"):
            config_lib.parse_overrides([bad])


def test_shared_checks_for_run_time_callers():
    config_lib.check_fsdp_accelerator("fsdp2", "cpu")
    config_lib.check_fsdp_accelerator("fsdp", "gpu")
    with pytest.raises(ConfigError, match=r"^trainer.strategy='fsdp' \(Lightning FSDPStrategy\) needs a GPU"):
        config_lib.check_fsdp_accelerator("fsdp", "cpu")
    config_lib.check_evidence_heads(4, 128)
    config_lib.check_evidence_heads(3, None)  # width not known yet (pretrained LM)
    with pytest.raises(ConfigError, match=r"^model.moe.evidence.heads=3 must divide the language hidden size 128$"):
        config_lib.check_evidence_heads(3, 128)


def test_config_error_is_one_line():
    assert str(ConfigError("bad key 'a\nb'\r")) == "bad key 'a\\nb'\\r"
