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
