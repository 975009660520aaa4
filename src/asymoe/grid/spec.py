"""Grid files: read (with ``extends:``) and check; :mod:`asymoe.grid.cells` expands them into cells.

A grid file (``ablations/*.yaml``)::

    extends: _presets.yaml              # optional: another grid file whose keys this one inherits
    name: routing                       # GRID_DIR defaults to runs/grids/<name>
    base: ../experiments/moiie.yaml     # relative to the grid file, or an experiment name
    overrides: [key=value, ...]         # applied to every cell
    variants:                           # optional; crossed with the axes
      ltdr: [model.moe.routing.vision_tail.enabled=true, ...]
      dense: {experiment: dense}        # a variant may switch the base experiment
    axes:                               # dotted config key -> values; crossed
      model.moe.routing.top_k: [1, 2]
    seeds: [0, 1, 2]                    # default [0]
    quick: [data.limit_train=2000, ...] # the CPU-minutes preset, applied with --quick
    metric: test/accuracy               # the main metric (progress lines, first in tables)
    metrics: [test/accuracy, test/lm_loss]  # optional: the metrics of the chart and main table
    reference: dense                    # optional: the group every other group is compared with
    launcher: {partition: gpu, time: 240, gpus_per_node: 1}  # optional: SLURM options (--launcher slurm)

``extends`` is resolved first: the file's own top-level keys replace the extended file's (no deep
merge, so a grid's ``variants:`` never mixes with another grid's); chains are allowed, cycles are
an error, and paths in each file are relative to that file.

Cells are variants x axes x seeds. A cell's overrides apply in this order: grid ``overrides``, ``quick`` (with --quick),
command-line overrides, the variant's, the axes', ``seed``; an override applied to every cell may
not set a key the grid varies.

``reference`` names a variant (each group is then compared with the group of that variant at the
same axis values) or a group (``variant=dense__routing.top_k=2``, compared with every group).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from asymoe import config as config_lib
from asymoe.config import ConfigError

GRID_KEYS = ("extends", "name", "base", "overrides", "variants", "axes", "seeds", "quick", "metric", "metrics")
GRID_KEYS += ("reference", "launcher")
# `launcher:` option -> (sbatch parameter as submitit's SlurmExecutor names it, accepted type, meaning).
LAUNCHER_OPTIONS: dict[str, tuple[str, type, str]] = {
    "partition": ("partition", str, "sbatch --partition"),
    "account": ("account", str, "sbatch --account"),
    "qos": ("qos", str, "sbatch --qos"),
    "constraint": ("constraint", str, "sbatch --constraint"),
    "time": ("time", int, "time limit in minutes"),
    "nodes": ("nodes", int, "nodes per cell"),
    "tasks_per_node": ("ntasks_per_node", int, "ranks per node (= trainer.devices for multi-GPU cells)"),
    "gpus_per_node": ("gpus_per_node", int, "GPUs per node"),
    "cpus_per_task": ("cpus_per_task", int, "CPUs per rank"),
    "mem": ("mem", str, "memory per node, e.g. 64G"),
    "setup": ("setup", list, "shell lines run before the cell, e.g. module load"),
    "extra": ("additional_parameters", dict, "any other sbatch flag: {flag: value}"),
}
VARIANT_KEYS = ("experiment", "overrides")
DEFAULT_METRIC = "test/accuracy"
_NAME_CHARACTER = re.compile(r"[A-Za-z0-9]")


@dataclass
class Variant:
    label: str  # as written in the grid file (summary, HParams)
    experiment: str | None  # YAML path; None = the grid's base
    overrides: list[str]


@dataclass
class Grid:
    name: str
    path: Path
    sha256: str  # of the grid file's keys and those of every file it extends, `launcher:` excepted
    base: str  # YAML path
    overrides: list[str]  # every cell: grid overrides, quick preset, command line
    variants: list[Variant]
    axes: dict[str, list]
    seeds: list[int]
    metric: str
    metrics: list[str]  # main metrics: chart, main table; metric first
    reference: str | None  # a variant label or a group name
    quick: bool
    cli_overrides: list[str]
    launcher: dict = field(default_factory=dict)  # SLURM options (LAUNCHER_OPTIONS), not part of the identity

    @property
    def switch_columns(self) -> list[str]:
        return (["variant"] if self.variants else []) + list(self.axes)


# ---------------------------------------------------------------------------------------------
# Reading a grid file


def resolve_grid_path(name_or_path: str) -> Path:
    """A grid YAML path, or a grid name in ablations/."""
    return config_lib.resolve_named_yaml(name_or_path, "ablations")


def _read_mapping(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"grid file not found: {path}")
    text = path.read_text()
    try:
        raw = OmegaConf.to_container(OmegaConf.create(text))
    except Exception as error:  # yaml errors carry multi-line marks; keep the first line
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(GRID_KEYS)}")
    for key in raw:
        if key not in GRID_KEYS:
            match = difflib.get_close_matches(str(key), GRID_KEYS, n=1)
            hint = f"did you mean '{match[0]}'?" if match else f"valid keys: {', '.join(GRID_KEYS)}"
            raise ConfigError(f"{path}: unknown key '{key}'; {hint}")
    return raw


def _is_yaml_path(value: Any) -> bool:
    return isinstance(value, str) and value.endswith((".yaml", ".yml"))


def _anchor_paths(raw: dict, directory: Path) -> None:
    """Experiment YAML paths in `raw` (base, variant experiments) made relative to `directory`."""
    if _is_yaml_path(raw.get("base")):
        raw["base"] = os.path.normpath(directory / raw["base"])
    variants = raw.get("variants")
    for body in variants.values() if isinstance(variants, dict) else ():
        if isinstance(body, dict) and _is_yaml_path(body.get("experiment")):
            body["experiment"] = os.path.normpath(directory / body["experiment"])


def read_grid_file(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, list[str]]:
    """The grid file's keys with its ``extends`` chain resolved, and each file's identity.

    A file's identity is its keys but ``launcher:`` as canonical JSON: what makes the grid's
    cells what they are (comments and SLURM options do not).

    Paths inside an extended file (base, variant experiments) are made absolute here, so that
    they stay relative to the file that wrote them.
    """
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    raw = _read_mapping(path)
    identity = json.dumps({key: value for key, value in raw.items() if key != "launcher"}, sort_keys=True)
    _anchor_paths(raw, path.parent)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw, [identity]
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: extends must be a grid file path relative to this file, got {parent!r}")
    inherited, identities = read_grid_file((path.parent / parent).resolve(), seen + (path.resolve(),))
    return {**inherited, **raw}, [identity, *identities]


def _experiment_path(value: Any, where: str) -> str:
    """An experiment YAML path (already absolute when it came from a grid file) or name."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be an experiment YAML path or name, got {value!r}")
    if _is_yaml_path(value):
        return value
    return str(config_lib.resolve_config_path(value))


def _override_list(value: Any, where: str) -> list[str]:
    """A list of ``key=value`` overrides, checked by the config's own override parser."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{where} must be a list of key=value strings, got {value!r}")
    config_lib.parse_overrides(value, where)
    return list(value)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def _keys_overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _load_variants(raw: dict, where: str) -> list[Variant]:
    raw_variants = raw.get("variants") or {}
    if not isinstance(raw_variants, dict):
        raise ConfigError(f"{where}: variants must map a name to a list of key=value overrides")
    variants = []
    for label, body in raw_variants.items():
        at = f"{where}: variants.{label}"
        if not _NAME_CHARACTER.search(str(label)):
            raise ConfigError(f"{at}: a variant name needs at least one letter or digit")
        if isinstance(body, dict):
            for key in body:
                if key not in VARIANT_KEYS:
                    raise ConfigError(f"{at}: unknown key '{key}'; a variant has {' and '.join(VARIANT_KEYS)}")
            experiment = _experiment_path(body["experiment"], f"{at}.experiment") if "experiment" in body else None
            overrides = _override_list(body.get("overrides"), f"{at}.overrides")
        else:
            experiment, overrides = None, _override_list(body, at)
        variants.append(Variant(str(label), experiment, overrides))
    return variants


def _load_axes(raw: dict, where: str) -> dict[str, list]:
    axes = raw.get("axes") or {}
    if not isinstance(axes, dict):
        raise ConfigError(f"{where}: axes must map a dotted config key to a list of values")
    for key, values in axes.items():
        if not isinstance(values, list):
            raise ConfigError(f"{where}: axes.{key} must be a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"{where}: axes.{key} is empty; give it at least one value")
        if key == "seed":
            raise ConfigError(f"{where}: axes.seed: list seeds under 'seeds:' instead")
    return axes


def _load_metrics(raw: dict, where: str) -> tuple[str, list[str]]:
    """The main metric and the main metrics (chart, main table), the main one first."""
    metrics = raw.get("metrics")
    if metrics is not None and (
        not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) and m for m in metrics)
    ):
        raise ConfigError(f"{where}: metrics must be a non-empty list of metrics.json keys, got {metrics!r}")
    metric = raw.get("metric", metrics[0] if metrics else DEFAULT_METRIC)
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"{where}: metric must be a metrics.json key such as {DEFAULT_METRIC}, got {metric!r}")
    return metric, list(dict.fromkeys([metric, *(metrics or [])]))


def _load_scalars(raw: dict, where: str) -> tuple[str, str, list[int]]:
    """name, base experiment path, seeds."""
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"{where}: name must be a non-empty string of letters, digits, '.', '_', '-', got {name!r}")
    if "base" not in raw:
        raise ConfigError(f"{where}: base is required (an experiment YAML relative to the grid file, or a name)")
    base = _experiment_path(raw["base"], f"{where}: base")
    seeds = raw.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    return name, base, seeds


def _every_cell_overrides(
    raw: dict, where: str, quick: bool, cli_overrides: list[str], variants: list[Variant], axes: dict
) -> list[str]:
    """Grid overrides, quick preset, command line; none of them may set a key the grid varies."""
    quick_preset = _override_list(raw.get("quick"), f"{where}: quick")
    if quick and not quick_preset:
        raise ConfigError(f"{where}: --quick needs a 'quick:' list of overrides in the grid file")
    every_cell = [
        *[(item, f"{where}: overrides") for item in _override_list(raw.get("overrides"), f"{where}: overrides")],
        *[(item, f"{where}: quick") for item in (quick_preset if quick else [])],
        *[(item, "command-line override") for item in cli_overrides],
    ]
    varied = [(key, f"axes.{key}") for key in axes] + [
        (_override_key(item), f"variants.{v.label}") for v in variants for item in v.overrides
    ]
    for item, origin in every_cell:
        for key, at in varied:
            if _keys_overlap(_override_key(item), key):
                raise ConfigError(f"{origin} '{item}' sets {key}, which the grid varies in {at}; drop one of them")
    return [item for item, _ in every_cell]


def load_grid(path: str | os.PathLike, cli_overrides: list[str] | None = None, quick: bool = False) -> Grid:
    """Read and check a grid file; `cli_overrides` and (with `quick`) its preset apply to every cell."""
    grid_path = resolve_grid_path(str(path))
    raw, identities = read_grid_file(grid_path)
    where = str(grid_path)
    name, base, seeds = _load_scalars(raw, where)
    metric, metrics = _load_metrics(raw, where)
    reference = raw.get("reference")
    if reference is not None and (not isinstance(reference, str) or not reference):
        raise ConfigError(f"{where}: reference must name a variant or a group, got {reference!r}")
    variants = _load_variants(raw, where)
    axes = _load_axes(raw, where)
    if not axes and not variants:
        raise ConfigError(f"{where}: axes and variants are both empty; a grid varies at least one of them")
    cli_overrides = _override_list(list(cli_overrides or []), "command-line overrides")
    return Grid(
        name=name,
        path=grid_path,
        sha256=hashlib.sha256("\n".join(identities).encode()).hexdigest(),
        base=base,
        overrides=_every_cell_overrides(raw, where, quick, cli_overrides, variants, axes),
        variants=variants,
        axes=axes,
        seeds=seeds,
        metric=metric,
        metrics=metrics,
        reference=reference,
        quick=quick,
        cli_overrides=cli_overrides,
        launcher=check_launcher_options(raw.get("launcher"), f"{where}: launcher"),
    )


def check_launcher_options(options: Any, where: str) -> dict:
    """A `launcher:` block (or --slurm items), checked: known options, values of the right type."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ConfigError(f"{where} must map SLURM options ({', '.join(LAUNCHER_OPTIONS)}) to values, got {options!r}")
    for key, value in options.items():
        if key not in LAUNCHER_OPTIONS:
            raise ConfigError(f"{where}: unknown option '{key}'; valid: {', '.join(LAUNCHER_OPTIONS)}")
        _, kind, meaning = LAUNCHER_OPTIONS[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{where}.{key}: expected {kind.__name__} ({meaning}), got {value!r}")
        if kind is int and value < 1:
            raise ConfigError(f"{where}.{key}: must be at least 1, got {value}")
        if key == "setup" and not all(isinstance(line, str) for line in value):
            raise ConfigError(f"{where}.setup: expected a list of shell lines, got {value!r}")
    return dict(options)
