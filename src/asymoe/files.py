"""Small file helpers and file names shared by runs and grids (no heavy imports)."""

from __future__ import annotations

import json
import os
from pathlib import Path

# A run directory is complete exactly when this file exists (written last, atomically).
METRICS_FILE = "metrics.json"


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: a reader sees the old file or the whole new one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True))


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing or unreadable (e.g. half-written)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
