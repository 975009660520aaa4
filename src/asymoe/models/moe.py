"""MoEBlock: expert groups + routers, in place of a language model's feed-forward layer.

Groups: `vision` (vision-intra), `shared` (inter-modality), `language` (language-intra), each
built only when its count is > 0. Global expert order and the routers of each routing mode are
defined in `asymoe.layout`.

A forward is route → dispatch → combine: every router picks top-k experts for its real tokens
(LTDR: top-a for the vision tail tokens), each group runs its experts on the tokens routed to
it, and the block output is the sum of the groups' weighted outputs. Losses and statistics are
computed afterwards from what routing returned.

Token metadata reaches the block through `MoEState`, an object owned by the model and set before
each forward (never module-global). The block writes its losses and statistics into the state
under its layer index, overwriting on a re-run, so activation-checkpoint recomputation (which runs
the forward again during backward) leaves them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypeVar

import torch
from torch import nn

from asymoe.config import MoEConfig
from asymoe.layout import GROUP_NAMES, SHARED_ROUTER, eligible_groups, router_names
from asymoe.models import dispatch
from asymoe.models.experts import ExpertGroup
from asymoe.models.positions import PackedPositions
from asymoe.models.routing import (
    Router,
    Routing,
    expert_share,
    routing_entropy,
    routing_probability_variance,
    switch_balance_loss,
    top_k_routing,
    z_loss,
)

T = TypeVar("T")


@dataclass(eq=False)
class TokenMeta:
    """Per-position facts about the current batch, all (batch, seq) bool tensors.

    The four fields are what the model knows about each position. Everything else reads the
    derived masks below, each built once (on first use) and restricted to real positions, so the
    rule for, say, "a real language token" lives here only. Do not modify the fields after a
    derived mask has been read.
    """

    vision_mask: torch.Tensor  # positions holding a projected image token
    attention_mask: torch.Tensor  # real (non-padding) positions
    evidence_mask: torch.Tensor  # image tokens + prompt/question tokens (never answers, padding, template)
    answer_mask: torch.Tensor  # supervised answer positions
    _reachable: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _packed: dict[int, tuple[torch.Tensor, PackedPositions]] = field(default_factory=dict, init=False, repr=False)
    _memo: dict[Hashable, object] = field(default_factory=dict, init=False, repr=False)

    @cached_property
    def valid(self) -> torch.Tensor:
        """Real (non-padding) positions."""
        return self.attention_mask.bool()

    @cached_property
    def vision(self) -> torch.Tensor:
        """Real image-token positions."""
        return self.valid & self.vision_mask.bool()

    @cached_property
    def language(self) -> torch.Tensor:
        """Real language-token positions: every real position that is not an image token."""
        return self.valid & ~self.vision_mask.bool()

    @cached_property
    def evidence(self) -> torch.Tensor:
        """Real evidence positions (image + prompt/question tokens)."""
        return self.valid & self.evidence_mask.bool()

    @cached_property
    def prompt(self) -> torch.Tensor:
        """Real language evidence positions: the prompt/question tokens."""
        return self.evidence & self.language

    @cached_property
    def answer(self) -> torch.Tensor:
        """Real supervised answer positions."""
        return self.valid & self.answer_mask.bool()

    @cached_property
    def sample_index(self) -> torch.Tensor:
        """(tokens,) sample of each flattened position."""
        batch, seq = self.vision_mask.shape
        return torch.arange(batch, device=self.vision_mask.device).repeat_interleave(seq)

    def router_tokens(self, router: str) -> torch.Tensor:
        """(batch, seq) positions a router routes: real tokens of its modality (all real ones in shared mode)."""
        if router == SHARED_ROUTER:
            return self.valid
        return self.vision if router == "vision" else self.language

    def reachable(self, routers: tuple[str, ...]) -> torch.Tensor:
        """(batch, seq) positions any of `routers` routes, built once per batch (every layer shares it)."""
        if len(routers) == 1:
            return self.router_tokens(routers[0])
        if routers not in self._reachable:
            masks = [self.router_tokens(router) for router in routers]
            self._reachable[routers] = torch.stack(masks).any(0) if masks else torch.zeros_like(self.valid)
        return self._reachable[routers]

    def packed(self, mask: torch.Tensor) -> PackedPositions:
        """`mask`'s positions packed per sample, cached for a mask this TokenMeta holds (`reachable`)."""
        cached = self._packed.get(id(mask))
        if cached is None or cached[0] is not mask:
            cached = self._packed[id(mask)] = (mask, PackedPositions.of(mask))
        return cached[1]

    def memo(self, key: Hashable, build: Callable[[], T]) -> T:
        """`build()` once per batch under `key` (e.g. a mask that every layer derives alike).

        A key naming an object should name one this TokenMeta keeps alive (a `packed` result), so
        that it is never reused by another object.
        """
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]  # type: ignore[return-value]


@dataclass
class LayerRecord:
    """What one MoE block reports for the last forward."""

    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted, enter the total loss
    scalars: dict[str, torch.Tensor] = field(default_factory=dict)  # detached, for logging
    expert_share: dict[str, torch.Tensor] = field(default_factory=dict)  # router -> (experts,)
    rpv: torch.Tensor | None = None  # vision tokens' routing-probability variance (detached)


class MoEState:
    """Shared by the model and its MoE blocks: metadata in, per-layer records out.

    `statistics` (default True) says whether blocks fill the records' statistics (scalars, expert
    shares, RPV); losses are always recorded. A training loop may switch it off on steps that
    log nothing, which skips that work (and its device syncs) entirely.
    """

    def __init__(self) -> None:
        self.meta: TokenMeta | None = None
        self.records: dict[int, LayerRecord] = {}
        self.statistics = True

    def set(self, meta: TokenMeta) -> None:
        self.meta = meta
        self.records = {}

    def _losses_by_name(self) -> dict[str, list[torch.Tensor]]:
        by_name: dict[str, list[torch.Tensor]] = {}
        for record in self.records.values():
            for name, value in record.losses.items():
                by_name.setdefault(name, []).append(value)
        return by_name

    def total_aux_loss(self) -> torch.Tensor | None:
        """Sum over loss names of the mean over MoE layers (not the HF all-layers pooling)."""
        by_name = self._losses_by_name()
        if not by_name:
            return None
        return sum(torch.stack(values).mean() for values in by_name.values())

    def mean_losses(self) -> dict[str, torch.Tensor]:
        """Each auxiliary loss averaged over layers (weighted values, detached)."""
        return {name: torch.stack(values).mean().detach() for name, values in self._losses_by_name().items()}


@dataclass
class RouterDecision:
    """One router's routing of its tokens."""

    token_ids: torch.Tensor  # (n,) flattened positions this router routed
    is_vision: torch.Tensor  # (n,) bool
    logits: torch.Tensor  # (n, eligible) float32, logit biases included
    routing: Routing  # expert indices local to the router's eligible experts
    tail_top_a: int | None  # LTDR's top-a for this router's vision tail tokens, None when off


@dataclass
class BlockRouting:
    """Every router's choice in global expert numbering, one row per flattened position."""

    expert_index: torch.Tensor  # (tokens, slots) long
    expert_weight: torch.Tensor  # (tokens, slots) float32, used slots sum to 1
    slot_mask: torch.Tensor  # (tokens, slots) bool, all False on padding


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
        self.routing_config = config.routing
        self.experts_backend = config.experts_backend
        self.groups = nn.ModuleDict({name: group for name, group in groups.items() if group.num_experts > 0})
        self.offsets: dict[str, int] = {}  # first global expert id of each group
        offset = 0
        for name in GROUP_NAMES:
            if name in self.groups:
                self.offsets[name] = offset
                offset += self.groups[name].num_experts
        self.num_experts = offset
        mode = config.routing.mode
        self.router_groups: dict[str, tuple[str, ...]] = {
            router: tuple(g for g in eligible_groups(mode, router) if g in self.groups) for router in router_names(mode)
        }
        self.routers = nn.ModuleDict()
        for router, router_groups in self.router_groups.items():
            eligible = torch.cat([torch.arange(self.groups[g].num_experts) + self.offsets[g] for g in router_groups])
            self.routers[router] = Router(hidden_size, len(eligible), config.routing.jitter)
            # Router-local expert j of router r is global expert eligible_r[j].
            self.register_buffer(f"eligible_{router}", eligible, persistent=False)
        # The routers that can send tokens to each group.
        self.group_routers: dict[str, tuple[str, ...]] = {
            name: tuple(router for router, router_groups in self.router_groups.items() if name in router_groups)
            for name in self.groups
        }
        self.tail_top_a = self._tail_top_a()
        self.slots = max([config.routing.top_k, *self.tail_top_a.values()])
        # Python-side handle on the shared state; not a submodule and not in the state dict.
        object.__setattr__(self, "_state", state)

    def _tail_top_a(self) -> dict[str, int]:
        """LTDR's top-a per router that routes vision tokens; language tokens never get top-a.

        In modality mode that is the vision router only; in shared mode the one router, whose
        language tokens are never tail candidates.
        """
        tail = self.routing_config.vision_tail
        if not tail.enabled:
            return {}
        routers = [r for r in self.routers if r in (SHARED_ROUTER, "vision")]
        return {r: len(getattr(self, f"eligible_{r}")) if tail.top_a is None else tail.top_a for r in routers}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        meta: TokenMeta | None = self._state.meta
        assert meta is not None, "MoEState.meta must be set before the forward"
        batch, seq, width = hidden.shape
        assert meta.attention_mask.shape == (batch, seq), "token metadata does not match the hidden states"
        tokens = hidden.reshape(batch * seq, width)  # (tokens, d)
        extras = {
            name: group.prepare(hidden, meta, meta.reachable(self.group_routers[name]))
            for name, group in self.groups.items()
        }
        decisions, routing = self._route(tokens, meta, extras)
        group_outputs, routed_weight = self._dispatch(tokens, routing, extras)
        out = sum(group_outputs.values()).reshape(batch, seq, width)  # combine
        self._state.records[self.layer_index] = self._record(hidden, meta, decisions, group_outputs, routed_weight)
        return out

    # -- route -----------------------------------------------------------------------------------

    def _route(
        self, tokens: torch.Tensor, meta: TokenMeta, extras: dict[str, dict[str, torch.Tensor]]
    ) -> tuple[dict[str, RouterDecision], BlockRouting]:
        """Each router's top-k (top-a) choice for its tokens, and all of them in global numbering."""
        num_tokens = tokens.shape[0]
        routing = BlockRouting(
            expert_index=torch.zeros(num_tokens, self.slots, dtype=torch.long, device=tokens.device),
            expert_weight=torch.zeros(num_tokens, self.slots, dtype=torch.float32, device=tokens.device),
            slot_mask=torch.zeros(num_tokens, self.slots, dtype=torch.bool, device=tokens.device),
        )
        vision_flat = meta.vision.reshape(-1)
        decisions: dict[str, RouterDecision] = {}
        for name, router in self.routers.items():
            token_ids = torch.where(meta.router_tokens(name).reshape(-1))[0]  # (n,)
            # The gate runs on every position and its logits are selected: gathering the (n, d)
            # token rows instead would cost a scatter-add of (T, d) in the backward.
            logits = router(tokens).index_select(0, token_ids)  # (n, eligible) float32
            bias = self._logit_bias(name, extras, token_ids, logits)
            if bias is not None:
                logits = logits + bias
            is_vision = vision_flat[token_ids]
            top_a = self.tail_top_a.get(name)
            local = top_k_routing(
                logits,
                self.routing_config.top_k,
                tail_top_a=top_a,
                tail_candidate=is_vision,
                sample_index=meta.sample_index[token_ids],
            )
            used = local.expert_index.shape[1]
            routing.expert_index[token_ids, :used] = getattr(self, f"eligible_{name}")[local.expert_index]
            routing.expert_weight[token_ids, :used] = local.expert_weight
            routing.slot_mask[token_ids, :used] = local.slot_mask
            decisions[name] = RouterDecision(token_ids, is_vision, logits, local, top_a)
        return decisions, routing

    def _logit_bias(self, router: str, extras, token_ids, logits) -> torch.Tensor | None:
        """Per-group logit biases (e.g. the evidence routing bias), placed on that group's columns."""
        bias = None
        column = 0
        for group_name in self.router_groups[router]:
            group = self.groups[group_name]
            group_bias = group.logit_bias(extras[group_name])  # (T,) or None
            if group_bias is not None:
                group_bias = group_bias.index_select(0, token_ids)
                if bias is None:
                    bias = torch.zeros_like(logits)
                bias[:, column : column + group.num_experts] += group_bias.float().unsqueeze(-1)
            column += group.num_experts
        return bias

    # -- dispatch --------------------------------------------------------------------------------

    def _dispatch(
        self, tokens: torch.Tensor, routing: BlockRouting, extras: dict[str, dict[str, torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Every group's weighted output (tokens, d) and the routing weight (tokens,) it received."""
        outputs: dict[str, torch.Tensor] = {}
        routed_weight: dict[str, torch.Tensor] = {}
        kernels = self._kernels(tokens)
        if kernels is not None and set(kernels.values()) == {"eager"}:
            kernels = None
        if kernels is not None:
            # One sort of every router's assignments for the whole block; each group reads its run.
            no_host_sizes = set(kernels.values()) <= {"grouped_mm", "eager"}  # eager groups do not read the sort
            sync_free = tokens.device.type in dispatch.SYNC_FREE_DEVICES and no_host_sizes
            assignments = dispatch.sort_assignments(
                routing.expert_index, routing.expert_weight, routing.slot_mask, self.num_experts, sync_free
            )
        for name, group in self.groups.items():
            local = routing.expert_index - self.offsets[name]
            in_group = routing.slot_mask & (local >= 0) & (local < group.num_experts)  # (tokens, slots)
            if kernels is None or kernels[name] == "eager":
                outputs[name] = group.dispatch(tokens, local, routing.expert_weight, in_group, extras[name])
            else:
                rows = dispatch.group_rows(assignments, self.offsets[name], group.num_experts)
                outputs[name] = group.dispatch_grouped(tokens, rows, kernels[name], extras[name])
            routed_weight[name] = (routing.expert_weight * in_group).sum(-1)
        return outputs, routed_weight

    def _kernels(self, tokens: torch.Tensor) -> dict[str, str] | None:
        """Each group's kernel ("eager": its per-expert loop) for `model.moe.experts_backend`; None for eager."""
        if self.experts_backend == "eager":
            return None
        device = tokens.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else tokens.dtype
        return {
            name: dispatch.resolve_kernel(
                self.experts_backend,
                device,
                torch.float32 if group.float32_experts else dtype,
                *group.matmul_widths(),
                family=group.family,
            )
            for name, group in self.groups.items()
        }

    # -- losses and statistics -------------------------------------------------------------------

    def _record(
        self,
        hidden: torch.Tensor,
        meta: TokenMeta,
        decisions: dict[str, RouterDecision],
        group_outputs: dict[str, torch.Tensor],
        routed_weight: dict[str, torch.Tensor],
    ) -> LayerRecord:
        record = LayerRecord()
        balance = {name: self._balance_loss(decision) for name, decision in decisions.items()}
        cfg = self.routing_config
        for name, decision in decisions.items():
            coef = float(cfg.balance_coef.get(name, 0.0))
            if coef > 0:
                record.losses[f"balance_{name}"] = coef * balance[name]
            if cfg.z_loss_coef > 0:
                record.losses[f"z_{name}"] = cfg.z_loss_coef * z_loss(decision.logits)
        shape = hidden.shape[:2]
        outputs = {name: value.view(hidden.shape) for name, value in group_outputs.items()}
        weights = {name: value.view(shape) for name, value in routed_weight.items()}
        for group in self.groups.values():
            record.losses.update(group.aux_losses(hidden, meta, outputs, weights))
        if self._state.statistics:
            self._statistics(record, meta, decisions, balance, weights)
        return record

    def _balance_loss(self, decision: RouterDecision) -> torch.Tensor:
        """Switch balance loss over the router's tokens of the modalities in `balance_modalities`."""
        in_balance = torch.zeros_like(decision.is_vision)
        for modality in self.routing_config.balance_modalities:
            in_balance |= decision.is_vision if modality == "vision" else ~decision.is_vision
        routing = decision.routing
        return switch_balance_loss(
            routing.probs[in_balance], routing.expert_index[in_balance], routing.slot_mask[in_balance]
        )

    def _statistics(
        self,
        record: LayerRecord,
        meta: TokenMeta,
        decisions: dict[str, RouterDecision],
        balance: dict[str, torch.Tensor],
        routed_weight: dict[str, torch.Tensor],
    ) -> None:
        """Detached per-router, per-group and per-token statistics for TensorBoard."""
        experts_used = torch.zeros(meta.valid.numel(), device=meta.valid.device)  # (tokens,)
        for name, decision in decisions.items():
            routing = decision.routing
            eligible = routing.probs.shape[1]
            record.scalars[f"balance_raw/{name}"] = balance[name].detach()
            record.scalars[f"entropy/{name}"] = routing_entropy(routing.probs).detach()
            record.scalars[f"balance_P/{name}"] = (
                routing.probs.mean(0).detach() if routing.probs.shape[0] else routing.probs.new_zeros(eligible)
            )
            record.expert_share[name] = expert_share(routing.expert_index, routing.slot_mask, eligible).detach()
            if decision.tail_top_a is not None and decision.is_vision.any():
                record.scalars[f"tail_fraction/{name}"] = routing.tail_mask[decision.is_vision].float().mean().detach()
                record.rpv = routing_probability_variance(routing.probs[decision.is_vision]).detach()
            experts_used[decision.token_ids] = routing.slot_mask.sum(-1).float()
        for key, mask in (("experts_per_vision_token", meta.vision), ("experts_per_token", meta.valid)):
            if mask.any():
                record.scalars[key] = experts_used[mask.reshape(-1)].mean()
        for name, group in self.groups.items():
            for part, mask in (("prompt", meta.prompt), ("answer", meta.answer)):
                if mask.any():
                    record.scalars[f"route_share/{name}/{part}"] = routed_weight[name][mask].mean().detach()
            record.scalars.update({f"{name}/{key}": value for key, value in group.scalars().items()})
