"""Which ExpertGroup class a configured group becomes."""

from __future__ import annotations

from asymoe.config import MoEConfig
from asymoe.models.experts import ExpertGroup, FFNExperts


def make_group(name: str, moe: MoEConfig, hidden_size: int, width: int, activation: str) -> ExpertGroup:
    group = getattr(moe.groups, name)
    if group.geometry != "euclidean":
        from asymoe.models.hyperbolic import HyperbolicExperts

        return HyperbolicExperts(
            num_experts=group.num_experts,
            hidden_size=hidden_size,
            intermediate_size=width,
            activation=activation,
            geometry=group.geometry,
            curvature=group.curvature,
            learn_curvature=group.learn_curvature,
            geometry_loss=moe.geometry_loss,
            has_evidence_group=moe.groups.language.num_experts > 0 and moe.groups.language.kind == "evidence",
        )
    if group.kind == "evidence":
        from asymoe.models.evidence import EvidenceExperts

        return EvidenceExperts(
            num_experts=group.num_experts,
            hidden_size=hidden_size,
            intermediate_size=width,
            activation=activation,
            config=moe.evidence,
        )
    return FFNExperts(group.num_experts, hidden_size, width, activation)
