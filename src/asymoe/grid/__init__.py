"""Ablation grids: expand a grid file into cells, run each cell in its own process, resume, report.

- :mod:`asymoe.grid.spec`: grid files (``extends:``), checked;
- :mod:`asymoe.grid.cells`: cells and their names, every cell's config validated;
- :mod:`asymoe.grid.state`: the grid directory (grid.json, each cell's status);
- :mod:`asymoe.grid.command`: ``asymoe grid``; :mod:`asymoe.grid.runner`: cells as child processes,
  one after another; :mod:`asymoe.grid.parallel`: ``--jobs N`` at once; :mod:`asymoe.grid.slurm`:
  SLURM jobs through submitit;
- :mod:`asymoe.grid.report`: summary tables; :mod:`asymoe.grid.chart`: summary.png;
  :mod:`asymoe.grid.stats`: confidence intervals and Welch's comparison with the reference group;
  :mod:`asymoe.grid.hparams`: TensorBoard HParams.
"""

from asymoe.grid.cells import Cell, expand, validate
from asymoe.grid.command import run_cli
from asymoe.grid.report import GroupRow, load_rows, report_cli, write_report
from asymoe.grid.runner import run_cell
from asymoe.grid.spec import Grid, Variant, load_grid, read_grid_file, resolve_grid_path
from asymoe.grid.state import cell_state, check_grid_dir, grid_spec

__all__ = [
    "Cell",
    "Grid",
    "GroupRow",
    "Variant",
    "cell_state",
    "check_grid_dir",
    "expand",
    "grid_spec",
    "load_grid",
    "load_rows",
    "read_grid_file",
    "report_cli",
    "resolve_grid_path",
    "run_cell",
    "run_cli",
    "validate",
    "write_report",
]
