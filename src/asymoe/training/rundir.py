"""A run directory's life cycle: claimed once, never reused silently, resumed from its newest good checkpoint.

A directory holds a run once any of config.yaml, checkpoints/, tb/ or metrics.json exists in it.
`fit` into such a directory needs `trainer.resume` (continue it) or `overwrite` (clear it first);
otherwise it is refused with one line, so a finished run's results are never replaced by accident.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from asymoe import config as config_lib
from asymoe.config import Config, ConfigError
from asymoe.files import METRICS_FILE
from asymoe.training.checkpoints import (
    CheckpointError,
    checkpoint_candidates,
    checkpoint_metadata,
    newest_good_checkpoint,
    verify_checkpoint,
)

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
RUN_MARKERS = (CONFIG_FILE, CHECKPOINT_DIR, "tb", METRICS_FILE)
# Environment variables a launcher (torchrun, SLURM, Lightning's own) sets to a process's rank.
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK")


def is_first_process() -> bool:
    """True in the process that owns the run directory: rank 0, before or without any launcher.

    Lightning re-runs the training script for ranks 1..n-1, so these processes meet a run
    directory their rank 0 has just claimed; they must neither refuse nor clear it.
    """
    return all(int(os.environ.get(name) or 0) == 0 for name in RANK_VARIABLES)


def say(message: str) -> None:
    """A notice for the user on stderr, from the first process only."""
    if is_first_process():
        print(f"asymoe: {message}", file=sys.stderr)


def holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / marker).exists() for marker in RUN_MARKERS)


def claim_run_directory(cfg: Config, run_dir: Path, overwrite: bool) -> None:
    """Refuse to train into a directory that holds a run, unless resuming it or told to overwrite it."""
    resume = cfg.trainer.resume
    if overwrite and resume is not None:
        raise ConfigError(f"--overwrite clears {run_dir}, which trainer.resume={resume} would continue; choose one")
    if not is_first_process() or resume is not None or not holds_a_run(run_dir):
        return
    if overwrite:
        shutil.rmtree(run_dir)
        return
    state = "finished" if (run_dir / METRICS_FILE).is_file() else "started"
    raise ConfigError(
        f"output_dir {run_dir} holds a {state} run; continue it with resume=last, "
        "choose a fresh output_dir, or pass --overwrite to clear it first"
    )


def _resume_last(run_dir: Path) -> Path:
    """`last.ckpt`, or the newest good checkpoint when it is missing or corrupt (and say so)."""
    folder = run_dir / CHECKPOINT_DIR
    last = folder / LAST_CHECKPOINT
    try:
        verify_checkpoint(last)
        return last
    except CheckpointError as error:
        problem = str(error)
    fallback = newest_good_checkpoint(folder, exclude=last)
    if fallback is None:
        if not last.exists() and not checkpoint_candidates(folder):
            raise ConfigError(f"trainer.resume=last: checkpoint not found: {last}")
        raise CheckpointError(f"{problem}; no other good checkpoint in {folder}")
    path, step = fallback
    say(f"{problem}; resuming from {path} (step {step}), the newest good checkpoint")
    return path


def resume_checkpoint(cfg: Config, run_dir: Path, model_key: str) -> tuple[Path | None, dict | None]:
    """The checkpoint `trainer.resume` names and its metadata, checked whole and holding this config's model.

    `model_key`: the checkpoint key under which the training module stores its model config.
    """
    resume = cfg.trainer.resume
    if resume is None:
        return None, None
    if resume == "last":
        path = _resume_last(run_dir)
    else:
        path = Path(resume)
        verify_checkpoint(path)
    metadata = checkpoint_metadata(path)
    saved = metadata.get(model_key)
    current = config_lib.to_dict(cfg)["model"]
    if saved is not None and saved != current:
        differing = sorted(_differing_keys(saved, current, "model"))
        raise ConfigError(
            f"trainer.resume={resume}: {path} holds a different model (config differs at {', '.join(differing[:3])})"
        )
    return path, metadata


def _differing_keys(a, b, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return [k for key in keys for k in _differing_keys(a.get(key), b.get(key), f"{prefix}.{key}")]
    return [] if a == b else [prefix]
