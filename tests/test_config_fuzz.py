"""Fuzzed malformed configs: each must end in one ConfigError whose message is one line.

Cases are generated with a fixed seed from the schema itself (its keys, types and choice lists)
plus tables of out-of-range values, missing files, broken YAML and broken overrides. A case
passes only if `load` raises ConfigError (not any other exception) with a single-line message
that names what is wrong (the key, the file or the value). A few go through the CLI as well.
"""

from __future__ import annotations

import random
import string
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest

from asymoe import cli
from asymoe import config as config_lib
from asymoe.config import ConfigError
from asymoe.config.schema import Config, all_keys
from conftest import REPO

SEED = 20261201
BASE = REPO / "experiments" / "moiie.yaml"
# Keys whose children are free-form (timm kwargs) or checked by validation (router names).
FREE_FORM = ("model.vision.model_kwargs", "model.moe.routing.balance_coef", "data.scenes.families")


@dataclass
class Case:
    kind: str
    overrides: list[str]
    # A file under the test's temp dir to write (with `text`) and load; None = the schema defaults
    # alone (MoIIE's 1 + 2 + 1 experts, top-2, a 2-layer LM of width 128).
    file: str | None = None
    text: str | bytes | None = None
    # Something the one-line message must contain (a key, a file, a phrase).
    expect: str = ""
    # A key the message's "unknown key '...'" must be a prefix of (unknown-key cases).
    unknown_prefix_of: str | None = None


def _leaf_types() -> dict[str, object]:
    """Dotted key -> annotation, for every non-section field of the schema."""
    out: dict[str, object] = {}

    def walk(schema: type, prefix: str) -> None:
        hints = typing.get_type_hints(schema)
        for item in fields(schema):
            hint = hints[item.name]
            if is_dataclass(hint):
                walk(hint, f"{prefix}{item.name}.")
            else:
                out[f"{prefix}{item.name}"] = hint

    walk(Config, "")
    return out


LEAVES = _leaf_types()
WRONG_FOR = {
    int: ["abc", "[1, 2]", "{a: 1}", "1.5"],
    float: ["abc", "[1]", "{a: 1}"],
    bool: ["abc", "[1]", "{a: 1}", "1.5"],
    str: ["[1, 2]", "{a: 1}"],
    list: ["abc", "3", "{a: 1}"],
    dict: ["abc", "3", "[1, 2]"],
}


def _base_type(hint: object) -> object:
    args = [arg for arg in get_args(hint) if arg is not type(None)]
    if get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    origin = get_origin(hint)
    return origin if origin in (list, dict, Literal) else hint


def wrong_types(rng: random.Random, n: int) -> list[Case]:
    typed = [(key, _base_type(hint)) for key, hint in LEAVES.items() if _base_type(hint) in WRONG_FOR]
    cases = []
    for _ in range(n):
        key, kind = rng.choice(typed)
        cases.append(Case("wrong type", [f"{key}={rng.choice(WRONG_FOR[kind])}"], expect=key))
    sections = [key for key in all_keys() if key not in LEAVES]
    for _ in range(n // 4):
        key = rng.choice(sections)
        cases.append(Case("scalar onto a section", [f"{key}={rng.choice(['3', 'fast', '[1]'])}"], expect=key))
    return cases


def _mutate(rng: random.Random, key: str) -> str:
    parts = key.split(".")
    index = rng.randrange(len(parts))
    part = parts[index]
    position = rng.randrange(len(part))
    operation = rng.choice(["drop", "swap", "double", "insert", "suffix"])
    if operation == "drop" and len(part) > 1:
        part = part[:position] + part[position + 1 :]
    elif operation == "swap" and position + 1 < len(part) and part[position] != part[position + 1]:
        part = part[:position] + part[position + 1] + part[position] + part[position + 2 :]
    elif operation == "double":
        part = part[:position] + part[position] + part[position:]
    elif operation == "insert":
        part = part[:position] + rng.choice(string.ascii_lowercase) + part[position:]
    else:
        part = part + "_" + rng.choice(["x", "typo", "old"])
    parts[index] = part
    return ".".join(parts)


def unknown_keys(rng: random.Random, n: int) -> list[Case]:
    known = set(all_keys())
    keys = [key for key in LEAVES if not key.startswith(FREE_FORM)]
    cases: list[Case] = []
    while len(cases) < n:
        mutated = _mutate(rng, rng.choice(keys))
        if mutated in known or mutated.startswith(FREE_FORM) or "." in mutated and mutated.rsplit(".", 1)[0] in LEAVES:
            continue
        cases.append(Case("unknown key", [f"{mutated}=1"], unknown_prefix_of=mutated))
    return cases


def bad_choices(rng: random.Random, n: int) -> list[Case]:
    choice_keys = [key for key in LEAVES if config_lib.choices(key) is not None]
    cases = []
    for _ in range(n):
        key = rng.choice(choice_keys)
        value = "".join(rng.choice(string.ascii_lowercase + "_") for _ in range(rng.randint(2, 10)))
        if value in config_lib.choices(key):
            continue
        if get_origin(_base_type_raw(key)) is list:
            cases.append(Case("bad choice", [f"{key}=[{value}]"], expect="is not valid; use one of"))
        else:
            cases.append(Case("bad choice", [f"{key}={value}"], expect=f"{key}='{value}' is not valid; use one of"))
    return cases


def _base_type_raw(key: str) -> object:
    hint = LEAVES[key]
    args = [arg for arg in get_args(hint) if arg is not type(None)]
    return args[0] if get_origin(hint) is not list and len(args) == 1 else hint


def out_of_range(rng: random.Random, n: int) -> list[Case]:
    group = lambda: rng.choice(["vision", "shared", "language"])  # noqa: E731
    router = lambda: rng.choice(["all", "vision", "language"])  # noqa: E731
    makers = [
        lambda: ("model.moe.routing.top_k", rng.choice([rng.randint(-3, 0), rng.randint(4, 50)])),
        lambda: ("model.moe.layers", f"[{rng.choice([rng.randint(2, 100), rng.randint(-100, -3)])}]"),
        lambda: ("model.moe.layers", rng.choice(["every_third", "odd", "1.5", "[0.5]", "[true]", "{a: 1}", "[]"])),
        lambda: (f"model.moe.groups.{group()}.num_experts", rng.randint(-5, -1)),
        lambda: (f"model.moe.groups.{group()}.intermediate_size", rng.randint(-5, 0)),
        lambda: (f"model.moe.groups.{group()}.curvature", rng.choice([0, -1, -0.5])),
        lambda: ("data.val_fraction", rng.choice([0, 1, 1.5, -0.2, rng.uniform(1, 9)])),
        lambda: ("model.moe.geometry_loss.cone_k", rng.choice([0, 1, 2.5, -0.1])),
        lambda: ("model.moe.geometry_loss.order_weight", rng.choice([-1, -0.1])),
        lambda: ("model.moe.evidence.alpha_init", rng.choice([0, 1, 1.2, -1])),
        lambda: ("model.moe.evidence.heads", rng.choice([0, -2, 3, 5, 7, 9, 96, 256])),
        lambda: ("optim.lr", rng.choice([0, -1e-3])),
        lambda: ("optim.min_lr_ratio", rng.choice([-0.1, 1.5])),
        lambda: ("optim.betas", rng.choice(["[0.9]", "[1.5, 0.9]", "[0.9, 0.99, 0.999]", "[a, b]"])),
        lambda: ("model.vision.image_size", rng.randint(-64, 0)),
        lambda: (rng.choice(["data.images_per_batch", "data.eval_batch_size"]), rng.randint(-5, 0)),
        lambda: (rng.choice(["data.limit_train", "data.limit_val", "data.limit_test"]), rng.randint(-5, 0)),
        lambda: ("model.moe.routing.jitter", -rng.uniform(0.01, 1)),
        lambda: ("model.moe.routing.z_loss_coef", -rng.uniform(0.01, 1)),
        lambda: (f"model.moe.routing.balance_coef.{router()}", -rng.uniform(0.001, 1)),
        lambda: (f"model.moe.routing.balance_coef.{rng.choice(['text', 'image', 'shared'])}", 0.1),
        lambda: (f"model.language.{rng.choice(['hidden_size', 'num_layers', 'num_heads'])}", rng.randint(-4, 0)),
        lambda: ("trainer.num_nodes", rng.randint(-3, 0)),
        lambda: ("trainer.accumulate_grad_batches", rng.randint(-3, 0)),
    ]
    cases = []
    for _ in range(n):
        key, value = rng.choice(makers)()
        # The message names the key, or for grouped rules its section.
        expect = "balance_coef" if "balance_coef" in key else key.rsplit(".", 1)[0]
        cases.append(Case("out of range", [f"{key}={value}"], expect=expect))
    # Switches that need a partner: the partner is missing.
    tail_on = "model.moe.routing.vision_tail.enabled=true"
    cases += [
        Case("needs partner", [tail_on, "model.moe.routing.top_k=3"], expect="vision_tail"),
        Case("needs partner", ["model.moe.geometry_loss.align_weight=0.1"], expect="hyperbolic shared group"),
        Case("needs partner", ["trainer.activation_checkpointing=true"], expect="activation_checkpointing"),
        Case("needs partner", ["trainer.devices=2"], expect="output_dir"),
        Case("needs partner", ["trainer.resume=last"], expect="output_dir"),
        Case("needs partner", ["trainer.strategy=fsdp", "trainer.accelerator=cpu"], expect="needs a GPU"),
        Case("needs partner", ["data.source=llava_json"], expect="data.train_path is required"),
        Case("needs partner", ["model.moe.enabled=false", tail_on], expect="vision_tail"),
    ]
    return cases


def _random_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(rng.randint(4, 12)))


def missing_files(rng: random.Random, n: int) -> list[Case]:
    cases = []
    for _ in range(n):
        name = _random_name(rng)
        kind = rng.randrange(6)
        if kind == 0:
            cases.append(Case("missing file", [], file=f"{name}.yaml", expect="config file not found"))
        elif kind == 1:
            text = f"extends: {name}.yaml\nseed: 1\n"
            cases.append(Case("missing parent", [], file=f"child_{name}.yaml", text=text, expect=f"{name}.yaml"))
        elif kind == 2:
            key = rng.choice(["model.vision.pretrained_path", "model.language.pretrained_path"])
            cases.append(Case("missing path", [f"{key}=/no/such/{name}"], expect=f"{key}: path does not exist"))
        elif kind == 3:
            cases.append(Case("missing ckpt", [f"trainer.resume=/no/such/{name}.ckpt"], expect="checkpoint not found"))
        elif kind == 4:
            key = rng.choice(["train_path", "val_path", "test_path", "image_root"])
            overrides = ["data.source=llava_json", f"data.{key}=/no/such/{name}"]
            if key != "train_path":
                overrides.append(f"data.train_path={BASE}")
            cases.append(Case("missing data", overrides, expect=f"data.{key}: path does not exist"))
        else:
            cases.append(Case("odd path", [f"trainer.resume=/tmp/{'x' * 300}/{name}"], expect="checkpoint not found"))
    return cases


BROKEN_YAML = [
    "model: [unclosed\n",
    "seed: 1\n  indented: 2\n",
    "experiment: 'unterminated\n",
    "\tseed: 1\n",
    "a: b: c\n",
    "seed: @1\n",
    "seed: 1\nseed: 2\n",
    "model:\n  moe:\n    layers: [0, 1\n",
    "{{{\n",
    "seed: *undefined_alias\n",
]
NOT_A_MAPPING = ["- a\n- b\n", "just a string\n", "42\n"]
WRONG_IN_YAML = [
    ("model:\n  moe:\n    rooting: {top_k: 1}\n", "unknown key 'model.moe.rooting'"),
    ("seed: {a: 1}\n", "seed"),
    ("model:\n  moe:\n    routing:\n      mode: per_token\n", "model.moe.routing.mode='per_token' is not valid"),
    ("extends: [a.yaml, b.yaml]\n", "'extends' must be one file path"),
    ("source_file: x.yaml\n", "'source_file' is not a config key"),
    ("model: 3\n", "model"),
    ("experiment: ${nowhere}\n", "experiment"),
]


def broken_yaml(rng: random.Random, n: int) -> list[Case]:
    lines = BASE.read_text().splitlines(keepends=True)
    cases = []
    for index in range(n):
        name = f"broken_{index}.yaml"
        kind = rng.randrange(5)
        if kind == 0:  # a syntax error spliced into a real experiment file
            at = rng.randrange(len(lines) + 1)
            text = "".join(lines[:at]) + rng.choice(BROKEN_YAML) + "".join(lines[at:])
            cases.append(Case("yaml syntax", [], file=name, text=text, expect=name))
        elif kind == 1:
            cases.append(Case("yaml syntax", [], file=name, text=rng.choice(BROKEN_YAML), expect="not valid YAML"))
        elif kind == 2:
            text = rng.choice(NOT_A_MAPPING)
            cases.append(Case("not a mapping", [], file=name, text=text, expect="expected a mapping"))
        elif kind == 3:
            text, expect = rng.choice(WRONG_IN_YAML)
            cases.append(Case("wrong in yaml", [], file=name, text=text, expect=expect))
        else:
            raw = bytes(rng.randrange(128, 256) for _ in range(rng.randint(1, 40)))
            cases.append(Case("not utf-8", [], file=name, text=b"seed: " + raw + b"\n", expect=name))
    return cases


BAD_OVERRIDES = [
    ("=1", "key.sub=value"),
    ("noequals", "key.sub=value"),
    ("a..b=1", "key.sub=value"),
    (".seed=1", "key.sub=value"),
    ("seed.=1", "key.sub=value"),
    (" =1", "key.sub=value"),
    ("model.moe.layers=[0,", "overrides"),
    ("seed=[1", "overrides"),
    ("experiment=${nope}", "experiment"),
    ("experiment=${oc.env:ASYMOE_FUZZ_SURELY_UNSET}", "experiment"),
    ("model=3", "model"),
    ("model.moe=[1]", "model.moe"),
    ("seed={a: 1}", "seed"),
    ("model.moe.routing.balance_coef=3", "balance_coef"),
    ("model.moe.routing.balance_modalities=vision", "balance_modalities"),
    ("model.moe.routing.balance_coef.vision=abc", "balance_coef.vision"),
    ("extends=other.yaml", "unknown key 'extends'"),
]


def bad_overrides(rng: random.Random, n: int) -> list[Case]:
    cases = [Case("bad override", [item], expect=expect) for item, expect in BAD_OVERRIDES]
    while len(cases) < n:
        garbage = "".join(rng.choice(string.ascii_letters + ".-_ ") for _ in range(rng.randint(1, 20)))
        if "=" not in garbage:
            cases.append(Case("no equals sign", [garbage], expect="key.sub=value"))
    return cases


def generate() -> list[Case]:
    rng = random.Random(SEED)
    return (
        wrong_types(rng, 40)
        + unknown_keys(rng, 40)
        + bad_choices(rng, 30)
        + out_of_range(rng, 40)
        + missing_files(rng, 24)
        + broken_yaml(rng, 30)
        + bad_overrides(rng, 26)
    )


CASES = generate()


def test_enough_cases():
    assert len(CASES) >= 200
    assert len({c.kind for c in CASES}) >= 12


def _load_case(case: Case, folder: Path) -> ConfigError:
    path = None
    if case.file is not None:
        path = folder / case.file
        if isinstance(case.text, bytes):
            path.write_bytes(case.text)
        elif case.text is not None:
            path.write_text(case.text)
    try:
        config_lib.load(path, case.overrides)
    except ConfigError as error:
        return error
    except Exception as error:  # any other type is a bug: the CLI would print a traceback
        raise AssertionError(f"{type(error).__name__} instead of ConfigError: {error}") from error
    raise AssertionError("accepted")


def _check_message(case: Case, message: str) -> None:
    assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
    assert "Traceback" not in message
    assert case.expect in message, f"{case.expect!r} not in {message!r}"
    if case.unknown_prefix_of is not None:
        assert "unknown key '" in message, message
        reported = message.split("unknown key '", 1)[1].split("'", 1)[0]
        assert case.unknown_prefix_of.startswith(reported), (reported, case.unknown_prefix_of)


def test_every_malformed_config_is_one_config_error(tmp_path):
    failures = []
    for number, case in enumerate(CASES):
        try:
            _check_message(case, str(_load_case(case, tmp_path)))
        except AssertionError as error:
            failures.append(f"case {number} ({case.kind}, {case.overrides}, {case.file}): {error}")
    assert not failures, f"{len(failures)} of {len(CASES)} cases failed:\n" + "\n".join(failures)


def _exit_code(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exit_:
        return int(exit_.code)


@pytest.mark.parametrize("number", [0, 45, 90, 120, 160, 185, 200, 210])
def test_cli_exits_2_with_one_line(number, tmp_path, capsys):
    case = CASES[number]
    path = BASE
    if case.file is not None:
        path = tmp_path / case.file
        if isinstance(case.text, bytes):
            path.write_bytes(case.text)
        elif case.text is not None:
            path.write_text(case.text)
    command = ["params", "fit", "test"][number % 3]
    extra = ["ckpt=/no/such.ckpt"] if command == "test" else []
    code = _exit_code([command, str(path), *case.overrides, *extra, f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2, (case, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asymoe: error: "), err
    assert case.expect in lines[0]
    assert not (tmp_path / "out").exists()
