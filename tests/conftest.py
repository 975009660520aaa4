"""Shrinks any experiment to a seconds-long CPU run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Under pytest-xdist (pyproject.toml: 2 workers) one thread per worker: two workers of 2 threads each
# on 2 cores spent twice the CPU time (OpenMP threads spinning for a core) and ran slower than one.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))

# A tiny model and a handful of batches: every experiment keeps its MoE layout and switches.
TINY = [
    "model.vision.model_kwargs.channels=[8,16,32,64]",
    "model.language.hidden_size=32",
    "model.language.intermediate_size=64",
    "model.language.num_heads=2",
    "model.language.num_kv_heads=2",
    "model.moe.evidence.heads=2",
    "data.limit_train=96",
    "data.limit_val=24",
    "data.limit_test=24",
    "data.images_per_batch=4",
    "data.eval_batch_size=16",
    "trainer.max_steps=2",
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=1",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "optim.warmup_steps=1",
]


@pytest.fixture
def tiny_overrides(tmp_path) -> list[str]:
    return TINY + [f"output_dir={tmp_path / 'run'}"]


# A tiny causal LM (hidden 32, 2 layers) for the tests that save a model and load it by path.
TINY_LM = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def save_tiny_lm(directory, model_type: str, **config) -> None:
    """Save a `model_type` LM built from `config` (default TINY_LM) with seed-0 weights to `directory`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **(config or TINY_LM)))
    model.save_pretrained(directory)


# The longest test files (minutes of child processes on 2 cores) start first, so that the two xdist
# workers (pyproject.toml) finish together instead of one running a long file at the end alone.
LONGEST_FIRST = ("test_faults.py", "test_grid.py", "test_distributed.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
