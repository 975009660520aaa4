"""MoE block: Mixtral parity, upcycling exactness, checkpoint-recompute safety, empty groups."""

from __future__ import annotations

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from asymoe.config import load
from asymoe.models.moe import MoEState, TokenMeta
from asymoe.models.vlm import VisionLanguageModel
from conftest import TINY

VANILLA = [
    "model.moe.routing.mode=shared",
    "model.moe.groups.vision.num_experts=0",
    "model.moe.groups.shared.num_experts=4",
    "model.moe.groups.language.num_experts=0",
]


def tiny_model(overrides: list[str], seed: int = 0) -> VisionLanguageModel:
    cfg = load(None, TINY + overrides)
    torch.manual_seed(seed)
    return VisionLanguageModel(cfg.model, vocab_size=40, image_token_id=4)


def batch(num_image_tokens: int, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (3, 14), generator=generator)
    ids[:2, 1 : 1 + num_image_tokens] = 4
    attention = torch.ones_like(ids, dtype=torch.bool)
    attention[1, 11:] = False
    answer = torch.zeros_like(attention)
    answer[:, 10] = True
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "evidence_mask": attention & ~answer,
        "answer_mask": answer,
        "image_index": torch.tensor([0, 1, -1]),
        "pixel_values": torch.randn(2, 3, 64, 64, generator=generator),
        "labels": torch.where(attention, ids, -100),
    }


def test_vanilla_group_matches_mixtral_block():
    cfg = load(None, VANILLA + ["model.moe.routing.balance_coef.all=0"])
    hidden, width = 16, 32
    mixtral = MixtralSparseMoeBlock(
        MixtralConfig(hidden_size=hidden, intermediate_size=width, num_local_experts=4, num_experts_per_tok=2)
    ).float()
    torch.manual_seed(0)
    for param in mixtral.parameters():
        torch.nn.init.normal_(param, std=0.3)
    from asymoe.models.experts import FFNExperts
    from asymoe.models.moe import MoEBlock

    state = MoEState()
    block = MoEBlock(0, hidden, {"shared": FFNExperts(4, hidden, width)}, cfg.model.moe, state)
    with torch.no_grad():
        block.routers["all"].weight.copy_(mixtral.gate.weight)
        block.groups["shared"].gate_up_proj.copy_(mixtral.experts.gate_up_proj)
        block.groups["shared"].down_proj.copy_(mixtral.experts.down_proj)
    x = torch.randn(2, 7, hidden)
    mask = torch.ones(2, 7, dtype=torch.bool)
    state.set(TokenMeta(vision_mask=torch.zeros_like(mask), attention_mask=mask, evidence_mask=mask, answer_mask=~mask))
    torch.testing.assert_close(block(x), mixtral(x), atol=1e-5, rtol=1e-5)


def test_upcycled_moe_logits_equal_dense():
    dense = tiny_model(["model.moe.enabled=false"])
    for layout in (VANILLA, ["model.moe.layers=all", "model.moe.routing.top_k=1"], ["model.moe.layers=[0]"]):
        moe = tiny_model(layout)
        # Same seed, same construction order: the dense parts are identical; experts are copies.
        dense.eval(), moe.eval()
        data = batch(dense.num_image_tokens)
        data.pop("labels")
        with torch.no_grad():
            expected = dense(**data).logits
            got = moe(**data).logits
        valid = data["attention_mask"]
        torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)


def test_metadata_survives_activation_checkpointing():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(["model.moe.routing.balance_coef.vision=0.1", "model.moe.routing.balance_coef.language=0.1"])
        model.train()
        if checkpointing:
            # transformers >= 5.x renamed gradient_checkpointing_enable (the old name warns).
            enable = getattr(model.lm, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(**batch(model.num_image_tokens))
        (out.lm_loss + out.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_every_group_gets_gradients_with_text_only_batch():
    model = tiny_model([])
    data = batch(model.num_image_tokens)
    data["input_ids"][:2, 1 : 1 + model.num_image_tokens] = 7
    data["image_index"] = torch.tensor([-1, -1, -1])
    data["pixel_values"] = None
    out = model(**data)
    (out.lm_loss + out.aux_loss).backward()
    for block in model.moe_blocks():
        for name, param in block.named_parameters():
            assert param.grad is not None, f"{name} left out of the graph"
            assert torch.isfinite(param.grad).all()
    vision_router = model.moe_blocks()[0].routers["vision"].weight.grad
    assert torch.count_nonzero(vision_router) == 0


def test_parameter_table_activated_counts():
    model = tiny_model([])
    table = model.parameter_table()
    block = model.moe_blocks()[0]
    expert = block.groups["shared"].expert_parameter_count()
    assert expert == 3 * 32 * 64
    dense = tiny_model(["model.moe.enabled=false"]).parameter_table()
    # MoIIE 1+2+1 top-2 with equal experts: each token activates 2 experts where the dense has 1 FFN.
    assert table["activated_per_language_token"] == dense["activated_per_language_token"] + expert + sum(
        p.numel() for p in block.routers.parameters()
    )
    assert table["total"] == dense["total"] + 3 * expert + sum(p.numel() for p in block.routers.parameters())


def test_parameter_table_counts_the_evidence_cross_attention_in_full():
    evidence = ["model.moe.groups.language.kind=evidence", "model.moe.groups.language.num_experts=2"]
    model = tiny_model(evidence + ["model.moe.routing.top_k=1"])
    dense = tiny_model(["model.moe.enabled=false"]).parameter_table()
    table = model.parameter_table()
    d, f, layers = 32, 64, len(model.moe_blocks())
    router = sum(p.numel() for p in model.moe_blocks()[0].routers.parameters())
    ffn_expert = 3 * d * f  # gate, up, down
    # Memory branch W1 (2f x d), W2 (d x f); evidence branch W3 (2f x 2d), W4 (d x f); gate w_alpha, b_alpha.
    evidence_expert = 2 * f * d + d * f + 2 * f * 2 * d + d * f + d + 1
    cross_attention = 4 * d * d  # q, k, v, o; runs for every token, whatever its expert
    route_weight = d  # w_evd of the routing bias
    # Top-1 among shared (FFN) and evidence experts: the evidence expert is the larger.
    per_layer_language = router + evidence_expert + cross_attention + route_weight
    assert table["activated_per_language_token"] == (
        dense["activated_per_language_token"] + layers * (per_layer_language - ffn_expert)
    )
    # Vision tokens never reach the evidence group: its cross-attention is not theirs.
    assert table["activated_per_vision_token"] == dense["activated_per_vision_token"] + layers * router


def test_ltdr_top_a_applies_to_the_vision_router_only_and_trains():
    layout = [
        "model.moe.groups.vision.num_experts=2",
        "model.moe.groups.shared.num_experts=1",
        "model.moe.groups.language.num_experts=1",
        "model.moe.routing.top_k=2",
        "model.moe.routing.vision_tail.enabled=true",
        "model.moe.routing.vision_tail.top_a=3",
        "model.moe.experts_backend=eager",  # the spy below wraps the eager dispatch
    ]
    model = tiny_model(layout)
    block = model.moe_blocks()[0]
    with torch.no_grad():
        for router in block.routers.values():
            router.weight.normal_(std=3.0)  # spread the RPVs so that some vision tokens are tail tokens
    experts_used = {}
    for name, group in block.groups.items():
        original = group.dispatch

        def spy(tokens, index, weight, mask, extras, _name=name, _original=original):
            experts_used[_name] = mask.sum(-1)  # (tokens,) this group's experts per token
            return _original(tokens, index, weight, mask, extras)

        group.dispatch = spy
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = batch(model.num_image_tokens)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    out = model(**data)
    (out.lm_loss + out.aux_loss).backward()
    optimizer.step()
    assert torch.isfinite(out.lm_loss)
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())
    per_token = sum(experts_used.values()).reshape(data["input_ids"].shape)
    vision = data["input_ids"] == 4
    language = data["attention_mask"] & ~vision
    assert (per_token[language] == 2).all(), "language tokens use exactly top_k experts"
    assert set(per_token[vision].tolist()) == {2, 3}, "vision tail tokens use top_a = 3, head tokens top_k"


def test_generated_tokens_are_never_evidence():
    model = tiny_model([])
    model.eval()
    data = batch(model.num_image_tokens)
    prompt_lengths = torch.tensor([9, 6, 7])
    width = int(prompt_lengths.max())
    seen = []
    original = model.moe_state.set

    def record(meta):
        seen.append((meta.attention_mask.clone(), meta.evidence_mask.clone()))
        original(meta)

    model.moe_state.set = record
    model.generate(
        input_ids=data["input_ids"][:, :width],
        prompt_lengths=prompt_lengths,
        evidence_mask=torch.ones(3, width, dtype=torch.bool),  # also past the shorter prompts' ends
        image_index=data["image_index"],
        pixel_values=data["pixel_values"],
        max_new_tokens=4,
        eos_token_id=-1,  # never stops early: every step is checked
        pad_token_id=0,
    )
    assert len(seen) == 4
    for attention, evidence in seen:
        positions = torch.arange(attention.shape[1]).unsqueeze(0)
        in_prompt = positions < prompt_lengths.unsqueeze(1)
        assert torch.equal(evidence, attention & in_prompt), "evidence = the prompt positions, never a generated one"


def test_statistics_switch_skips_statistics_and_keeps_the_losses():
    model = tiny_model(["model.moe.routing.balance_coef.vision=0.1", "model.moe.routing.balance_coef.language=0.1"])
    model.eval()
    data = batch(model.num_image_tokens)
    with torch.no_grad():
        full = model(**data)
        records = dict(model.moe_state.records)
        model.moe_state.statistics = False
        bare = model(**data)
    assert all(record.scalars and record.expert_share for record in records.values())
    for layer, record in model.moe_state.records.items():
        assert not record.scalars and not record.expert_share and record.rpv is None
        assert record.losses.keys() == records[layer].losses.keys()
        for name, value in record.losses.items():
            torch.testing.assert_close(value, records[layer].losses[name])
    assert torch.equal(bare.logits, full.logits)
