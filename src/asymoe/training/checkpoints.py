"""Checkpoint I/O: a single file, or a sharded folder (torch.distributed.checkpoint + meta.pt)."""

from __future__ import annotations

from pathlib import Path

import torch

# Lightning writes a sharded checkpoint as a folder: torch.distributed.checkpoint shards + meta.pt.
SHARDED_METADATA_FILE = "meta.pt"


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / SHARDED_METADATA_FILE).is_file()


def checkpoint_metadata(path: Path) -> dict:
    """The non-tensor part of a checkpoint (step, loops, asymoe keys) without loading the weights."""
    if is_sharded_checkpoint(path):
        return torch.load(path / SHARDED_METADATA_FILE, map_location="cpu", weights_only=False)
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def load_full_checkpoint(path: Path) -> dict:
    """A checkpoint as one dict with a full `state_dict`, whether saved as a file or sharded.

    Sharded folders are consolidated in this process (no process group needed); the whole model
    must fit in CPU memory.
    """
    if not is_sharded_checkpoint(path):
        return torch.load(path, map_location="cpu", weights_only=False)
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    return _load_distributed_checkpoint(path)
