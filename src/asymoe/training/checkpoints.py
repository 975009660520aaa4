"""Checkpoint I/O that survives a kill at any moment: atomic writes, a size + SHA-256 record, checks.

A checkpoint is a single file (`last.ckpt`) or, under `fsdp`/`fsdp2` with sharded state, a folder
(torch.distributed.checkpoint shards + Lightning's `meta.pt`).

- File: the bytes go to `<name>.tmp`, are fsync'ed and renamed over the old file, so the path
  holds the old or the new checkpoint, never a part of one. Its record (size, SHA-256) is the
  sidecar `<name>.manifest.json`; while a new file is moved into place the sidecar lists both the
  old and the new record, so a kill between the two renames leaves a checkpoint that still checks.
- Folder: every rank writes its shards into `<name>.partial/`; rank 0 then records every file of
  the folder in `manifest.json` inside it and swaps the folder into place (old folder renamed to
  `<name>.old`, the new one renamed to `<name>`, the old one deleted). A kill in between leaves
  a complete `.partial` or `.old` folder, which `newest_good_checkpoint` finds.

`verify_checkpoint` raises `CheckpointError` naming the path when a checkpoint's size or checksum
disagrees with its record, its folder lacks files, or (without a record: a checkpoint written by
something else) it cannot be read. Everything is loaded with `weights_only=True`: a checkpoint holds
tensors, numbers, strings and containers only, so loading one never runs code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from asymoe.config import ConfigError

# Lightning writes a sharded checkpoint as a folder: torch.distributed.checkpoint shards + meta.pt.
SHARDED_METADATA_FILE = "meta.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_SUFFIX = ".manifest.json"
STAGING_SUFFIX = ".partial"
RETIRED_SUFFIX = ".old"
_CHUNK = 1 << 22


class CheckpointError(ConfigError):
    """A checkpoint that is truncated, corrupt or incomplete; the message names its path."""


# ---------------------------------------------------------------------------------------------
# Durable writes and records


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_durable(path: Path, data: bytes) -> None:
    """`data` into `path` via a temporary file, fsync and rename (the path never holds a part)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _record_of_bytes(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_record(path: Path) -> dict:
    """Size and SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _write_json_durable(path: Path, payload: Any) -> None:
    _write_durable(path, json.dumps(payload, indent=1, sort_keys=True).encode())


def _read_manifest(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint record {path} is unreadable ({type(error).__name__})") from None


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + MANIFEST_SUFFIX)


def save_checkpoint_file(checkpoint: dict, path: Path) -> None:
    """Write `checkpoint` to `path` atomically, with its size + SHA-256 record beside it."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    data = buffer.getvalue()
    record = _record_of_bytes(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [record]
    if path.is_file():
        records += _records_of_current(path)  # the file now in place stays valid until the rename below
    _write_json_durable(sidecar(path), {"records": records})
    _write_durable(path, data)
    _write_json_durable(sidecar(path), {"records": [record]})


def _records_of_current(path: Path) -> list[dict]:
    """The record(s) of the file at `path`: from its sidecar when the size fits, else hashed now."""
    try:
        listed = json.loads(sidecar(path).read_text()).get("records", [])
    except (OSError, ValueError, AttributeError):
        listed = []
    size = path.stat().st_size
    fitting = [r for r in listed if isinstance(r, dict) and r.get("size") == size]
    return fitting or [file_record(path)]


def remove_checkpoint(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Sharded folders


def write_folder_manifest(folder: Path) -> None:
    """Record every file of a finished sharded checkpoint folder in its manifest (rank 0, after a barrier)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    records = {str(file.relative_to(folder)): file_record(file) for file in files}
    _write_json_durable(folder / MANIFEST_FILE, {"files": records})


def swap_folder_into_place(staging: Path, path: Path) -> None:
    """Replace the checkpoint folder (or file) `path` by the complete folder `staging`."""
    retired = path.with_name(path.name + RETIRED_SUFFIX)
    if retired.exists():
        remove_checkpoint(retired)
    if path.is_dir():
        os.replace(path, retired)
    elif path.exists():
        remove_checkpoint(path)
    os.replace(staging, path)
    _fsync_dir(path.parent)
    if retired.exists():
        shutil.rmtree(retired)


# ---------------------------------------------------------------------------------------------
# Checks


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / SHARDED_METADATA_FILE).is_file()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _verify_file(path: Path) -> None:
    if sidecar(path).is_file():
        records = _read_manifest(sidecar(path)).get("records", [])
        actual = file_record(path)
        if actual in records:
            return
        sizes = {r.get("size") for r in records}
        if actual["size"] not in sizes:
            expected = " or ".join(str(size) for size in sorted(sizes))
            raise CheckpointError(f"checkpoint {path} is corrupt ({actual['size']} bytes, expected {expected})")
        raise CheckpointError(f"checkpoint {path} is corrupt (SHA-256 differs from {sidecar(path).name})")
    try:  # no record (written by another tool): readable is the best check there is
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} is corrupt (cannot be read: {_first_line(error)})") from None


def _verify_folder(path: Path) -> None:
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        # A staging folder gets its manifest only once every shard is written.
        if not is_sharded_checkpoint(path) or path.name.endswith(STAGING_SUFFIX):
            raise CheckpointError(f"checkpoint {path} is incomplete (no {SHARDED_METADATA_FILE} or {MANIFEST_FILE})")
        return  # a sharded folder written without asymoe's manifest: nothing to compare against
    for name, record in _read_manifest(manifest).get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete ({name} is missing)")
        if file.stat().st_size != record["size"]:
            size = file.stat().st_size
            raise CheckpointError(f"checkpoint {path} is corrupt ({name}: {size} bytes, expected {record['size']})")
        if file_record(file) != record:
            raise CheckpointError(f"checkpoint {path} is corrupt ({name}: SHA-256 differs from {MANIFEST_FILE})")


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError (one line, naming `path`) unless `path` is a whole, readable checkpoint."""
    path = Path(path)
    if path.is_dir():
        _verify_folder(path)
    elif path.is_file():
        _verify_file(path)
    else:
        raise CheckpointError(f"checkpoint {path} not found")


def checkpoint_candidates(folder: Path) -> list[Path]:
    """Every checkpoint in a run's checkpoints/ folder, including a complete `.partial`/`.old` folder."""
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        if entry.is_file() and entry.suffix == ".ckpt":
            found.append(entry)
        elif entry.is_dir() and (entry / SHARDED_METADATA_FILE).is_file():
            found.append(entry)
    return sorted(found)


def newest_good_checkpoint(folder: Path, exclude: Path | None = None) -> tuple[Path, int] | None:
    """The checkpoint with the highest global step that passes `verify_checkpoint`, and that step."""
    good = []
    for candidate in checkpoint_candidates(folder):
        if exclude is not None and candidate == exclude:
            continue
        try:
            verify_checkpoint(candidate)
            step = int(checkpoint_metadata(candidate).get("global_step", -1))
        except Exception:  # CheckpointError or an unreadable file: either way not a good candidate
            continue
        good.append((step, candidate.stat().st_mtime, candidate))
    if not good:
        return None
    step, _, path = max(good)
    return path, step


# ---------------------------------------------------------------------------------------------
# Loading


def checkpoint_metadata(path: Path) -> dict:
    """The non-tensor part of a checkpoint (step, loops, asymoe keys) without loading the weights."""
    if is_sharded_checkpoint(path):
        return torch.load(path / SHARDED_METADATA_FILE, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_full_checkpoint(path: Path) -> dict:
    """A checkpoint as one dict with a full `state_dict`, whether saved as a file or sharded.

    Sharded folders are consolidated in this process (no process group needed); the whole model
    must fit in CPU memory.
    """
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    try:
        if not is_sharded_checkpoint(path):
            return torch.load(path, map_location="cpu", weights_only=True)
        return _load_distributed_checkpoint(path)
    except Exception as error:  # a checkpoint without a record that verify_checkpoint could not vouch for
        raise CheckpointError(f"checkpoint {path} is corrupt (cannot be read: {_first_line(error)})") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint file I/O with atomic writes, records, verified `weights_only` loads."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        save_checkpoint_file(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict:
        verify_checkpoint(Path(path))
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)

    def remove_checkpoint(self, path) -> None:
        remove_checkpoint(Path(path))
