"""Sort-based dispatch: every expert backend equals the eager per-expert loop (outputs and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from asymoe.config.schema import GroupConfig, GroupsConfig, MoEConfig, RoutingConfig, VisionTailConfig
from asymoe.models import dispatch
from asymoe.models.factory import make_group
from asymoe.models.moe import MoEBlock, MoEState, TokenMeta

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


def routing_case(case: str, tokens: int, experts: int):
    """ragged: an expert without tokens, a third slot for some tokens only (as LTDR's tail tokens),
    padding without slots. full: every expert gets the same count and every slot is used."""
    if case == "full":
        expert_index = torch.stack([torch.arange(tokens) % experts, (torch.arange(tokens) + 1) % experts], -1)
        return torch.rand(tokens, 2).softmax(-1), expert_index, torch.ones(tokens, 2, dtype=torch.bool)
    logits = torch.randn(tokens, experts)
    logits[:, 3] = -1e9  # expert 3 receives no token
    probs, expert_index = torch.topk(logits.softmax(-1), 3)
    mask = torch.ones_like(expert_index, dtype=torch.bool)
    mask[:, 2] = torch.rand(tokens) < 0.3
    mask[-4:] = False
    return probs * mask / (probs * mask).sum(-1, keepdim=True).clamp_min(1e-9), expert_index, mask


@pytest.mark.parametrize("case", ["ragged", "full"])
@pytest.mark.parametrize("kernel", BACKENDS[:4])
def test_layouts_equal_the_loop(kernel, case):
    torch.manual_seed(0)
    tokens, experts = 40, 5
    x = torch.randn(tokens, HIDDEN, requires_grad=True)
    gate_up = torch.randn(experts, 2 * WIDTH, HIDDEN, requires_grad=True)
    down = torch.randn(experts, HIDDEN, WIDTH, requires_grad=True)
    weight, expert_index, mask = routing_case(case, tokens, experts)
    weight.requires_grad_()
    grad = torch.randn(tokens, HIDDEN)
    leaves = (x, gate_up, down, weight)

    def run(fn):
        out = fn()
        grads = torch.autograd.grad(out, leaves, grad)
        return out, grads

    def grouped(fused: bool):
        kernel_name, _, sync = kernel.partition("/")
        a = dispatch.sort_assignments(expert_index, weight, mask, experts, sync_free=bool(sync))
        rows = dispatch.group_rows(a, 0, experts)
        layout = dispatch.make_layout(kernel_name, rows)
        if fused:  # tokens straight into the layout and back; the weights scale the down projection's input
            gate, up = layout.linear(layout.gather(x), gate_up).chunk(2, dim=-1)
            y = layout.linear(F.silu(gate) * up * layout.row_weight(), down)
            return layout.combine(y, x.dtype, weighted=False)
        routed = layout.pack(dispatch.to_rows(x, rows))  # through the rows; the combine weights them
        gate, up = layout.linear(routed, gate_up).chunk(2, dim=-1)
        y = layout.unpack(layout.linear(F.silu(gate) * up, down))  # (rows, d)
        return dispatch.combine(rows, y, x.dtype, weighted=True)

    expected, expected_grads = run(lambda: loop_reference(x, gate_up, down, expert_index, weight, mask))
    for fused in (False, True):
        got, got_grads = run(lambda: grouped(fused))  # noqa: B023 (called at once)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        for g, e in zip(got_grads, expected_grads):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    if case == "ragged":
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


# ----------------------------------------------------------------------------- MoE blocks


def moe_config(name: str, backend: str) -> MoEConfig:
    """vanilla: 6 FFN experts, one router. Modality routers and LTDR with vision FFN experts and
    asymoe_lorentz: Lorentz shared + evidence language experts; asymoe_poincare: Poincaré shared +
    FFN language experts; evidence: FFN shared + evidence language experts (all on grouped_mm)."""
    if name == "vanilla":
        groups = GroupsConfig(GroupConfig(0), GroupConfig(6), GroupConfig(0))
        routing = RoutingConfig(mode="shared", top_k=2, balance_coef={"all": 0.01})
    else:
        geometry = {"asymoe_lorentz": "lorentz", "asymoe_poincare": "poincare"}.get(name, "euclidean")
        shared = GroupConfig(2, geometry=geometry)
        language = GroupConfig(2, kind="ffn" if name == "asymoe_poincare" else "evidence")
        groups = GroupsConfig(GroupConfig(1), shared, language)
        routing = RoutingConfig(mode="modality", top_k=2, z_loss_coef=0.01, vision_tail=VisionTailConfig(enabled=True))
    config = MoEConfig(groups=groups, routing=routing, experts_backend=backend)
    config.evidence.heads = 2
    config.geometry_loss.order_weight = 0.1 if name == "asymoe_lorentz" else 0.0
    return config


def build_block(name: str, backend: str) -> MoEBlock:
    """`name` as in `moe_config`; a `_wide` suffix gives experts wider than the model (f = 2d), whose
    routing weights the combine applies (`folds_routing_weight` is False)."""
    width = 2 * HIDDEN if name.endswith("_wide") else WIDTH
    name = name.removesuffix("_wide")
    config = moe_config(name, backend)
    torch.manual_seed(0)
    groups = {g: make_group(g, config, HIDDEN, width, "silu") for g in ("vision", "shared", "language")}
    block = MoEBlock(0, HIDDEN, groups, config, MoEState())
    if name == "vanilla":
        with torch.no_grad():
            block.routers["all"].weight[5] = -1.0  # tokens have a positive mean: expert 5 gets none
    return block


def token_meta(text_only: bool) -> TokenMeta:
    """3 samples of 10 positions: image tokens at 1-4 (samples 0, 1), padding, an answer at 7."""
    vision = torch.zeros(3, 10, dtype=torch.bool)
    if not text_only:
        vision[:2, 1:5] = True
    valid = torch.ones_like(vision)
    valid[1, 8:] = False
    answer = torch.zeros_like(vision)
    answer[:, 7] = True
    return TokenMeta(
        vision_mask=vision, attention_mask=valid, evidence_mask=valid & ~answer, answer_mask=answer & valid
    )


def run_block(block: MoEBlock, meta: TokenMeta, checkpointed: bool = False):
    """Output, input gradient, parameter gradients, losses and statistics of one forward + backward."""
    generator = torch.Generator().manual_seed(3)
    hidden = (torch.randn(3, 10, HIDDEN, generator=generator) + 0.5).requires_grad_()
    block._state.set(meta)
    out = checkpoint(block, hidden, use_reentrant=False) if checkpointed else block(hidden)
    record = block._state.records[0]
    loss = (out * torch.randn(out.shape, generator=generator)).sum() + sum(record.losses.values())
    block.zero_grad(set_to_none=True)
    loss.backward()
    grads = {name: p.grad for name, p in block.named_parameters()}
    scalars = {key: value for key, value in record.scalars.items()}
    return out.detach(), hidden.grad, grads, {k: v.detach() for k, v in record.losses.items()}, scalars


def assert_same_run(got, expected):
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], expected[0], **close)
    torch.testing.assert_close(got[1], expected[1], **close)
    assert got[2].keys() == expected[2].keys()
    for name, grad in expected[2].items():
        assert grad is not None and got[2][name] is not None, f"{name}: no gradient"
        torch.testing.assert_close(got[2][name], grad, **close, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(got[3], expected[3], **close)
    torch.testing.assert_close(got[4], expected[4], **close)


def run_backend(name: str, backend: str, meta: TokenMeta, monkeypatch, checkpointed: bool = False):
    kernel, _, sync = backend.partition("/")
    with monkeypatch.context() as patch:
        if sync:  # the GPU path: no size leaves the device
            patch.setattr(dispatch, "SYNC_FREE_DEVICES", frozenset({"cpu"}))
        return run_block(build_block(name, kernel), meta, checkpointed)


@pytest.mark.parametrize(
    "name, text_only",
    [
        ("vanilla", False),
        ("asymoe_lorentz", False),
        ("asymoe_lorentz", True),
        ("asymoe_poincare", False),
        ("evidence", False),
        ("evidence_wide", False),
    ],
    ids=["vanilla", "asymoe_lorentz", "asymoe_lorentz_text_only", "asymoe_poincare", "evidence", "evidence_wide"],
)
def test_block_backends_equal_eager(name, text_only, monkeypatch):
    meta = token_meta(text_only)
    expected = run_block(build_block(name, "eager"), meta)
    if name == "vanilla":
        assert expected[2]["groups.shared.gate_up_proj"][5].abs().max() == 0  # expert 5 received no token
    if name != "vanilla" and not text_only:
        assert expected[4]["tail_fraction/vision"] > 0  # LTDR tail tokens took more slots than top-k
    for backend in BACKENDS[:4]:
        assert_same_run(run_backend(name, backend, meta, monkeypatch), expected)


def test_block_backends_under_activation_checkpointing(monkeypatch):
    meta = token_meta(text_only=False)
    expected = run_block(build_block("asymoe_lorentz", "eager"), meta)
    for backend in ("grouped_mm/sync_free", "padded"):
        assert_same_run(run_backend("asymoe_lorentz", backend, meta, monkeypatch, checkpointed=True), expected)


def test_grouped_and_auto_resolve_per_group():
    block = build_block("asymoe_lorentz", "grouped")
    # The Lorentz layers' inputs [x_s; x_t; 1] are zero-padded to a 32-byte row: grouped_mm applies.
    expected = {"vision": "grouped_mm", "shared": "grouped_mm", "language": "grouped_mm"}
    assert block._kernels(torch.zeros(1, HIDDEN)) == expected
    # A width without a 16-byte stride (17 float32 columns) has no grouped_mm.
    assert dispatch.resolve_kernel("grouped", torch.device("cpu"), torch.float32, HIDDEN, 17) == dispatch.FALLBACK
    block.experts_backend = "auto"
    assert set(block._kernels(torch.zeros(1, HIDDEN)).values()) == {dispatch.FASTEST[("cpu", torch.float32)]}
    block.experts_backend = "eager"
    assert block._kernels(torch.zeros(1, HIDDEN)) is None


def test_auto_runs_a_family_listed_as_eager_eagerly_and_the_others_grouped(monkeypatch):
    """FASTEST_FOR_FAMILY: a family listed as eager for CPU float32 takes its per-expert loop under auto."""
    monkeypatch.setitem(dispatch.FASTEST_FOR_FAMILY, ("poincare", "cpu", torch.float32), "eager")
    cpu = torch.device("cpu")
    assert dispatch.resolve_kernel("auto", cpu, torch.float32, 16, family="poincare") == "eager"
    assert dispatch.resolve_kernel("grouped", cpu, torch.float32, 16, family="poincare") == "grouped_mm"
    assert dispatch.resolve_kernel("auto", cpu, torch.float32, 16, family="lorentz") == "grouped_mm"
    block = build_block("asymoe_poincare", "auto")
    kernels = {"vision": "grouped_mm", "shared": "eager", "language": "grouped_mm"}
    assert block._kernels(torch.zeros(1, HIDDEN)) == kernels
    meta = token_meta(text_only=False)
    calls = []
    group_class = type(block.groups["shared"])
    eager_dispatch = group_class.dispatch
    monkeypatch.setattr(group_class, "dispatch", lambda *a, **k: calls.append(1) or eager_dispatch(*a, **k))
    assert_same_run(run_block(block, meta), run_block(build_block("asymoe_poincare", "eager"), meta))
    assert len(calls) == 2  # the auto block's and the eager block's Poincaré group, each once
    monkeypatch.delitem(dispatch.FASTEST_FOR_FAMILY, ("poincare", "cpu", torch.float32))
    assert dispatch.resolve_kernel("auto", cpu, torch.float32, 16, family="poincare") == "grouped_mm"


@pytest.mark.parametrize("width", [8, 32], ids=["narrow", "wide"])
def test_gated_ffn_scale_multiplies_the_output(width):
    """scale on the gated unit is w · FFN(x), in value and gradient, for f < d and f ≥ d."""
    from asymoe.models.experts import gated_ffn

    torch.manual_seed(0)
    x = torch.randn(9, 16, dtype=torch.float64)
    gate_up = torch.randn(2 * width, 16, dtype=torch.float64)
    down = torch.randn(16, width, dtype=torch.float64)
    scale = torch.rand(9, 1, dtype=torch.float64, requires_grad=True)
    got = gated_ffn(x, gate_up, down, F.silu, scale=scale)
    expected = gated_ffn(x, gate_up, down, F.silu) * scale
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(got)
    (got_grad,) = torch.autograd.grad(got, scale, grad)
    (expected_grad,) = torch.autograd.grad(expected, scale, grad)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_swiglu_hand_written_backward_equals_autograd():
    from asymoe.models.experts import gated_unit

    torch.manual_seed(0)
    gate_up = torch.randn(2, 7, 10, dtype=torch.float64)
    mine, ref = gate_up.clone().requires_grad_(), gate_up.clone().requires_grad_()
    out = gated_unit(mine, torch.nn.functional.silu)
    gate, up = ref.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-12, atol=1e-14)
    # Any other activation takes the plain path.
    gelu = gated_unit(gate_up, torch.nn.functional.gelu)
    torch.testing.assert_close(gelu, torch.nn.functional.gelu(gate_up[..., :5]) * gate_up[..., 5:])
