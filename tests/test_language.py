"""Language models loaded from local directories (saved by the test) get MoE layers and train."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from asymoe.config import ConfigError, load
from asymoe.models.moe import MoEBlock
from asymoe.models.vlm import VisionLanguageModel
from conftest import TINY, save_tiny_lm


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_local_pretrained_lm_gets_moe_and_trains(arch, tmp_path):
    save_tiny_lm(tmp_path / arch, arch)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / arch)
    cfg = load(None, TINY + [f"model.language.pretrained_path={tmp_path / arch}", "model.moe.layers=all"])
    model = VisionLanguageModel(cfg.model, vocab_size=64, image_token_id=4)
    blocks = [m for m in model.lm.modules() if isinstance(m, MoEBlock)]
    assert len(blocks) == 2
    # Weights came from the directory: embeddings identical, experts upcycled from its FFNs.
    torch.testing.assert_close(model.lm.get_input_embeddings().weight, reference.get_input_embeddings().weight)
    dense_gate = reference.model.layers[1].mlp.gate_proj.weight
    torch.testing.assert_close(blocks[1].groups["shared"].gate_up_proj[0, :64], dense_gate)
    ids = torch.randint(5, 64, (2, 10))
    ids[:, 1:5] = 4
    mask = torch.ones_like(ids, dtype=torch.bool)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        out = model(
            ids,
            mask,
            mask,
            torch.zeros_like(mask),
            torch.tensor([0, 1]),
            pixel_values=torch.randn(2, 3, 64, 64),
            labels=ids,
        )
        loss = out.lm_loss + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_mlp_with_an_activation_the_config_does_not_name_is_refused(tmp_path):
    # BLOOM's MLP is two linears around its own GELU module, which no config activation key names.
    config = AutoConfig.for_model("bloom", vocab_size=64, hidden_size=32, n_layer=2, n_head=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "bloom")
    cfg = load(None, TINY + [f"model.language.pretrained_path={tmp_path / 'bloom'}"])
    with pytest.raises(ConfigError, match="cannot tell the activation of BloomMLP from the model config"):
        VisionLanguageModel(cfg.model, vocab_size=64, image_token_id=4)


def test_moe_layer_outside_pretrained_model(tmp_path):
    save_tiny_lm(tmp_path / "llama", "llama")
    cfg = load(None, TINY + [f"model.language.pretrained_path={tmp_path / 'llama'}", "model.moe.layers=[5]"])
    with pytest.raises(ConfigError, match="index 5 is outside the language model's 2 layers"):
        VisionLanguageModel(cfg.model, vocab_size=64, image_token_id=4)
