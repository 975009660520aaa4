"""A grid directory's state: what grid made it (grid.json) and where each cell stands.

``GRID_DIR/grid.json`` records the grid (file hash, cells, switches); ``GRID_DIR/cells/<cell>/``
holds ``cell.json`` (its command and resolved config), ``status.json`` (running | finished |
failed | interrupted, the error's last line) and ``log.txt``. A cell is finished exactly when its
run wrote ``metrics.json``. A directory made by a different grid file, other --quick/overrides,
or holding a cell finished under another config, is refused unless --force, which then reruns
only the cells whose config changed.
"""

from __future__ import annotations

import json
from pathlib import Path

from asymoe.config import ConfigError
from asymoe.files import METRICS_FILE, read_json
from asymoe.grid.cells import Cell
from asymoe.grid.spec import Grid

SPEC_FILE = "grid.json"
CELLS_DIR = "cells"
CELL_FILE = "cell.json"
STATUS_FILE = "status.json"
LOG_FILE = "log.txt"


def _fingerprint(grid: Grid) -> dict:
    return {"grid_sha256": grid.sha256, "quick": grid.quick, "overrides": grid.cli_overrides}


def _describe(record: dict) -> str:
    text = f"{record.get('grid_file')} (sha256 {str(record.get('grid_sha256'))[:12]})"
    if record.get("quick"):
        text += " --quick"
    if record.get("overrides"):
        text += " " + " ".join(record["overrides"])
    return text


def grid_spec(grid: Grid, cells: list[Cell]) -> dict:
    """What grid.json holds: enough to rebuild the report without the grid file or experiments."""
    keys = sorted({key for cell in cells for key in cell.config} - {"seed"})
    varied = [key for key in keys if len({json.dumps(cell.config.get(key)) for cell in cells}) > 1]
    return {
        "name": grid.name,
        "grid_file": str(grid.path),
        **_fingerprint(grid),
        "metric": grid.metric,
        "metrics": grid.metrics,
        "reference": grid.reference,
        "switch_columns": grid.switch_columns,
        "cells": [
            {
                "name": cell.name,
                "group": cell.group,
                "seed": cell.seed,
                "experiment": cell.experiment,
                "overrides": cell.overrides,
                "switches": cell.switches,
                "hparams": {
                    **({"variant": cell.switches["variant"]} if "variant" in cell.switches else {}),
                    **{key: cell.config.get(key) for key in varied},
                },
            }
            for cell in cells
        ],
    }


def cell_state(cell_dir: Path) -> str:
    """finished | failed | unfinished (started, never ended: killed or still running) | missing."""
    if (cell_dir / METRICS_FILE).is_file():
        return "finished"
    status = read_json(cell_dir / STATUS_FILE)
    if status is None:
        return "unfinished" if cell_dir.exists() else "missing"
    return "failed" if status.get("status") == "failed" else "unfinished"


def _config_difference(old: dict, new: dict) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return ""


def _check_identity(grid_dir: Path, grid: Grid, force: bool) -> None:
    previous = read_json(grid_dir / SPEC_FILE)
    if previous is None and grid_dir.is_dir() and any(grid_dir.iterdir()) and not force:
        raise ConfigError(
            f"{grid_dir}: exists and is not a grid directory (no {SPEC_FILE}); pass --output DIR or --force"
        )
    if previous is not None and not force and {k: previous.get(k) for k in _fingerprint(grid)} != _fingerprint(grid):
        new = {"grid_file": str(grid.path), **_fingerprint(grid)}
        raise ConfigError(
            f"{grid_dir}: made by a different grid, {_describe(previous)}, not {_describe(new)}; "
            "pass --force to reuse it or --output DIR for a new directory"
        )


def check_grid_dir(grid_dir: Path, grid: Grid, cells: list[Cell], force: bool) -> dict[str, str]:
    """Refuse a directory made by another grid unless `force`; return cell name -> state.

    A finished cell whose config has changed since (stale) gets state 'stale': refused without
    `force`, rerun with it.
    """
    _check_identity(grid_dir, grid, force)
    states = {}
    for cell in cells:
        cell_dir = grid_dir / CELLS_DIR / cell.name
        state = cell_state(cell_dir)
        if state == "finished":
            record = read_json(cell_dir / CELL_FILE)
            change = _config_difference(record["config"], cell.config) if record and "config" in record else ""
            if change:
                if not force:
                    raise ConfigError(
                        f"{grid_dir}: cell '{cell.name}' finished under another config ({change}); "
                        "pass --force to rerun it or --output DIR for a new directory"
                    )
                state = "stale"
        states[cell.name] = state
    return states
