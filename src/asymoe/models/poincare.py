r"""Poincaré-ball math as pure functions: maps, distance and the HNN++ fully-connected layer.

Curvature is −c (c > 0). Sources: HNN++ (Shimizu et al., ICLR 2021) for the layer; the ball's
maps as in geoopt.PoincareBall, against which these functions are tested.

    exp_0(v) = tanh(√c‖v‖)·v/(√c‖v‖),   log_0(y) = artanh(√c‖y‖)·y/(√c‖y‖)

Fully-connected layer with hyperplanes (z_k, r_k):
    v_k(x) = (2‖z_k‖/√c)·asinh(λ_x·√c⟨x, ẑ_k⟩·cosh(2√c r_k) − (λ_x − 1)·sinh(2√c r_k)),
    λ_x = 2/(1 − c‖x‖²),   w_k = sinh(√c v_k)/√c,   y = w/(1 + sqrt(1 + c‖w‖²)).
v_k is 2‖z_k‖ times the signed distance of x to the k-th Poincaré hyperplane. Its input enters
only through λ_x·x and λ_x − 1, which are the space part and √c·(time part) of x's image on the
hyperboloid, and w is the hyperboloid image of the output y; so the layer is evaluated on
hyperboloid coordinates (`fc_lifted`), which stays exact where 1 − c‖x‖² underflows.
The ball's exp_0(v) is the image of the hyperboloid's exp_o(2v) and log_0 is half of log_o (the
ball's conformal factor at the origin is 2).

Clamps: ball points stay within (1 − 1e-5)/√c of the origin (artanh inputs ≤ 1 − 1e-5), sinh
inputs and shifts ≤ asinh(2^15) (lorentz.SINH_MAX).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from asymoe.models import lorentz
from asymoe.models.lorentz import SINH_MAX, Curvature, identity, none_clipped, safe_norm

BALL_EPS = 1e-5  # ball points stay within (1 − ε)/√c of the origin


def exp_map0(tangent: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """exp_0(v) = tanh(√c‖v‖)·v/(√c‖v‖), kept strictly inside the ball."""
    sqrt_c = curvature**0.5
    scaled_norm = sqrt_c * safe_norm(tangent)
    radius = torch.tanh(scaled_norm).clamp(max=1.0 - BALL_EPS)  # √c·‖exp_0(v)‖
    return radius / scaled_norm * tangent


def log_map0(ball_point: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """log_0(y) = artanh(√c‖y‖)·y/(√c‖y‖)."""
    scaled_norm = curvature**0.5 * safe_norm(ball_point)
    return torch.atanh(scaled_norm.clamp(max=1.0 - BALL_EPS)) / scaled_norm * ball_point


def to_lorentz(ball_point: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """Space part of y's image on the hyperboloid: x_s = 2y/(1 − c‖y‖²) = λ_y·y."""
    scaled_sq = (curvature * ball_point.square().sum(-1, keepdim=True)).clamp(max=(1.0 - BALL_EPS) ** 2)
    return 2.0 * ball_point / (1.0 - scaled_sq)


def from_lorentz(x_space: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """Ball point of a hyperboloid point: y = x_s/(1 + √c·x_t) = x_s/(1 + sqrt(1 + c‖x_s‖²))."""
    return x_space / (1.0 + torch.sqrt(1.0 + curvature * x_space.square().sum(-1, keepdim=True)))


def dist(x: torch.Tensor, y: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """Poincaré-ball distance, through the isometry onto the hyperboloid."""
    return lorentz.dist(to_lorentz(x, curvature), to_lorentz(y, curvature), curvature)


def _hyperplane_asinh_terms(
    columns: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, curvature: Curvature, linear_fn, per_expert
) -> tuple[torch.Tensor, torch.Tensor]:
    """(argument, scale) with √c·v_k(x) = scale·asinh(argument)
    = 2‖z_k‖·asinh(√c⟨λ_x·x, ẑ_k⟩·cosh(2√c r_k) − (λ_x − 1)·sinh(2√c r_k)), x given by the
    `lorentz.time_columns` of its hyperboloid space part x_s = λ_x·x.

    The asinh argument of every k is [x_s; √c·x_t]·[√c cosh(2√c r_k) ẑ_k; −sinh(2√c r_k)]: the
    product of `lorentz.columns_linear` (time column √c·(−sinh(2√c r_k)), no bias), one matrix multiply.
    """
    sqrt_c = curvature**0.5
    weight_norm = safe_norm(weight)  # (..., out, 1)
    shift = (2.0 * sqrt_c * offset).clamp(-SINH_MAX, SINH_MAX).unsqueeze(-1)  # 2√c·r_k, (..., out, 1)
    space_rows = sqrt_c * torch.cosh(shift) * weight / weight_norm  # (..., out, in)
    time_column = -sqrt_c * torch.sinh(shift).squeeze(-1)  # (..., out)
    argument = lorentz.columns_linear(columns, space_rows, time_column, torch.zeros_like(time_column), linear_fn)
    return argument, 2.0 * per_expert(weight_norm.squeeze(-1))


# Entries per block of the CPU passes (1 MiB of float32): a block's temporaries stay in cache
# between its passes (`_SinhOfScaledAsinh`).
BLOCK_ELEMENTS = 1 << 18


def _follows_rows(a: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether `tensor` has a's dim 0 (is sliced with it), rather than broadcasting along it."""
    return a.dim() > 1 and tensor.dim() == a.dim() and tensor.shape[0] == a.shape[0] > 1


def _row_blocks(a: torch.Tensor, segments: Sequence[int] | None):
    """(rows, expert) pairs cutting a's dim 0 into blocks of ~BLOCK_ELEMENTS entries on CPU, one
    block elsewhere. With `segments` (a's rows per expert, in order) no block crosses an expert's
    rows and `expert` names its expert; otherwise it is None."""
    if a.dim() < 2:
        yield ..., None
        return
    rows = a.shape[0]
    cpu_step = max(1, BLOCK_ELEMENTS // max(1, a.numel() // max(1, rows)))
    if segments is None:
        spans = [(0, rows, None)]
    else:
        ends = list(itertools.accumulate(segments))
        assert not ends or ends[-1] == rows, f"segments cover {ends[-1]} rows of {rows}"
        spans = [(end - count, end, e) for e, (count, end) in enumerate(zip(segments, ends)) if count]
    for first, end, expert in spans:
        step = cpu_step if a.device.type == "cpu" else max(1, end - first)
        for start in range(first, end, step):
            yield slice(start, min(start + step, end)), expert


def _scale_block(scale: torch.Tensor, a: torch.Tensor, rows, expert: int | None) -> torch.Tensor:
    """The part of `scale` that a's block `rows` meets (a view): its expert's row (1, ...) of a
    per-expert scale, its rows of a scale sliced with a's rows, or the whole broadcast scale."""
    if expert is not None:
        return scale[expert : expert + 1]
    return scale[rows] if _follows_rows(a, scale) else scale


class _SinhOfScaledAsinh(torch.autograd.Function):
    """sinh(clamp(s·asinh(a), ±SINH_MAX))·k with a closed-form backward, in few passes.

    The HNN++ layer's w_k = sinh(2‖z_k‖·asinh(·))/√c (k = 1/√c) on every (row, output) entry, the
    largest element-wise cost of a Poincaré expert: each pass over a (rows, outputs) tensor costs
    about as much as any other, so the function is written as few passes as its formula allows
    (17 forward, 6 backward, where the composition of its parts took 26 and about 12), and on CPU
    runs them block by block (`BLOCK_ELEMENTS`), so that a block's temporaries stay in cache between
    passes. sinh is odd, so with u = |a|, t = sqrt(1 + u²), L = asinh(u) = log1p(u + u·u/(1 + t))
    (exact to rounding):
        out = sign(a)·sinh(s·L)·k,  sinh(x) = (m + m/(1 + m))/2, cosh(x) = (1 + m + 1/(1 + m))/2, m = expm1(x),
        ∂out/∂a = cosh(sL)·s·k/t,  ∂out/∂s = sign(a)·cosh(sL)·L·k,  ∂out/∂k = out/k.
    torch's sinh, cosh and asinh are slow on CPU (6.5x, 3.1x and 5.8x the time of exp on 8M
    elements). s (> 0) broadcasts against a, its gradient summed back to its shape; or, with
    `segments` (a's rows per expert, rows sorted by expert), s is (E, outputs), one row per expert,
    each block within one expert's rows broadcasting that row. On CPU the clamp's work is skipped
    in a block whose largest s·L is inside it (a host read costs nothing there); elsewhere it is
    always done, so that nothing synchronises.
    """

    @staticmethod
    def forward(
        ctx, a: torch.Tensor, scale: torch.Tensor, k: torch.Tensor, segments: Sequence[int] | None = None
    ) -> torch.Tensor:
        out, signed_log, twice_cosh, inverse_t = (torch.empty_like(a) for _ in range(4))
        one = torch.ones((), dtype=a.dtype, device=a.device)
        for rows, expert in _row_blocks(a, segments):
            a_block, scale_block = a[rows], _scale_block(scale, a, rows, expert)
            # log_term and m: scratch, then saved values
            out_block, log_term, m, inverse_t_block = out[rows], signed_log[rows], twice_cosh[rows], inverse_t[rows]
            u = torch.abs(a_block, out=out_block)
            t = torch.hypot(u, one, out=m)
            torch.reciprocal(t, out=inverse_t_block)
            torch.addcmul(u, u, torch.div(u, t.add_(1.0), out=t), out=log_term).log1p_()  # asinh(u)
            x = torch.mul(log_term, scale_block, out=m)
            inside = None
            if a.device.type != "cpu" or not bool(x.max() <= SINH_MAX):  # (a NaN fails this, and clamps nothing)
                beyond = x > SINH_MAX
                inside = None if none_clipped(beyond) else ~beyond
            if inside is not None:
                x.clamp_(max=SINH_MAX)
            x.expm1_()  # m
            m_plus_1 = m + 1.0
            inverse = m_plus_1.reciprocal()
            torch.addcmul(m, m, inverse, out=out_block).copysign_(a_block).mul_(0.5 * k)  # sign(a)·sinh(x)·k
            twice_cosh_block = torch.add(m_plus_1, inverse, out=m)
            if inside is not None:
                twice_cosh_block.mul_(inside)  # no gradient through the clamp
            log_term.copysign_(a_block)
        ctx.save_for_backward(signed_log, twice_cosh, inverse_t, scale, k, out)
        ctx.segments = segments
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        signed_log, twice_cosh, inverse_t, scale, k, out = ctx.saved_tensors
        half_k = 0.5 * k
        grad_a = torch.empty_like(grad)
        grad_scale = torch.zeros_like(scale) if ctx.needs_input_grad[1] else None
        # A scale sliced with the rows gets its gradient block by block; a broadcast or per-expert one
        # sums over the blocks that meet it.
        sliced_scale = ctx.segments is None and _follows_rows(grad, scale)
        for rows, expert in _row_blocks(grad, ctx.segments):
            grad_block, scale_block, grad_a_block = grad[rows], _scale_block(scale, grad, rows, expert), grad_a[rows]
            grad_cosh = torch.mul(grad_block, twice_cosh[rows], out=grad_a_block)
            if grad_scale is not None:
                partial = (grad_cosh * signed_log[rows]).sum_to_size(scale_block.shape)
                grad_scale_block = _scale_block(grad_scale, grad, rows, expert)
                if sliced_scale:
                    grad_scale_block.copy_(partial)
                else:
                    grad_scale_block.add_(partial)
            grad_cosh.mul_(inverse_t[rows]).mul_(scale_block * half_k)  # grad_a's block
        if grad_scale is not None:
            grad_scale.mul_(half_k)
        grad_k = None
        if ctx.needs_input_grad[2]:
            grad_k = (torch.dot(grad.reshape(-1), out.reshape(-1)) / k.reshape(())).reshape(k.shape)
        return grad_a, grad_scale, grad_k, None


def hyperplane_distance(
    x_space: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, curvature: Curvature
) -> torch.Tensor:
    """HNN++'s v_k(x) for all hyperplanes k, x given by its hyperboloid space part (λ_x·x).

    weight (out, in) holds the z_k as rows, offset (out,) the r_k; returns (..., out).
    """
    columns = lorentz.time_columns(x_space, curvature)
    argument, scale = _hyperplane_asinh_terms(columns, weight, offset, curvature, F.linear, identity)
    return scale * torch.asinh(argument) / curvature**0.5


def fc_lifted(
    x_space: torch.Tensor,
    weight: torch.Tensor,
    offset: torch.Tensor,
    curvature: Curvature,
    linear_fn=F.linear,
    per_expert=identity,
) -> torch.Tensor:
    """HNN++ Poincaré FC layer on hyperboloid coordinates: returns w = sinh(√c·v(x))/√c.

    w is the hyperboloid space part of the layer's ball output y = w/(1 + sqrt(1 + c‖w‖²)).
    For the (E, out, in) weights and (E, out) offsets of many experts, `linear_fn` is an expert
    layout's linear and `per_expert` broadcasts (E, out) values to its rows.
    """
    return fc_lifted_columns(lorentz.time_columns(x_space, curvature), weight, offset, curvature, linear_fn, per_expert)


def fc_lifted_columns(
    columns: torch.Tensor,
    weight: torch.Tensor,
    offset: torch.Tensor,
    curvature: Curvature,
    linear_fn=F.linear,
    per_expert=identity,
    segments: Sequence[int] | None = None,
) -> torch.Tensor:
    """`fc_lifted` on the input's `lorentz.time_columns` (which an expert layout may form per token).

    segments: the rows of each expert, in order, where the rows are sorted by expert with exact
    sizes (`ExpertLayout.expert_segments`); the per-expert scale 2‖z_k‖ then stays (E, out) and
    broadcasts within each expert's rows, instead of `per_expert` gathering it to every row.
    """
    per_row = identity if segments is not None else per_expert
    argument, scale = _hyperplane_asinh_terms(columns, weight, offset, curvature, linear_fn, per_row)
    inverse_sqrt_c = torch.as_tensor(curvature, dtype=argument.dtype, device=argument.device) ** -0.5
    return _SinhOfScaledAsinh.apply(argument, scale, inverse_sqrt_c, segments)


def fc(x: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, curvature: Curvature) -> torch.Tensor:
    """HNN++ Poincaré fully-connected layer on ball points: y = w/(1 + sqrt(1 + c‖w‖²))."""
    return from_lorentz(fc_lifted(to_lorentz(x, curvature), weight, offset, curvature), curvature)
