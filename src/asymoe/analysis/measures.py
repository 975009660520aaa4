"""The AsyMoE paper's grounding measurements on attention probabilities and routing weights.

Pure tensor functions (no model, no data), each with the reading we fix where the paper leaves
one open. Shapes: B batch, H heads, S sequence, T = B·S flattened positions, E experts.

- Evidence grounding ratio (AsyMoE, Eqs. 2-3). For the attention layer feeding MoE block l (the
  self-attention of the same decoder layer), average the probabilities over heads; a row i's
  evidence mass is A_evd(i) = Σ_{j ∈ I_evd} a_ij and its memory mass A_mem(i) = Σ_{j ∈ I_mem} a_ij,
  with I_evd the image and prompt/question positions and I_mem every other position (BOS, role
  markers, answer tokens and their EOS, padding — padding gets probability 0). Expert k's
  expectations weight each routed row by the routing weight k received from it:
  E[A^k_evd] = Σ_i w_ik A_evd(i) / Σ_i w_ik, likewise E[A^k_mem], and
  F(E_k) = E[A^k_evd] / (E[A^k_evd] + E[A^k_mem]). As every real position is either evidence or
  memory, A_evd + A_mem = 1 per row and F(E_k) = E[A^k_evd].
- Evidence-dependence ratio (Eq. 4). f_k = the fraction of the tokens that may reach expert k
  (those of its router's modality) that select it among their top-k; f^evd_k with the real image
  and question, f^mem_k with the image blanked and the question tokens shuffled within each
  sequence; R_k = (f^evd_k − f^mem_k) / (f^evd_k + f^mem_k) ∈ [−1, 1], > 0 when real evidence
  draws tokens to the expert.
- Attention entropy (Eqs. 5-6). Per row and head H_i = −Σ_j a_ij log a_ij (nats, 0·log 0 = 0);
  H_V(l) averages it over heads and over the rows of image tokens, H_L(l) over heads and the rows
  of every other real token. A causal row i spreads over i + 1 keys at most, so both grow with
  position as well as with diffuseness; compare models on the same data. Context dilution is the
  least-squares slope β of H_L(l) over the layer index l.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def evidence_memory_mass(attention: torch.Tensor, evidence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-averaged attention mass of every row on evidence and on memory positions (Eq. 2).

    attention (B, H, S, S) probabilities; evidence (B, S) bool over the key positions.
    Returns A_evd, A_mem, each (B, S).
    """
    rows = attention.float().mean(dim=1)  # (B, S, S), averaged over heads
    on_evidence = evidence.to(rows.dtype).unsqueeze(1)  # (B, 1, S) over keys
    a_evd = (rows * on_evidence).sum(-1)
    a_mem = (rows * (1 - on_evidence)).sum(-1)
    return a_evd, a_mem


def dense_routing_weights(
    expert_index: torch.Tensor, expert_weight: torch.Tensor, slot_mask: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """(T, E) routing weight each position sent to each expert (0 where unrouted) from (T, slots) choices."""
    weights = expert_weight.new_zeros(expert_index.shape[0], num_experts)
    return weights.scatter_add_(1, expert_index, expert_weight * slot_mask)


def grounding_sums(weights: torch.Tensor, a_evd: torch.Tensor, a_mem: torch.Tensor) -> torch.Tensor:
    """(3, E): Σ_i w_ik, Σ_i w_ik A_evd(i), Σ_i w_ik A_mem(i) over rows i; weights (T, E), masses (T,)."""
    weights = weights.float()
    return torch.stack([weights.sum(0), a_evd.float() @ weights, a_mem.float() @ weights])


def grounding_ratio(sums: torch.Tensor) -> dict[str, list[float | None]]:
    """E[A_evd], E[A_mem] and F per expert (Eq. 3) from accumulated `grounding_sums`; None without tokens."""
    weight, evd, mem = sums.double()
    a_evd, a_mem = evd / weight, mem / weight
    ratio = a_evd / (a_evd + a_mem)
    return {"F": _listed(ratio), "A_evd": _listed(a_evd), "A_mem": _listed(a_mem), "weight": _listed(weight)}


def activation_counts(weights: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """(2, E): tokens that selected each expert, tokens that could have; weights, eligible (T, E)."""
    return torch.stack([(weights > 0).sum(0), eligible.sum(0)]).double()


def evidence_dependence(evidence_counts: torch.Tensor, memory_counts: torch.Tensor) -> dict[str, list[float | None]]:
    """f_evd, f_mem and R (Eq. 4) per expert from accumulated `activation_counts` of the two conditions."""
    f_evd = evidence_counts[0] / evidence_counts[1]
    f_mem = memory_counts[0] / memory_counts[1]
    ratio = (f_evd - f_mem) / (f_evd + f_mem)
    return {"R": _listed(ratio), "f_evd": _listed(f_evd), "f_mem": _listed(f_mem)}


def row_entropy(attention: torch.Tensor) -> torch.Tensor:
    """(B, S) per-row attention entropy −Σ_j a_ij log a_ij, averaged over heads, from (B, H, S, S)."""
    probs = attention.float()
    return -torch.special.xlogy(probs, probs).sum(-1).mean(1)


def entropy_sums(entropy: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(2,): Σ of the rows' entropies and their count; entropy (B, S), rows (B, S) bool."""
    return torch.stack([entropy[rows].double().sum(), rows.sum().double()])


def least_squares_slope(xs: Sequence[float], ys: Sequence[float | None]) -> float | None:
    """Slope of the least-squares line through the (x, y) pairs with a y (None with fewer than two x)."""
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if len({x for x, _ in pairs}) < 2:
        return None
    mean_x = sum(x for x, _ in pairs) / len(pairs)
    mean_y = sum(y for _, y in pairs) / len(pairs)
    spread = sum((x - mean_x) ** 2 for x, _ in pairs)
    return sum((x - mean_x) * (y - mean_y) for x, y in pairs) / spread


def mean_of(sums: torch.Tensor) -> float | None:
    """sums[0] / sums[1] for a (2,) sum-and-count accumulator; None for a zero count."""
    return finite_or_none(float(sums[0].double() / sums[1].double()))


def finite_or_none(value: float) -> float | None:
    """`value`, or None for NaN / ±inf (an expert or row set without tokens): JSON has no NaN."""
    return value if math.isfinite(value) else None


def _listed(values: torch.Tensor) -> list[float | None]:
    return [finite_or_none(float(v)) for v in values.reshape(-1)]
