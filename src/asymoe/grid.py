"""Ablation grids: expand a grid file into cells, run each cell in its own process, resume, report.

A grid file (``ablations/*.yaml``)::

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
    metric: test/accuracy               # the main metric (chart, ordering of columns)

Cells are variants x axes x seeds, named ``variant=<v>__<key>=<value>__seed=<s>`` (an axis key is
shortened to its last two components, longer where two axes would collide); a *group* is a cell
without its seed, and the summary aggregates seeds per group. Every cell's config is validated
with :func:`asymoe.config.load` before any cell runs. A cell's overrides apply in this order:
grid ``overrides``, ``quick`` (with --quick), command-line overrides, the variant's, the axes',
``seed``; an override applied to every cell may not set a key the grid varies.

Each cell runs ``asymoe fit`` in its own process (a crash or OOM cannot take the grid down) in
``GRID_DIR/cells/<cell>/``, next to ``cell.json`` (its command and resolved config),
``status.json`` (running | finished | failed | interrupted, the error's last line) and
``log.txt`` (the child's output, also shown live). A cell is finished exactly when its
``metrics.json`` exists; rerunning a grid skips finished cells and reruns every other cell from
scratch. ``GRID_DIR/grid.json`` records the grid (file hash, cells, switches): a directory made by
a different grid file, other --quick/overrides, or holding a cell finished under another config,
is refused unless --force, which then reruns only the cells whose config changed.

Reports (written after a run, rebuilt by ``asymoe report GRID_DIR``): ``summary.csv``,
``summary.md``, ``summary.png`` (main metric per group, error bars = sample std over seeds) and
``hparams/`` (TensorBoard HParams: one session per cell, sessions of a group share a group name
so the dashboard aggregates seeds).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import difflib
import fnmatch
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from asymoe import config as config_lib
from asymoe.config import ConfigError
from asymoe.files import write_json_atomic

GRID_KEYS = ("name", "base", "overrides", "variants", "axes", "seeds", "quick", "metric")
VARIANT_KEYS = ("experiment", "overrides")
DEFAULT_METRIC = "test/accuracy"
SPEC_FILE = "grid.json"
CELLS_DIR = "cells"
CELL_FILE = "cell.json"
STATUS_FILE = "status.json"
LOG_FILE = "log.txt"
METRICS_FILE = "metrics.json"
PARAM_KEYS = ("params/total", "params/activated_per_vision_token", "params/activated_per_language_token")
# Keys of a resolved config that say where it came from, not what it is.
NON_SETTING_KEYS = ("output_dir", "source_file")
MAX_NAME_LENGTH = 200
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")


@dataclass
class Variant:
    label: str  # as written in the grid file (summary, HParams)
    experiment: str | None  # YAML path; None = the grid's base
    overrides: list[str]


@dataclass
class Grid:
    name: str
    path: Path
    sha256: str  # of the grid file's text
    base: str  # YAML path
    overrides: list[str]  # every cell: grid overrides, quick preset, command line
    variants: list[Variant]
    axes: dict[str, list]
    seeds: list[int]
    metric: str
    quick: bool
    cli_overrides: list[str]

    @property
    def switch_columns(self) -> list[str]:
        return (["variant"] if self.variants else []) + list(self.axes)


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


# ---------------------------------------------------------------------------------------------
# Grid file -> cells


def resolve_grid_path(name_or_path: str) -> Path:
    """A grid YAML path, or a grid name in ablations/."""
    return config_lib.resolve_named_yaml(name_or_path, "ablations")


def _experiment_path(value: Any, grid_path: Path, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be an experiment YAML path or name, got {value!r}")
    if value.endswith((".yaml", ".yml")):
        return os.path.normpath(grid_path.parent / value)
    return str(config_lib.resolve_config_path(value))


def _override_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{where} must be a list of key=value strings, got {value!r}")
    for item in value:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"{where}: '{item}' is not of the form key.sub=value")
    return list(value)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def _keys_overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def load_grid(path: str | os.PathLike, cli_overrides: list[str] | None = None, quick: bool = False) -> Grid:
    """Read and check a grid file; `cli_overrides` and (with `quick`) its preset apply to every cell."""
    grid_path = resolve_grid_path(str(path))
    if not grid_path.is_file():
        raise ConfigError(f"grid file not found: {grid_path}")
    text = grid_path.read_text()
    try:
        raw = OmegaConf.to_container(OmegaConf.create(text))
    except Exception as error:  # yaml errors carry multi-line marks; keep the first line
        raise ConfigError(f"{grid_path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{grid_path}: expected a mapping with keys {', '.join(GRID_KEYS)}")
    for key in raw:
        if key not in GRID_KEYS:
            match = difflib.get_close_matches(str(key), GRID_KEYS, n=1)
            hint = f"did you mean '{match[0]}'?" if match else f"valid keys: {', '.join(GRID_KEYS)}"
            raise ConfigError(f"{grid_path}: unknown key '{key}'; {hint}")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"{grid_path}: name must be a non-empty string of letters, digits, '.', '_', '-', got {name!r}")
    if "base" not in raw:
        raise ConfigError(f"{grid_path}: base is required (an experiment YAML relative to the grid file, or a name)")
    base = _experiment_path(raw["base"], grid_path, f"{grid_path}: base")

    variants = []
    raw_variants = raw.get("variants") or {}
    if not isinstance(raw_variants, dict):
        raise ConfigError(f"{grid_path}: variants must map a name to a list of key=value overrides")
    for label, body in raw_variants.items():
        where = f"{grid_path}: variants.{label}"
        if not _UNSAFE.sub("", str(label)):
            raise ConfigError(f"{where}: a variant name needs at least one letter or digit")
        if isinstance(body, dict):
            for key in body:
                if key not in VARIANT_KEYS:
                    raise ConfigError(f"{where}: unknown key '{key}'; a variant has {' and '.join(VARIANT_KEYS)}")
            experiment = _experiment_path(body["experiment"], grid_path, f"{where}.experiment") if "experiment" in body else None
            overrides = _override_list(body.get("overrides"), f"{where}.overrides")
        else:
            experiment, overrides = None, _override_list(body, where)
        variants.append(Variant(str(label), experiment, overrides))

    axes = raw.get("axes") or {}
    if not isinstance(axes, dict):
        raise ConfigError(f"{grid_path}: axes must map a dotted config key to a list of values")
    for key, values in axes.items():
        if not isinstance(values, list):
            raise ConfigError(f"{grid_path}: axes.{key} must be a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"{grid_path}: axes.{key} is empty; give it at least one value")
        if key == "seed":
            raise ConfigError(f"{grid_path}: axes.seed: list seeds under 'seeds:' instead")
    if not axes and not variants:
        raise ConfigError(f"{grid_path}: axes and variants are both empty; a grid varies at least one of them")

    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{grid_path}: seeds must be a non-empty list of integers, got {seeds!r}")
    metric = raw.get("metric", DEFAULT_METRIC)
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"{grid_path}: metric must be a metrics.json key such as {DEFAULT_METRIC}, got {metric!r}")
    quick_preset = _override_list(raw.get("quick"), f"{grid_path}: quick")
    if quick and not quick_preset:
        raise ConfigError(f"{grid_path}: --quick needs a 'quick:' list of overrides in the grid file")
    cli_overrides = _override_list(list(cli_overrides or []), "command-line overrides")
    every_cell = [
        *[(item, f"{grid_path}: overrides") for item in _override_list(raw.get("overrides"), f"{grid_path}: overrides")],
        *[(item, f"{grid_path}: quick") for item in (quick_preset if quick else [])],
        *[(item, "command-line override") for item in cli_overrides],
    ]
    varied = [(key, f"axes.{key}") for key in axes] + [
        (_override_key(item), f"variants.{v.label}") for v in variants for item in v.overrides
    ]
    for item, origin in every_cell:
        for key, where in varied:
            if _keys_overlap(_override_key(item), key):
                raise ConfigError(f"{origin} '{item}' sets {key}, which the grid varies in {where}; drop one of them")
    return Grid(
        name=name,
        path=grid_path,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        base=base,
        overrides=[item for item, _ in every_cell],
        variants=variants,
        axes=axes,
        seeds=seeds,
        metric=metric,
        quick=quick,
        cli_overrides=cli_overrides,
    )


def override_value(value: Any) -> str:
    """`value` written so that an override `key=<it>` parses back to `value`."""
    if isinstance(value, str) and OmegaConf.from_dotlist([f"x={value}"]).x == value:
        return value
    return json.dumps(value)


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


def expand(grid: Grid) -> list[Cell]:
    """Cells in order variants x axes (file order) x seeds; duplicate names are an error."""
    short = short_keys(list(grid.axes))
    variants = grid.variants or [None]
    cells: list[Cell] = []
    seen: dict[str, int] = {}
    for variant, values in itertools.product(variants, itertools.product(*grid.axes.values())):
        parts, overrides, switches = [], list(grid.overrides), {}
        if variant is not None:
            parts.append(f"variant={name_value(variant.label)}")
            overrides += variant.overrides
            switches["variant"] = variant.label
        for key, value in zip(grid.axes, values):
            parts.append(f"{short[key]}={name_value(value)}")
            overrides.append(f"{key}={override_value(value)}")
            switches[key] = value
        group = "__".join(parts)
        for seed in grid.seeds:
            name = f"{group}__seed={seed}"
            if name in seen:
                raise ConfigError(
                    f"{grid.path}: cells {seen[name] + 1} and {len(cells) + 1} are both named '{name}'; "
                    "make the variant names, axis values and seeds distinct"
                )
            if len(name) > MAX_NAME_LENGTH:
                raise ConfigError(f"{grid.path}: cell name '{name[:60]}...' is longer than {MAX_NAME_LENGTH} characters; shorten the variant names")
            seen[name] = len(cells)
            experiment = variant.experiment if variant is not None and variant.experiment else grid.base
            cells.append(Cell(name, group, seed, experiment, overrides + [f"seed={seed}"], dict(switches)))
    return cells


def _check_axes(grid: Grid) -> None:
    """Each axis value must fit its key in the config schema; the error names the axis key."""
    for key, values in grid.axes.items():
        for value in values:
            try:
                layer = OmegaConf.from_dotlist([f"{key}={override_value(value)}"])
            except Exception as error:
                raise ConfigError(f"{grid.path}: axes.{key}: {str(error).splitlines()[0]}") from None
            config_lib.merge_onto_schema([(f"{grid.path}: axes", layer)])


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


# ---------------------------------------------------------------------------------------------
# Grid directory: identity, cell states


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


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cell_state(cell_dir: Path) -> str:
    """finished | failed | unfinished (started, never ended: killed or still running) | missing."""
    if (cell_dir / METRICS_FILE).is_file():
        return "finished"
    status = _read_json(cell_dir / STATUS_FILE)
    if status is None:
        return "unfinished" if cell_dir.exists() else "missing"
    return "failed" if status.get("status") == "failed" else "unfinished"


def _config_difference(old: dict, new: dict) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return ""


def check_grid_dir(grid_dir: Path, grid: Grid, cells: list[Cell], force: bool) -> dict[str, str]:
    """Refuse a directory made by another grid unless `force`; return cell name -> state.

    A finished cell whose config has changed since (stale) gets state 'stale': refused without
    `force`, rerun with it.
    """
    previous = _read_json(grid_dir / SPEC_FILE)
    if previous is None and grid_dir.is_dir() and any(grid_dir.iterdir()) and not force:
        raise ConfigError(f"{grid_dir}: exists and is not a grid directory (no {SPEC_FILE}); pass --output DIR or --force")
    if previous is not None and not force and {k: previous.get(k) for k in _fingerprint(grid)} != _fingerprint(grid):
        new = {"grid_file": str(grid.path), **_fingerprint(grid)}
        raise ConfigError(
            f"{grid_dir}: made by a different grid, {_describe(previous)}, not {_describe(new)}; "
            "pass --force to reuse it or --output DIR for a new directory"
        )
    states = {}
    for cell in cells:
        cell_dir = grid_dir / CELLS_DIR / cell.name
        state = cell_state(cell_dir)
        if state == "finished":
            record = _read_json(cell_dir / CELL_FILE)
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


# ---------------------------------------------------------------------------------------------
# Running


def _last_error_line(tail: bytes) -> str:
    text = _ANSI.sub("", tail.decode("utf-8", errors="replace"))
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    return lines[-1] if lines else "no output"


def run_cell(cell: Cell, cell_dir: Path) -> tuple[int, str]:
    """Run one cell's `asymoe fit` in a child process, its output shown live and kept in log.txt.

    On a terminal the child gets a pseudo-terminal, so its Lightning progress bar draws as usual.
    Returns (exit status, the output's last line).
    """
    command = cell.command(cell_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    use_pty = sys.stdout.isatty()
    if use_pty:
        import pty

        env["COLUMNS"] = str(shutil.get_terminal_size().columns)
        read_fd, child_fd = pty.openpty()
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=child_fd, stderr=child_fd, env=env)
        os.close(child_fd)
    else:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        read_fd = child.stdout.fileno()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail = b""
    try:
        with open(cell_dir / LOG_FILE, "wb") as log:
            log.write(f"$ {shlex.join(command)}\n".encode())
            while True:
                try:
                    chunk = os.read(read_fd, 65536)
                except OSError:  # a pseudo-terminal reports EIO once the child has exited
                    break
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                sys.stdout.write(decoder.decode(chunk))
                sys.stdout.flush()
                tail = (tail + chunk)[-8192:]
        returncode = child.wait()
    except BaseException:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise
    finally:
        if use_pty:
            os.close(read_fd)
        elif child.stdout is not None:
            child.stdout.close()
    if returncode < 0:
        return returncode, f"killed by signal {signal.Signals(-returncode).name}" + (
            " (out of memory?)" if returncode == -signal.SIGKILL else ""
        )
    if returncode == 0 and not (cell_dir / METRICS_FILE).is_file():
        return 1, f"exited 0 without writing {METRICS_FILE}"
    return returncode, _last_error_line(tail)


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _main_metric_text(grid_dir: Path, cell: Cell, metric: str) -> str:
    metrics = _read_json(grid_dir / CELLS_DIR / cell.name / METRICS_FILE) or {}
    value = metrics.get(metric)
    return f", {metric} {value:.4f}" if isinstance(value, (int, float)) else ""


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a scheduler's stop, `kill`) ends the grid like Ctrl-C: the running child is stopped
    and marked interrupted instead of being left to write into a cell the next run will clear."""

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli(args) -> int:
    """`asymoe grid GRID_FILE [overrides] [--dry-run] [--only GLOB] [--quick] [--force] [--output DIR]`."""

    grid = load_grid(args.grid_file, args.overrides, quick=args.quick)
    cells = expand(grid)
    validate(grid, cells)
    grid_dir = Path(args.output) if args.output else Path("runs") / "grids" / grid.name
    states = check_grid_dir(grid_dir, grid, cells, force=args.force)
    selected = [cell for cell in cells if args.only is None or fnmatch.fnmatchcase(cell.name, args.only)]
    if not selected:
        raise ConfigError(f"--only '{args.only}' matches none of the {len(cells)} cells (e.g. '{cells[0].name}')")

    print(
        f"grid {grid.name}: {len(cells)} cells from {grid.path}{' (--quick)' if grid.quick else ''}"
        + (f", {len(selected)} selected by --only '{args.only}'" if args.only else "")
        + f"; directory {grid_dir}",
        flush=True,
    )
    for index, cell in enumerate(selected, 1):
        state = states[cell.name]
        action = "skip (finished)" if state == "finished" else "run" if state == "missing" else f"rerun ({state})"
        print(f"  cell {index} of {len(selected)}: {cell.name}  [{action}]", flush=True)
        if args.dry_run:
            print(f"    asymoe {shlex.join(cell.command(grid_dir / CELLS_DIR / cell.name)[3:])}", flush=True)
    if args.dry_run:
        return 0

    grid_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(grid_dir / SPEC_FILE, grid_spec(grid, cells))
    with _terminate_as_interrupt():
        failed = _run_cells(grid, grid_dir, selected, states)
    paths, _ = write_report(grid_dir)
    finished = sum(cell_state(grid_dir / CELLS_DIR / cell.name) == "finished" for cell in selected)
    print(f"grid {grid.name}: {finished} of {len(selected)} cells finished" + (f", {len(failed)} failed: {', '.join(failed)}" if failed else ""))
    print(f"summary: {paths['md']}  chart: {paths['png']}  hparams: tensorboard --logdir {paths['hparams']}")
    return 1 if failed else 0


def _run_cells(grid: Grid, grid_dir: Path, selected: list[Cell], states: dict[str, str]) -> list[str]:
    """Run the selected cells that have not finished, one after another; return the failed ones."""

    to_run = [cell for cell in selected if states[cell.name] != "finished"]
    failed, durations = [], []
    for index, cell in enumerate(selected, 1):
        heading = f"cell {index} of {len(selected)}: {cell.name}"
        cell_dir = grid_dir / CELLS_DIR / cell.name
        if states[cell.name] == "finished":
            print(f"{heading}: finished earlier{_main_metric_text(grid_dir, cell, grid.metric)}, skipping", flush=True)
            continue
        remaining = len(to_run) - len(durations)
        eta = f" (about {_format_seconds(remaining * sum(durations) / len(durations))} left)" if durations else ""
        print(f"==> {heading}{eta}", flush=True)
        # A cell is resumed from scratch: leftovers of an unfinished run would mix into its logs.
        shutil.rmtree(cell_dir, ignore_errors=True)
        cell_dir.mkdir(parents=True)
        write_json_atomic(
            cell_dir / CELL_FILE,
            {"name": cell.name, "command": cell.command(cell_dir), "config": cell.config},
        )
        started = time.time()
        write_json_atomic(cell_dir / STATUS_FILE, {"status": "running", "started": started, "pid": os.getpid()})
        try:
            returncode, last_line = run_cell(cell, cell_dir)
        except KeyboardInterrupt:
            write_json_atomic(cell_dir / STATUS_FILE, {"status": "interrupted", "started": started, "ended": time.time()})
            write_report(grid_dir)
            raise
        seconds = time.time() - started
        durations.append(seconds)
        log_path = cell_dir / LOG_FILE
        if returncode == 0:
            write_json_atomic(cell_dir / STATUS_FILE, {"status": "finished", "started": started, "seconds": seconds})
            print(f"<== {heading}: finished in {_format_seconds(seconds)}{_main_metric_text(grid_dir, cell, grid.metric)}", flush=True)
        else:
            failed.append(cell.name)
            write_json_atomic(
                cell_dir / STATUS_FILE,
                {"status": "failed", "returncode": returncode, "error": last_line, "log": str(log_path), "started": started, "seconds": seconds},
            )
            print(f"<== {heading}: FAILED (exit {returncode}) after {_format_seconds(seconds)}: {last_line}; log: {log_path}", flush=True)
    return failed


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class GroupRow:
    group: str
    switches: dict[str, Any]
    states: list[str]  # one per seed
    metrics: list[dict]  # metrics.json of each finished seed

    def values(self, key: str) -> list[float]:
        return [float(m[key]) for m in self.metrics if isinstance(m.get(key), (int, float))]

    def mean_std(self, key: str) -> tuple[float | None, float | None]:
        """Mean and sample standard deviation (n - 1) over finished seeds; std None for one seed."""
        values = self.values(key)
        if not values:
            return None, None
        mean = sum(values) / len(values)
        if len(values) < 2:
            return mean, None
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))

    @property
    def status(self) -> str:
        counts = {state: self.states.count(state) for state in dict.fromkeys(self.states)}
        if list(counts) == ["finished"]:
            return "finished"
        return ", ".join(f"{count} {state}" for state, count in counts.items())


def load_rows(grid_dir: Path) -> tuple[dict, list[GroupRow]]:
    spec = _read_json(grid_dir / SPEC_FILE)
    if spec is None:
        raise ConfigError(f"{grid_dir}: not a grid directory (no readable {SPEC_FILE}); run `asymoe grid` first")
    rows: dict[str, GroupRow] = {}
    for cell in spec["cells"]:
        row = rows.setdefault(cell["group"], GroupRow(cell["group"], cell["switches"], [], []))
        cell_dir = grid_dir / CELLS_DIR / cell["name"]
        state = cell_state(cell_dir)
        row.states.append(state)
        if state == "finished":
            row.metrics.append(_read_json(cell_dir / METRICS_FILE) or {})
    return spec, list(rows.values())


def metric_columns(main: str, rows: list[GroupRow]) -> list[str]:
    keys = {key for row in rows for m in row.metrics for key, value in m.items() if isinstance(value, (int, float))}
    others = sorted(key for key in keys if key.startswith("test/") and key != main)
    return [main] + others + [key for key in ("val/accuracy",) if key in keys and key != main]


def _switch_text(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value)


def write_summary_csv(path: Path, spec: dict, rows: list[GroupRow], metrics: list[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["group", *spec["switch_columns"], "seeds_finished", "seeds", "status", *PARAM_KEYS]
            + [f"{key}_{stat}" for key in metrics for stat in ("mean", "std")]
            + ["time/total_s_mean"]
        )
        for row in rows:
            params = [row.mean_std(key)[0] for key in PARAM_KEYS]
            stats = [row.mean_std(key) for key in metrics]
            seconds = row.mean_std("time/total_s")[0]
            writer.writerow(
                [row.group, *[_switch_text(row.switches.get(c)) for c in spec["switch_columns"]]]
                + [len(row.metrics), len(row.states), row.status]
                + ["" if p is None else int(round(p)) for p in params]
                + ["" if x is None else x for mean, std in stats for x in (mean, std)]
                + ["" if seconds is None else round(seconds, 1)]
            )


def write_summary_md(path: Path, spec: dict, rows: list[GroupRow], metrics: list[str]) -> None:
    seeds = max(len(row.states) for row in rows)
    header = [*spec["switch_columns"], "seeds", *(k.split("/", 1)[1] for k in PARAM_KEYS), *metrics, "time", "status"]
    lines = [
        f"# Grid `{spec['name']}`",
        "",
        f"From `{spec['grid_file']}`{' with --quick' if spec.get('quick') else ''}. "
        f"Metrics: mean ± sample std over the finished seeds (of {seeds}); parameters as the model counts them "
        "(total, activated per vision / language token); time: a cell's train + test time (time/total_s).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        cells = [_switch_text(row.switches.get(c)) for c in spec["switch_columns"]]
        cells.append(f"{len(row.metrics)}/{len(row.states)}")
        for key in PARAM_KEYS:
            mean = row.mean_std(key)[0]
            cells.append("" if mean is None else f"{int(round(mean)):,}")
        for key in metrics:
            mean, std = row.mean_std(key)
            cells.append("" if mean is None else f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}"))
        seconds = row.mean_std("time/total_s")[0]
        cells.append("" if seconds is None else _format_seconds(seconds))
        cells.append(row.status)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_chart(path: Path, spec: dict, rows: list[GroupRow]) -> None:
    """Bar chart of the main metric per group, error bars = sample std over seeds.

    Groups none of whose cells has started (--only) are left out; failed ones show their status.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = spec["metric"]
    never_run = sum(set(row.states) == {"missing"} for row in rows)
    rows = [row for row in rows if set(row.states) != {"missing"}] or rows
    labels = [row.group.replace("__", "\n") for row in rows]
    longest = max(len(line) for label in labels for line in label.splitlines())
    bar_width_inches = max(1.1, 0.07 * longest)
    figure = Figure(figsize=(max(6.0, bar_width_inches * len(rows) + 1.5), 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    positions = list(range(len(rows)))
    stats = [row.mean_std(metric) for row in rows]
    means = [0.0 if mean is None else mean for mean, _ in stats]
    bars = axes.bar(positions, means, color="#4C72B0")
    with_spread = [(x, mean, std) for x, (mean, std) in zip(positions, stats) if std is not None]
    if with_spread:
        xs, ys, errors = zip(*with_spread)
        axes.errorbar(xs, ys, yerr=errors, fmt="none", ecolor="black", capsize=4)
    for bar, row, (mean, std) in zip(bars, rows, stats):
        if mean is None:
            label = f"no {metric}" if row.metrics else row.status
        else:
            label = f"{mean:.3f}" + ("" if std is None else f" ± {std:.3f}")
        axes.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height() + (std or 0.0)), ha="center",
                      va="bottom", xytext=(0, 3), textcoords="offset points", fontsize=8)
    axes.set_xticks(positions, labels, fontsize=8)
    axes.set_ylabel(metric)
    seeds = max(len(row.metrics) for row in rows)
    title = f"{spec['name']}: {metric}, " + (
        f"mean ± sample std over up to {seeds} seeds" if seeds > 1 else "one seed per group"
    )
    if never_run:
        title += f" ({never_run} group{'s' if never_run > 1 else ''} not run)"
    axes.set_title(title, fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    figure.savefig(path, dpi=120)


def _hparam_domain(values: list) -> tuple[list, type]:
    if all(isinstance(v, bool) for v in values):
        return values, bool
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], float
    return [_switch_text(v) for v in values], str


def write_hparams(hparams_dir: Path, spec: dict) -> None:
    """TensorBoard HParams: the experiment (switched keys, metrics) at the top, one session per cell.

    A session's hparams are the variant and every config key that differs between cells (seed
    excluded); its group name is the cell's group, so the dashboard aggregates seeds.
    """
    from tensorboard.plugins.hparams import summary_v2 as hp
    from torch.utils.tensorboard.summary import scalar
    from torch.utils.tensorboard.writer import FileWriter

    shutil.rmtree(hparams_dir, ignore_errors=True)
    grid_dir = hparams_dir.parent
    finished = []
    for cell in spec["cells"]:
        metrics = _read_json(grid_dir / CELLS_DIR / cell["name"] / METRICS_FILE)
        if metrics is not None:
            numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            finished.append((cell, numbers))
    hparams_dir.mkdir(parents=True)
    if not finished:
        return
    names = list(spec["cells"][0]["hparams"])
    domains = {name: _hparam_domain([cell["hparams"].get(name) for cell, _ in finished]) for name in names}
    metric_tags = sorted({key for _, numbers in finished for key in numbers})
    top = FileWriter(str(hparams_dir))
    top.add_summary(
        hp.hparams_config_pb(
            hparams=[hp.HParam(name, hp.Discrete(sorted(set(values)), dtype=dtype)) for name, (values, dtype) in domains.items()],
            metrics=[hp.Metric(tag) for tag in metric_tags],
        )
    )
    top.close()
    for index, (cell, numbers) in enumerate(finished):
        writer = FileWriter(str(hparams_dir / cell["name"]))
        session = {name: domains[name][0][index] for name in names}
        writer.add_summary(hp.hparams_pb(session, trial_id=cell["group"]))
        for tag, value in numbers.items():
            writer.add_summary(scalar(tag, value), global_step=0)
        writer.close()


def write_report(grid_dir: Path) -> tuple[dict[str, Path], list[GroupRow]]:
    """Rebuild summary.csv, summary.md, summary.png and hparams/ from what is on disk."""
    spec, rows = load_rows(grid_dir)
    metrics = metric_columns(spec["metric"], rows)
    paths = {
        "csv": grid_dir / "summary.csv",
        "md": grid_dir / "summary.md",
        "png": grid_dir / "summary.png",
        "hparams": grid_dir / "hparams",
    }
    write_summary_csv(paths["csv"], spec, rows, metrics)
    write_summary_md(paths["md"], spec, rows, metrics)
    write_chart(paths["png"], spec, rows)
    write_hparams(paths["hparams"], spec)
    return paths, rows


def report_cli(args) -> int:
    """`asymoe report GRID_DIR`: rebuild the summary from the grid directory."""
    grid_dir = Path(args.grid_dir)
    paths, rows = write_report(grid_dir)
    print(paths["md"].read_text())
    print(f"wrote {paths['csv']}, {paths['md']}, {paths['png']}; tensorboard --logdir {paths['hparams']}")
    incomplete = sum(row.status != "finished" for row in rows)
    if incomplete:
        print(f"{incomplete} of {len(rows)} groups have unfinished seeds (see the status column)")
    return 0
