"""Every supported LM family: a tiny model saved by the test loads, upcycles exactly and trains.

Each family is built from its own transformers config (hidden 32, 2 layers), saved to a temporary
directory and loaded through `model.language.pretrained_path`. Upcycled MoE layers must leave the
logits equal to the dense model's; a sparse checkpoint's experts and router map with equal outputs.
"""

from __future__ import annotations

import typing

import pytest
import torch
from transformers import AutoModelForCausalLM

from asymoe.config import ConfigError, load
from asymoe.config.schema import LMArch
from asymoe.models.adapters import PlainFFNExperts
from asymoe.models.experts import FFNExperts
from asymoe.models.moe import MoEBlock
from asymoe.models.vlm import VisionLanguageModel
from conftest import TINY, TINY_LM, save_tiny_lm

COMMON = TINY_LM
VOCAB = COMMON["vocab_size"]
IMAGE_TOKEN = 4
HEADED = dict(COMMON, head_dim=16)

# model_type -> (config kwargs, the MLP layout its adapter reads)
FAMILIES = {
    "llama": (COMMON, "separate_gated"),
    "mistral": (COMMON, "separate_gated"),
    "qwen2": (COMMON, "separate_gated"),
    "qwen3": (HEADED, "separate_gated"),
    "phi3": (COMMON, "fused_gated"),
    "gemma": (HEADED, "separate_gated"),
    "gemma2": (HEADED, "separate_gated"),
    "olmo2": (COMMON, "separate_gated"),
    "granite": (COMMON, "separate_gated"),
    "gpt2": (
        dict(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "non_gated",
    ),
    "phi": (dict(COMMON, resid_pdrop=0.0, embd_pdrop=0.0), "non_gated"),
}
SPARSE = {
    "mixtral": dict(COMMON, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(COMMON, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
    "qwen3_moe": dict(
        HEADED,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
}


def save(directory, model_type: str, kwargs: dict) -> AutoModelForCausalLM:
    save_tiny_lm(directory, model_type, **kwargs)
    return AutoModelForCausalLM.from_pretrained(directory).eval()


def build(path, extra: list[str]) -> VisionLanguageModel:
    cfg = load(None, TINY + [f"model.language.pretrained_path={path}"] + extra)
    torch.manual_seed(0)
    return VisionLanguageModel(cfg.model, vocab_size=VOCAB, image_token_id=IMAGE_TOKEN)


def text_logits(model: VisionLanguageModel, ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids, dtype=torch.bool)
    no_image = torch.full((ids.shape[0],), -1)
    return model(ids, mask, mask, torch.zeros_like(mask), no_image).logits


def train_steps(model: VisionLanguageModel, steps: int = 2) -> list[float]:
    torch.manual_seed(1)
    ids = torch.randint(5, VOCAB, (2, 10))
    ids[:, 1 : 1 + model.num_image_tokens] = IMAGE_TOKEN
    mask = torch.ones_like(ids, dtype=torch.bool)
    pixels = torch.randn(2, 3, 64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(ids, mask, mask, torch.zeros_like(mask), torch.tensor([0, 1]), pixel_values=pixels, labels=ids)
        loss = out.lm_loss + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_upcycles_exactly_and_trains(model_type, tmp_path):
    kwargs, layout = FAMILIES[model_type]
    reference = save(tmp_path / model_type, model_type, kwargs)
    model = build(tmp_path / model_type, ["model.moe.layers=all"]).eval()
    blocks = [m for m in model.lm.modules() if isinstance(m, MoEBlock)]
    assert len(blocks) == 2
    expert_class = PlainFFNExperts if layout == "non_gated" else FFNExperts
    assert all(isinstance(group, expert_class) for block in blocks for group in block.groups.values())
    ids = torch.randint(5, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(text_logits(model, ids), reference(ids).logits, atol=1e-5, rtol=1e-5)
    losses = train_steps(model)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]


@pytest.mark.parametrize("model_type", sorted(SPARSE))
def test_sparse_checkpoint_experts_map_with_equal_outputs(model_type, tmp_path):
    reference = save(tmp_path / model_type, model_type, SPARSE[model_type])
    # Shared mode, 4 experts in one pool: checkpoint experts 0..3 become shared experts 0..3.
    groups = [
        "model.moe.groups.vision.num_experts=0",
        "model.moe.groups.shared.num_experts=4",
        "model.moe.groups.language.num_experts=0",
    ]
    model = build(tmp_path / model_type, groups + ["model.moe.layers=all", "model.moe.routing.mode=shared"]).eval()
    ids = torch.randint(5, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(text_logits(model, ids), reference(ids).logits, atol=1e-5, rtol=1e-5)
    assert train_steps(model, steps=1)[0] > 0


def test_sparse_checkpoint_fills_groups_in_global_order(tmp_path):
    reference = save(tmp_path / "mixtral", "mixtral", SPARSE["mixtral"])
    model = build(tmp_path / "mixtral", ["model.moe.layers=all"])  # modality mode, vision 1 + shared 2 + language 1
    block = model.lm.model.layers[0].mlp
    sparse = reference.model.layers[0].mlp
    torch.testing.assert_close(block.groups["vision"].gate_up_proj[0], sparse.experts.gate_up_proj[0])
    torch.testing.assert_close(block.groups["shared"].down_proj, sparse.experts.down_proj[1:3])
    torch.testing.assert_close(block.groups["language"].gate_up_proj[0], sparse.experts.gate_up_proj[3])
    torch.testing.assert_close(block.routers["vision"].weight, sparse.gate.weight[[0, 1, 2]])
    torch.testing.assert_close(block.routers["language"].weight, sparse.gate.weight[[1, 2, 3]])


def test_sparse_checkpoint_refusals(tmp_path):
    save(tmp_path / "mixtral", "mixtral", SPARSE["mixtral"])
    with pytest.raises(ConfigError, match=r"has 4 experts but the configured groups hold 3"):
        build(tmp_path / "mixtral", ["model.moe.layers=all", "model.moe.groups.shared.num_experts=1"])
    with pytest.raises(ConfigError, match=r"must include every sparse layer of the checkpoint \(\[0, 1\]\)"):
        build(tmp_path / "mixtral", ["model.moe.layers=[1]"])
    save(
        tmp_path / "qwen2_moe",
        "qwen2_moe",
        dict(
            COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64
        ),
    )
    with pytest.raises(ConfigError, match="sigmoid-gated shared expert"):
        build(tmp_path / "qwen2_moe", ["model.moe.layers=all"])
    save(tmp_path / "olmoe", "olmoe", dict(SPARSE["olmoe"], norm_topk_prob=False))
    with pytest.raises(ConfigError, match="norm_topk_prob=false"):
        build(tmp_path / "olmoe", ["model.moe.layers=all"])


def test_non_gated_mlp_refuses_gated_only_groups(tmp_path):
    save(tmp_path / "gpt2", "gpt2", FAMILIES["gpt2"][0])
    with pytest.raises(ConfigError, match="needs a gated MLP; this language model's MLP is non-gated"):
        build(tmp_path / "gpt2", ["model.moe.groups.language.kind=evidence"])


@pytest.mark.parametrize("arch", typing.get_args(LMArch))
def test_scratch_family_builds_and_upcycles_exactly(arch):
    def scratch(extra: list[str]) -> VisionLanguageModel:
        cfg = load(None, TINY + [f"model.language.arch={arch}"] + extra)
        torch.manual_seed(0)
        return VisionLanguageModel(cfg.model, vocab_size=VOCAB, image_token_id=IMAGE_TOKEN).eval()

    dense, moe = scratch(["model.moe.enabled=false"]), scratch(["model.moe.layers=all"])
    assert moe.lm.config.model_type == arch and moe.lm.config.head_dim == 16 and len(moe.moe_blocks()) == 2
    ids = torch.randint(5, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(text_logits(moe, ids), text_logits(dense, ids), atol=1e-5, rtol=1e-5)


def test_non_gated_experts_agree_across_backends(tmp_path):
    save(tmp_path / "gpt2", "gpt2", FAMILIES["gpt2"][0])
    ids = torch.randint(5, VOCAB, (2, 9))
    logits = {}
    for backend in ("eager", "segment", "padded"):
        # Random (not upcycled) experts, the same for every backend: any mix-up of experts shows.
        model = build(tmp_path / "gpt2", ["model.moe.upcycle=false", f"model.moe.experts_backend={backend}"]).eval()
        with torch.no_grad():
            logits[backend] = text_logits(model, ids)
    torch.testing.assert_close(logits["segment"], logits["eager"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["padded"], logits["eager"], atol=1e-5, rtol=1e-5)
