"""Hyperbolic maps against geoopt, the entailment cone, and the hyperbolic expert group."""

from __future__ import annotations

import math

import geoopt
import pytest
import torch
from torch import nn

from asymoe.config import GeometryLossConfig, MoEConfig
from asymoe.models import hyperbolic as hyp
from asymoe.models import lorentz, poincare
from asymoe.models.experts import FFNExperts
from asymoe.models.moe import MoEBlock, MoEState, TokenMeta

GEOMETRIES = ("lorentz", "poincare")
HIDDEN, WIDTH = 16, 32


def lorentz_full(space: torch.Tensor, curvature: float) -> torch.Tensor:
    """Full coordinates [x_t, x_s] as geoopt.Lorentz(k=1/c) stores them."""
    return torch.cat([lorentz.time(space, curvature), space], dim=-1)


def make_group(geometry: str, *, curvature=1.0, learn=True, align=1.0, order=1.0, evidence=False, experts=2):
    loss = GeometryLossConfig(align_weight=align, order_weight=order, cone_k=0.1, text_source="evidence")
    return hyp.HyperbolicExperts(
        num_experts=experts,
        hidden_size=HIDDEN,
        intermediate_size=WIDTH,
        activation="silu",
        geometry=geometry,
        curvature=curvature,
        learn_curvature=learn,
        geometry_loss=loss,
        has_evidence_group=evidence,
    )


class DenseMLP(nn.Module):
    def __init__(self, hidden: int = HIDDEN, width: int = WIDTH):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)


def make_meta(batch: int = 2, seq: int = 10, vision: int = 4) -> TokenMeta:
    vision_mask = torch.zeros(batch, seq, dtype=torch.bool)
    vision_mask[:, :vision] = True
    attention_mask = torch.ones(batch, seq, dtype=torch.bool)
    attention_mask[-1, -2:] = False  # right padding in the last sample
    answer_mask = torch.zeros(batch, seq, dtype=torch.bool)
    answer_mask[:, seq - 3 : seq - 2] = True
    evidence_mask = attention_mask & ~answer_mask
    return TokenMeta(vision_mask, attention_mask, evidence_mask, answer_mask)


def every_token_processed(meta: TokenMeta) -> dict[str, torch.Tensor]:
    """Routing weight 1 from every real token to both groups a geometry loss may read."""
    weight = meta.valid.float()
    return {"shared": weight, "language": weight}


def route_all_to(expert: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-1 routing of every token to one expert: (expert_index, expert_weight, slot_mask)."""
    return (
        torch.full((tokens, 1), expert, dtype=torch.long),
        torch.ones(tokens, 1),
        torch.ones(tokens, 1, dtype=torch.bool),
    )


# ----------------------------------------------------------------------------- manifold maps


@pytest.mark.parametrize("curvature", [0.3, 1.0, 2.5])
def test_lorentz_exp_map_lands_on_the_hyperboloid_and_log_inverts_it(curvature):
    tangent = 0.5 * torch.randn(64, 8)
    tangent[0] = 0.0
    point = lorentz.exp_map0(tangent, curvature)
    inner = lorentz.inner(point, point, curvature)
    torch.testing.assert_close(inner, torch.full_like(inner, -1.0 / curvature), atol=1e-4, rtol=0)
    torch.testing.assert_close(lorentz.log_map0(point, curvature), tangent, atol=1e-5, rtol=1e-4)
    assert torch.equal(point[0], torch.zeros(8))
    # Far from the origin float32 cannot resolve ⟨z,z⟩_L = x_s² − x_t²; float64 can.
    far = lorentz.exp_map0(2.0 * tangent.double(), curvature)
    inner = lorentz.inner(far, far, curvature)
    torch.testing.assert_close(inner, torch.full_like(inner, -1.0 / curvature), atol=1e-8, rtol=0)


@pytest.mark.parametrize("curvature", [0.3, 1.0, 2.5])
def test_poincare_exp_map_stays_in_the_ball_and_log_inverts_it(curvature):
    tangent = 0.5 * torch.randn(64, 8)
    point = poincare.exp_map0(tangent, curvature)
    torch.testing.assert_close(poincare.log_map0(point, curvature), tangent, atol=1e-4, rtol=1e-4)
    far = poincare.exp_map0(1e4 * tangent, curvature)
    assert (far.norm(dim=-1) < curvature**-0.5).all()


def test_maps_match_geoopt():
    torch.manual_seed(0)
    curvature = 0.7
    tangent = torch.randn(32, 6, dtype=torch.float64)
    # geoopt.Lorentz: ⟨x,x⟩_L = −k with k = 1/c, full coordinates [x_t, x_s].
    hyperboloid = geoopt.Lorentz(k=torch.tensor(1.0 / curvature, dtype=torch.float64))
    padded = torch.cat([torch.zeros(32, 1, dtype=torch.float64), tangent], dim=-1)
    point = lorentz.exp_map0(tangent, curvature)
    torch.testing.assert_close(lorentz_full(point, curvature), hyperboloid.expmap0(padded))
    torch.testing.assert_close(
        lorentz.log_map0(point, curvature), hyperboloid.logmap0(hyperboloid.expmap0(padded))[:, 1:]
    )
    ball = geoopt.PoincareBall(c=torch.tensor(curvature, dtype=torch.float64))
    torch.testing.assert_close(poincare.exp_map0(0.5 * tangent, curvature), ball.expmap0(0.5 * tangent))
    ball_point = ball.expmap0(0.5 * tangent)
    torch.testing.assert_close(poincare.log_map0(ball_point, curvature), ball.logmap0(ball_point))
    # The ball's exp_0(v) is the hyperboloid's exp_o(2v) under the standard isometry.
    torch.testing.assert_close(
        poincare.from_lorentz(lorentz.exp_map0(tangent, curvature), curvature),
        ball.expmap0(tangent / 2),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_distances_match_geoopt(geometry, dtype):
    torch.manual_seed(1)
    curvature = 1.3
    x, y = torch.randn(2, 128, 8, dtype=dtype)
    if geometry == "lorentz":
        ours = lorentz.dist(x, y, curvature)
        manifold = geoopt.Lorentz(k=torch.tensor(1.0 / curvature, dtype=dtype))
        reference = manifold.dist(lorentz_full(x, curvature), lorentz_full(y, curvature))
    else:
        ball = geoopt.PoincareBall(c=torch.tensor(curvature, dtype=dtype))
        x, y = ball.expmap0(0.4 * x), ball.expmap0(0.4 * y)
        ours = poincare.dist(x, y, curvature)
        reference = ball.dist(x, y)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(ours, reference.to(dtype), atol=tolerance, rtol=tolerance)


def test_distance_of_a_point_to_itself_is_zero_with_finite_gradient():
    point = torch.randn(4, 8, requires_grad=True)
    distance_sq = lorentz.dist(point, point, 1.0).square()
    assert distance_sq.max() < 1e-10
    distance_sq.sum().backward()
    assert torch.isfinite(point.grad).all()
    # The maps are smooth at the origin too.
    origin = torch.zeros(3, 8, requires_grad=True)
    round_trip = lorentz.log_map0(lorentz.exp_map0(origin, 1.0), 1.0)
    (round_trip.sum() + poincare.exp_map0(origin, 1.0).sum()).backward()
    torch.testing.assert_close(origin.grad, torch.full_like(origin, 2.0))


def test_hnn_fc_layer_matches_geoopt_hyperplane_distances():
    torch.manual_seed(2)
    curvature = 0.8
    ball = geoopt.PoincareBall(c=torch.tensor(curvature, dtype=torch.float64))
    x = ball.expmap0(0.6 * torch.randn(16, 5, dtype=torch.float64))
    normals = 0.3 * torch.randn(3, 5, dtype=torch.float64)  # z_k
    offsets = 0.5 * torch.randn(3, dtype=torch.float64)  # r_k
    unit = normals / normals.norm(dim=-1, keepdim=True)
    anchors = ball.expmap0(offsets.unsqueeze(-1) * unit)  # p_k = exp_0(r_k ẑ_k)
    signed = torch.stack([ball.dist2plane(x, anchors[k], unit[k], signed=True) for k in range(3)], dim=-1)
    expected_v = 2 * normals.norm(dim=-1) * signed
    lifted = poincare.to_lorentz(x, curvature)
    torch.testing.assert_close(poincare.hyperplane_distance(lifted, normals, offsets, curvature), expected_v)
    w = torch.sinh(curvature**0.5 * expected_v) / curvature**0.5
    expected_y = w / (1 + torch.sqrt(1 + curvature * w.square().sum(-1, keepdim=True)))
    output = poincare.fc(x, normals, offsets, curvature)
    torch.testing.assert_close(output, expected_y)
    assert (output.norm(dim=-1) < curvature**-0.5).all()


# ----------------------------------------------------------------------------- entailment cone


def test_exterior_angle_matches_geoopt_tangent_angle():
    torch.manual_seed(3)
    curvature = 0.9
    x, y = torch.randn(2, 32, 6, dtype=torch.float64)
    manifold = geoopt.Lorentz(k=torch.tensor(1.0 / curvature, dtype=torch.float64))
    x_full, y_full = lorentz_full(x, curvature), lorentz_full(y, curvature)
    to_child = manifold.logmap(x_full, y_full)
    away_from_origin = -manifold.logmap(x_full, lorentz_full(torch.zeros_like(x), curvature))
    cosine = manifold.inner(x_full, to_child, away_from_origin) / (
        manifold.norm(to_child) * manifold.norm(away_from_origin)
    )
    torch.testing.assert_close(lorentz.exterior_angle(x, y, curvature), torch.acos(cosine))


def test_entailment_loss_is_zero_inside_the_cone_and_positive_outside():
    curvature, cone_k = 1.0, 0.1
    parent = torch.tensor([[2.0, 0.0, 0.0]])
    aperture = lorentz.half_aperture(parent, curvature, cone_k)
    torch.testing.assert_close(aperture, torch.asin(torch.tensor([2 * cone_k / 2.0])))
    inside = torch.tensor([[3.0, 0.0, 0.0], [4.0, 0.05, 0.0]])  # further out along the parent's ray
    outside = torch.tensor([[2.0, 2.0, 0.0], [0.5, 0.0, 0.0]])  # off to the side; towards the origin
    assert torch.equal(lorentz.entailment_loss(parent.expand(2, 3), inside, curvature, cone_k), torch.zeros(2))
    loss_outside = lorentz.entailment_loss(parent.expand(2, 3), outside, curvature, cone_k)
    assert (loss_outside > 0.5).all()
    # Towards the origin the exterior angle is π.
    assert abs(lorentz.exterior_angle(parent, outside[1:], curvature).item() - math.pi) < 1e-2


# ----------------------------------------------------------------------------- expert group


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_hyperbolic_expert_is_not_a_euclidean_ffn(geometry):
    torch.manual_seed(4)
    dense = DenseMLP()
    euclidean = FFNExperts(1, HIDDEN, WIDTH, "silu")
    euclidean.upcycle_from(dense)
    tokens = torch.randn(32, HIDDEN)  # ‖h‖ ≈ √d, as after RMSNorm

    def expert_output(curvature: float) -> torch.Tensor:
        group = make_group(geometry, curvature=curvature, align=0.0, order=0.0, experts=1)
        group.upcycle_from(dense)
        return group.expert_forward(0, tokens, {})

    with torch.no_grad():
        reference = euclidean.expert_forward(0, tokens, {})
        at_one, at_four, flat = expert_output(1.0), expert_output(4.0), expert_output(1e-6)

    def relative_gap(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert relative_gap(at_one, reference) > 0.05
    assert relative_gap(at_four, at_one) > 0.05
    # Upcycling means: the dense FFN in the flat limit c -> 0.
    assert relative_gap(flat, reference) < 1e-3


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_upcycle_copies_the_dense_weights(geometry):
    dense = DenseMLP()
    group = make_group(geometry, align=0.0, order=0.0)
    group.upcycle_from(dense)
    gate_up = torch.cat([dense.gate_proj.weight, dense.up_proj.weight]) / (4.0 if geometry == "poincare" else 1.0)
    for expert in range(group.num_experts):
        torch.testing.assert_close(group.gate_up_proj[expert], gate_up)
        torch.testing.assert_close(group.down_proj[expert], dense.down_proj.weight)
    assert not group.gate_up_bias.any() and not group.down_bias.any()
    if geometry == "lorentz":
        assert not group.gate_up_time.any() and not group.down_time.any()
    narrower = make_group(geometry, align=0.0, order=0.0)
    before = narrower.gate_up_proj.clone()
    narrower.upcycle_from(DenseMLP(width=WIDTH // 2))
    assert torch.equal(narrower.gate_up_proj, before)


def test_weights_are_plain_tensors_and_curvature_is_named_and_frozen_as_a_buffer():
    learned = make_group("lorentz")
    names = dict(learned.named_parameters())
    assert "log_curvature" in names and names["log_curvature"].shape == (1,)
    assert not any(isinstance(p, geoopt.ManifoldParameter) for p in learned.parameters())
    assert learned.gate_up_proj.shape == (2, 2 * WIDTH, HIDDEN) and learned.down_proj.shape == (2, HIDDEN, WIDTH)
    frozen = make_group("lorentz", learn=False)
    assert "log_curvature" not in dict(frozen.named_parameters())
    assert "log_curvature" in frozen.state_dict()
    torch.testing.assert_close(frozen.curvature(), torch.tensor([1.0]))


def test_curvature_is_clamped_and_only_an_inward_gradient_passes_the_bound():
    group = make_group("lorentz", curvature=2.0)
    with torch.no_grad():
        group.log_curvature.fill_(math.log(2.0 * 50))  # beyond 10·c0
    torch.testing.assert_close(group.curvature(), torch.tensor([20.0]))
    group.curvature().sum().neg().backward()  # descent would raise c further: dropped
    assert group.log_curvature.grad.item() == 0.0
    group.log_curvature.grad = None
    group.curvature().sum().backward()  # descent lowers c: passes
    assert group.log_curvature.grad.item() > 0.0


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_gradients_reach_curvature_and_an_idle_expert_gets_exact_zeros(geometry):
    torch.manual_seed(5)
    group = make_group(geometry, align=0.0, order=0.0)
    tokens = torch.randn(6, HIDDEN, requires_grad=True)
    out = group.dispatch(tokens, *route_all_to(0, 6), {})
    out.square().sum().backward()
    grad = group.log_curvature.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().item() > 0
    for name, parameter in group.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        if parameter.dim() >= 2 or name.endswith(("_bias", "_time")):
            assert not parameter.grad[1].any(), name  # expert 1 got no token
            assert parameter.grad[0].any(), name
    # No token at all for the group: every gradient is a zero tensor, none is None or NaN.
    group.zero_grad(set_to_none=True)
    index, weight, _ = route_all_to(0, 6)
    group.dispatch(tokens, index, weight, torch.zeros(6, 1, dtype=torch.bool), {}).sum().backward()
    for name, parameter in group.named_parameters():
        assert parameter.grad is not None and not parameter.grad.any(), name


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_origin_distance_scalar_is_the_mean_distance_of_the_routed_points(geometry):
    group = make_group(geometry, curvature=2.0, align=0.0, order=0.0)
    tokens = torch.randn(5, HIDDEN) * torch.linspace(0.1, 3.0, 5).unsqueeze(-1)
    group.dispatch(tokens, *route_all_to(1, 5), {})
    scalars = group.scalars()
    # d(o, exp_o(α·h)) = ‖α·h‖ on the hyperboloid; the ball's exp_0 doubles it.
    expected = (tokens.norm(dim=-1) * HIDDEN**-0.5).mean() * (2.0 if geometry == "poincare" else 1.0)
    torch.testing.assert_close(scalars["origin_distance"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scalars["curvature"], torch.tensor(2.0))


# ----------------------------------------------------------------------------- geometry losses


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_alignment_is_zero_when_vision_and_text_points_coincide(geometry):
    group = make_group(geometry, align=2.0, order=3.0)
    with torch.no_grad():
        group.text_projection.weight.copy_(group.vision_projection.weight)
    meta = make_meta()
    hidden = torch.randn(2, 1, HIDDEN).expand(2, 10, HIDDEN).contiguous()  # one vector per sample
    losses = group.aux_losses(hidden, meta, {"shared": hidden}, every_token_processed(meta))
    assert set(losses) == {"geometry_align", "geometry_order"}
    assert losses["geometry_align"].item() < 1e-9
    assert torch.isfinite(losses["geometry_order"])


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_geometry_losses_are_weighted_finite_and_read_the_evidence_group(geometry):
    torch.manual_seed(6)
    group = make_group(geometry, align=2.0, order=3.0, evidence=True)
    meta = make_meta()
    hidden = torch.randn(2, 10, HIDDEN)
    outputs = {"shared": torch.randn(2, 10, HIDDEN), "language": torch.randn(2, 10, HIDDEN)}
    losses = group.aux_losses(hidden, meta, outputs, every_token_processed(meta))
    raw = group.scalars()
    torch.testing.assert_close(losses["geometry_align"], 2.0 * raw["geometry_align_raw"])
    torch.testing.assert_close(losses["geometry_order"], 3.0 * raw["geometry_order_raw"])
    assert losses["geometry_align"] > 0 and all(torch.isfinite(v) for v in losses.values())
    # text_source=evidence with an evidence group: t comes from the language group, not the shared one.
    changed_shared = group.aux_losses(
        hidden, meta, {**outputs, "shared": torch.randn(2, 10, HIDDEN)}, every_token_processed(meta)
    )
    torch.testing.assert_close(changed_shared["geometry_align"], losses["geometry_align"])
    changed_language = group.aux_losses(
        hidden, meta, {**outputs, "language": torch.randn(2, 10, HIDDEN)}, every_token_processed(meta)
    )
    assert not torch.allclose(changed_language["geometry_align"], losses["geometry_align"])


def test_geometry_losses_without_an_eligible_sample_are_exact_zeros_on_the_graph():
    group = make_group("lorentz", align=1.0, order=1.0)
    meta = make_meta(vision=0)  # no vision token anywhere
    hidden = torch.randn(2, 10, HIDDEN)
    losses = group.aux_losses(hidden, meta, {"shared": hidden}, every_token_processed(meta))
    assert all(value.item() == 0.0 for value in losses.values())
    sum(losses.values()).backward()
    for parameter in (group.vision_projection.weight, group.text_projection.weight):
        assert parameter.grad is not None and not parameter.grad.any()
    assert "geometry_align_raw" not in group.scalars()


def test_no_loss_weight_builds_no_projection():
    group = make_group("poincare", align=0.0, order=0.0)
    assert group.vision_projection is None and group.text_projection is None
    meta = make_meta()
    outputs = {"shared": torch.randn(2, 10, HIDDEN)}
    assert group.aux_losses(torch.randn(2, 10, HIDDEN), meta, outputs, every_token_processed(meta)) == {}


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_text_point_pools_only_the_tokens_the_text_group_processed(geometry):
    torch.manual_seed(9)
    group = make_group(geometry, evidence=True)
    meta = make_meta(batch=3)  # vision 0-3, language 4-9; the last sample is padded at 8-9
    hidden = torch.randn(3, 10, HIDDEN)
    expert_output = torch.randn(3, 10, HIDDEN)  # E(x_i) of the evidence experts
    weight = torch.zeros(3, 10)  # routing weight each token sent to the evidence group
    weight[0, [4, 6, 7]] = torch.tensor([1.0, 0.5, 0.25])
    weight[1, 5] = 0.6
    weight[2, 9] = 1.0  # padding: not a token; sample 2's real language tokens all went elsewhere
    routed = expert_output * weight.unsqueeze(-1)  # the group's routed output, 0 where not routed
    outputs = {"shared": torch.randn(3, 10, HIDDEN), "language": routed}
    routed_weight = {"shared": meta.valid.float(), "language": weight}
    vision_point, text_point, eligible = group.pooled_points(hidden, meta, outputs, routed_weight)

    assert eligible.tolist() == [True, True, False]
    scale = HIDDEN**-0.5 * (2.0 if geometry == "poincare" else 1.0)
    curvature = group.curvature()

    def point(mean: torch.Tensor, projection: nn.Linear) -> torch.Tensor:
        return lorentz.exp_map0(scale * mean @ projection.weight.T, curvature)

    processed_mean = torch.stack([expert_output[0, [4, 6, 7]].mean(0), expert_output[1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(text_point, point(processed_mean, group.text_projection))
        torch.testing.assert_close(vision_point, point(hidden[:2, :4].mean(1), group.vision_projection))
        # The zero-padded mean over every real language token lands elsewhere.
        zero_padded = torch.stack([routed[0, 4:10].mean(0), routed[1, 4:10].mean(0)])
        assert (text_point - point(zero_padded, group.text_projection)).norm(dim=-1).min() > 0.1


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_bf16_autocast_output_equals_the_float32_output(geometry):
    torch.manual_seed(10)
    group = make_group(geometry, align=1.0, order=1.0)
    with torch.no_grad():
        for parameter in (group.gate_up_bias, group.down_bias):
            parameter.normal_(std=0.3)
    tokens = 2.0 * torch.randn(12, HIDDEN)
    index = (torch.arange(12) % 2).unsqueeze(-1)  # experts 0 and 1 take turns
    routing = (index, torch.full((12, 1), 0.7), torch.ones(12, 1, dtype=torch.bool))
    meta = make_meta()
    hidden, outputs = torch.randn(2, 10, HIDDEN), {"shared": torch.randn(2, 10, HIDDEN)}

    def run():
        out = group.dispatch(tokens, *routing, {})
        return out, group.aux_losses(hidden, meta, outputs, every_token_processed(meta))

    with torch.no_grad():
        reference, reference_losses = run()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed, mixed_losses = run()
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, atol=1e-6, rtol=0)
    for name, value in reference_losses.items():
        torch.testing.assert_close(mixed_losses[name], value, atol=1e-6, rtol=0, msg=name)


# ----------------------------------------------------------------------------- training


@pytest.fixture
def single_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("geometry", "learn", "steps"),
    [("lorentz", True, 300), ("poincare", True, 300), ("lorentz", False, 30), ("poincare", False, 30)],
)
def test_bf16_autocast_training_with_large_inputs_stays_finite(geometry, learn, steps, single_thread):
    torch.manual_seed(7)
    state = MoEState()
    group = make_group(geometry, learn=learn, align=0.5, order=0.5)
    group.upcycle_from(DenseMLP())
    block = MoEBlock(0, HIDDEN, {"shared": group}, MoEConfig(), state)
    optimizer = torch.optim.AdamW(block.parameters(), lr=1e-2)
    meta = make_meta()
    hidden = 50.0 * torch.randn(2, 10, HIDDEN)
    target = torch.randn(2, 10, HIDDEN)
    start = group.curvature().detach().clone()
    for _ in range(steps):
        state.set(meta)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(hidden)
        loss = (out.float() - target).square().mean() + state.total_aux_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        assert torch.isfinite(loss)
        for name, parameter in block.named_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        optimizer.step()
        assert torch.isfinite(group.curvature()).all()
    record = state.records[0]
    assert {"shared/curvature", "shared/origin_distance", "shared/geometry_align_raw"} <= set(record.scalars)
    assert {"geometry_align", "geometry_order"} <= set(record.losses)
    if learn:
        assert (group.curvature() - start).abs().item() > 1e-3
    else:
        assert torch.equal(group.curvature(), start)


def test_clip_radius_backward_equals_autograd_of_its_formula():
    """The hand-written backward: identity on unclipped rows, the projected gradient on clipped ones."""
    torch.manual_seed(0)
    curvature = 0.7
    limit = lorentz.RADIUS_MAX / curvature**0.5
    x = torch.randn(6, 5, dtype=torch.float64)
    x[1] *= 3 * limit / x[1].norm()  # clipped to the bound
    x[4] *= 1.5 * limit / x[4].norm()
    grad = torch.randn_like(x)
    mine = x.clone().requires_grad_()
    out = lorentz.clip_radius(mine, curvature)
    out.backward(grad)
    ref = x.clone().requires_grad_()
    expected = ref * (limit / lorentz.safe_norm(ref)).clamp(max=1.0)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-10, atol=1e-12)
    assert torch.equal(mine.grad[[0, 2, 3, 5]], grad[[0, 2, 3, 5]])  # unclipped rows: the identity
    assert not torch.allclose(mine.grad[[1, 4]], grad[[1, 4]])


@pytest.mark.parametrize("kind", ["exp", "log", "log_clipped", "log_clipped_scaled"])
def test_radial_maps_hand_written_backward_equals_autograd_of_the_formulas(kind):
    """exp_o, log_o, log_o ∘ clip and s·log_o ∘ clip (per-row s): values and gradients (input,
    curvature and s) in float64."""
    torch.manual_seed(0)
    curvature = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    limit = lorentz.RADIUS_MAX / 0.7**0.5
    x = torch.randn(9, 5, dtype=torch.float64)
    x[1] *= 1e-4 / x[1].norm()  # the small-u series
    x[2] = 0.0  # below the norm floor
    x[3] *= 3 * limit / x[3].norm()  # clipped (log) / past the sinh clamp (exp)
    x[4] *= 20.0 / x[4].norm()
    grad = torch.randn_like(x)
    scaled = kind.endswith("_scaled")
    kind = kind.removesuffix("_scaled")
    scale = torch.rand(9, 1, dtype=torch.float64, requires_grad=True) if scaled else None

    def reference(v, c):
        sqrt_c = c**0.5
        if kind == "exp":
            u = sqrt_c * lorentz.safe_norm(v)
            return torch.sinh(u.clamp(max=lorentz.SINH_MAX)) / u * v
        if kind == "log_clipped":
            v = v * (limit / lorentz.safe_norm(v)).clamp(max=1.0)  # the bound is a constant of c
        u = sqrt_c * lorentz.safe_norm(v)
        return torch.asinh(u) / u * v

    mine_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_c = curvature.detach().clone().requires_grad_()
    ref_scale = scale.detach().clone().requires_grad_() if scaled else None
    if kind == "exp":
        out = lorentz.exp_map0(mine_x, curvature)
    else:
        out = lorentz.log_map0(mine_x, curvature, clip=kind == "log_clipped", scale=scale)
    expected = reference(ref_x, ref_c) * (ref_scale if scaled else 1.0)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(mine_x.grad, ref_x.grad, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(curvature.grad, ref_c.grad, rtol=1e-7, atol=1e-9)
    assert torch.isfinite(mine_x.grad).all()
    if scaled:
        torch.testing.assert_close(scale.grad, ref_scale.grad, rtol=1e-10, atol=1e-12)
    origin_slope = scale[2].detach() if scaled else 1.0
    torch.testing.assert_close(mine_x.grad[2], origin_slope * grad[2], rtol=1e-12, atol=0)  # φ → 1 at the origin


def test_clip_radius_returns_its_input_when_nothing_is_clipped():
    x = torch.randn(4, 3, requires_grad=True)
    out = lorentz.clip_radius(x, 1.0)
    assert torch.equal(out, x) and out.data_ptr() == x.data_ptr()
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("width", [5, 8])
def test_lorentz_linear_equals_the_product_with_the_time_coordinate(width):
    """y_s = W·[x_t; x_s] + b: values and gradients (x, W, time column, bias, curvature) in float64."""
    torch.manual_seed(1)
    x = torch.randn(7, width, dtype=torch.float64)
    params = [torch.randn(3, width), torch.randn(3), torch.randn(3), torch.tensor([0.6])]
    mine = [t.to(torch.float64).requires_grad_() for t in [x, *params]]
    ref = [t.detach().clone().requires_grad_() for t in mine]
    out = lorentz.linear(mine[0], mine[1], mine[2], mine[3], mine[4])
    assert lorentz.augmented_width(width) % 4 == 0
    x_ref, weight, time_weight, bias, curvature = ref
    full = torch.cat([lorentz.time(x_ref, curvature), x_ref], dim=-1)
    expected = full @ torch.cat([time_weight.unsqueeze(-1), weight], dim=-1).T + bias
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for a, b in zip(mine, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("clipped_rows", [False, True])
def test_gated_columns_equal_the_time_columns_of_the_clipped_gated_unit(clipped_rows):
    """silu(g) ⊙ u, its radius clip and its time columns in one function: values and all gradients in float64."""
    from asymoe.models.hyperbolic import gated_columns

    torch.manual_seed(2)
    width, kappa = 5, 0.7 / 64  # float64 rows of 5 + 2 columns padded to 8
    gate_up = torch.randn(5, 2 * width, dtype=torch.float64)
    if clipped_rows:  # rows 1 and 3 far past the bound 2^15/√κ, the rest inside it
        gate_up[[1, 3]] *= 3e3
    grad = torch.randn(5, lorentz.augmented_width(width, 8), dtype=torch.float64)
    mine = [gate_up.clone().requires_grad_(), torch.tensor([kappa], dtype=torch.float64, requires_grad=True)]
    ref = [t.detach().clone().requires_grad_() for t in mine]
    out = gated_columns(mine[0], torch.nn.functional.silu, mine[1])
    gate, up = ref[0].chunk(2, dim=-1)
    limit = lorentz.RADIUS_MAX / kappa**0.5  # a constant of the curvature, as in clip_radius
    inner = torch.nn.functional.silu(gate) * up
    inner = inner * (limit / lorentz.safe_norm(inner)).clamp(max=1.0)
    ones = torch.ones(5, 1, dtype=torch.float64)
    expected = torch.cat([inner, lorentz.time(inner, ref[1]), ones, torch.zeros(5, 1, dtype=torch.float64)], dim=-1)
    assert bool((lorentz.safe_norm(torch.nn.functional.silu(gate) * up) > limit).any()) == clipped_rows
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.backward(grad)
    expected.backward(grad)
    for a, b in zip(mine, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "scale_rows, segments",
    [(1, None), (6, None), (4, (2, 0, 3, 1))],
    ids=["broadcast_scale", "per_row_scale", "per_expert_scale"],
)
@pytest.mark.parametrize("block", [1 << 18, 8], ids=["one_block", "blocks_of_2_rows"])
@pytest.mark.parametrize("clamped", [True, False], ids=["clamped", "unclamped"])
def test_poincare_sinh_of_scaled_asinh_equals_autograd_of_the_formula(
    clamped, block, scale_rows, segments, monkeypatch
):
    """sinh(clamp(s·asinh(a)))·k through expm1/log1p with its closed-form backward, s broadcast per
    column, given per entry (as an expert layout's per_expert gives it) or per expert over rows
    sorted by expert (`segments`: 4 experts, one with no row; against the scale gathered to rows);
    with an entry beyond the clamp (which gets no gradient) and without one (the clamp skipped); in
    one block and in blocks of 2 rows (the CPU passes run block by block, never across an expert's
    rows: the clamped entry's block clamps, the others skip it)."""
    from asymoe.models.poincare import _SinhOfScaledAsinh

    monkeypatch.setattr(poincare, "BLOCK_ELEMENTS", block)
    torch.manual_seed(0)
    a = torch.randn(6, 4, dtype=torch.float64) * 3
    a[0, 0], a[1, 1], a[2, 2] = 0.0, 1e-9, -1e-7  # the origin and tiny values of either sign
    if clamped:
        a[3, 3] = -1e30  # s·asinh(a) beyond the clamp: no gradient through it
    scale = (torch.rand(scale_rows, 4, dtype=torch.float64) + 0.5).requires_grad_()
    k = torch.tensor([0.8], dtype=torch.float64, requires_grad=True)
    mine_a, ref_a = a.clone().requires_grad_(), a.clone().requires_grad_()
    ref_scale, ref_k = scale.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    out = _SinhOfScaledAsinh.apply(mine_a, scale, k, segments)
    row_scale = ref_scale
    if segments is not None:
        row_scale = ref_scale.repeat_interleave(torch.tensor(segments), dim=0)  # (6, 4): each row's expert
    limit = poincare.SINH_MAX
    expected = torch.sinh((row_scale * torch.asinh(ref_a)).clamp(-limit, limit)) * ref_k
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-15)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(mine_a.grad, ref_a.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scale.grad, ref_scale.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(k.grad, ref_k.grad, rtol=1e-10, atol=1e-12)
    assert mine_a.grad[3, 3] == 0.0 if clamped else mine_a.grad[3, 3] != 0.0


@pytest.mark.parametrize("bmm_from", [0, 1 << 30], ids=["batched_product", "sum"])
def test_row_dot_is_the_row_wise_dot_product(bmm_from, monkeypatch):
    """Both ways `radial.row_dot` takes (a batched product for large inputs, a sum for small ones)
    give ⟨x, y⟩ per row over the last dimension, shaped (..., 1), with gradients."""
    from asymoe.models import radial

    monkeypatch.setattr(radial, "ROW_DOT_BMM_ELEMENTS", bmm_from)
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    out = radial.row_dot(x, y)
    expected = torch.einsum("abd,abd->ab", x.detach(), y.detach()).unsqueeze(-1)
    assert out.shape == (3, 5, 1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())
    torch.testing.assert_close(y.grad, x.detach())
