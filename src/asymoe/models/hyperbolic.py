r"""AsyMoE hyperbolic inter-modality (shared) experts, their curvature and geometry losses.

The manifold math is in `lorentz` (maps, distances, entailment cone, fully hyperbolic linear
layer; MERU, Chen et al. 2022) and `poincare` (ball maps, HNN++ fully-connected layer; Shimizu
et al. 2021); this module owns the float32 islands around them, the learnable curvature and the
expert group.

Mapping to the AsyMoE paper (Zhang et al., 2025, arXiv:2509.12715):
    Eqs. 10–11  hyperbolic inter-modality expert: exp_o → hyperbolic layers → log_o
                (`HyperbolicExperts.expert_forward`);
    Eq. 12      v = exp_o(W_V^hyp·x_v): pooled vision point;
    Eq. 13      t = exp_o(W_L^hyp·E_L-evd(x_l)): pooled text point from the evidence-priority
                experts' output over the tokens they processed (the shared group's when the model
                has no evidence experts; `pooled_points` says which positions are pooled);
    Eq. 14      alignment D = d_L(v, t)²;
    Eqs. 15–17  entailment cone and L_order. The paper prints a non-standard variant without a
                cone constant; we use MERU's definitions (`lorentz`) with K = `cone_k` (0.1);
    Eq. 21      L = L_lm + λ1·L_order + λ2·L_balance; λ_align is kept separate (default 0), so
                both readings (with and without the alignment term) are available.

Token scale. The experts run in hidden-state coordinates on the hyperboloid of curvature −κ,
κ = c·α², α = 1/√d. Scaling coordinates by α maps it onto the curvature −c hyperboloid, so the
exp/log maps and distances are those of the α-scaled token α·h at curvature −c (MERU scales its
features by a learned α initialised to 1/√d; here α stays fixed and c is learned). RMS-normalised
states (‖h‖ ≈ √d) then sit at distance ≈ 1 from the origin for any width, so c = 1 is a sensible
default, while the layers keep the dense FFN's weight scale. The geometry losses use α-scaled
projections at curvature −c, and reported distances (`origin_distance`, alignment) are in α units.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from asymoe.config import GeometryLossConfig
from asymoe.models import lorentz, poincare
from asymoe.models.dispatch import ExpertLayout, ExpertRows
from asymoe.models.experts import ExpertGroup
from asymoe.models.gating import gated_unit, is_silu

if TYPE_CHECKING:
    from asymoe.models.moe import TokenMeta

GEOMETRIES = ("lorentz", "poincare")


class _InwardClamp(torch.autograd.Function):
    """clamp(value, low, high) whose gradient survives beyond a bound only if it points back inside.

    MERU clamps the stored log-curvature in place after each step; an in-place write to a
    parameter is not FSDP-safe, so the forward clamps the value and an overshooting parameter is
    pulled back by the first gradient that points inward (an outward one is dropped).
    """

    @staticmethod
    def forward(ctx, value: torch.Tensor, low: float, high: float) -> torch.Tensor:
        ctx.save_for_backward(value)
        ctx.low, ctx.high = low, high
        return value.clamp(low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (value,) = ctx.saved_tensors
        # Descent moves value by −grad: above `high` only grad > 0 moves it inward, below `low` grad < 0.
        outward = ((value > ctx.high) & (grad < 0)) | ((value < ctx.low) & (grad > 0))
        return grad.masked_fill(outward, 0.0), None, None


def gated_columns(gate_up: torch.Tensor, act_fn, curvature: torch.Tensor) -> torch.Tensor:
    """`lorentz.time_columns` of clip_radius(act(gate) ⊙ up): the second layer's input, (..., augmented_width(f)).

    With SiLU one function (`lorentz.swiglu_time_columns`) writes silu(gate) ⊙ up straight into the
    columns and takes its norm once for the clip and the time column; the composition of the three
    (what it equals) took two norms and a copy of every row.
    """
    if is_silu(act_fn):
        return lorentz.swiglu_time_columns(gate_up, curvature)
    return lorentz.time_columns(lorentz.clip_radius(gated_unit(gate_up, act_fn), curvature), curvature)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of values (B, S, d) over positions where mask (B, S) holds; 0 where none."""
    weight = mask.to(values.dtype).unsqueeze(-1)  # (B, S, 1)
    return (values * weight).sum(1) / weight.sum(1).clamp_min(1.0)  # (B, d)


class HyperbolicExperts(ExpertGroup):
    r"""AsyMoE hyperbolic inter-modality experts: gated FFNs whose layers live on a hyperboloid.

    Expert e maps a token h (hidden-state coordinates, curvature κ = c·α², α = 1/√d):
      lorentz:   x = exp_o(h);  [g; u] = clip(W1·[x_t; x_s] + b1);  s = clip(act(g) ⊙ u);
                 z = clip(W2·[s_t; s_s] + b2);  out = log_o(z)
                 (two fully hyperbolic linear layers; the activation acts on the space part and
                 the time part s_t = sqrt(1/κ + ‖s‖²) is recomputed);
      poincare:  x = exp_0(h) in the ball;  [g; u] = HNN++-FC(x; Z1, r1) taken as w (its
                 hyperboloid image);  s = clip(act(g) ⊙ u);  z = HNN++-FC(s; Z2, r2);
                 out = log_0(z)  (the activation acts where the Lorentz expert applies it).
    clip = `lorentz.clip_radius`. The layers are not Möbius matrix-vector products at the origin
    (whose chain collapses to a Euclidean FFN): they read the time part (Lorentz) or the
    hyperplane distances (Poincaré), which depend on c non-linearly. All of it runs in float32
    with autocast off; the output is cast back to the input's dtype.

    Weights are 3-D, one tensor per projection for the whole group, in FFNExperts' layout:
    gate_up_proj (E, 2f, d), down_proj (E, d, f) (Poincaré: the hyperplane normals z_k as rows),
    gate_up_bias (E, 2f), down_bias (E, d) (Poincaré: the offsets r_k), and for Lorentz the time
    columns gate_up_time (E, 2f), down_time (E, d). All are plain tensors (no ManifoldParameter),
    so AdamW and FSDP treat them exactly. One curvature per group, stored as `log_curvature` and
    clamped to [c0/10, 10·c0]; a buffer when it is not learned.

    The geometry losses (`aux_losses`) and their projections W_V, W_L exist only when a loss
    weight is > 0, so every built parameter receives a gradient in every step.
    """

    float32_experts = True

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: str,
        geometry: str,
        curvature: float,
        learn_curvature: bool,
        geometry_loss: GeometryLossConfig,
        has_evidence_group: bool,
    ):
        super().__init__()
        if geometry not in GEOMETRIES:
            raise ValueError(f"geometry='{geometry}' is not hyperbolic; use one of {', '.join(GEOMETRIES)}")
        assert curvature > 0, "curvature must be > 0"
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.geometry = geometry
        self.act_fn = ACT2FN[activation]
        self.token_scale = hidden_size**-0.5  # α
        self.geometry_loss = geometry_loss
        self.has_evidence_group = has_evidence_group

        log_curvature = torch.tensor([math.log(curvature)])
        self.log_curvature_bounds = (math.log(curvature / 10.0), math.log(curvature * 10.0))
        if learn_curvature:
            self.log_curvature = nn.Parameter(log_curvature)
        else:
            self.register_buffer("log_curvature", log_curvature)

        experts, width = num_experts, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * width, hidden_size))
        self.gate_up_bias = nn.Parameter(torch.zeros(experts, 2 * width))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden_size, width))
        self.down_bias = nn.Parameter(torch.zeros(experts, hidden_size))
        if geometry == "lorentz":
            self.gate_up_time = nn.Parameter(torch.empty(experts, 2 * width))
            self.down_time = nn.Parameter(torch.empty(experts, hidden_size))
            nn.init.normal_(self.gate_up_time, std=hidden_size**-0.5)
            nn.init.normal_(self.down_time, std=width**-0.5)
        # Same pre-activation scale as FFNExperts; for the ball see `upcycle_from` for the 1/4.
        gate_up_std = hidden_size**-0.5 * (0.25 if geometry == "poincare" else 1.0)
        nn.init.normal_(self.gate_up_proj, std=gate_up_std)
        nn.init.normal_(self.down_proj, std=width**-0.5)

        if geometry_loss.align_weight > 0 or geometry_loss.order_weight > 0:
            self.vision_projection = nn.Linear(hidden_size, hidden_size, bias=False)  # W_V^hyp
            self.text_projection = nn.Linear(hidden_size, hidden_size, bias=False)  # W_L^hyp
        else:
            self.vision_projection = None
            self.text_projection = None

        self._routed_norms: tuple[torch.Tensor, torch.Tensor] | None = None  # for `scalars`
        self._geometry_raw: dict[str, torch.Tensor] = {}

    @property
    def family(self) -> str:
        return self.geometry

    @property
    def folds_routing_weight(self) -> bool:
        """The weights ride on the log map's per-row factor (`lorentz.log_map0`'s scale): no pass."""
        return True

    # -- curvature -----------------------------------------------------------------------------

    def curvature(self) -> torch.Tensor:
        """c (shape (1,), float32), clamped to [c0/10, 10·c0]."""
        low, high = self.log_curvature_bounds
        return _InwardClamp.apply(self.log_curvature.float(), low, high).exp()

    def manifold_curvature(self) -> torch.Tensor:
        """κ = c·α²: the curvature the experts see in hidden-state coordinates."""
        return self.curvature() * self.token_scale**2

    # -- experts -------------------------------------------------------------------------------

    @torch.no_grad()
    def upcycle_from(self, dense_mlp: nn.Module) -> None:
        """Initialise every expert from a Llama-family dense MLP (gate_proj, up_proj, down_proj).

        "Upcycled" here means: the space weights are copies of the dense FFN's (Lorentz: W1's
        space columns = [gate; up], W2's = down; Poincaré: the hyperplane normals z_k, with
        [gate; up] divided by 4 to cancel the ball's conformal factor 2 at the origin, met once in
        exp_0 and once in v_k), and the time columns and offsets are zero. Each expert then equals
        the dense FFN in the flat limit c → 0; at the configured c it is that FFN bent by the
        geometry, so unlike a Euclidean expert it does not reproduce the dense output exactly.
        An upcycled Lorentz expert starts as the dense FFN between the exp and log maps; its time
        columns get gradient (x_t ≥ 1/√κ) and grow from zero. If the group's width differs from
        the dense FFN's, nothing is copied and the random initialisation stays.
        """
        gate = dense_mlp.gate_proj.weight
        up = dense_mlp.up_proj.weight
        down = dense_mlp.down_proj.weight
        if gate.shape != (self.intermediate_size, self.hidden_size):
            return
        gate_up = torch.cat([gate, up], dim=0)  # (2f, d)
        if self.geometry == "poincare":
            gate_up = gate_up / 4.0
        self.gate_up_proj.copy_(gate_up.unsqueeze(0).expand_as(self.gate_up_proj))
        self.down_proj.copy_(down.unsqueeze(0).expand_as(self.down_proj))
        self.gate_up_bias.zero_()
        self.down_bias.zero_()
        if self.geometry == "lorentz":
            self.gate_up_time.zero_()
            self.down_time.zero_()

    def _expert_weights(self) -> dict[str, torch.Tensor]:
        names = ["gate_up_proj", "gate_up_bias", "down_proj", "down_bias"]
        if self.geometry == "lorentz":
            names += ["gate_up_time", "down_time"]
        return {name: getattr(self, name) for name in names}

    def expert_parameter_count(self) -> int:
        """Parameters one expert uses per token (the loss projections and curvature excluded)."""
        # numel() // shape[0], not weight[0]: indexing a sharded (FSDP2 DTensor) weight is a collective.
        return sum(weight.numel() // weight.shape[0] for weight in self._expert_weights().values())

    def dispatch(
        self,
        tokens: torch.Tensor,
        expert_index: torch.Tensor,
        expert_weight: torch.Tensor,
        slot_mask: torch.Tensor,
        extras: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        # The origin distance depends on a token's norm only: keep (T, 1) norms and the number of
        # the group's experts each token reached, not the tokens. Overwritten by every forward, so
        # a checkpoint recomputation reproduces the statistics.
        self._routed_norms = (tokens.detach().float().norm(dim=-1, keepdim=True), slot_mask.sum(-1))
        return super().dispatch(tokens, expert_index, expert_weight, slot_mask, extras)

    def _to_manifold(self, hidden: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
        """Hyperboloid space part of a token's point: exp_o(h), or the image of the ball's exp_0(h)."""
        return lorentz.exp_map0(hidden if self.geometry == "lorentz" else 2.0 * hidden, kappa)

    def expert_forward(self, expert: int, tokens: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            kappa = self.manifold_curvature()
            point = self._to_manifold(tokens.float(), kappa)  # (n, d) space part
            weights = {name: weight[expert].float() for name, weight in self._expert_weights().items()}
            output = self._layers(lorentz.time_columns(point, kappa), kappa, weights, F.linear, lorentz.identity)
        return output.to(tokens.dtype)  # (n, d)

    def forward_grouped(
        self,
        tokens: torch.Tensor,
        rows: ExpertRows,
        layout: ExpertLayout,
        extras: dict[str, torch.Tensor],
        row_weight: torch.Tensor | None,
    ) -> torch.Tensor:
        # Statistics as in `dispatch`: token norms and how many of the group's rows each token has.
        reached = (rows.row_of_position < rows.position.shape[0]).view(tokens.shape[0], rows.slots).sum(-1)
        self._routed_norms = (tokens.detach().float().norm(dim=-1, keepdim=True), reached)
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            kappa = self.manifold_curvature()
            point = self._to_manifold(tokens.float(), kappa)  # (T, d): the exp map once per token
            columns = layout.gather(lorentz.time_columns(point, kappa))  # and its time column, gathered to rows
            weights = {name: weight.float() for name, weight in self._expert_weights().items()}
            row_weight = None if row_weight is None else row_weight.float()
            output = self._layers(
                columns, kappa, weights, layout.linear, layout.per_expert, row_weight, layout.expert_segments()
            )
        return output.to(tokens.dtype)  # (layout, d)

    def matmul_widths(self) -> tuple[int, ...]:
        # Inputs [x_s; x_t; 1], zero-padded (lorentz.time_columns of both layers); float32.
        inputs = lorentz.augmented_width(self.hidden_size), lorentz.augmented_width(self.intermediate_size)
        return (*inputs, 2 * self.intermediate_size, self.hidden_size)

    def _layers(self, columns, kappa, weights, linear_fn, per_expert, row_weight=None, segments=None) -> torch.Tensor:
        """The experts' layers (class docstring) on points given by their `lorentz.time_columns` (..., ·), in float32.

        weights: one expert's (matrices (out, in), vectors (out,)), with linear_fn = F.linear and
        per_expert the identity; or all experts' (E, out, in), (E, out), with an expert layout's
        linear and per_expert. row_weight (..., 1): routing weights that multiply the output
        within the log map (default 1). segments: rows per expert where the layout sorts them by
        expert with exact sizes (`ExpertLayout.expert_segments`; the Poincaré layers then broadcast
        their per-expert scales within each expert's rows).
        """
        clip = lorentz.clip_radius
        if self.geometry == "lorentz":
            first = weights["gate_up_proj"], weights["gate_up_time"], weights["gate_up_bias"]
            gate_up = clip(lorentz.columns_linear(columns, *first, linear_fn), kappa)  # (..., 2f)
            inner = gated_columns(gate_up, self.act_fn, kappa)  # time columns of clip(act(g) ⊙ u), (..., ·)
            second = weights["down_proj"], weights["down_time"], weights["down_bias"]
            output = lorentz.columns_linear(inner, *second, linear_fn)  # (..., d)
            return lorentz.log_map0(output, kappa, clip=True, scale=row_weight)
        first = weights["gate_up_proj"], weights["gate_up_bias"]
        gate_up = poincare.fc_lifted_columns(columns, *first, kappa, linear_fn, per_expert, segments)  # (..., 2f)
        inner = gated_columns(gate_up, self.act_fn, kappa)  # time columns of clip(act(g) ⊙ u), (..., ·)
        second = weights["down_proj"], weights["down_bias"]
        output = poincare.fc_lifted_columns(inner, *second, kappa, linear_fn, per_expert, segments)  # (..., d)
        # The ball's log_0 of the output point is half the hyperboloid's log_o of its image.
        half = torch.full((), 0.5, dtype=output.dtype, device=output.device)
        return lorentz.log_map0(output, kappa, clip=True, scale=half if row_weight is None else half * row_weight)

    # -- geometry losses -----------------------------------------------------------------------

    def pooled_points(
        self,
        hidden: torch.Tensor,
        meta: TokenMeta,
        group_outputs: dict[str, torch.Tensor],
        routed_weight: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample vision point v and text point t (paper Eqs. 12–13), as hyperboloid space parts.

        v = exp_o(α·W_V·mean of `hidden` over the sample's real vision positions).
        t = exp_o(α·W_L·mean of E(x_i) over the sample's real language positions i that the text
        group processed (routing weight > 0)): the evidence group with text_source `evidence` and
        an evidence group, else the shared group. E(x_i) is the group's routed output at i divided
        by the routing weight i sent to the group, i.e. the routing-weighted mean of the outputs
        of the group's experts that processed x_i (exactly E_L-evd(x_i) with one of them). Tokens
        routed elsewhere, image tokens and padding are not pooled.
        Both points lie on the curvature −c hyperboloid (for the ball, the isometric image of
        exp_0). Returns (v, t, eligible): v and t of the samples that have vision tokens and
        processed language tokens only; eligible (B,) marks those samples.
        """
        use_evidence = self.has_evidence_group and self.geometry_loss.text_source == "evidence"
        text_group = "language" if use_evidence else "shared"
        assert text_group in group_outputs, f"geometry loss needs the '{text_group}' group's output"
        text_weight = routed_weight[text_group] * meta.language  # (B, S)
        processed = text_weight > 0
        eligible = meta.vision.any(1) & processed.any(1)  # (B,)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            vision_mean = _masked_mean(hidden.float(), meta.vision)[eligible]  # (b, d)
            expert_output = group_outputs[text_group].float() / torch.where(processed, text_weight, 1.0).unsqueeze(-1)
            text_mean = _masked_mean(expert_output, processed)[eligible]  # (b, d)
            scale = self.token_scale * (2.0 if self.geometry == "poincare" else 1.0)
            curvature = self.curvature()
            vision_tangent = scale * F.linear(vision_mean, self.vision_projection.weight.float())
            text_tangent = scale * F.linear(text_mean, self.text_projection.weight.float())
            vision_point = lorentz.exp_map0(vision_tangent, curvature)
            text_point = lorentz.exp_map0(text_tangent, curvature)
        return vision_point, text_point, eligible

    def aux_losses(
        self,
        hidden: torch.Tensor,
        meta: TokenMeta,
        group_outputs: dict[str, torch.Tensor],
        routed_weight: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Weighted alignment d(v, t)² (Eq. 14) and entailment-cone order loss (Eqs. 15–17).

        Means over the samples that have both points; with none, both are an exact zero that
        still depends on every loss parameter (sum over an empty selection).
        """
        if self.vision_projection is None:
            return {}
        vision_point, text_point, eligible = self.pooled_points(hidden, meta, group_outputs, routed_weight)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            curvature = self.curvature()
            count = eligible.sum().clamp_min(1)
            align = lorentz.dist(vision_point, text_point, curvature).square().sum() / count
            cone_k = self.geometry_loss.cone_k
            order = lorentz.entailment_loss(vision_point, text_point, curvature, cone_k).sum() / count
        self._geometry_raw = {}
        if bool(eligible.any()):
            self._geometry_raw = {"geometry_align_raw": align.detach(), "geometry_order_raw": order.detach()}
        losses = {}
        if self.geometry_loss.align_weight > 0:
            losses["geometry_align"] = self.geometry_loss.align_weight * align
        if self.geometry_loss.order_weight > 0:
            losses["geometry_order"] = self.geometry_loss.order_weight * order
        return losses

    def scalars(self) -> dict[str, torch.Tensor]:
        """Detached: curvature c, mean origin distance of the last forward's routed points, raw losses.

        The distance is d(o, x)·α per routed (token, expert) pair: a distance on the α-scaled
        (curvature −c) hyperboloid.
        """
        out = {"curvature": self.curvature().detach().squeeze(0)}
        if self._routed_norms is not None and self._routed_norms[1].sum() > 0:
            norms, reached = self._routed_norms  # (T, 1), (T,)
            with torch.no_grad(), torch.autocast(device_type=norms.device.type, enabled=False):
                kappa = self.manifold_curvature()
                distance = lorentz.origin_dist(self._to_manifold(norms, kappa), kappa)  # (T,)
                out["origin_distance"] = (distance * reached).sum() / reached.sum() * self.token_scale
        out.update(self._geometry_raw)
        return out
