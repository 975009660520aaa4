"""Cells of a grid: the product variants x axes x seeds, their names, and every cell's validated config.

A cell is named ``variant=<v>__<key>=<value>__seed=<s>``: an axis key is shortened to its last two
components, longer where two axes would collide, and values are written filesystem-safe. A
*group* is a cell without its seed; the summary aggregates the seeds of a group.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asymoe import config as config_lib
from asymoe.config import ConfigError
from asymoe.grid.spec import Grid

# Keys of a resolved config that say where it came from, not what it is.
NON_SETTING_KEYS = ("output_dir", "source_file")
MAX_NAME_LENGTH = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")


@dataclass
class Cell:
    name: str
    group: str
    seed: int
    experiment: str  # YAML path
    overrides: list[str]  # everything but output_dir
    switches: dict[str, Any]  # switch column -> value
    config: dict = field(default_factory=dict)  # resolved config, flattened (set by validate)

    def command(self, cell_dir: Path) -> list[str]:
        return [sys.executable, "-m", "asymoe.cli", "fit", self.experiment, *self.overrides, f"output_dir={cell_dir}"]


def name_value(value: Any) -> str:
    """`value` in a cell name: readable and filesystem-safe."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "+".join(name_value(item) for item in value) or "none"
    if isinstance(value, dict):
        return "+".join(f"{name_value(k)}-{name_value(v)}" for k, v in value.items()) or "none"
    return _UNSAFE.sub("_", str(value)).strip("_") or "empty"


def switch_text(value: Any) -> str:
    """A switch value in a summary table or an HParams string: JSON for lists, dicts, booleans, null."""
    if isinstance(value, (list, dict, bool)) or value is None:
        return json.dumps(value)
    return str(value)


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key's last two components, extended leftwards until no two keys collide."""
    parts = {key: key.split(".") for key in keys}
    length = {key: min(2, len(parts[key])) for key in keys}
    while True:
        short = {key: ".".join(parts[key][-length[key] :]) for key in keys}
        clashing = [key for key in keys if list(short.values()).count(short[key]) > 1 and length[key] < len(parts[key])]
        if not clashing:
            return short
        for key in clashing:
            length[key] += 1


def _check_name(grid: Grid, name: str, index: int, seen: dict[str, int]) -> None:
    if name in seen:
        raise ConfigError(
            f"{grid.path}: cells {seen[name] + 1} and {index + 1} are both named '{name}'; "
            "make the variant names, axis values and seeds distinct"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(
            f"{grid.path}: cell name '{name[:60]}...' is longer than {MAX_NAME_LENGTH} characters; "
            "shorten the variant names"
        )


def expand(grid: Grid) -> list[Cell]:
    """Cells in order variants x axes (file order) x seeds; duplicate names are an error."""
    short = short_keys(list(grid.axes))
    cells: list[Cell] = []
    seen: dict[str, int] = {}
    for variant, values in itertools.product(grid.variants or [None], itertools.product(*grid.axes.values())):
        parts, overrides, switches = [], list(grid.overrides), {}
        if variant is not None:
            parts.append(f"variant={name_value(variant.label)}")
            overrides += variant.overrides
            switches["variant"] = variant.label
        for key, value in zip(grid.axes, values):
            parts.append(f"{short[key]}={name_value(value)}")
            overrides.append(config_lib.format_override(key, value))
            switches[key] = value
        group = "__".join(parts)
        experiment = variant.experiment if variant is not None and variant.experiment else grid.base
        for seed in grid.seeds:
            name = f"{group}__seed={seed}"
            _check_name(grid, name, len(cells), seen)
            seen[name] = len(cells)
            cells.append(Cell(name, group, seed, experiment, overrides + [f"seed={seed}"], dict(switches)))
    _check_reference(grid, cells)
    return cells


def _check_reference(grid: Grid, cells: list[Cell]) -> None:
    labels = [variant.label for variant in grid.variants]
    groups = list(dict.fromkeys(cell.group for cell in cells))
    if grid.reference is None or grid.reference in labels or grid.reference in groups:
        return
    valid = (
        f"a variant ({', '.join(labels)}) or a group such as '{groups[0]}'"
        if labels
        else f"a group such as '{groups[0]}'"
    )
    raise ConfigError(f"{grid.path}: reference '{grid.reference}' is neither a variant nor a group; use {valid}")


def _check_axes(grid: Grid) -> None:
    """Each axis value must fit its key in the config schema; the error names the axis key."""
    for key, values in grid.axes.items():
        config_lib.check_overrides([config_lib.format_override(key, value) for value in values], f"{grid.path}: axes")


def validate(grid: Grid, cells: list[Cell]) -> None:
    """Load every cell's config (raising ConfigError that names the cell); fill `cell.config`."""
    _check_axes(grid)
    for index, cell in enumerate(cells, 1):
        try:
            cfg = config_lib.load(cell.experiment, cell.overrides)
        except ConfigError as error:
            raise ConfigError(f"{grid.path}: cell {index} of {len(cells)} '{cell.name}': {error}") from None
        flat = config_lib.switched_hparams(cfg)
        cell.config = {k: v for k, v in flat.items() if k not in NON_SETTING_KEYS}
