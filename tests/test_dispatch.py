"""Sort-based dispatch: every expert backend equals the eager per-expert loop (outputs and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from asymoe.models import dispatch

HIDDEN, WIDTH = 16, 8  # fp32 widths that make 16-byte strides (grouped_mm's requirement)
BACKENDS = ["grouped_mm", "grouped_mm/sync_free", "padded", "segment", "auto"]


# ----------------------------------------------------------------------------- pure functions


def loop_reference(x, gate_up, down, expert_index, weight, mask):
    """The eager per-expert loop, written out: sum over used slots of w · FFN_e(x)."""
    out = torch.zeros_like(x)
    for expert in range(gate_up.shape[0]):
        token, slot = torch.where((expert_index == expert) & mask)
        gate, up = F.linear(x[token], gate_up[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[expert])
        out.index_add_(0, token, y * weight[token, slot, None])
    return out


def test_sort_assignments_counts_and_order():
    expert_index = torch.tensor([[2, 0], [0, 1], [2, 2], [1, 0]])
    mask = torch.tensor([[True, True], [True, False], [True, False], [False, False]])
    weight = torch.arange(8.0).reshape(4, 2)
    for sync_free in (False, True):
        a = dispatch.sort_assignments(expert_index, weight, mask, num_experts=3, sync_free=sync_free)
        assert a.ends.tolist() == [2, 2, 4]  # expert 0: two, expert 1: none, expert 2: two
        assert a.position[:4].tolist() == [1, 2, 0, 4]  # (token, slot) as token·2 + slot; token order kept
        assert a.weight[:4].tolist() == [1.0, 2.0, 0.0, 4.0]
        assert a.expert_index[4:].tolist() == [3, 3, 3, 3]  # unused slots sort last
        assert (a.host_ends is None) == sync_free


@pytest.mark.parametrize("kernel", BACKENDS[:4])
def test_layouts_equal_the_loop_with_empty_experts_and_variable_k(kernel):
    torch.manual_seed(0)
    tokens, experts = 40, 5
    x = torch.randn(tokens, HIDDEN, requires_grad=True)
    gate_up = torch.randn(experts, 2 * WIDTH, HIDDEN, requires_grad=True)
    down = torch.randn(experts, HIDDEN, WIDTH, requires_grad=True)
    logits = torch.randn(tokens, experts)
    logits[:, 3] = -1e9  # expert 3 receives no token
    probs, expert_index = torch.topk(logits.softmax(-1), 3)
    mask = torch.ones_like(expert_index, dtype=torch.bool)
    mask[:, 2] = torch.rand(tokens) < 0.3  # a third slot for some tokens only, as LTDR's tail
    mask[-4:] = False  # padding: no slot at all
    weight = (probs * mask / (probs * mask).sum(-1, keepdim=True).clamp_min(1e-9)).requires_grad_()
    grad = torch.randn(tokens, HIDDEN)
    leaves = (x, gate_up, down, weight)

    def run(fn):
        out = fn()
        grads = torch.autograd.grad(out, leaves, grad)
        return out, grads

    def grouped():
        kernel_name, _, sync = kernel.partition("/")
        a = dispatch.sort_assignments(expert_index, weight, mask, experts, sync_free=bool(sync))
        rows = dispatch.group_rows(a, 0, experts)
        layout = dispatch.make_layout(kernel_name, rows)
        routed = layout.pack(dispatch.to_rows(x, rows))
        gate, up = layout.linear(routed, gate_up).chunk(2, dim=-1)
        y = layout.unpack(layout.linear(F.silu(gate) * up, down))
        return dispatch.combine(rows, y, x.dtype)

    expected, expected_grads = run(lambda: loop_reference(x, gate_up, down, expert_index, weight, mask))
    got, got_grads = run(grouped)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    assert got_grads[1][3].abs().max() == 0  # the expert without tokens: an exact-zero gradient


def test_group_rows_of_a_middle_group_sync_free_equals_exact():
    torch.manual_seed(1)
    expert_index = torch.randint(0, 6, (30, 2))
    mask = torch.rand(30, 2) < 0.8
    weight = torch.rand(30, 2)
    exact = dispatch.group_rows(dispatch.sort_assignments(expert_index, weight, mask, 6), 2, 3)
    window = dispatch.group_rows(dispatch.sort_assignments(expert_index, weight, mask, 6, sync_free=True), 2, 3)
    count = exact.token_index.shape[0]
    assert int(window.valid.sum()) == count and bool(window.valid[:count].all())
    assert torch.equal(window.token_index[:count], exact.token_index)
    assert torch.equal(window.row_of_position.clamp(max=count), exact.row_of_position)  # padding: no position
    assert torch.equal(window.local_expert[:count], exact.local_expert)
    assert torch.equal(window.ends, exact.ends) and window.weight[count:].abs().sum() == 0


def test_resolve_kernel():
    cpu = torch.device("cpu")
    assert dispatch.resolve_kernel("auto", cpu, torch.float32, 16) == dispatch.FASTEST[("cpu", torch.float32)]
    assert dispatch.resolve_kernel("grouped_mm", cpu, torch.float32, 16) == "grouped_mm"
    assert dispatch.resolve_kernel("grouped_mm", cpu, torch.float32, 6) == dispatch.FALLBACK  # 24-byte stride
    assert dispatch.resolve_kernel("grouped_mm", cpu, torch.float64, 16) == dispatch.FALLBACK
