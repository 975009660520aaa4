"""Small file helpers shared by runs and grids (no heavy imports)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)
