"""Expert groups: E experts whose weights live in one 3-D tensor per projection.

A group is built or not at construction; a built group runs every one of its experts in every
forward, on however many tokens were routed to it (possibly none). An expert with no tokens then
still contributes an exact-zero gradient, so every rank of a sharded run sees the same graph.

Weight layout follows transformers' MoE modules (Mixtral/Qwen3-MoE): gate_up_proj (E, 2f, d) and
down_proj (E, d, f), applied with F.linear, so weights copy across without transposes.

`ExpertGroup.dispatch` is the eager reference path: one gather, expert call and scatter-add per
expert. `dispatch_grouped` is the fast one (`model.moe.experts_backend`, asymoe.models.dispatch):
the block sorts its assignments once, and `forward_grouped` runs all experts of the group at once
through an expert layout, giving each token the same weighted sum (fine-grained gated experts fold
the routing weights into the down projection's input, `folds_routing_weight`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from asymoe.models.dispatch import ExpertLayout, ExpertRows, make_layout
from asymoe.models.gating import gated_unit

if TYPE_CHECKING:
    from asymoe.models.moe import TokenMeta


def gated_ffn(
    tokens: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn,
    linear=F.linear,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """down · (s ⊙ act(gate · x) ⊙ (up · x)) with gate_up_proj (2f, in) and down_proj (d, f).

    `linear` applies a weight: F.linear for one expert, or an `ExpertLayout.linear` for the
    weights (E, 2f, in), (E, d, f) of all experts at once. `scale` (n, 1) (default 1) multiplies the
    gated unit, i.e. the output (down is linear and bias-free).
    """
    hidden = gated_unit(linear(tokens, gate_up_proj), act_fn)  # (n, 2f) -> (n, f)
    if scale is not None:
        hidden = hidden * scale.to(hidden.dtype)
    return linear(hidden, down_proj)  # (n, d)


class ExpertGroup(nn.Module):
    """Base class of an expert group.

    Subclasses implement `expert_forward`; they may also
    - `prepare(hidden, meta, reachable)`: per-token tensors the experts need besides the token
      itself (returned as a dict of (tokens, ...) tensors, indexed together with the tokens);
      `reachable` (batch, seq) marks the positions the group's routers route (None: all), so
      work only they need may skip the rest;
    - `logit_bias(extras)`: a (tokens,) bias added to this group's router logits;
    - `aux_losses(...)`: auxiliary losses (see moe.MoEBlock);
    - `scalars()`: statistics of the last forward, read only on logging steps;
    - `always_active_parameter_count()`: parameters run for every token whatever the routing.
    """

    num_experts: int
    hidden_size: int
    intermediate_size: int
    # Whether the experts compute in float32 whatever the autocast state (the hyperbolic ones).
    float32_experts: bool = False

    @property
    def family(self) -> str:
        """What `auto` measures the group as (dispatch.FASTEST_FOR_FAMILY): ffn, evidence, lorentz, poincare."""
        return "ffn"

    def prepare(
        self, hidden: torch.Tensor, meta: TokenMeta, reachable: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        return {}

    def logit_bias(self, extras: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None

    def aux_losses(
        self,
        hidden: torch.Tensor,
        meta: TokenMeta,
        group_outputs: dict[str, torch.Tensor],
        routed_weight: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Weighted auxiliary losses of this group for the current forward (default: none).

        hidden (B, S, d) is the block input; group_outputs maps each group name of the block to its
        routed output (B, S, d) and routed_weight to the routing weight (B, S) each token sent to
        that group (0: the group did not process the token); meta is the batch's TokenMeta.
        """
        return {}

    def scalars(self) -> dict[str, torch.Tensor]:
        """Detached statistics of the last forward for TensorBoard (e.g. curvature)."""
        return {}

    def expert_forward(self, expert: int, tokens: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """Output (n, d) of expert `expert` for tokens (n, d); every subclass defines it."""
        raise NotImplementedError(type(self).__name__)

    @property
    def folds_routing_weight(self) -> bool:
        """Whether the group applies the routing weights itself at less cost than the combine
        (`forward_grouped` then gets them); default no."""
        return False

    def forward_grouped(
        self,
        tokens: torch.Tensor,
        rows: ExpertRows,
        layout: ExpertLayout,
        extras: dict[str, torch.Tensor],
        row_weight: torch.Tensor | None,
    ) -> torch.Tensor:
        """Outputs of all the group's rows at once, in `layout` (its `combine` sums them into
        tokens): row r is expert rows.local_expert[r] on token rows.token_index[r]; tokens (T, d)
        and extras (T, ...) are per token and enter the layout through `layout.gather`. With
        row_weight (`layout.row_weight()`, given where `folds_routing_weight`) each output is
        multiplied by its routing weight."""
        raise NotImplementedError(type(self).__name__)

    def dispatch_grouped(
        self, tokens: torch.Tensor, rows: ExpertRows, kernel: str, extras: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The sum of `dispatch` for rows sorted by expert (asymoe.models.dispatch), (T, d)."""
        layout = make_layout(kernel, rows)
        folds = self.folds_routing_weight
        outputs = self.forward_grouped(tokens, rows, layout, extras, layout.row_weight() if folds else None)
        return layout.combine(outputs, tokens.dtype, weighted=not folds)

    def matmul_widths(self) -> tuple[int, ...]:
        """Input and output widths of the experts' weight multiplies (a kernel's stride rules)."""
        return (self.hidden_size, self.intermediate_size)

    def always_active_parameter_count(self) -> int:
        """Parameters the group runs for every token it may receive, whatever the routing (default 0)."""
        return 0

    def expert_parameter_count(self) -> int:
        """Parameters one expert uses for one token (for activated-parameter accounting).

        Default: every parameter but the always-active ones is split evenly over the experts.
        """
        total = sum(p.numel() for p in self.parameters())
        return (total - self.always_active_parameter_count()) // max(self.num_experts, 1)

    def dispatch(
        self,
        tokens: torch.Tensor,
        expert_index: torch.Tensor,
        expert_weight: torch.Tensor,
        slot_mask: torch.Tensor,
        extras: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Eager dropless dispatch: out[t] = sum over used slots s of w[t,s] * expert_{idx[t,s]}(x[t]).

        tokens (T, d); expert_index (T, slots) local to this group; expert_weight (T, slots);
        slot_mask (T, slots) marks the slots routed to this group. Every expert runs, also on no token.
        """
        out = torch.zeros_like(tokens)
        for expert in range(self.num_experts):
            token_ids, slot_ids = torch.where((expert_index == expert) & slot_mask)
            selected = {key: value[token_ids] for key, value in extras.items()}
            expert_out = self.expert_forward(expert, tokens[token_ids], selected)  # (n, d)
            weight = expert_weight[token_ids, slot_ids].unsqueeze(-1)
            out.index_add_(0, token_ids, (expert_out * weight).to(out.dtype))
        return out


class FFNExperts(ExpertGroup):
    """Gated (SwiGLU-style) FFN experts, as the Llama-family dense MLP they are upcycled from."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "silu"):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = ACT2FN[activation]
        nn.init.normal_(self.gate_up_proj, std=hidden_size**-0.5)
        nn.init.normal_(self.down_proj, std=intermediate_size**-0.5)

    @property
    def folds_routing_weight(self) -> bool:
        """With f < d (fine-grained experts) w·down(h) = down(w·h) puts the weights on f values per
        row instead of the combine's d: at 16 experts of 128, d = 256, the block ran 0.70x instead
        of 0.65x dense (one interleaved run); at 4 of 512 the weighted combine was faster (172 vs 182 ms)."""
        return self.intermediate_size < self.hidden_size

    @torch.no_grad()
    def upcycle_from(self, dense_mlp: nn.Module) -> None:
        """Every expert becomes an exact copy of a Llama-family dense MLP."""
        gate = dense_mlp.gate_proj.weight
        up = dense_mlp.up_proj.weight
        down = dense_mlp.down_proj.weight
        assert gate.shape == (self.intermediate_size, self.hidden_size), "upcycling needs the dense FFN's width"
        self.gate_up_proj.copy_(torch.cat([gate, up], dim=0).unsqueeze(0).expand_as(self.gate_up_proj))
        self.down_proj.copy_(down.unsqueeze(0).expand_as(self.down_proj))

    def expert_forward(self, expert: int, tokens: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        return gated_ffn(tokens, self.gate_up_proj[expert], self.down_proj[expert], self.act_fn)

    def forward_grouped(
        self,
        tokens: torch.Tensor,
        rows: ExpertRows,
        layout: ExpertLayout,
        extras: dict[str, torch.Tensor],
        row_weight: torch.Tensor | None,
    ) -> torch.Tensor:
        routed = layout.gather(tokens)
        return gated_ffn(routed, self.gate_up_proj, self.down_proj, self.act_fn, layout.linear, row_weight)
