"""Projector from vision features to the language model's width (LLaVA-1.5's mlp2x_gelu or linear)."""

from __future__ import annotations

from torch import nn


def build_projector(kind: str, vision_dim: int, hidden_size: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(vision_dim, hidden_size)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
    raise ValueError(f"unknown projector kind {kind!r}")
