"""The positions of a (batch, seq) mask packed per sample, for work that only some tokens need.

The evidence experts' cross-attention and routing-bias attention are read only by the tokens the
evidence group can receive (in modality routing: language tokens, often a small part of a
LLaVA-style sequence next to hundreds of image tokens). `PackedPositions` moves those positions
to the front of each sample, (batch, seq, ·) -> (batch, Q, ·) with Q the largest count of any
sample, so that attention runs Q queries per sample instead of seq, and puts results back.

Within a sample the packed columns are the selected positions in order, followed by unselected
ones (a stable argsort of the mask): every index is distinct, so putting back is an injective
scatter (deterministic, and its backward a gather). Columns past a sample's count are padding
(`valid` False); `scatter` writes zeros from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class PackedPositions:
    """Selected positions of each sample at the front: index (batch, Q) into seq, valid (batch, Q)."""

    seq: int
    index: torch.Tensor  # (batch, Q) long, distinct within a row
    valid: torch.Tensor  # (batch, Q) bool: a selected position (the rest are padding columns)
    every: bool  # every position is selected (Q = seq, index = arange): gather and scatter are identities

    @staticmethod
    def of(mask: torch.Tensor) -> PackedPositions:
        """Pack the True positions of mask (batch, seq). Reads the largest count to the host (once per batch)."""
        batch, seq = mask.shape
        if bool(mask.all()):
            return PackedPositions._every(batch, seq, mask.device)
        counts = mask.sum(1)  # (batch,)
        width = int(counts.max()) if batch else 0
        index = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :width]
        valid = torch.arange(width, device=mask.device) < counts.unsqueeze(1)
        return PackedPositions(seq, index, valid, every=False)

    @staticmethod
    def everywhere(states: torch.Tensor) -> PackedPositions:
        """Every position of states (batch, seq, ...)."""
        return PackedPositions._every(*states.shape[:2], states.device)

    @staticmethod
    def _every(batch: int, seq: int, device: torch.device) -> PackedPositions:
        index = torch.arange(seq, device=device).expand(batch, seq)
        return PackedPositions(seq, index, torch.ones(batch, seq, dtype=torch.bool, device=device), every=True)

    def gather(self, states: torch.Tensor) -> torch.Tensor:
        """(batch, seq, ...) -> (batch, Q, ...)."""
        if self.every:
            return states
        index = self.index.view(*self.index.shape, *[1] * (states.dim() - 2)).expand(-1, -1, *states.shape[2:])
        return states.gather(1, index)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """(batch, Q, ...) -> (batch, seq, ...): each value at its position, zeros elsewhere and from padding."""
        if self.every:
            return values
        shape = (values.shape[0], self.seq, *values.shape[2:])
        valid = self.valid.view(*self.valid.shape, *[1] * (values.dim() - 2))
        index = self.index.view(*self.index.shape, *[1] * (values.dim() - 2)).expand_as(values)
        return values.new_zeros(shape).scatter(1, index, values * valid)
