"""AsyMoE evidence-priority experts: causality, evidence masking, gate, routing bias, upcycling."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from asymoe.config import ConfigError, EvidenceConfig, load
from asymoe.models.evidence import EvidenceExperts, EvidenceMask, evidence_attention
from asymoe.models.language import build_groups
from asymoe.models.moe import MoEBlock, MoEState, TokenMeta
from asymoe.models.positions import PackedPositions

HIDDEN, WIDTH, EXPERTS, HEADS = 16, 24, 3, 4


def make_meta() -> TokenMeta:
    """Two samples of 10 positions.

    sample 0: image 0-2, prompt 3-5, answer 6-9;
    sample 1: template 0 (no evidence before it), image 1-3, prompt 4-5, answer 6-7, padding 8-9.
    """
    vision = torch.zeros(2, 10, dtype=torch.bool)
    prompt = torch.zeros(2, 10, dtype=torch.bool)
    answer = torch.zeros(2, 10, dtype=torch.bool)
    attention = torch.ones(2, 10, dtype=torch.bool)
    vision[0, 0:3], prompt[0, 3:6], answer[0, 6:10] = True, True, True
    vision[1, 1:4], prompt[1, 4:6], answer[1, 6:8], attention[1, 8:] = True, True, True, False
    return TokenMeta(vision_mask=vision, attention_mask=attention, evidence_mask=vision | prompt, answer_mask=answer)


def make_group(seed: int = 0, experts: int = EXPERTS, **evidence) -> EvidenceExperts:
    torch.manual_seed(seed)
    group = EvidenceExperts(experts, HIDDEN, WIDTH, "silu", EvidenceConfig(heads=HEADS, **evidence))
    if getattr(group, "route_weight", None) is not None:
        with torch.no_grad():
            group.route_weight.normal_()
    if group.fixed_alpha is None:
        with torch.no_grad():
            group.alpha_weight.normal_(std=0.3)
    return group


def dense_mlp(seed: int = 1) -> LlamaMLP:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=WIDTH, num_attention_heads=HEADS, hidden_act="silu")
    return LlamaMLP(config)


def every_token_routing(meta: TokenMeta, experts: int = EXPERTS):
    """Each real token goes to two experts (t mod E and t+1 mod E) with weights 0.6 / 0.4."""
    tokens = meta.attention_mask.numel()
    position = torch.arange(tokens)
    index = torch.stack([position % experts, (position + 1) % experts], dim=-1)
    weight = torch.tensor([0.6, 0.4]).expand(tokens, 2).clone()
    slot_mask = meta.attention_mask.reshape(-1, 1).expand(tokens, 2).clone()
    return index, weight, slot_mask


def group_output(group: EvidenceExperts, hidden: torch.Tensor, meta: TokenMeta, routing=None):
    index, weight, slot_mask = routing if routing is not None else every_token_routing(meta, group.num_experts)
    extras = group.prepare(hidden, meta)
    out = group.dispatch(hidden.reshape(-1, HIDDEN), index, weight, slot_mask, extras)
    return out.reshape(hidden.shape), extras


def test_later_positions_never_change_earlier_outputs():
    group, meta = make_group(), make_meta()
    torch.manual_seed(2)
    hidden = torch.randn(2, 10, HIDDEN)
    out, _ = group_output(group, hidden, meta)
    for position in (2, 4, 7):
        changed = hidden.clone()
        changed[:, position] += torch.randn(2, HIDDEN)
        out_changed, _ = group_output(group, changed, meta)
        assert torch.equal(out_changed[:, :position], out[:, :position])
        assert not torch.allclose(out_changed[:, position], out[:, position])
    # Evidence at position 4 does reach the positions after it, and only within its own sample.
    changed = hidden.clone()
    changed[0, 4] += 1.0
    out_changed, _ = group_output(group, changed, meta)
    assert not torch.allclose(out_changed[0, 5:], out[0, 5:])
    assert torch.equal(out_changed[1], out[1])


def test_answer_tokens_never_serve_as_keys_or_values():
    group, meta = make_group(), make_meta()
    torch.manual_seed(3)
    hidden = torch.randn(2, 10, HIDDEN)
    not_evidence = ~meta.evidence_mask
    perturbed = torch.where(not_evidence.unsqueeze(-1), hidden + 5 * torch.randn_like(hidden), hidden)

    # Keys/values taken from the perturbed states: nobody's context moves (queries held fixed).
    attention, mask = group.cross_attention, EvidenceMask.of(meta.evidence_mask)
    assert torch.equal(attention(hidden, perturbed, mask), attention(hidden, hidden, mask))
    states, moved = hidden.unsqueeze(1), perturbed.unsqueeze(1)
    assert torch.equal(
        evidence_attention(states, moved, moved, EvidenceMask.of(meta.evidence_mask))[0],
        evidence_attention(states, states, states, EvidenceMask.of(meta.evidence_mask))[0],
    )
    # Through prepare(): context and s_evd are unchanged at every evidence (query-unchanged) position.
    extras = group.prepare(hidden, meta)
    extras_perturbed = group.prepare(perturbed, meta)
    keep = meta.evidence_mask.reshape(-1)
    assert torch.equal(extras_perturbed["context"][keep], extras["context"][keep])
    assert torch.equal(extras_perturbed["s_evd"][keep], extras["s_evd"][keep])
    # Perturbing an evidence (prompt) position does move the answers' context.
    prompt_moved = hidden.clone()
    prompt_moved[0, 4] += 1.0
    answers = meta.answer_mask.reshape(-1)
    assert not torch.allclose(group.prepare(prompt_moved, meta)["context"][answers], extras["context"][answers])


def test_alpha_one_is_the_memory_ffn_and_upcycled_memory_is_the_dense_mlp():
    group, meta, dense = make_group(alpha="fixed"), make_meta(), dense_mlp()
    group.upcycle_from(dense)
    with torch.no_grad():
        group.evidence_gate_up_proj.normal_()  # an evidence branch far from the memory branch
    group.fixed_alpha = 1.0
    torch.manual_seed(4)
    hidden = torch.randn(2, 10, HIDDEN)
    extras = group.prepare(hidden, meta)
    tokens = hidden.reshape(-1, HIDDEN)
    dense_out = dense(tokens)
    for expert in range(EXPERTS):
        out = group.expert_forward(expert, tokens, extras)
        memory = torch.nn.functional.linear(
            torch.nn.functional.silu(tokens @ group.gate_up_proj[expert, :WIDTH].T)
            * (tokens @ group.gate_up_proj[expert, WIDTH:].T),
            group.down_proj[expert],
        )
        torch.testing.assert_close(out, memory, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out, dense_out, rtol=1e-6, atol=1e-6)
    group.fixed_alpha = 0.0
    evidence_only = group.expert_forward(0, tokens, group.prepare(hidden, meta))
    assert not torch.allclose(evidence_only, dense_out, atol=1e-3)


def test_upcycled_group_reproduces_the_dense_mlp_for_any_alpha_and_context():
    group, meta, dense = make_group(), make_meta(), dense_mlp()
    group.upcycle_from(dense)
    torch.manual_seed(5)
    hidden = torch.randn(2, 10, HIDDEN)
    out, extras = group_output(group, hidden, meta)
    assert extras["context"].abs().sum() > 0  # the context is there, W3's context columns are 0
    real = meta.attention_mask
    torch.testing.assert_close(out[real], dense(hidden[real]), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))


def test_alpha_starts_at_alpha_init():
    group, meta = make_group(alpha_init=0.3), make_meta()
    with torch.no_grad():
        group.alpha_weight.zero_()  # make_group randomises it; the constructor leaves it at 0
    fresh = EvidenceExperts(EXPERTS, HIDDEN, WIDTH, "silu", EvidenceConfig(heads=HEADS, alpha_init=0.3))
    assert torch.equal(fresh.alpha_weight, torch.zeros(EXPERTS, HIDDEN))
    torch.testing.assert_close(torch.sigmoid(fresh.alpha_bias), torch.full((EXPERTS,), 0.3))
    extras = group.prepare(torch.randn(2, 10, HIDDEN), meta)
    torch.testing.assert_close(extras["alpha"], torch.full((20, EXPERTS), 0.3))
    torch.testing.assert_close(group.scalars()["alpha"], torch.tensor(0.3))

    fixed = make_group(alpha="fixed", alpha_init=0.7)
    assert not any("alpha" in name for name, _ in fixed.named_parameters())
    assert torch.equal(fixed.prepare(torch.randn(2, 10, HIDDEN), meta)["alpha"], torch.full((20, EXPERTS), 0.7))


def test_scalars_average_over_real_language_tokens():
    group, meta = make_group(), make_meta()
    extras = group.prepare(torch.randn(2, 10, HIDDEN), meta)
    language = (meta.attention_mask & ~meta.vision_mask).reshape(-1)
    scalars = group.scalars()
    torch.testing.assert_close(scalars["s_evd"], extras["s_evd"][language].mean())
    torch.testing.assert_close(scalars["alpha"], extras["alpha"][language].mean())
    assert not scalars["alpha"].requires_grad and not scalars["s_evd"].requires_grad


def test_logit_bias_is_s_evd_when_on_and_none_when_off():
    meta = make_meta()
    hidden = torch.randn(2, 10, HIDDEN)
    on = make_group()
    extras = on.prepare(hidden, meta)
    assert torch.equal(on.logit_bias(extras), extras["s_evd"])
    assert extras["s_evd"].dtype == torch.float32
    has_evidence = meta.evidence_mask.cummax(dim=1).values.reshape(-1)
    assert (extras["s_evd"][has_evidence] > 0).all() and (extras["s_evd"][has_evidence] < 1).all()
    off = make_group(route_bias=False)
    off_extras = off.prepare(hidden, meta)
    assert off.logit_bias(off_extras) is None
    assert "s_evd" not in off_extras and "s_evd" not in off.scalars()
    assert not hasattr(off, "route_weight")


def moe_block(route_bias: bool, upcycle_from=None) -> tuple[MoEBlock, MoEState]:
    cfg = load(
        None,
        [
            "model.moe.groups.language.kind=evidence",
            "model.moe.groups.language.num_experts=2",
            f"model.moe.evidence.heads={HEADS}",
            f"model.moe.evidence.route_bias={str(route_bias).lower()}",
        ],
    )
    torch.manual_seed(6)
    groups = build_groups(cfg.model.moe, HIDDEN, WIDTH, "silu")
    if upcycle_from is not None:
        for group in groups.values():
            group.upcycle_from(upcycle_from)
    state = MoEState()
    return MoEBlock(1, HIDDEN, groups, cfg.model.moe, state), state


def test_route_bias_raises_the_evidence_experts_routing_probability():
    with_bias, state_on = moe_block(route_bias=True)
    without_bias, state_off = moe_block(route_bias=False)
    with torch.no_grad():
        with_bias.groups["language"].route_weight.normal_()
    missing = without_bias.load_state_dict(with_bias.state_dict(), strict=False)
    assert missing.unexpected_keys == ["groups.language.route_weight"] and not missing.missing_keys
    meta = make_meta()
    hidden = torch.randn(2, 10, HIDDEN)
    for block, state in ((with_bias, state_on), (without_bias, state_off)):
        state.set(meta)
        block(hidden)
    # Language router columns: shared experts 0-1, evidence experts 2-3.
    probs_on = state_on.records[1].scalars["balance_P/language"]
    probs_off = state_off.records[1].scalars["balance_P/language"]
    assert (probs_on[2:] > probs_off[2:]).all() and (probs_on[:2] < probs_off[:2]).all()
    # The vision router has no evidence experts and is untouched.
    vision_on, vision_off = (state.records[1].scalars["balance_P/vision"] for state in (state_on, state_off))
    torch.testing.assert_close(vision_on, vision_off)
    assert {"language/alpha", "language/s_evd"} <= set(state_on.records[1].scalars)
    assert "language/s_evd" not in state_off.records[1].scalars


def test_upcycled_moe_block_with_evidence_experts_reproduces_the_dense_ffn():
    dense = dense_mlp()
    block, state = moe_block(route_bias=True, upcycle_from=dense)
    meta = make_meta()
    state.set(meta)
    hidden = torch.randn(2, 10, HIDDEN)
    out = block(hidden)
    real = meta.attention_mask
    torch.testing.assert_close(out[real], dense(hidden[real]), rtol=1e-5, atol=1e-6)


def test_a_sample_without_evidence_gets_zero_context_and_finite_outputs():
    group, meta = make_group(), make_meta()
    meta.evidence_mask[1] = False
    hidden = torch.randn(2, 10, HIDDEN, requires_grad=True)
    out, extras = group_output(group, hidden, meta)
    context = extras["context"].reshape(2, 10, HIDDEN)
    assert torch.equal(context[1], torch.zeros(10, HIDDEN))
    assert context[0].abs().sum() > 0
    assert torch.equal(extras["s_evd"].reshape(2, 10)[1], torch.zeros(10))
    assert torch.isfinite(out).all()
    (out.square().sum() + group.logit_bias(extras).sum()).backward()
    assert torch.isfinite(hidden.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in group.parameters())


def test_gradients_reach_every_branch_and_zero_token_experts_get_zero():
    group, meta = make_group(), make_meta()
    hidden = torch.randn(2, 10, HIDDEN)
    routing = every_token_routing(meta, experts=2)  # experts 0 and 1 only; expert 2 gets no token
    out, extras = group_output(group, hidden, meta, routing)
    (out.square().sum() + group.logit_bias(extras).sum()).backward()
    attention = group.cross_attention
    for param in (attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight, attention.o_proj.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert group.route_weight.grad.abs().sum() > 0
    per_expert = ("gate_up_proj", "down_proj", "evidence_gate_up_proj", "evidence_down_proj")
    for name in per_expert + ("alpha_weight", "alpha_bias"):
        grad = getattr(group, name).grad
        assert grad[:2].abs().reshape(2, -1).sum(-1).gt(0).all(), name
        assert torch.equal(grad[2], torch.zeros_like(grad[2])), name
    # W3's context columns are trained too.
    assert group.evidence_gate_up_proj.grad[0, :, HIDDEN:].abs().sum() > 0


def test_upcycled_context_columns_get_gradient_from_the_first_step():
    group, meta = make_group(), make_meta()
    group.upcycle_from(dense_mlp())
    out, _ = group_output(group, torch.randn(2, 10, HIDDEN), meta)
    out.square().sum().backward()
    assert group.evidence_gate_up_proj.grad[0, :, HIDDEN:].abs().sum() > 0
    assert group.cross_attention.q_proj.weight.grad.abs().sum() == 0  # opens once those columns move


def test_heads_must_divide_the_hidden_size():
    with pytest.raises(ConfigError, match="model.moe.evidence.heads"):
        EvidenceExperts(2, HIDDEN, WIDTH, "silu", EvidenceConfig(heads=3))


def test_packed_positions_round_trip_and_put_zeros_elsewhere():
    mask = torch.tensor([[False, True, False, True, True], [True, False, False, False, False]])
    packed = PackedPositions.of(mask)
    assert packed.index.shape == (2, 3) and not packed.every
    assert packed.index[0].tolist() == [1, 3, 4] and packed.index[1, 0] == 0
    assert packed.valid.tolist() == [[True, True, True], [True, False, False]]
    assert all(len(set(row.tolist())) == 3 for row in packed.index)  # distinct: an injective scatter
    states = torch.randn(2, 5, 3, requires_grad=True)
    back = packed.scatter(packed.gather(states))
    assert torch.equal(back[mask], states[mask]) and torch.equal(back[~mask], torch.zeros_like(back[~mask]))
    back.sum().backward()
    assert torch.equal(states.grad, mask.unsqueeze(-1).float().expand_as(states))
    every = PackedPositions.of(torch.ones(2, 5, dtype=torch.bool))
    assert every.every and every.gather(states) is states and every.scatter(states) is states


def test_attention_for_the_reachable_positions_only_equals_the_full_one_there():
    """The block packs the language tokens (its evidence group's only router): same values and gradients."""
    group, meta = make_group(), make_meta()
    hidden = torch.randn(2, 10, HIDDEN, requires_grad=True)
    full = group.prepare(hidden, meta)
    language = meta.reachable(("language",))
    packed = group.prepare(hidden, meta, language)
    assert meta.packed(language) is meta.packed(language)  # packed once per batch
    flat = language.reshape(-1)
    for key in ("context", "s_evd", "alpha"):
        torch.testing.assert_close(packed[key][flat], full[key][flat], rtol=0, atol=1e-6)
    assert torch.equal(packed["context"][~flat], torch.zeros_like(packed["context"][~flat]))
    grads = []
    for extras in (full, packed):
        loss = (extras["context"][flat].square().sum() + extras["s_evd"][flat].sum()).float()
        grads.append(torch.autograd.grad(loss, [hidden, *group.parameters()], allow_unused=True))
    for full_grad, packed_grad in zip(*grads, strict=True):
        if full_grad is None:
            assert packed_grad is None
        else:
            torch.testing.assert_close(packed_grad, full_grad, rtol=1e-5, atol=1e-6)
    # In modality routing the block hands the evidence group exactly the language tokens.
    block, _ = moe_block(route_bias=True)
    assert block.group_routers["language"] == ("language",) and block.group_routers["shared"] == ("vision", "language")
    assert torch.equal(meta.reachable(block.group_routers["shared"]), meta.valid)


@pytest.mark.parametrize("threads", [2, 3])
def test_query_chunks_for_a_parallel_cpu_backward_give_the_same_attention(threads, monkeypatch):
    """One sample, one head: with more threads than (sample, head) pairs the queries run as chunks (GQA heads)."""
    generator = torch.Generator().manual_seed(7)
    evidence = torch.rand(1, 23, generator=generator) > 0.4
    mask = EvidenceMask.of(evidence, torch.arange(6, 23).unsqueeze(0))  # 17 queries: 3 chunks need a padded one
    query, key, value = (torch.randn(1, 1, n, 8, generator=generator, dtype=torch.float64) for n in (17, 23, 23))
    for tensor in (query, key, value):
        tensor.requires_grad_()
    grad = torch.randn(1, 1, 17, 8, generator=generator, dtype=torch.float64)
    results = []
    for thread_count in (1, threads):
        monkeypatch.setattr(torch, "get_num_threads", lambda count=thread_count: count)
        out, has_evidence = evidence_attention(query, key, value, mask)
        results.append((out, *torch.autograd.grad(out, (query, key, value), grad)))
    reference = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask.allowed)
    torch.testing.assert_close(results[0][0], reference * has_evidence[:, None, :, None], rtol=0, atol=1e-12)
    for single, chunked in zip(*results, strict=True):
        torch.testing.assert_close(chunked, single, rtol=0, atol=1e-12)


def test_one_evidence_mask_per_batch_serves_both_attentions_of_every_layer():
    first, second, meta = make_group(), make_group(), make_meta()
    hidden = torch.randn(2, 10, HIDDEN)
    language = meta.reachable(("language",))
    first.prepare(hidden, meta, language)
    masks = [value for key, value in meta._memo.items() if key[0] == "evidence_mask"]
    second.prepare(hidden, meta, language)
    assert len(masks) == 1 and [v for k, v in meta._memo.items() if k[0] == "evidence_mask"] == masks
    # Its additive form is SDPA's reading of the bool mask: 0 where allowed, -inf elsewhere.
    additive = masks[0].additive(torch.float32)
    assert torch.equal(additive == 0, masks[0].allowed) and bool(additive[~masks[0].allowed].eq(float("-inf")).all())
