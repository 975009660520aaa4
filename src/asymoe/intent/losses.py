"""Semantic-synchronisation losses (our reading of A-MESS): align samples with label descriptions.

`sample`: (B, h) fused sample embeddings (anchor of the triplet); `descriptions`: (L, h) one
encoded description per label; `labels`: (B,) label ids in [0, L).

- distance: cosine d = 1 - cos(x, y), or euclidean d = ||x - y||_2;
- triplet:  mean_b max(0, d(s_b, e_{y_b}) - d(s_b, e_{n_b}) + margin), with the negative n_b a
  uniformly random other label (`random`) or the other label whose description is closest to s_b
  (`hardest`);
- InfoNCE:  cross-entropy of softmax_l(-d(s_b, e_l) / temperature) against y_b (for cosine this is
  the usual cos / temperature up to a constant shift).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_distance(sample: torch.Tensor, descriptions: torch.Tensor, distance: str) -> torch.Tensor:
    """(B, h), (L, h) -> (B, L) distances."""
    if distance == "cosine":
        return 1.0 - F.normalize(sample, dim=-1) @ F.normalize(descriptions, dim=-1).T
    assert distance == "euclidean", distance
    return torch.cdist(sample, descriptions)


def triplet_loss(
    sample: torch.Tensor,
    descriptions: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    distance: str,
    negative: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    distances = pairwise_distance(sample, descriptions, distance)  # (B, L)
    positive = distances.gather(1, labels[:, None]).squeeze(1)  # (B,)
    num_labels = descriptions.shape[0]
    if negative == "hardest":
        others = distances.masked_fill(F.one_hot(labels, num_labels).bool(), float("inf"))
        negative_distance = others.min(dim=1).values
    else:
        assert negative == "random", negative
        offset = torch.randint(1, num_labels, labels.shape, generator=generator, device=labels.device)
        negative_distance = distances.gather(1, ((labels + offset) % num_labels)[:, None]).squeeze(1)
    return F.relu(positive - negative_distance + margin).mean()


def infonce_loss(
    sample: torch.Tensor, descriptions: torch.Tensor, labels: torch.Tensor, temperature: float, distance: str
) -> torch.Tensor:
    logits = -pairwise_distance(sample, descriptions, distance) / temperature  # (B, L)
    return F.cross_entropy(logits, labels)
