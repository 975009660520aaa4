"""Grid hooks, torch-free: analyse finished cells (`asymoe grid ... --analyze`), read their headline scalars.

Each cell is analysed in its own process (`asymoe analyze CELL_DIR`), like a cell's training, so
a failing analysis ends only itself; its output goes to the cell's log.txt. A cell already holding
analysis/analysis.json is not analysed again.
"""

from __future__ import annotations

import sys
from pathlib import Path

from asymoe.files import read_json

ANALYSIS_DIR = "analysis"
ANALYSIS_FILE = "analysis.json"


def analysis_scalars(run_dir: Path) -> dict[str, float]:
    """The `analysis/...` headline numbers of a run directory's analysis (empty when it was not analysed)."""
    result = read_json(Path(run_dir) / ANALYSIS_DIR / ANALYSIS_FILE) or {}
    scalars = result.get("scalars") or {}
    return {k: float(v) for k, v in scalars.items() if k.startswith("analysis/") and isinstance(v, (int, float))}


def analyze_command(run_dir: Path, items: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "asymoe.cli", "analyze", str(run_dir), *(items or [])]


def needs_analysis(cell_dir: Path) -> bool:
    from asymoe.grid.state import cell_state

    return cell_state(cell_dir) == "finished" and not (cell_dir / ANALYSIS_DIR / ANALYSIS_FILE).is_file()


def analyze_cell(cell, cell_dir: Path, items: list[str] | None = None, env=None, output=None, say=print) -> bool:
    """Analyse one finished cell in its own process (output to the cell's log); True when it failed."""
    from asymoe.grid.runner import run_cell

    say(f"==> analysing {cell.name}")
    returncode, last_line = run_cell(cell, cell_dir, command=analyze_command(cell_dir, items), env=env, output=output)
    if returncode != 0:
        say(f"<== analysis of {cell.name} FAILED (exit {returncode}): {last_line}")
    return returncode != 0


def analyze_cells(cells: list, grid_dir: Path, items: list[str] | None = None) -> list[str]:
    """Analyse every finished cell of `cells` that has no analysis yet; return the names that failed.

    `asymoe grid --analyze` analyses each cell as it finishes (the runners' `after` hook); this
    catches the cells that finished in an earlier run.
    """
    from asymoe.grid.state import CELLS_DIR

    failed = []
    for cell in cells:
        cell_dir = grid_dir / CELLS_DIR / cell.name
        if needs_analysis(cell_dir) and analyze_cell(cell, cell_dir, items, say=lambda text: print(text, flush=True)):
            failed.append(cell.name)
    return failed
