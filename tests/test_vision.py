"""Vision encoders: CNN and ViT token layouts, local weights, freezing, feature levels, preprocessing,
and any timm model chosen from the command line (its kwargs not inherited from the base config)."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image

from asymoe.config import ConfigError, load
from asymoe.data.datamodule import ImageStore
from asymoe.models.vision import Preprocessing, VisionEncoder, resolve_preprocessing
from asymoe.models.vlm import VisionLanguageModel
from conftest import TINY


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
    channels = "model.vision.model_kwargs.channels=[8,16,32,64]"
    enc = encoder([channels, f"model.vision.pretrained_path={tmp_path / 'encoder.pth'}"])
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(enc.model.state_dict()[name], value)
    torch.save({"unrelated": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match="lacks .* weights"):
        encoder([channels, f"model.vision.pretrained_path={tmp_path / 'wrong.pth'}"])


def test_safetensors_weights_are_loaded(tmp_path):
    from safetensors.torch import save_file

    overrides = ["model.vision.model_name=vit_tiny_patch16_224", "model.vision.model_kwargs.depth=1",
                 "model.vision.image_size=32"]  # fmt: skip
    reference = encoder(overrides).model
    save_file(reference.state_dict(), str(tmp_path / "vit.safetensors"))
    loaded = encoder(overrides + [f"model.vision.pretrained_path={tmp_path / 'vit.safetensors'}"])
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], value)


def test_frozen_encoder_gets_no_gradient_and_keeps_statistics():
    enc = encoder(["model.vision.model_kwargs.channels=[8,16,32,64]", "model.vision.freeze=true"])
    enc.train()
    before = {k: v.clone() for k, v in enc.model.state_dict().items()}
    out = enc(torch.randn(4, 3, 64, 64))
    assert not out.requires_grad
    assert all(not p.requires_grad for p in enc.parameters())
    for name, value in enc.model.state_dict().items():
        torch.testing.assert_close(value, before[name], msg=name)  # BatchNorm running stats untouched


def test_a_new_model_name_does_not_inherit_the_base_kwargs(tmp_path):
    base = load("base").model.vision
    assert base.model_name == "resnet10t" and "channels" in base.model_kwargs
    vit = ["model.vision.model_name=vit_tiny_patch16_224"]
    assert load("base", vit).model.vision.model_kwargs == {}
    assert load("base", vit + ["model.vision.model_kwargs.depth=2"]).model.vision.model_kwargs == {"depth": 2}
    assert load("base", ["model.vision.model_kwargs={}"]).model.vision.model_kwargs == {}
    assert load("base", ["model.vision.model_kwargs=null"]).model.vision.model_kwargs == {}
    # Same name: kwargs still merge key by key.
    merged = load("base", ["model.vision.model_name=resnet10t", "model.vision.model_kwargs.stem_width=8"])
    assert merged.model.vision.model_kwargs == {"channels": [32, 64, 128, 256], "stem_width": 8}
    # An experiment file that extends the base and switches the model gets the same rule.
    child = tmp_path / "vit.yaml"
    child.write_text(f"extends: {load('base').source_file}\nmodel:\n  vision:\n    model_name: vit_tiny_patch16_224\n")
    assert load(str(child)).model.vision.model_kwargs == {}


def test_tiny_vit_from_overrides_builds_and_runs():
    overrides = [o for o in TINY if not o.startswith("model.vision.model_kwargs")] + [
        "model.vision.model_name=vit_tiny_patch16_224",
        "model.vision.model_kwargs.depth=2",
        "model.vision.image_size=32",
    ]
    cfg = load("base", overrides)
    model = VisionLanguageModel(cfg.model, vocab_size=64, image_token_id=4)
    assert model.num_image_tokens == 4 and model.vision.out_dim == 192  # (32/16)^2 patches of width 192
    ids = torch.randint(5, 64, (2, 8))
    ids[:, 1:5] = 4
    mask = torch.ones_like(ids, dtype=torch.bool)
    out = model(ids, mask, mask, mask, torch.tensor([0, 1]), pixel_values=torch.randn(2, 3, 32, 32), labels=ids)
    assert out.logits.shape == (2, 8, 64) and torch.isfinite(out.lm_loss)
    out.lm_loss.backward()
    assert model.vision.model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_prefix_tokens_kept_in_front_of_the_patches():
    overrides = [
        "model.vision.model_name=vit_tiny_patch16_224",
        "model.vision.model_kwargs.depth=1",
        "model.vision.image_size=32",
    ]
    dropped = encoder(overrides)
    kept = encoder(overrides + ["model.vision.keep_prefix_tokens=true"])
    kept.load_state_dict(dropped.state_dict())
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        patches, with_cls = dropped.eval()(pixels), kept.eval()(pixels)
    assert with_cls.shape == (1, 5, 192) and kept.num_tokens == 5
    torch.testing.assert_close(with_cls[:, 1:], patches)
    with pytest.raises(ConfigError, match="keep_prefix_tokens=true: 'resnet10t' has no class or register tokens"):
        encoder(["model.vision.model_kwargs.channels=[8,16,32,64]", "model.vision.keep_prefix_tokens=true"])


def test_preprocessing_from_the_timm_pretrained_config(tmp_path):
    vit = resolve_preprocessing(
        load(None, ["model.vision.model_name=vit_tiny_patch16_224", "model.vision.image_size=null"]).model.vision
    )
    assert vit == Preprocessing(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
    resnet = resolve_preprocessing(load(None, ["model.vision.interpolation=bilinear"]).model.vision)
    assert resnet == Preprocessing(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
    # The image store normalises with the encoder's mean and std: hand-computed for one pixel value.
    Image.new("RGB", (2, 2), (255, 0, 51)).save(tmp_path / "red.png")
    preprocessing = Preprocessing(2, (0.5, 0.25, 0.2), (0.5, 0.5, 0.1), "nearest")
    store = ImageStore({"red": str(tmp_path / "red.png")}, preprocessing)
    expected = torch.tensor([(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.5, (0.2 - 0.2) / 0.1]).view(3, 1, 1).expand(3, 2, 2)
    torch.testing.assert_close(store("red"), expected)
    with pytest.raises(ConfigError, match="model.vision.mean must be 3 numbers"):
        load(None, ["model.vision.mean=[0.5,0.5]"])
