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

Fully hyperbolic linear layer (Chen et al.): y_s = W·[x_t; x_s] + b, y_t = sqrt(1/c + ‖y_s‖²),
as one product of [x_s; x_t; 1] (`linear`).

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

from asymoe.models.gating import swiglu_backward
from asymoe.models.radial import radial_map, row_dot

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
    return time_of_norm(torch.linalg.vector_norm(x_space, dim=-1, keepdim=True), curvature)


def time_of_norm(space_norm: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """x_t = sqrt(1/c + ‖x_s‖²) from ‖x_s‖, for a caller that has the norm already."""
    return torch.sqrt(1.0 / curvature + space_norm.square())


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
    """Space part of exp_o(v) = sinh(√c‖v‖)·v/(√c‖v‖); the sinh input is clamped (MERU).

    A radial map with a hand-written backward (asymoe.models.radial).
    """
    return radial_map(tangent, curvature, "exp", SINH_MAX, NORM_SQ_MIN**0.5)


def log_map0(
    x_space: torch.Tensor, curvature: Curvature, clip: bool = False, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """log_o(x) = asinh(√c‖x_s‖)·x_s/(√c‖x_s‖) (= arcosh(√c·x_t)·x_s/(√c‖x_s‖)).

    clip: of the point first clipped to ‖x_s‖ ≤ 2^15/√c, i.e. log_o(clip_radius(x_s)) in one map.
    scale: a factor (..., 1) on the result (the experts' routing weights), applied in the same pass.
    A radial map with a hand-written backward (asymoe.models.radial).
    """
    bound = RADIUS_MAX if clip else math.inf
    return radial_map(x_space, curvature, "log", bound, NORM_SQ_MIN**0.5, scale)


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
        ctx.none_clipped = none_clipped(clipped)
        return x_space.view_as(x_space) if ctx.none_clipped else x_space * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.none_clipped:
            return grad, None
        x_space, norm, scale, clipped = ctx.saved_tensors
        return _clip_gradient(grad, x_space, norm, scale, clipped), None


def none_clipped(clipped: torch.Tensor) -> bool:
    """Whether a clip may skip its work, `clipped` marking the rows (or entries) it would change: on
    CPU one is looked for (a host read costs nothing there) and, without one, the clip is the
    identity in value and gradient; elsewhere (False) it is always applied and its correction
    masked, so that nothing synchronises. Used by the radius clips and the Poincaré layer's clamp."""
    return clipped.device.type == "cpu" and not bool(clipped.any())


def _clip_gradient(
    grad: torch.Tensor, point: torch.Tensor, norm: torch.Tensor, scale: torch.Tensor, clipped: torch.Tensor
) -> torch.Tensor:
    """∂/∂x of x·min(1, limit/‖x‖): (limit/‖x‖)·(g − x·(x·g)/‖x‖²) on clipped rows, g elsewhere.

    `point` may be x or its clipped image (the same direction) with `norm` its norm; scale = min(1, limit/‖x‖).
    """
    radial = row_dot(point, grad) / norm.square()
    return torch.where(clipped, scale * (grad - point * radial), grad)


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


def augmented_width(width: int, element_size: int = 4) -> int:
    """Input width of `linear`'s product: x_s, x_t and a column of ones, zero-padded to 32-byte rows.

    32 bytes (one AVX2 vector), not only the 16 that grouped_mm needs: the three GEMMs of a layer
    with 16384 × 264 float32 inputs took 60.0–60.5 ms against 61.6–62.2 ms at 260 (2-core CPU, one
    interleaved run; 67.4 against 72.4 ms in another).
    """
    per_row = 32 // element_size
    return -(-(width + 2) // per_row) * per_row


def linear(
    x_space: torch.Tensor,
    weight: torch.Tensor,
    time_weight: torch.Tensor,
    bias: torch.Tensor,
    curvature: Curvature,
    linear_fn=F.linear,
) -> torch.Tensor:
    """Fully hyperbolic linear layer (Chen et al., 2022): y_s = W·[x_t; x_s] + b, returns y_s (..., out).

    weight (out, in) acts on x_s, time_weight (out,) is W's time column, bias (out,). The time part
    is a non-linear function of ‖x_s‖, which is what makes the layer depend on c. One matrix
    multiply does it all: the input gets the columns [x_t, 1] (and zeros up to `augmented_width`,
    `time_columns`) and the weight the columns [time_weight, bias] (`columns_linear`), so no
    per-row copy of a time column or a bias is formed; for the (E, out, in), (E, out) weights of
    many experts `linear_fn` is an expert layout's linear (F.linear for one layer).
    """
    return columns_linear(time_columns(x_space, curvature), weight, time_weight, bias, linear_fn)


def time_columns(x_space: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """[x_s; x_t; 1; 0 …] (..., augmented_width(w)) for x_s (..., w): the input of `columns_linear`.

    A row-wise function of the point, so an expert layout may form it per token and gather the rows.
    """
    return _TimeColumns.apply(x_space, torch.as_tensor(curvature, dtype=x_space.dtype, device=x_space.device))


def columns_linear(
    columns: torch.Tensor, weight: torch.Tensor, time_weight: torch.Tensor, bias: torch.Tensor, linear_fn=F.linear
) -> torch.Tensor:
    """`linear` on its input's `time_columns`: columns · [W; w_t; b; 0 …]ᵀ, (..., out)."""
    padding = columns.shape[-1] - weight.shape[-1] - 2
    w_columns = [weight, time_weight.unsqueeze(-1), bias.unsqueeze(-1)]
    if padding:
        w_columns.append(weight.new_zeros(*weight.shape[:-1], padding))
    return linear_fn(columns, torch.cat(w_columns, dim=-1))


class _TimeColumns(torch.autograd.Function):
    """x_s (..., w) -> [x_s; x_t; 1; 0 …] (..., augmented_width(w)), x_t = sqrt(1/c + ‖x_s‖²).

    Hand-written backward, one fused pass: ∂/∂x_s = g_s + (g_t/x_t)·x_s, ∂/∂c = −Σ g_t/(2c²·x_t).
    """

    @staticmethod
    def forward(ctx, x_space: torch.Tensor, curvature: torch.Tensor) -> torch.Tensor:
        width = x_space.shape[-1]
        x_time = time(x_space, curvature)  # (..., 1)
        out = x_space.new_zeros(*x_space.shape[:-1], augmented_width(width, x_space.element_size()))
        out[..., :width] = x_space
        out[..., width : width + 1] = x_time
        out[..., width + 1] = 1.0
        ctx.save_for_backward(x_space, x_time, curvature)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_space, x_time, curvature = ctx.saved_tensors
        width = x_space.shape[-1]
        grad_time = grad[..., width : width + 1] / x_time  # (..., 1)
        grad_x = torch.addcmul(grad[..., :width], x_space, grad_time)
        grad_c = None
        if ctx.needs_input_grad[1]:
            grad_c = (-grad_time.sum() / (2.0 * curvature.square())).reshape(curvature.shape)
        return grad_x, grad_c


def swiglu_time_columns(gate_up: torch.Tensor, curvature: torch.Tensor) -> torch.Tensor:
    """`time_columns` of clip_radius(silu(gate) ⊙ up) for gate_up = [gate; up] (..., 2f), in one pass of its own."""
    limit = torch.as_tensor(RADIUS_MAX / curvature**0.5, dtype=gate_up.dtype, device=gate_up.device)
    return _SwiGLUColumns.apply(gate_up, curvature.to(gate_up.dtype), limit.detach())


class _SwiGLUColumns(torch.autograd.Function):
    """[z; z_t; 1; 0 …] for z = s·min(1, limit/‖s‖), s = silu(gate) ⊙ up, z_t = sqrt(1/c + ‖z‖²).

    Backward: ∂/∂z = g_z + (g_t/z_t)·z; through the clip the identity where a row is not clipped
    and (limit/‖s‖)·(g − s·(s·g)/‖s‖²) where it is; ∂/∂c = −Σ g_t/(2c²·z_t); then SiLU-gated
    unit's backward (`gating.swiglu_backward`).
    """

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, curvature: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        width = gate.shape[-1]
        columns = gate_up.new_empty(*gate_up.shape[:-1], augmented_width(width, gate_up.element_size()))
        inner = columns[..., :width]
        torch.mul(F.silu(gate), up, out=inner)
        norm = safe_norm(inner)  # (..., 1)
        clipped = limit < norm
        scale = None if none_clipped(clipped) else (limit / norm).clamp(max=1.0)
        if scale is not None:
            inner.mul_(scale)
            norm = norm * scale
        x_time = time_of_norm(norm, curvature)
        columns[..., width : width + 1] = x_time
        columns[..., width + 1] = 1.0
        columns[..., width + 2 :] = 0.0
        ctx.save_for_backward(gate_up, columns, x_time, norm, scale, clipped, curvature)
        return columns

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate_up, columns, x_time, norm, scale, clipped, curvature = ctx.saved_tensors
        width = gate_up.shape[-1] // 2
        inner = columns[..., :width]
        grad_time = grad[..., width : width + 1] / x_time  # (..., 1)
        grad_inner = torch.addcmul(grad[..., :width], inner, grad_time)  # ∂/∂z
        if scale is not None:  # through the clip, from the clipped image z (norm = ‖z‖)
            grad_inner = _clip_gradient(grad_inner, inner, norm, scale, clipped)
        grad_c = None
        if ctx.needs_input_grad[1]:
            grad_c = (-grad_time.sum() / (2.0 * curvature.square())).reshape(curvature.shape)
        return swiglu_backward(grad_inner, gate_up), grad_c, None
