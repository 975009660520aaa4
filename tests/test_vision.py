"""Vision encoders: CNN and ViT token layouts, local weights, freezing, feature levels."""

from __future__ import annotations

import pytest
import timm
import torch

from asymoe.config import ConfigError, load
from asymoe.models.vision import VisionEncoder


def encoder(overrides: list[str]) -> VisionEncoder:
    return VisionEncoder(load(None, overrides).model.vision)


def test_cnn_feature_map_positions_are_tokens():
    enc = encoder(["model.vision.model_kwargs.channels=[8,16,32,64]"])
    tokens = enc(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 4, 64) and enc.num_tokens == 4 and enc.out_dim == 64
    earlier = encoder(["model.vision.model_kwargs.channels=[8,16,32,64]", "model.vision.select_layer=-2"])
    assert earlier.num_tokens == 16 and earlier.out_dim == 32


def test_vit_patch_tokens_without_prefix():
    enc = encoder(["model.vision.model_name=vit_tiny_patch16_224", "model.vision.model_kwargs.depth=2"])
    tokens = enc(torch.randn(1, 3, 64, 64))
    assert tokens.shape == (1, 16, 192)  # (64/16)^2 patches, class token dropped


def test_local_weights_are_loaded(tmp_path):
    reference = timm.create_model("resnet10t", num_classes=0, channels=(8, 16, 32, 64))
    torch.save(reference.state_dict(), tmp_path / "encoder.pth")
    enc = encoder(["model.vision.model_kwargs.channels=[8,16,32,64]", f"model.vision.pretrained_path={tmp_path / 'encoder.pth'}"])
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(enc.model.state_dict()[name], value)
    torch.save({"unrelated": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match="lacks .* weights"):
        encoder(["model.vision.model_kwargs.channels=[8,16,32,64]", f"model.vision.pretrained_path={tmp_path / 'wrong.pth'}"])


def test_frozen_encoder_gets_no_gradient_and_keeps_statistics():
    enc = encoder(["model.vision.model_kwargs.channels=[8,16,32,64]", "model.vision.freeze=true"])
    enc.train()
    before = {k: v.clone() for k, v in enc.model.state_dict().items()}
    out = enc(torch.randn(4, 3, 64, 64))
    assert not out.requires_grad
    assert all(not p.requires_grad for p in enc.parameters())
    for name, value in enc.model.state_dict().items():
        torch.testing.assert_close(value, before[name], msg=name)  # BatchNorm running stats untouched
