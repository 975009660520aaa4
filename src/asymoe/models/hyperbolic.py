r"""AsyMoE hyperbolic inter-modality (shared) experts, their manifold maps and geometry losses.

Curvature is -c (c > 0). A point of the Lorentz model (hyperboloid) is stored by its space part
x_s; the time part is derived. Sources: MERU (Desai et al., ICML 2023) for the maps, the distance,
the entailment cone and the float32/clamping discipline; the fully hyperbolic linear layer of
Chen et al. (ACL 2022); the Poincaré fully-connected layer of HNN++ (Shimizu et al., ICLR 2021).

Lorentz model (MERU):
    x_t = sqrt(1/c + ‖x_s‖²)                        ⟨x, y⟩_L = ⟨x_s, y_s⟩ − x_t·y_t
    d(x, y) = arcosh(−c⟨x, y⟩_L)/√c = (2/√c)·asinh(√c·‖x − y‖_L / 2)
    exp_o(v) = sinh(√c‖v‖)·v/(√c‖v‖)                log_o(x) = asinh(√c‖x_s‖)·x_s/(√c‖x_s‖)
The second form of d (‖x − y‖_L² = ‖x_s − y_s‖² − (x_t − y_t)² ≥ 0) is the same function without
the cancellation arcosh suffers near 1, so d(x, x) = 0 with a finite gradient; log_o uses
asinh(√c‖x_s‖) = arcosh(√c·x_t), which never forms x_t.
Entailment cone (MERU), parent x, child y, cone constant K:
    half_aperture(x) = arcsin(2K/(√c‖x_s‖))
    ext(x, y) = arccos((y_t + x_t·c⟨x,y⟩_L) / (‖x_s‖·sqrt((c⟨x,y⟩_L)² − 1)))
    L_order(x, y) = max(0, ext(x, y) − half_aperture(x))
Fully hyperbolic linear layer (Chen et al.): y_s = W·[x_t; x_s] + b, y_t = sqrt(1/c + ‖y_s‖²);
an activation acts on y_s and the time part is recomputed.
Poincaré ball (HNN++): exp_0(v) = tanh(√c‖v‖)·v/(√c‖v‖), log_0(y) = artanh(√c‖y‖)·y/(√c‖y‖);
fully-connected layer with hyperplanes (z_k, r_k):
    v_k(x) = (2‖z_k‖/√c)·asinh(λ_x·√c⟨x, ẑ_k⟩·cosh(2√c r_k) − (λ_x − 1)·sinh(2√c r_k)),
    λ_x = 2/(1 − c‖x‖²),   w_k = sinh(√c v_k)/√c,   y = w/(1 + sqrt(1 + c‖w‖²)).
v_k is 2‖z_k‖ times the signed distance of x to the k-th Poincaré hyperplane. Its input enters
only through λ_x·x and λ_x − 1, which are the space part and √c·(time part) of x's image on the
hyperboloid, and w is the hyperboloid image of the output y; so the layer is evaluated on
hyperboloid coordinates (`poincare_fc_lifted`), which stays exact where 1 − c‖x‖² underflows.
The ball's exp_0(v) is the image of the hyperboloid's exp_o(2v) and log_0 is half of log_o (the
ball's conformal factor at the origin is 2): this is how tokens enter and leave the ball.
geoopt (geoopt.Lorentz with k = 1/c on full coordinates, geoopt.PoincareBall) is the reference
these functions are tested against; they are not built on it because geoopt.Lorentz stores the
time coordinate and evaluates arcosh in float64, and this module needs neither.

Clamps: sinh/cosh inputs ≤ asinh(2^15) and space norms ≤ 2^15/√c (MERU's bound), asin/acos
inputs within ±(1 − 1e-6), artanh inputs ≤ 1 − 1e-5, squared norms ≥ 1e-12 under every sqrt, so
no value or gradient is Inf/NaN, also at the origin.

Mapping to the AsyMoE paper (Zhang et al., 2025, arXiv:2509.12715). Eqs. 12–14 and 21 follow
DESIGN.md; the numbers of the other pieces follow the project brief and were not checked against
the paper's text here:
    Eqs. 10–11  hyperbolic inter-modality expert: exp_o → hyperbolic layers → log_o
                (`HyperbolicExperts.expert_forward`);
    Eq. 12      v = exp_o(W_V^hyp·x_v): pooled vision point;
    Eq. 13      t = exp_o(W_L^hyp·E_L-evd(x_l)): pooled text point from the evidence-priority
                experts (the shared group's language output when the model has none);
    Eq. 14      alignment D = d_L(v, t)²;
    Eqs. 15–17  entailment cone and L_order. The paper prints a non-standard variant without K;
                we use MERU's definitions above with K = `cone_k` (DESIGN.md);
    Eq. 21      L = L_lm + λ1·L_order + λ2·L_balance; λ_align is kept separate (default 0).

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from asymoe.config import GeometryLossConfig
from asymoe.models.experts import ExpertGroup

GEOMETRIES = ("lorentz", "poincare")
SINH_MAX = math.asinh(2.0**15)  # MERU: sinh/cosh inputs stay below this
RADIUS_MAX = 2.0**15  # = sinh(SINH_MAX): space norms stay below RADIUS_MAX/√c
NORM_SQ_MIN = 1e-12  # floor under squared norms before a sqrt
ANGLE_EPS = 1e-6  # asin/acos inputs stay in [−1 + ε, 1 − ε], where their derivatives are finite
BALL_EPS = 1e-5  # ball points stay within (1 − ε)/√c of the origin
Curvature = torch.Tensor | float


def _norm(x: torch.Tensor, keepdim: bool = True) -> torch.Tensor:
    """Euclidean norm over the last dimension, floored so that its gradient is finite at 0."""
    return torch.sqrt(x.square().sum(-1, keepdim=keepdim).clamp_min(NORM_SQ_MIN))


# ----------------------------------------------------------------------------- Lorentz model


def lorentz_time(x_space: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """x_t = sqrt(1/c + ‖x_s‖²), shape (..., 1)."""
    return torch.sqrt(1.0 / curvature + x_space.square().sum(-1, keepdim=True))


def lorentz_inner(x_space: torch.Tensor, y_space: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """⟨x, y⟩_L = ⟨x_s, y_s⟩ − x_t·y_t, shape (...)."""
    time = lorentz_time(x_space, curvature) * lorentz_time(y_space, curvature)
    return (x_space * y_space).sum(-1) - time.squeeze(-1)


def lorentz_dist(x_space: torch.Tensor, y_space: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """Geodesic distance arcosh(−c⟨x,y⟩_L)/√c, evaluated as (2/√c)·asinh(√c‖x − y‖_L/2)."""
    sqrt_c = curvature**0.5
    space_diff = x_space - y_space
    # x_t − y_t = (‖x_s‖² − ‖y_s‖²)/(x_t + y_t), free of cancellation.
    time_sum = (lorentz_time(x_space, curvature) + lorentz_time(y_space, curvature)).squeeze(-1)
    time_diff = (space_diff * (x_space + y_space)).sum(-1) / time_sum
    chord_sq = (space_diff.square().sum(-1) - time_diff.square()).clamp_min(NORM_SQ_MIN)
    return 2.0 / sqrt_c * torch.asinh(sqrt_c * chord_sq.sqrt() / 2.0)


def lorentz_origin_dist(x_space: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """d(o, x) = asinh(√c‖x_s‖)/√c, shape (...)."""
    sqrt_c = curvature**0.5
    return torch.asinh(sqrt_c * _norm(x_space, keepdim=False)) / sqrt_c


def lorentz_exp_map0(tangent: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """Space part of exp_o(v) = sinh(√c‖v‖)·v/(√c‖v‖); the sinh input is clamped (MERU)."""
    scaled_norm = curvature**0.5 * _norm(tangent)
    return torch.sinh(scaled_norm.clamp(max=SINH_MAX)) / scaled_norm * tangent


def lorentz_log_map0(x_space: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """log_o(x) = asinh(√c‖x_s‖)·x_s/(√c‖x_s‖) (= arcosh(√c·x_t)·x_s/(√c‖x_s‖))."""
    scaled_norm = curvature**0.5 * _norm(x_space)
    return torch.asinh(scaled_norm) / scaled_norm * x_space


def clip_radius(x_space: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """Scale x_s down to ‖x_s‖ ≤ 2^15/√c where it is longer (the exp map's own bound)."""
    limit = RADIUS_MAX / curvature**0.5
    return x_space * (limit / _norm(x_space)).clamp(max=1.0)


def half_aperture(x_space: torch.Tensor, curvature: Curvature, cone_k: float = 0.1) -> torch.Tensor:
    """Half-aperture arcsin(2K/(√c‖x_s‖)) of the entailment cone at x (MERU), shape (...)."""
    sine = 2.0 * cone_k / (curvature**0.5 * _norm(x_space, keepdim=False))
    return torch.asin(sine.clamp(max=1.0 - ANGLE_EPS))


def exterior_angle(x_space: torch.Tensor, y_space: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """Angle at x between the ray o→x extended and the geodesic x→y (MERU's oxy_angle)."""
    x_time = lorentz_time(x_space, curvature).squeeze(-1)
    y_time = lorentz_time(y_space, curvature).squeeze(-1)
    scaled_inner = curvature * ((x_space * y_space).sum(-1) - x_time * y_time)  # c⟨x,y⟩_L ≤ −1
    numerator = y_time + scaled_inner * x_time
    denominator = _norm(x_space, keepdim=False) * torch.sqrt((scaled_inner.square() - 1.0).clamp_min(NORM_SQ_MIN))
    return torch.acos((numerator / denominator).clamp(-1.0 + ANGLE_EPS, 1.0 - ANGLE_EPS))


def entailment_loss(
    parent_space: torch.Tensor, child_space: torch.Tensor, curvature: Curvature, cone_k: float = 0.1
) -> torch.Tensor:
    """max(0, ext(x, y) − half_aperture(x)): zero when the child lies in the parent's cone."""
    violation = exterior_angle(parent_space, child_space, curvature) - half_aperture(parent_space, curvature, cone_k)
    return violation.clamp_min(0.0)


def lorentz_linear(
    x_space: torch.Tensor,
    weight: torch.Tensor,
    time_weight: torch.Tensor,
    bias: torch.Tensor | None,
    curvature: Curvature,
) -> torch.Tensor:
    """Fully hyperbolic linear layer (Chen et al., 2022): y_s = W·[x_t; x_s] + b.

    weight (out, in) acts on x_s, time_weight (out,) is W's time column; returns y_s (..., out).
    """
    full_point = torch.cat([lorentz_time(x_space, curvature), x_space], dim=-1)  # [x_t; x_s]
    return F.linear(full_point, torch.cat([time_weight.unsqueeze(-1), weight], dim=-1), bias)


# ----------------------------------------------------------------------------- Poincaré ball


def poincare_exp_map0(tangent: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """exp_0(v) = tanh(√c‖v‖)·v/(√c‖v‖), kept strictly inside the ball."""
    sqrt_c = curvature**0.5
    scaled_norm = sqrt_c * _norm(tangent)
    radius = torch.tanh(scaled_norm).clamp(max=1.0 - BALL_EPS)  # √c·‖exp_0(v)‖
    return radius / scaled_norm * tangent


def poincare_log_map0(ball_point: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """log_0(y) = artanh(√c‖y‖)·y/(√c‖y‖)."""
    scaled_norm = curvature**0.5 * _norm(ball_point)
    return torch.atanh(scaled_norm.clamp(max=1.0 - BALL_EPS)) / scaled_norm * ball_point


def poincare_to_lorentz(ball_point: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """Space part of y's image on the hyperboloid: x_s = 2y/(1 − c‖y‖²) = λ_y·y."""
    scaled_sq = (curvature * ball_point.square().sum(-1, keepdim=True)).clamp(max=(1.0 - BALL_EPS) ** 2)
    return 2.0 * ball_point / (1.0 - scaled_sq)


def lorentz_to_poincare(x_space: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """Ball point of a hyperboloid point: y = x_s/(1 + √c·x_t) = x_s/(1 + sqrt(1 + c‖x_s‖²))."""
    return x_space / (1.0 + torch.sqrt(1.0 + curvature * x_space.square().sum(-1, keepdim=True)))


def poincare_dist(x: torch.Tensor, y: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """Poincaré-ball distance, through the isometry onto the hyperboloid."""
    return lorentz_dist(poincare_to_lorentz(x, curvature), poincare_to_lorentz(y, curvature), curvature)


def _scaled_hyperplane_distance(
    x_space: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, curvature: Curvature
) -> torch.Tensor:
    """√c·v_k(x) = 2‖z_k‖·asinh(√c⟨λ_x·x, ẑ_k⟩·cosh(2√c r_k) − (λ_x − 1)·sinh(2√c r_k)).

    The asinh argument of every k comes from one matmul of [√c·x_t; x_s] (x_s = λ_x·x).
    """
    sqrt_c = curvature**0.5
    weight_norm = _norm(weight)  # (out, 1)
    shift = (2.0 * sqrt_c * offset).clamp(-SINH_MAX, SINH_MAX).unsqueeze(-1)  # 2√c·r_k, (out, 1)
    scaled_time = torch.sqrt(1.0 + curvature * x_space.square().sum(-1, keepdim=True))  # λ_x − 1 = √c·x_t
    # [√c x_t; x_s] against [−sinh(2√c r_k); √c cosh(2√c r_k) ẑ_k] gives the asinh argument.
    rows = torch.cat([-torch.sinh(shift), sqrt_c * torch.cosh(shift) * weight / weight_norm], dim=-1)
    argument = F.linear(torch.cat([scaled_time, x_space], dim=-1), rows)  # (..., out)
    return 2.0 * weight_norm.squeeze(-1) * torch.asinh(argument)


def poincare_hyperplane_distance(
    x_space: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, curvature: Curvature
) -> torch.Tensor:
    """HNN++'s v_k(x) for all hyperplanes k, x given by its hyperboloid space part (λ_x·x).

    weight (out, in) holds the z_k as rows, offset (out,) the r_k; returns (..., out).
    """
    return _scaled_hyperplane_distance(x_space, weight, offset, curvature) / curvature**0.5


def poincare_fc_lifted(
    x_space: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, curvature: Curvature
) -> torch.Tensor:
    """HNN++ Poincaré FC layer on hyperboloid coordinates: returns w = sinh(√c·v(x))/√c.

    w is the hyperboloid space part of the layer's ball output y = w/(1 + sqrt(1 + c‖w‖²)).
    """
    scaled_distance = _scaled_hyperplane_distance(x_space, weight, offset, curvature)
    return torch.sinh(scaled_distance.clamp(-SINH_MAX, SINH_MAX)) / curvature**0.5


def poincare_fc(x: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """HNN++ Poincaré fully-connected layer on ball points: y = w/(1 + sqrt(1 + c‖w‖²))."""
    lifted = poincare_fc_lifted(poincare_to_lorentz(x, curvature), weight, offset, curvature)
    return lorentz_to_poincare(lifted, curvature)


# ----------------------------------------------------------------------------- curvature


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


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of values (B, S, d) over positions where mask (B, S) holds; 0 where none."""
    weight = mask.to(values.dtype).unsqueeze(-1)  # (B, S, 1)
    return (values * weight).sum(1) / weight.sum(1).clamp_min(1.0)  # (B, d)


# ----------------------------------------------------------------------------- expert group


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
    clip = `clip_radius`. The layers are not Möbius matrix-vector products at the origin (whose
    chain collapses to a Euclidean FFN): they read the time part (Lorentz) or the hyperplane
    distances (Poincaré), which depend on c non-linearly.

    Weights are 3-D, one tensor per projection for the whole group, in FFNExperts' layout:
    gate_up_proj (E, 2f, d), down_proj (E, d, f) (Poincaré: the hyperplane normals z_k as rows),
    gate_up_bias (E, 2f), down_bias (E, d) (Poincaré: the offsets r_k), and for Lorentz the time
    columns gate_up_time (E, 2f), down_time (E, d). All are plain tensors (no ManifoldParameter),
    so AdamW and FSDP treat them exactly. One curvature per group, stored as `log_curvature` and
    clamped to [c0/10, 10·c0]; a buffer when it is not learned.

    The geometry losses (`aux_losses`) and their projections W_V, W_L exist only when a loss
    weight is > 0, so every built parameter receives a gradient in every step.
    """

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

        self._origin_distance_sum: torch.Tensor | None = None
        self._origin_distance_count = 0
        self._geometry_raw: dict[str, torch.Tensor] = {}

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
        columns get gradient (x_t ≥ 1/√κ) and grow from zero. If the group's width differs from the dense FFN's, nothing is copied and the random
        initialisation stays.
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

    def _expert_weights(self) -> list[torch.Tensor]:
        weights = [self.gate_up_proj, self.gate_up_bias, self.down_proj, self.down_bias]
        if self.geometry == "lorentz":
            weights += [self.gate_up_time, self.down_time]
        return weights

    def expert_parameter_count(self) -> int:
        """Parameters one expert uses per token (the loss projections and curvature excluded)."""
        # numel() // shape[0], not weight[0]: indexing a sharded (FSDP2 DTensor) weight is a collective.
        return sum(weight.numel() // weight.shape[0] for weight in self._expert_weights())

    def dispatch(
        self,
        tokens: torch.Tensor,
        expert_index: torch.Tensor,
        expert_weight: torch.Tensor,
        slot_mask: torch.Tensor,
        extras: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        # Statistics restart with every dispatch, so a checkpoint recomputation reproduces them.
        self._origin_distance_sum = None
        self._origin_distance_count = 0
        return super().dispatch(tokens, expert_index, expert_weight, slot_mask, extras)

    def expert_forward(self, expert: int, tokens: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            kappa = self.manifold_curvature()
            hidden = tokens.float()  # (n, d)
            if self.geometry == "lorentz":
                point = lorentz_exp_map0(hidden, kappa)  # (n, d) space part
                output = self._lorentz_layers(expert, point, kappa)
            else:
                point = lorentz_exp_map0(2.0 * hidden, kappa)  # hyperboloid image of the ball's exp_0(h)
                output = self._poincare_layers(expert, point, kappa)
            self._record_origin_distance(point, kappa)
        return output.to(tokens.dtype)  # (n, d)

    def _lorentz_layers(self, expert: int, point: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
        gate_up = lorentz_linear(
            point,
            self.gate_up_proj[expert].float(),
            self.gate_up_time[expert].float(),
            self.gate_up_bias[expert].float(),
            kappa,
        )  # (n, 2f)
        gate, up = clip_radius(gate_up, kappa).chunk(2, dim=-1)
        inner = clip_radius(self.act_fn(gate) * up, kappa)  # (n, f)
        output = lorentz_linear(
            inner,
            self.down_proj[expert].float(),
            self.down_time[expert].float(),
            self.down_bias[expert].float(),
            kappa,
        )  # (n, d)
        return lorentz_log_map0(clip_radius(output, kappa), kappa)

    def _poincare_layers(self, expert: int, point: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
        gate_up = poincare_fc_lifted(
            point, self.gate_up_proj[expert].float(), self.gate_up_bias[expert].float(), kappa
        )  # (n, 2f)
        gate, up = gate_up.chunk(2, dim=-1)
        inner = clip_radius(self.act_fn(gate) * up, kappa)  # (n, f)
        output = poincare_fc_lifted(inner, self.down_proj[expert].float(), self.down_bias[expert].float(), kappa)
        # The ball's log_0 of the output point is half the hyperboloid's log_o of its image.
        return lorentz_log_map0(clip_radius(output, kappa), kappa) / 2.0

    def _record_origin_distance(self, point: torch.Tensor, kappa: torch.Tensor) -> None:
        # d_κ(o, x)·α is the distance on the α-scaled (curvature −c) hyperboloid.
        distance = lorentz_origin_dist(point.detach(), kappa.detach()).sum() * self.token_scale
        if self._origin_distance_sum is not None:
            distance = distance + self._origin_distance_sum
        self._origin_distance_sum = distance
        self._origin_distance_count += point.shape[0]

    # -- geometry losses -----------------------------------------------------------------------

    def pooled_points(
        self, hidden: torch.Tensor, meta: Any, group_outputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample vision point v and text point t (paper Eqs. 12–13), as hyperboloid space parts.

        v = exp_o(α·W_V·mean of the sample's valid vision tokens of `hidden`), t = exp_o(α·W_L·mean
        of its valid language tokens of the evidence group's output (text_source `evidence` with
        an evidence group) or else the shared group's), both on the curvature −c hyperboloid (for
        the ball, the isometric image of exp_0). Returns (v, t, eligible): v and t for the
        samples with both kinds of token only, eligible (B,) marks those samples.
        """
        use_evidence = self.has_evidence_group and self.geometry_loss.text_source == "evidence"
        text_group = "language" if use_evidence else "shared"
        assert text_group in group_outputs, f"geometry loss needs the '{text_group}' group's output"
        valid = meta.attention_mask.bool()
        vision = valid & meta.vision_mask.bool()  # (B, S)
        language = valid & ~meta.vision_mask.bool()
        eligible = vision.any(1) & language.any(1)  # (B,)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            vision_mean = _masked_mean(hidden.float(), vision)[eligible]  # (b, d)
            text_mean = _masked_mean(group_outputs[text_group].float(), language)[eligible]
            scale = self.token_scale * (2.0 if self.geometry == "poincare" else 1.0)
            curvature = self.curvature()
            vision_tangent = scale * F.linear(vision_mean, self.vision_projection.weight.float())
            text_tangent = scale * F.linear(text_mean, self.text_projection.weight.float())
            vision_point = lorentz_exp_map0(vision_tangent, curvature)
            text_point = lorentz_exp_map0(text_tangent, curvature)
        return vision_point, text_point, eligible

    def aux_losses(
        self, hidden: torch.Tensor, meta: Any, group_outputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Weighted alignment d(v, t)² (Eq. 14) and entailment-cone order loss (Eqs. 15–17).

        Means over the samples that have vision and language tokens; with none, both are an exact
        zero that still depends on every loss parameter (sum over an empty selection).
        """
        if self.vision_projection is None:
            return {}
        vision_point, text_point, eligible = self.pooled_points(hidden, meta, group_outputs)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            curvature = self.curvature()
            count = eligible.sum().clamp_min(1)
            align = lorentz_dist(vision_point, text_point, curvature).square().sum() / count
            order = entailment_loss(vision_point, text_point, curvature, self.geometry_loss.cone_k).sum() / count
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
        """Detached: curvature c, mean origin distance of the last forward's points, raw losses."""
        out = {"curvature": self.curvature().detach().squeeze(0)}
        if self._origin_distance_sum is not None and self._origin_distance_count > 0:
            out["origin_distance"] = self._origin_distance_sum / self._origin_distance_count
        out.update(self._geometry_raw)
        return out
