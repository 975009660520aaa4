"""``asymoe grid FILE``: load and validate the grid, check its directory, then run its cells.

Three ways to run the cells: one after another (default), ``--jobs N`` at once on this machine
(:mod:`asymoe.grid.parallel`), or as SLURM jobs (``--launcher slurm``, :mod:`asymoe.grid.slurm`).
All three keep the same directory layout and status files, so a grid started one way can be
resumed another way.
"""

from __future__ import annotations

import fnmatch
import shlex
from pathlib import Path

from omegaconf import OmegaConf

from asymoe import config as config_lib
from asymoe.config import ConfigError
from asymoe.files import write_json_atomic
from asymoe.grid import slurm
from asymoe.grid.cells import Cell, expand, validate
from asymoe.grid.parallel import run_parallel
from asymoe.grid.report import write_report
from asymoe.grid.runner import run_sequential, terminate_as_interrupt
from asymoe.grid.spec import Grid, check_launcher_options, load_grid
from asymoe.grid.state import CELLS_DIR, SPEC_FILE, cell_state, check_grid_dir, grid_spec


def _launcher_options(grid: Grid, items: list[str]) -> dict:
    """The grid file's `launcher:` block with the command line's --slurm KEY=VALUE items on top."""
    layer = OmegaConf.to_container(config_lib.parse_overrides(items, "--slurm")) if items else {}
    merged = dict(grid.launcher)
    for key, value in layer.items():  # --slurm extra.FLAG=VALUE adds to the file's extra flags
        both_maps = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both_maps else value
    return check_launcher_options(merged, "launcher (grid file and --slurm)")


def _print_plan(grid: Grid, grid_dir: Path, cells: list[Cell], selected: list[Cell], states: dict, args) -> None:
    print(
        f"grid {grid.name}: {len(cells)} cells from {grid.path}{' (--quick)' if grid.quick else ''}"
        + (f", {len(selected)} selected by --only '{args.only}'" if args.only else "")
        + f"; directory {grid_dir}",
        flush=True,
    )
    for index, cell in enumerate(selected, 1):
        state = states[cell.name]
        if state == "finished":
            action = "skip (finished)"
        elif state in ("queued", "running"):
            action = f"leave ({state})"
        else:
            action = "run" if state == "missing" else f"rerun ({state})"
        print(f"  cell {index} of {len(selected)}: {cell.name}  [{action}]", flush=True)
        if args.dry_run:
            print(f"    asymoe {shlex.join(cell.command(grid_dir / CELLS_DIR / cell.name)[3:])}", flush=True)


def _check_switches(args) -> None:
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    if args.launcher != "local" and args.jobs != 1:
        raise ConfigError(
            f"--jobs applies to --launcher local; with --launcher {args.launcher} every cell is its own job"
        )
    if args.launcher == "local" and (args.slurm or args.wait):
        raise ConfigError("--slurm and --wait apply to --launcher slurm or submitit-local")


def run_cli(args) -> int:
    """`asymoe grid GRID_FILE [overrides] [--dry-run] [--only GLOB] [--quick] [--force] [--output DIR]
    [--jobs N | --launcher slurm [--slurm KEY=VALUE ...] [--wait]]`."""
    _check_switches(args)
    grid = load_grid(args.grid_file, args.overrides, quick=args.quick)
    options = _launcher_options(grid, args.slurm or []) if args.launcher != "local" else {}
    cells = expand(grid)
    validate(grid, cells)
    grid_dir = Path(args.output) if args.output else Path("runs") / "grids" / grid.name
    states = check_grid_dir(grid_dir, grid, cells, force=args.force)
    selected = [cell for cell in cells if args.only is None or fnmatch.fnmatchcase(cell.name, args.only)]
    if not selected:
        raise ConfigError(f"--only '{args.only}' matches none of the {len(cells)} cells (e.g. '{cells[0].name}')")
    jobs = {}
    if args.launcher != "local":  # ask the scheduler about the jobs recorded earlier; stale cells rerun
        jobs = {c.name: slurm.reconcile(grid_dir / CELLS_DIR / c.name, args.launcher) for c in selected}
        states.update({name: state for name, (state, _) in jobs.items() if states[name] != "stale"})
    _print_plan(grid, grid_dir, cells, selected, states, args)
    if args.dry_run:
        if args.launcher == "slurm":
            print("sbatch script of each cell (submitit writes it at submission):")
            print(slurm.sbatch_script(options, "<cell name>", grid_dir / CELLS_DIR / "<cell>" / slurm.SLURM_DIR))
        return 0

    grid_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(grid_dir / SPEC_FILE, grid_spec(grid, cells))
    if args.launcher != "local":
        job_ids = {name: job_id for name, (_, job_id) in jobs.items()}
        failed = slurm.launch(grid_dir, selected, states, job_ids, args.launcher, options, args.wait)
    else:
        after = None
        if getattr(args, "analyze", False):  # each cell analysed as soon as it finished
            from asymoe.analysis.cells import analyze_cell

            after = analyze_cell
        with terminate_as_interrupt():
            if args.jobs > 1:
                failed = run_parallel(grid, grid_dir, selected, states, args.jobs, after)
            else:
                failed = run_sequential(grid, grid_dir, selected, states, after)
    if getattr(args, "analyze", False):
        from asymoe.analysis.cells import analyze_cells

        # Cells run here were analysed as they finished (a failed analysis is not retried); the
        # rest — finished in an earlier run, or by a scheduler — are analysed now.
        run_here = set() if args.launcher != "local" else {c.name for c in selected if states[c.name] != "finished"}
        failed += analyze_cells([c for c in selected if c.name not in run_here], grid_dir)
    paths, _ = write_report(grid_dir)
    finished = sum(cell_state(grid_dir / CELLS_DIR / cell.name) == "finished" for cell in selected)
    print(
        f"grid {grid.name}: {finished} of {len(selected)} cells finished"
        + (f", {len(failed)} failed: {', '.join(failed)}" if failed else "")
    )
    print(f"summary: {paths['md']}  chart: {paths['png']}  hparams: tensorboard --logdir {paths['hparams']}")
    return 1 if failed else 0
