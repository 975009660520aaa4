r"""Lorentz-model (hyperboloid) math as pure functions: maps, distances, the entailment cone, a layer.

Curvature is −c (c > 0). A point is stored by its space part x_s; the time part is derived.
Sources: MERU (Desai et al., ICML 2023) for the maps, the distance, the entailment cone and the
clamps; the fully hyperbolic linear layer of Chen et al. (ACL 2022).

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

Fully hyperbolic linear layer (Chen et al.): y_s = W·[x_t; x_s] + b, y_t = sqrt(1/c + ‖y_s‖²).

Clamps: sinh inputs ≤ asinh(2^15) and space norms ≤ 2^15/√c (MERU's bound), asin/acos inputs
within ±(1 − 1e-6), squared norms ≥ 1e-12 under every sqrt, so no value or gradient is Inf/NaN,
also at the origin. The functions compute in the dtype they are given; callers that run under
autocast keep them in a float32 island. geoopt.Lorentz (k = 1/c, full coordinates) is the
reference they are tested against; it stores the time coordinate and evaluates arcosh in
float64, which these functions avoid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SINH_MAX = math.asinh(2.0**15)  # MERU: sinh/cosh inputs stay below this
RADIUS_MAX = 2.0**15  # = sinh(SINH_MAX): space norms stay below RADIUS_MAX/√c
NORM_SQ_MIN = 1e-12  # floor under squared norms before a sqrt
ANGLE_EPS = 1e-6  # asin/acos inputs stay in [−1 + ε, 1 − ε], where their derivatives are finite
Curvature = torch.Tensor | float


def safe_norm(x: torch.Tensor, keepdim: bool = True) -> torch.Tensor:
    """Euclidean norm over the last dimension, floored so that its gradient is finite at 0.

    One fused reduction (vector_norm) rather than square → sum → sqrt: the hyperbolic experts take
    several norms of (tokens, width) tensors per layer, forward and backward.
    """
    return torch.linalg.vector_norm(x, dim=-1, keepdim=keepdim).clamp_min(NORM_SQ_MIN**0.5)


def time(x_space: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """x_t = sqrt(1/c + ‖x_s‖²), shape (..., 1)."""
    return torch.sqrt(1.0 / curvature + torch.linalg.vector_norm(x_space, dim=-1, keepdim=True).square())


def inner(x_space: torch.Tensor, y_space: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """⟨x, y⟩_L = ⟨x_s, y_s⟩ − x_t·y_t, shape (...)."""
    time_product = time(x_space, curvature) * time(y_space, curvature)
    return (x_space * y_space).sum(-1) - time_product.squeeze(-1)


def dist(x_space: torch.Tensor, y_space: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """Geodesic distance arcosh(−c⟨x,y⟩_L)/√c, evaluated as (2/√c)·asinh(√c‖x − y‖_L/2)."""
    sqrt_c = curvature**0.5
    space_diff = x_space - y_space
    # x_t − y_t = (‖x_s‖² − ‖y_s‖²)/(x_t + y_t), free of cancellation.
    time_sum = (time(x_space, curvature) + time(y_space, curvature)).squeeze(-1)
    time_diff = (space_diff * (x_space + y_space)).sum(-1) / time_sum
    chord_sq = (space_diff.square().sum(-1) - time_diff.square()).clamp_min(NORM_SQ_MIN)
    return 2.0 / sqrt_c * torch.asinh(sqrt_c * chord_sq.sqrt() / 2.0)


def origin_dist(x_space: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """d(o, x) = asinh(√c‖x_s‖)/√c, shape (...)."""
    sqrt_c = curvature**0.5
    return torch.asinh(sqrt_c * safe_norm(x_space, keepdim=False)) / sqrt_c


def exp_map0(tangent: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """Space part of exp_o(v) = sinh(√c‖v‖)·v/(√c‖v‖); the sinh input is clamped (MERU)."""
    scaled_norm = curvature**0.5 * safe_norm(tangent)
    return torch.sinh(scaled_norm.clamp(max=SINH_MAX)) / scaled_norm * tangent


def log_map0(x_space: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """log_o(x) = asinh(√c‖x_s‖)·x_s/(√c‖x_s‖) (= arcosh(√c·x_t)·x_s/(√c‖x_s‖))."""
    scaled_norm = curvature**0.5 * safe_norm(x_space)
    return torch.asinh(scaled_norm) / scaled_norm * x_space


class _ClipRadius(torch.autograd.Function):
    """x·min(1, limit/‖x‖) with a hand-written backward.

    Where a row is not clipped (all rows, in practice) its Jacobian is the identity; autograd
    would still differentiate the norm and the clamp of every row. A clipped row, x·limit/‖x‖,
    has the gradient (limit/‖x‖)·(g − x·(x·g)/‖x‖²).
    """

    @staticmethod
    def forward(ctx, x_space: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
        norm = safe_norm(x_space)
        scale = (limit / norm).clamp(max=1.0)
        clipped = limit < norm  # (..., 1)
        ctx.save_for_backward(x_space, norm, scale, clipped)
        return x_space * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_space, norm, scale, clipped = ctx.saved_tensors
        # On CPU a clipped row is looked for (a host read costs nothing there); elsewhere the
        # correction is always computed and masked, so that nothing synchronises.
        if x_space.device.type == "cpu" and not bool(clipped.any()):
            return grad, None
        radial = (x_space * grad).sum(-1, keepdim=True) / norm.square()
        correction = torch.where(clipped, scale * (grad - x_space * radial), grad)
        return correction, None


def clip_radius(x_space: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """Scale x_s down to ‖x_s‖ ≤ 2^15/√c where it is longer (the exp map's own bound).

    The curvature is treated as a constant here (no gradient through the bound, which is met
    with equality only by clipped rows).
    """
    limit = torch.as_tensor(RADIUS_MAX / curvature**0.5, dtype=x_space.dtype, device=x_space.device)
    return _ClipRadius.apply(x_space, limit.detach())


def half_aperture(x_space: torch.Tensor, curvature: Curvature, cone_k: float = 0.1) -> torch.Tensor:
    """Half-aperture arcsin(2K/(√c‖x_s‖)) of the entailment cone at x (MERU), shape (...)."""
    sine = 2.0 * cone_k / (curvature**0.5 * safe_norm(x_space, keepdim=False))
    return torch.asin(sine.clamp(max=1.0 - ANGLE_EPS))


def exterior_angle(x_space: torch.Tensor, y_space: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """Angle at x between the ray o→x extended and the geodesic x→y (MERU's oxy_angle)."""
    x_time = time(x_space, curvature).squeeze(-1)
    y_time = time(y_space, curvature).squeeze(-1)
    scaled_inner = curvature * ((x_space * y_space).sum(-1) - x_time * y_time)  # c⟨x,y⟩_L ≤ −1
    numerator = y_time + scaled_inner * x_time
    denominator = safe_norm(x_space, keepdim=False) * torch.sqrt((scaled_inner.square() - 1.0).clamp_min(NORM_SQ_MIN))
    return torch.acos((numerator / denominator).clamp(-1.0 + ANGLE_EPS, 1.0 - ANGLE_EPS))


def entailment_loss(
    parent_space: torch.Tensor, child_space: torch.Tensor, curvature: Curvature, cone_k: float = 0.1
) -> torch.Tensor:
    """max(0, ext(x, y) − half_aperture(x)): zero when the child lies in the parent's cone."""
    violation = exterior_angle(parent_space, child_space, curvature) - half_aperture(parent_space, curvature, cone_k)
    return violation.clamp_min(0.0)


def identity(values: torch.Tensor) -> torch.Tensor:
    """The `per_expert` of a single layer (one expert's weights broadcast as they are)."""
    return values


def linear(
    x_space: torch.Tensor,
    weight: torch.Tensor,
    time_weight: torch.Tensor,
    bias: torch.Tensor | None,
    curvature: Curvature,
    linear_fn=F.linear,
    per_expert=identity,
) -> torch.Tensor:
    """Fully hyperbolic linear layer (Chen et al., 2022): y_s = W·[x_t; x_s] + b = W_s·x_s + x_t·w_t + b.

    weight (out, in) acts on x_s, time_weight (out,) is W's time column; returns y_s (..., out).
    The time part is a non-linear function of ‖x_s‖, which is what makes the layer depend on c.
    `linear_fn` applies weight and bias: F.linear for one layer, or an expert layout's linear for
    the (E, out, in), (E, out) weights of many experts at once, with `per_expert` broadcasting the
    (E, out) time columns to its rows. The time column is added after the product rather than
    concatenated to the input: no copy of the input, and the product keeps the aligned width.
    """
    return linear_fn(x_space, weight, bias) + time(x_space, curvature) * per_expert(time_weight)
