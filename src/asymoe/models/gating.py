"""The gated unit act(gate) ⊙ up of gated FFN experts, with a hand-written SiLU backward.

Used by every gated expert (`experts.gated_ffn`), the dense benchmark FFN, and the hyperbolic
experts' fused second-layer input (`lorentz.swiglu_time_columns`), which shares `swiglu_backward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation


def is_silu(act_fn) -> bool:
    """Whether act_fn is SiLU (the gated units with a hand-written backward)."""
    return act_fn is F.silu or isinstance(act_fn, (nn.SiLU, SiLUActivation))


def gated_unit(gate_up: torch.Tensor, act_fn) -> torch.Tensor:
    """act(gate) ⊙ up for gate_up = [gate; up] (..., 2f) -> (..., f); SiLU through `_SwiGLU`."""
    if is_silu(act_fn):
        return _SwiGLU.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return act_fn(gate) * up


def swiglu_backward(grad: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """∂/∂[gate; up] of silu(gate) ⊙ up for the output gradient `grad` (..., f), as one (..., 2f) tensor.

    silu(gate) is recomputed, not kept; both halves are written straight into the result (aten's
    fused silu_backward for the gate half).
    """
    gate, up = gate_up.chunk(2, dim=-1)
    grad_gate_up = torch.empty_like(gate_up)
    grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
    torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
    torch.mul(grad, F.silu(gate), out=grad_up)
    return grad_gate_up


class _SwiGLU(torch.autograd.Function):
    """silu(gate) ⊙ up with a hand-written backward (`swiglu_backward`).

    Autograd would keep silu(gate) alive for the backward and assemble the (..., 2f) input
    gradient by concatenating its two halves.
    """

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        return swiglu_backward(grad, gate_up)
