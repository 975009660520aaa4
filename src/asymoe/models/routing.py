"""Routers and routing rules: softmax over eligible experts -> top-k -> renormalise (dropless).

All router math runs in float32 whatever the autocast state, as MoE-LLaVA, Switch and
DeepSeek-MoE do: small logit differences decide discrete assignments.

Implemented rules
- top-k routing with renormalised weights (Mixtral / MoE-LLaVA);
- router jitter (Switch Transformer, multiplicative uniform noise on the router input, training only);
- router z-loss (ST-MoE, Zoph et al. 2022, Eq. 5): mean(logsumexp(logits)^2);
- Switch balance loss (Fedus et al. 2022, Eq. 4): L = E * sum_i f_i * P_i, with f_i the share of
  routing assignments that went to expert i and P_i the mean router probability of expert i, over
  the tokens of the modalities listed in `balance_modalities` (padding never counts). A perfectly
  uniform routing gives L = 1 for any top-k (the HF Mixtral helper scales it by k instead);
- LTDR vision tail rule (Cai et al., "Long-Tailed Distribution-Aware Router"): per sample, a vision
  token whose routing-probability variance (RPV) over its eligible experts exceeds the mean RPV of
  that sample's vision tokens is a tail token and is sent to its top-a experts instead of top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """A linear gate over `num_experts` eligible experts; logits in float32."""

    def __init__(self, hidden_size: int, num_experts: int, jitter: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.jitter = jitter
        nn.init.normal_(self.weight, std=hidden_size**-0.5 * 0.1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            hidden = hidden.float()
            if self.training and self.jitter > 0:
                hidden = hidden * torch.empty_like(hidden).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            return F.linear(hidden, self.weight.float())  # (tokens, experts)


@dataclass
class Routing:
    """Routing decision for one router's tokens.

    expert_index and expert_weight have one slot per possibly-used expert (max(k, a) slots);
    slot_mask says which slots are used (head tokens use k, LTDR tail tokens a).
    """

    probs: torch.Tensor  # (tokens, experts) float32
    expert_index: torch.Tensor  # (tokens, slots) long, local to this router's eligible experts
    expert_weight: torch.Tensor  # (tokens, slots) float32, used slots sum to 1
    slot_mask: torch.Tensor  # (tokens, slots) bool
    tail_mask: torch.Tensor  # (tokens,) bool: LTDR tail tokens


def routing_probability_variance(probs: torch.Tensor) -> torch.Tensor:
    """RPV: population variance of each token's probabilities over its eligible experts."""
    if probs.shape[0] == 0:  # a router without tokens (torch's var warns on an empty reduction)
        return probs.new_zeros(0)
    return probs.var(dim=-1, unbiased=False)  # (tokens,)


def tail_tokens(rpv: torch.Tensor, sample_index: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """LTDR tail detection, per sample: rpv > mean rpv of that sample's candidate (vision) tokens.

    rpv, sample_index, candidate: (tokens,). A token's status depends only on its own sample.
    """
    num_samples = int(sample_index.max().item()) + 1 if sample_index.numel() else 0
    weight = candidate.to(rpv.dtype)
    total = torch.zeros(num_samples, dtype=rpv.dtype, device=rpv.device).index_add_(0, sample_index, rpv * weight)
    count = torch.zeros(num_samples, dtype=rpv.dtype, device=rpv.device).index_add_(0, sample_index, weight)
    mean = total / count.clamp(min=1)
    return candidate & (rpv > mean[sample_index])


def top_k_routing(
    logits: torch.Tensor,
    top_k: int,
    tail_top_a: int | None = None,
    tail_candidate: torch.Tensor | None = None,
    sample_index: torch.Tensor | None = None,
) -> Routing:
    """Softmax over the eligible experts, top-k (top-a for LTDR tail tokens), renormalise."""
    probs = torch.softmax(logits.float(), dim=-1)  # (tokens, experts)
    slots = top_k if tail_top_a is None else max(top_k, tail_top_a)
    top_probs, expert_index = torch.topk(probs, slots, dim=-1)  # (tokens, slots)
    slot_mask = torch.zeros_like(top_probs, dtype=torch.bool)
    slot_mask[:, :top_k] = True
    tail = torch.zeros(probs.shape[0], dtype=torch.bool, device=probs.device)
    if tail_top_a is not None and tail_candidate is not None and sample_index is not None:
        tail = tail_tokens(routing_probability_variance(probs), sample_index, tail_candidate)
        slot_mask = slot_mask | tail[:, None]
    kept = top_probs * slot_mask
    expert_weight = kept / kept.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(kept.dtype).tiny)
    return Routing(probs, expert_index, expert_weight, slot_mask, tail)


def switch_balance_loss(probs: torch.Tensor, expert_index: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss E * sum_i f_i P_i over the given tokens (uniform routing -> 1).

    With no tokens the loss is an exact zero that still depends on `probs`, so the router stays in
    the autograd graph on every rank (FSDP needs every parameter to take part).
    """
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0
    assignments = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    assignments.index_add_(0, expert_index[slot_mask], torch.ones_like(expert_index[slot_mask], dtype=probs.dtype))
    share = assignments / assignments.sum().clamp(min=1)  # f_i
    mean_prob = probs.mean(dim=0)  # P_i
    return num_experts * (share * mean_prob).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean over tokens of logsumexp(logits)^2 (zero with no tokens)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def expert_share(expert_index: torch.Tensor, slot_mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Share of routing assignments each expert received (sums to 1; zeros with no tokens)."""
    counts = torch.bincount(expert_index[slot_mask], minlength=num_experts).float()
    return counts / counts.sum().clamp(min=1)


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the tokens' routing distributions."""
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    return -(probs * probs.clamp(min=1e-12).log()).sum(dim=-1).mean()
