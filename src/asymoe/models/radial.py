r"""Radial maps x ↦ φ(‖x‖, c)·x with a hand-written backward: the hyperboloid's exp_o and log_o.

The hyperbolic experts apply exp_o once per token and log_o (after the radius clip) once per
routed row, forward and backward, on (rows, d) tensors. Left to autograd, each is a chain of
norm, clamp, sinh/asinh, division and product, every link a pass over the rows. A radial map
has a closed-form vector-Jacobian product,

    ∂(φ·x)/∂x · g = φ·g + (φ'(r)/r)·⟨x, g⟩·x,      ∂(φ·x)/∂c · g = (∂φ/∂c)·⟨x, g⟩,

so the backward is one row-wise dot product and one fused multiply-add over the rows, with φ,
φ'(r) and ∂φ/∂c evaluated on (rows, 1) norms. An optional per-row factor s (the experts' routing
weights) rides on φ: s·φ·x costs no pass of its own, and ∂/∂s = φ·⟨x, g⟩ reuses the dot product.
Below the norm floor r₀ (lorentz.NORM_SQ_MIN^½) the norm is the constant r₀, as in `safe_norm`,
and only φ·g remains.

With u = √c·r:
    exp_o:          φ = sinh(min(u, U))/u        (U = lorentz.SINH_MAX, MERU's clamp)
    log_o ∘ clip:   φ = asinh(√c·ρ)/(√c·ρ) · ρ/r, ρ = min(r, R/√c)   (R = lorentz.RADIUS_MAX)
The clip bound is treated as a constant of c, as `lorentz.clip_radius` does. Small u uses the
series of the derivatives (the closed forms cancel there). Tested against autograd of the
formulas in float64, clipped and near-zero rows included.
"""

from __future__ import annotations

import torch

SMALL_U = 1e-3  # below this, the series of dφ/du


def _exp_factor(u: torch.Tensor, u_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """φ = sinh(min(u, U))/u and dφ/du."""
    capped = u.clamp(max=u_max)
    sinh = torch.sinh(capped)
    phi = sinh / u
    slope = torch.where(capped < u, -sinh / u.square(), (torch.cosh(u) * u - sinh) / u.square())
    slope = torch.where(u < SMALL_U, u / 3.0, slope)
    return phi, slope


def _log_factor(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """φ = asinh(u)/u and dφ/du."""
    asinh = torch.asinh(u)
    phi = asinh / u
    slope = (u / torch.sqrt(1.0 + u.square()) - asinh) / u.square()
    return phi, torch.where(u < SMALL_U, -u / 3.0, slope)


# From this many entries on, `row_dot` is a batched product (measured crossover on the 2-core CPU:
# 4096 × 256 took 0.68 against 0.58 ms for the sum, 8192 × 256 1.48 against 1.69 ms).
ROW_DOT_BMM_ELEMENTS = 1 << 21


def row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """⟨x, y⟩ over the last dimension, (..., 1). Large inputs take a batched (1 × d)·(d × 1) product:
    one pass with no (..., d) temporary (3.5 against 4.5 ms for (x·y).sum(-1) at 16384 × 256 on the
    2-core CPU); small ones (x·y).sum(-1), which is faster there (0.35 against 0.17 ms at 4096 × 128)."""
    if x.numel() < ROW_DOT_BMM_ELEMENTS:
        return (x * y).sum(-1, keepdim=True)
    width = x.shape[-1]
    with torch.autocast(device_type=x.device.type, enabled=False):
        dot = torch.bmm(x.reshape(-1, 1, width), y.reshape(-1, width, 1))
    return dot.view(*x.shape[:-1], 1)


class _RadialMap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, curvature: torch.Tensor, scale, kind: str, bound: float, floor: float):
        raw = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (..., 1)
        r = raw.clamp_min(floor)
        sqrt_c = curvature.sqrt()
        if kind == "exp":
            u = sqrt_c * r
            phi, du_slope = _exp_factor(u, bound)
            dphi_dr, dphi_dc = sqrt_c * du_slope, du_slope * r / (2.0 * sqrt_c)
        else:  # log_o of the point clipped to radius bound/√c
            limit = bound / sqrt_c
            rho = torch.minimum(r, limit)
            log_phi, du_slope = _log_factor(sqrt_c * rho)
            clipped = r > limit
            phi = torch.where(clipped, log_phi * rho / r, log_phi)
            dphi_dr = torch.where(clipped, -log_phi * rho / r.square(), sqrt_c * du_slope)
            dphi_dc = du_slope * rho / (2.0 * sqrt_c) * torch.where(clipped, rho / r, 1.0)
        # φ'(r)/r where the norm is above its floor (below it r is a constant).
        radial = torch.where(raw > floor, dphi_dr / r, 0.0)
        ctx.save_for_backward(x, phi, radial, dphi_dc, scale)
        ctx.curvature_shape = curvature.shape
        return x * (phi if scale is None else phi * scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, phi, radial, dphi_dc, scale = ctx.saved_tensors
        dot = row_dot(x, grad)  # ⟨x, g⟩, (..., 1)
        grad_scale = None
        if scale is not None:
            if ctx.needs_input_grad[2]:
                grad_scale = (phi * dot).sum_to_size(scale.shape)
            dot = dot * scale  # the dot product of x and s·g
            phi = phi * scale
        grad_x = torch.addcmul(grad * phi, x, radial * dot)
        grad_c = None
        if ctx.needs_input_grad[1]:
            grad_c = (dphi_dc * dot).sum().reshape(ctx.curvature_shape)
        return grad_x, grad_c, grad_scale, None, None, None


def radial_map(
    x: torch.Tensor,
    curvature: torch.Tensor | float,
    kind: str,
    bound: float,
    floor: float,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """s·φ(‖x‖, c)·x for kind "exp" (bound U) or "log" (log_o after the clip to radius bound/√c);
    scale s broadcasts against the (..., 1) norms (default 1)."""
    curvature = torch.as_tensor(curvature, dtype=x.dtype, device=x.device)  # differentiable for a tensor
    return _RadialMap.apply(x, curvature, scale, kind, bound, floor)
