"""MoEBlock: expert groups + routers, in place of a language model's feed-forward layer.

Groups: `vision` (vision-intra), `shared` (inter-modality), `language` (language-intra), each
built only when its count is > 0. Global expert order is vision, shared, language.

Routers
- mode `shared`: one router `all` over every expert (vanilla MoE, MoE-LLaVA);
- mode `modality`: router `vision` over vision ∪ shared, router `language` over shared ∪ language
  (modality-specific MoE when `shared` is empty, MoIIE, AsyMoE).

Token metadata reaches the block through `MoEState`, an object owned by the model and set before
each forward (never module-global). The block writes its losses and statistics into the state
under its layer index, overwriting on a re-run, so activation-checkpoint recomputation (which runs
the forward again during backward) leaves them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from asymoe.config import GROUP_NAMES, MODALITIES, MoEConfig, eligible_groups
from asymoe.models.experts import ExpertGroup
from asymoe.models.routing import (
    Router,
    expert_share,
    routing_entropy,
    routing_probability_variance,
    switch_balance_loss,
    top_k_routing,
    z_loss,
)


@dataclass
class TokenMeta:
    """Per-position facts about the current batch, all (batch, seq) bool tensors."""

    vision_mask: torch.Tensor  # positions holding a projected image token
    attention_mask: torch.Tensor  # real (non-padding) positions
    evidence_mask: torch.Tensor  # image tokens + prompt/question tokens (never answers, padding, template)
    answer_mask: torch.Tensor  # supervised answer positions

    @property
    def sample_index(self) -> torch.Tensor:
        batch, seq = self.vision_mask.shape
        return torch.arange(batch, device=self.vision_mask.device).repeat_interleave(seq)  # (tokens,)


@dataclass
class LayerRecord:
    """What one MoE block reports for the last forward."""

    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted, enter the total loss
    scalars: dict[str, torch.Tensor] = field(default_factory=dict)  # detached, for logging
    expert_share: dict[str, torch.Tensor] = field(default_factory=dict)  # router -> (experts,)
    rpv: torch.Tensor | None = None  # vision tokens' routing-probability variance (detached)


class MoEState:
    """Shared by the model and its MoE blocks: metadata in, per-layer records out."""

    def __init__(self) -> None:
        self.meta: TokenMeta | None = None
        self.records: dict[int, LayerRecord] = {}

    def set(self, meta: TokenMeta) -> None:
        self.meta = meta
        self.records = {}

    def total_aux_loss(self) -> torch.Tensor | None:
        """Sum over loss names of the mean over MoE layers (not the HF all-layers pooling)."""
        by_name: dict[str, list[torch.Tensor]] = {}
        for record in self.records.values():
            for name, value in record.losses.items():
                by_name.setdefault(name, []).append(value)
        if not by_name:
            return None
        return sum(torch.stack(values).mean() for values in by_name.values())

    def mean_losses(self) -> dict[str, torch.Tensor]:
        """Each auxiliary loss averaged over layers (weighted values, detached)."""
        by_name: dict[str, list[torch.Tensor]] = {}
        for record in self.records.values():
            for name, value in record.losses.items():
                by_name.setdefault(name, []).append(value.detach())
        return {name: torch.stack(values).mean() for name, values in by_name.items()}


class MoEBlock(nn.Module):
    """Routes each real token to top-k experts of its eligible groups and mixes their outputs."""

    def __init__(
        self,
        layer_index: int,
        hidden_size: int,
        groups: dict[str, ExpertGroup],
        config: MoEConfig,
        state: MoEState,
    ):
        super().__init__()
        self.layer_index = layer_index
        self.config = config
        self.routing_config = config.routing
        self.groups = nn.ModuleDict({name: group for name, group in groups.items() if group.num_experts > 0})
        # Global expert numbering: vision, shared, language.
        self.offsets: dict[str, int] = {}
        offset = 0
        for name in GROUP_NAMES:
            if name in self.groups:
                self.offsets[name] = offset
                offset += self.groups[name].num_experts
        self.num_experts = offset
        self.router_groups: dict[str, tuple[str, ...]] = {}
        if config.routing.mode == "shared":
            self.router_groups["all"] = tuple(name for name in GROUP_NAMES if name in self.groups)
        else:
            for modality in MODALITIES:
                self.router_groups[modality] = tuple(
                    name for name in eligible_groups("modality", modality) if name in self.groups
                )
        self.routers = nn.ModuleDict(
            {
                name: Router(hidden_size, sum(self.groups[g].num_experts for g in groups_), config.routing.jitter)
                for name, groups_ in self.router_groups.items()
            }
        )
        # Router-local expert j of router r is global expert eligible[r][j].
        for name, groups_ in self.router_groups.items():
            eligible = torch.cat(
                [torch.arange(self.groups[g].num_experts) + self.offsets[g] for g in groups_]
            )
            self.register_buffer(f"eligible_{name}", eligible, persistent=False)
        # Python-side handle on the shared state; not a submodule and not in the state dict.
        object.__setattr__(self, "_state", state)

    def _router_tokens(self, name: str, meta: TokenMeta) -> torch.Tensor:
        valid = meta.attention_mask.reshape(-1).bool()
        vision = meta.vision_mask.reshape(-1).bool()
        if name == "all":
            return valid
        return valid & vision if name == "vision" else valid & ~vision

    def _tail_top_a(self, num_eligible: int) -> int | None:
        tail = self.routing_config.vision_tail
        if not tail.enabled:
            return None
        return num_eligible if tail.top_a is None else tail.top_a

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        meta: TokenMeta | None = self._state.meta
        assert meta is not None, "MoEState.meta must be set before the forward"
        batch, seq, width = hidden.shape
        assert meta.attention_mask.shape == (batch, seq), "token metadata does not match the hidden states"
        tokens = hidden.reshape(batch * seq, width)  # (tokens, d)
        sample_index = meta.sample_index
        vision_flat = meta.vision_mask.reshape(-1).bool()
        extras = {name: group.prepare(hidden, meta) for name, group in self.groups.items()}

        routing_cfg = self.routing_config
        top_k = routing_cfg.top_k
        slots = top_k
        for name in self.routers:
            top_a = self._tail_top_a(len(getattr(self, f"eligible_{name}")))
            slots = max(slots, top_a or 0)
        global_index = torch.zeros(batch * seq, slots, dtype=torch.long, device=hidden.device)
        global_weight = torch.zeros(batch * seq, slots, dtype=torch.float32, device=hidden.device)
        global_mask = torch.zeros(batch * seq, slots, dtype=torch.bool, device=hidden.device)

        record = LayerRecord()
        experts_per_token = []
        for name, router in self.routers.items():
            token_ids = torch.where(self._router_tokens(name, meta))[0]
            eligible = getattr(self, f"eligible_{name}")
            logits = router(tokens[token_ids])  # (n, eligible) float32
            bias = self._logit_bias(name, extras, token_ids, logits)
            if bias is not None:
                logits = logits + bias
            top_a = self._tail_top_a(len(eligible))
            routing = top_k_routing(
                logits,
                top_k,
                tail_top_a=top_a,
                tail_candidate=vision_flat[token_ids],
                sample_index=sample_index[token_ids],
            )
            used = routing.expert_index.shape[1]
            global_index[token_ids, :used] = eligible[routing.expert_index]
            global_weight[token_ids, :used] = routing.expert_weight
            global_mask[token_ids, :used] = routing.slot_mask

            is_vision = vision_flat[token_ids]  # (n,)
            in_balance = torch.zeros_like(is_vision)
            for modality in routing_cfg.balance_modalities:
                in_balance |= is_vision if modality == "vision" else ~is_vision
            balance = switch_balance_loss(
                routing.probs[in_balance], routing.expert_index[in_balance], routing.slot_mask[in_balance]
            )
            coef = float(routing_cfg.balance_coef.get(name, 0.0))
            if coef > 0:
                record.losses[f"balance_{name}"] = coef * balance
            if routing_cfg.z_loss_coef > 0:
                record.losses[f"z_{name}"] = routing_cfg.z_loss_coef * z_loss(logits)
            record.scalars[f"balance_raw/{name}"] = balance.detach()
            record.scalars[f"entropy/{name}"] = routing_entropy(routing.probs).detach()
            record.expert_share[name] = expert_share(routing.expert_index, routing.slot_mask, len(eligible)).detach()
            record.scalars[f"balance_f/{name}"] = record.expert_share[name]
            record.scalars[f"balance_P/{name}"] = (
                routing.probs.mean(0).detach() if routing.probs.shape[0] else routing.probs.new_zeros(len(eligible))
            )
            if top_a is not None and is_vision.any():
                record.scalars[f"tail_fraction/{name}"] = routing.tail_mask[is_vision].float().mean().detach()
                record.rpv = routing_probability_variance(routing.probs[is_vision]).detach()
            experts_per_token.append((is_vision, routing.slot_mask.sum(-1)))

        vision_counts = torch.cat([counts[is_v] for is_v, counts in experts_per_token]).float()
        all_counts = torch.cat([counts for _, counts in experts_per_token]).float()
        if vision_counts.numel():
            record.scalars["experts_per_vision_token"] = vision_counts.mean().detach()
        if all_counts.numel():
            record.scalars["experts_per_token"] = all_counts.mean().detach()

        group_outputs: dict[str, torch.Tensor] = {}
        language_flat = meta.attention_mask.reshape(-1).bool() & ~vision_flat
        answer_flat = meta.answer_mask.reshape(-1).bool()
        prompt_flat = meta.evidence_mask.reshape(-1).bool() & language_flat
        for name, group in self.groups.items():
            offset = self.offsets[name]
            local = global_index - offset
            in_group = global_mask & (local >= 0) & (local < group.num_experts)
            group_outputs[name] = group.dispatch(tokens, local, global_weight, in_group, extras[name])
            routed_weight = (global_weight * in_group).sum(-1)  # (tokens,) share of the token sent here
            for part, mask in (("prompt", prompt_flat), ("answer", answer_flat)):
                if mask.any():
                    record.scalars[f"route_share/{name}/{part}"] = routed_weight[mask].mean().detach()
        out = sum(group_outputs.values())
        group_outputs = {name: value.reshape(batch, seq, width) for name, value in group_outputs.items()}
        for name, group in self.groups.items():
            record.losses.update(group.aux_losses(hidden, meta, group_outputs))
            record.scalars.update({f"{name}/{key}": value for key, value in group.scalars().items()})
        self._state.records[self.layer_index] = record
        return out.reshape(batch, seq, width)

    def _logit_bias(self, router: str, extras, token_ids, logits) -> torch.Tensor | None:
        """Per-group logit biases (e.g. the evidence routing bias), placed on that group's columns."""
        bias = None
        column = 0
        for group_name in self.router_groups[router]:
            group = self.groups[group_name]
            group_bias = group.logit_bias({k: v[token_ids] for k, v in extras[group_name].items()})
            if group_bias is not None:
                if bias is None:
                    bias = torch.zeros_like(logits)
                bias[:, column : column + group.num_experts] += group_bias.float().unsqueeze(-1)
            column += group.num_experts
        return bias
