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


def analyze_cells(cells: list, grid_dir: Path, items: list[str] | None = None) -> list[str]:
    """Analyse every finished cell of `cells` that has no analysis yet; return the names that failed."""
    from asymoe.grid.runner import run_cell
    from asymoe.grid.state import CELLS_DIR, cell_state

    failed = []
    for cell in cells:
        cell_dir = grid_dir / CELLS_DIR / cell.name
        if cell_state(cell_dir) != "finished" or (cell_dir / ANALYSIS_DIR / ANALYSIS_FILE).is_file():
            continue
        print(f"==> analysing {cell.name}", flush=True)
        returncode, last_line = run_cell(cell, cell_dir, command=analyze_command(cell_dir, items))
        if returncode != 0:
            failed.append(cell.name)
            print(f"<== analysis of {cell.name} FAILED (exit {returncode}): {last_line}", flush=True)
    return failed
