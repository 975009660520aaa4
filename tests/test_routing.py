"""Routing math: top-k renormalisation, eligibility, balance loss values, padding, LTDR tail rule."""

from __future__ import annotations

import math

import torch

from asymoe.config import load
from asymoe.models.experts import FFNExperts
from asymoe.models.moe import MoEBlock, MoEState, TokenMeta
from asymoe.models.routing import routing_probability_variance, switch_balance_loss, tail_tokens, top_k_routing


def make_block(overrides: list[str], hidden: int = 8, width: int = 16):
    cfg = load(None, overrides)
    moe = cfg.model.moe
    groups = {
        name: FFNExperts(getattr(moe.groups, name).num_experts, hidden, width)
        for name in ("vision", "shared", "language")
        if getattr(moe.groups, name).num_experts > 0
    }
    state = MoEState()
    return MoEBlock(0, hidden, groups, moe, state), state


def meta_for(vision: torch.Tensor, attention: torch.Tensor | None = None) -> TokenMeta:
    attention = torch.ones_like(vision) if attention is None else attention
    return TokenMeta(
        vision_mask=vision,
        attention_mask=attention,
        evidence_mask=attention & True,
        answer_mask=torch.zeros_like(vision),
    )


def test_top_k_renormalised():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    routing = top_k_routing(logits, top_k=2)
    probs = torch.softmax(logits, -1)
    assert routing.expert_index.tolist() == [[0, 1], [2, 3]]
    expected = probs[0, :2] / probs[0, :2].sum()
    torch.testing.assert_close(routing.expert_weight[0], expected)
    torch.testing.assert_close(routing.expert_weight.sum(-1), torch.ones(2))
    assert routing.slot_mask.all()


def test_balance_loss_known_value():
    # 2 tokens, 2 experts, top-1: token0 -> e0 (p=.8/.2), token1 -> e0 (p=.6/.4).
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    index = torch.tensor([[0], [0]])
    mask = torch.ones(2, 1, dtype=torch.bool)
    # f = (1, 0), P = (0.7, 0.3): L = 2 * (1 * 0.7) = 1.4
    assert math.isclose(switch_balance_loss(probs, index, mask).item(), 1.4, rel_tol=1e-6)
    uniform = torch.full((4, 4), 0.25)
    index = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert math.isclose(
        switch_balance_loss(uniform, index, torch.ones(4, 2, dtype=torch.bool)).item(), 1.0, rel_tol=1e-6
    )
    empty = switch_balance_loss(
        torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.bool)
    )
    assert empty.item() == 0.0 and empty.requires_grad


def test_modality_eligibility():
    # The spy below wraps each group's eager dispatch (the sorted backends equal it: test_dispatch.py).
    block, state = make_block(
        [
            "model.moe.experts_backend=eager",
            "model.moe.groups.vision.num_experts=2",
            "model.moe.groups.shared.num_experts=1",
            "model.moe.groups.language.num_experts=2",
        ]
    )
    # Global order: vision 0-1, shared 2, language 3-4.
    torch.manual_seed(0)
    vision = torch.zeros(2, 10, dtype=torch.bool)
    vision[:, :4] = True
    state.set(meta_for(vision))
    for router in block.routers.values():
        torch.nn.init.normal_(router.weight, std=5.0)
    hidden = torch.randn(2, 10, 8)
    calls = {}
    for name, group in block.groups.items():
        original = group.dispatch

        def spy(tokens, index, weight, mask, extras, _name=name, _original=original):
            calls[_name] = torch.where(mask.any(-1))[0]
            return _original(tokens, index, weight, mask, extras)

        group.dispatch = spy
    block(hidden)
    vision_tokens = set(torch.where(vision.reshape(-1))[0].tolist())
    assert set(calls["vision"].tolist()) <= vision_tokens
    assert not set(calls["language"].tolist()) & vision_tokens
    assert set(calls["language"].tolist()), "language tokens reached the language group"


def test_padding_excluded_from_balance_and_dispatch():
    block, state = make_block(
        [
            "model.moe.routing.mode=shared",
            "model.moe.groups.shared.num_experts=4",
            "model.moe.groups.vision.num_experts=0",
            "model.moe.groups.language.num_experts=0",
        ]
    )
    torch.manual_seed(0)
    hidden = torch.randn(1, 6, 8)
    vision = torch.zeros(1, 6, dtype=torch.bool)
    attention = torch.tensor([[True, True, True, True, False, False]])
    state.set(meta_for(vision, attention))
    out = block(hidden)
    loss_padded = state.records[0].scalars["balance_raw/all"]
    assert torch.count_nonzero(out[0, 4:]) == 0, "padding positions receive no expert output"
    hidden2 = hidden.clone()
    hidden2[0, 4:] = 100.0  # padding content must not matter
    block(hidden2)
    torch.testing.assert_close(state.records[0].scalars["balance_raw/all"], loss_padded)
    state.set(meta_for(vision[:, :4], attention[:, :4]))
    block(hidden[:, :4])
    torch.testing.assert_close(state.records[0].scalars["balance_raw/all"], loss_padded)


# ---- LTDR -----------------------------------------------------------------------------------


def test_tail_detection_per_sample():
    # RPVs of 6 tokens, samples [0,0,0,1,1,1]; token 5 is language.
    rpv = torch.tensor([0.1, 0.5, 0.3, 10.0, 20.0, 100.0])
    sample = torch.tensor([0, 0, 0, 1, 1, 1])
    candidate = torch.tensor([True, True, True, True, True, False])
    tail = tail_tokens(rpv, sample, candidate)
    # sample 0 mean 0.3 -> only 0.5; sample 1 mean over vision (10, 20) = 15 -> only 20.
    assert tail.tolist() == [False, True, False, False, True, False]
    # A sample's tail status does not depend on other samples in the batch.
    alone = tail_tokens(rpv[:3], sample[:3], candidate[:3])
    assert alone.tolist() == tail[:3].tolist()


def test_tail_tokens_get_top_a_weights_sum_to_one():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.1]])  # token 0 peaked (high RPV)
    routing = top_k_routing(
        logits, 2, tail_top_a=4, tail_candidate=torch.tensor([True, True]), sample_index=torch.tensor([0, 0])
    )
    assert routing.tail_mask.tolist() == [True, False]
    assert routing.slot_mask.sum(-1).tolist() == [4, 2]
    torch.testing.assert_close(routing.expert_weight.sum(-1), torch.ones(2))
    assert (routing.expert_weight[1, 2:] == 0).all()


def test_ltdr_balance_ignores_vision_tokens():
    overrides = [
        "model.moe.routing.mode=shared",
        "model.moe.groups.shared.num_experts=4",
        "model.moe.groups.vision.num_experts=0",
        "model.moe.groups.language.num_experts=0",
        "model.moe.routing.balance_modalities=[language]",
        "model.moe.routing.vision_tail.enabled=true",
    ]
    block, state = make_block(overrides)
    torch.manual_seed(0)
    vision = torch.zeros(2, 8, dtype=torch.bool)
    vision[:, :3] = True
    state.set(meta_for(vision))
    hidden = torch.randn(2, 8, 8, requires_grad=True)
    block(hidden)
    loss = state.records[0].losses["balance_all"]
    grad = torch.autograd.grad(loss, hidden)[0]
    assert torch.count_nonzero(grad[vision]) == 0, "no gradient through vision tokens"
    changed = hidden.detach().clone()
    changed[vision] = torch.randn_like(changed[vision]) * 3
    block(changed)
    torch.testing.assert_close(state.records[0].losses["balance_all"], loss.detach())


def test_mean_experts_per_token_known_case():
    overrides = [
        "model.moe.routing.mode=shared",
        "model.moe.groups.shared.num_experts=4",
        "model.moe.groups.vision.num_experts=0",
        "model.moe.groups.language.num_experts=0",
        "model.moe.routing.vision_tail.enabled=true",
    ]
    block, state = make_block(overrides)
    vision = torch.zeros(1, 6, dtype=torch.bool)
    vision[0, :4] = True
    # Router = identity on the first 4 features: logits are the token's first 4 features.
    with torch.no_grad():
        block.routers["all"].weight.copy_(torch.eye(4, 8))
    hidden = torch.zeros(1, 6, 8)
    hidden[0, 0, 0] = 8.0  # one peaked vision token -> the only tail token (above the mean RPV)
    hidden[0, 1:4, :4] = torch.tensor([0.1, 0.0, 0.0, 0.0])
    state.set(meta_for(vision))
    block(hidden)
    scalars = state.records[0].scalars
    # Vision tokens: one tail token with 4 experts, three head tokens with 2 -> 10 / 4 = 2.5.
    assert math.isclose(scalars["experts_per_vision_token"].item(), 2.5)
    # All tokens: (4 + 2 * 5) / 6.
    assert math.isclose(scalars["experts_per_token"].item(), 14 / 6, rel_tol=1e-6)
    assert math.isclose(scalars["tail_fraction/all"].item(), 0.25)


def test_padding_never_reaches_the_language_router_in_modality_mode():
    block, state = make_block([])  # modality mode, vision 1 + shared 2 + language 1
    torch.manual_seed(0)
    for router in block.routers.values():
        torch.nn.init.normal_(router.weight, std=5.0)
    hidden = torch.randn(1, 8, 8)
    vision = torch.zeros(1, 8, dtype=torch.bool)
    vision[0, :2] = True
    attention = torch.tensor([[True] * 5 + [False] * 3])
    keys = ("balance_raw/language", "balance_P/language", "entropy/language")

    def run(hidden, vision, attention):
        state.set(meta_for(vision, attention))
        out = block(hidden)
        record = state.records[0]
        return out, {key: record.scalars[key] for key in keys}, record.expert_share["language"]

    out, stats, share = run(hidden, vision, attention)
    assert torch.count_nonzero(out[0, 5:]) == 0, "padding positions receive no expert output"
    changed = hidden.clone()
    changed[0, 5:] = 10.0 * torch.randn(3, 8)  # padding content must not matter
    unpadded = (hidden[:, :5], vision[:, :5], attention[:, :5])  # nor the padding's presence
    for other_out, other_stats, other_share in (run(changed, vision, attention), run(*unpadded)):
        torch.testing.assert_close(other_out[0, :5], out[0, :5])
        torch.testing.assert_close(other_share, share)
        for key in keys:
            torch.testing.assert_close(other_stats[key], stats[key], msg=key)


def test_ltdr_tail_threshold_is_per_sample_inside_the_block():
    block, state = make_block(["model.moe.routing.vision_tail.enabled=true"])  # vision router: 3 experts, top-2
    block.eval()
    with torch.no_grad():
        block.routers["vision"].weight.copy_(torch.eye(3, 8))  # vision logits = the first 3 features
    torch.manual_seed(2)
    hidden = torch.randn(2, 10, 8)
    vision = torch.zeros(2, 10, dtype=torch.bool)
    vision[:, :6] = True
    hidden[0, :6, :3] *= 4.0  # sample 0: peaked routing (large RPVs); sample 1: flat (small RPVs)
    hidden[1, :6, :3] *= 0.3
    # Precondition: one threshold over the batch would pick other tail tokens than per sample.
    rpv = routing_probability_variance(torch.softmax(hidden[:, :6, :3].reshape(12, 3), -1))
    sample = torch.arange(2).repeat_interleave(6)
    candidate = torch.ones(12, dtype=torch.bool)
    per_sample = tail_tokens(rpv, sample, candidate)
    assert not torch.equal(per_sample, tail_tokens(rpv, torch.zeros_like(sample), candidate))
    assert per_sample[6:].any(), "the flat sample has tail tokens of its own"

    state.set(meta_for(vision))
    together = block(hidden)
    for index in range(2):
        state.set(meta_for(vision[index : index + 1]))
        alone = block(hidden[index : index + 1])
        torch.testing.assert_close(together[index], alone[0], atol=1e-6, rtol=1e-6)
