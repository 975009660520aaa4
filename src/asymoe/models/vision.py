"""Vision encoder: any timm model by name, producing a sequence of visual tokens, and its preprocessing.

ViTs give their patch tokens, CNNs the positions of a feature map; both come from timm's
`forward_intermediates`, in NCHW layout, flattened to (N, H*W, C). With `keep_prefix_tokens` a
ViT's class (and register) tokens are kept in front of its patch tokens.

Preprocessing (input size, mean, std, interpolation) comes from the timm model's pretrained config
(`timm.data.resolve_data_config`), each overridable by its config key; images are resized to a
square of that size (no crop) and normalised with that mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from asymoe.config import VisionConfig
from asymoe.errors import ConfigError


@dataclass(frozen=True)
class Preprocessing:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # a PIL resampling filter name: bicubic, bilinear, nearest, lanczos, ...


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ConfigError(f"model.vision.model_name='{name}' is not a timm model{hint}")


def resolve_preprocessing(config: VisionConfig) -> Preprocessing:
    """The config's size/mean/std/interpolation, each None taken from the timm model's pretrained config."""
    check_model_name(config.model_name)
    pretrained = timm.models.get_pretrained_cfg(config.model_name)
    data = resolve_data_config(pretrained_cfg=pretrained.to_dict() if pretrained else {})
    size = config.image_size if config.image_size is not None else data["input_size"][-1]
    mean = tuple(config.mean) if config.mean is not None else tuple(data["mean"])
    std = tuple(config.std) if config.std is not None else tuple(data["std"])
    interpolation = config.interpolation or data["interpolation"]
    return Preprocessing(size=int(size), mean=mean, std=std, interpolation=interpolation)


def create_timm_model(config: VisionConfig, size: int) -> nn.Module:
    kwargs = dict(config.model_kwargs)
    try:
        # Transformers take the input size (position embeddings are sized for it); CNNs refuse the key.
        return timm.create_model(config.model_name, pretrained=False, num_classes=0, **{"img_size": size, **kwargs})
    except TypeError as error:
        if "img_size" not in str(error) or "img_size" in kwargs:
            raise ConfigError(f"model.vision.model_kwargs rejected by timm '{config.model_name}': {error}") from None
    try:
        return timm.create_model(config.model_name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as error:
        raise ConfigError(f"model.vision.model_kwargs rejected by timm '{config.model_name}': {error}") from None


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.preprocessing = resolve_preprocessing(config)
        self.image_size = self.preprocessing.size
        self.model = create_timm_model(config, self.image_size)
        if config.pretrained_path is not None:
            self.load_local_weights(Path(config.pretrained_path))
        if not hasattr(self.model, "forward_intermediates"):
            raise ConfigError(
                f"model.vision.model_name='{config.model_name}' has no forward_intermediates in this timm version"
            )
        self.keep_prefix_tokens = config.keep_prefix_tokens
        if self.keep_prefix_tokens and not getattr(self.model, "num_prefix_tokens", 0):
            raise ConfigError(
                f"model.vision.keep_prefix_tokens=true: '{config.model_name}' has no class or register tokens"
            )
        self.select_layer = config.select_layer
        self.freeze = config.freeze
        if config.freeze:
            self.model.requires_grad_(False)
        # Probe the token layout in eval mode: a train-mode forward would move BatchNorm statistics.
        training = self.model.training
        self.model.eval()
        with torch.no_grad():
            probe = self.tokens(torch.zeros(1, 3, self.image_size, self.image_size))
        self.model.train(training)
        self.num_tokens = probe.shape[1]
        self.out_dim = probe.shape[2]

    def load_local_weights(self, path: Path) -> None:
        """A .safetensors file or a timm/torch checkpoint (state_dict, 'state_dict' / 'model' / EMA entries)."""
        try:
            state = timm.models.load_state_dict(str(path), use_ema=True)
        except Exception as error:  # unreadable file: name it, keep the first line of the cause
            reason = str(error).splitlines()[0]
            raise ConfigError(f"model.vision.pretrained_path: cannot read {path} ({reason})") from None
        missing, _ = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("head", "fc."))]
        if missing:
            raise ConfigError(
                f"model.vision.pretrained_path: {path} lacks {len(missing)} weights of "
                f"'{type(self.model).__name__}' (first: {missing[0]})"
            )

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.keep_prefix_tokens:
            (features,) = self.model.forward_intermediates(
                pixels, indices=[self.select_layer], intermediates_only=True
            )  # (N, C, H, W)
            return features.flatten(2).transpose(1, 2)  # (N, H*W, C)
        ((features, prefix),) = self.model.forward_intermediates(
            pixels, indices=[self.select_layer], intermediates_only=True, return_prefix_tokens=True
        )  # (N, C, H, W), (N, prefix, C)
        return torch.cat([prefix, features.flatten(2).transpose(1, 2)], dim=1)  # (N, prefix + H*W, C)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.freeze:
            self.model.eval()
            with torch.no_grad():
                return self.tokens(pixels)
        return self.tokens(pixels)
