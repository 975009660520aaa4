"""Vision encoder: any timm model by name, producing a sequence of visual tokens.

ViTs give their patch tokens (prefix/class tokens dropped), CNNs the positions of a feature map;
both come from timm's `forward_intermediates`, in NCHW layout, flattened to (N, H*W, C).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from asymoe.config import ConfigError, VisionConfig


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        if not timm.is_model(config.model_name):
            close = timm.list_models(f"*{config.model_name.split('_')[0]}*")[:5]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise ConfigError(f"model.vision.model_name='{config.model_name}' is not a timm model{hint}")
        kwargs = dict(config.model_kwargs)
        if "vit" in config.model_name or "deit" in config.model_name:
            kwargs.setdefault("img_size", config.image_size)
        try:
            self.model = timm.create_model(config.model_name, pretrained=False, num_classes=0, **kwargs)
        except TypeError as error:
            raise ConfigError(f"model.vision.model_kwargs rejected by timm '{config.model_name}': {error}") from None
        if config.pretrained_path is not None:
            self.load_local_weights(Path(config.pretrained_path))
        if not hasattr(self.model, "forward_intermediates"):
            raise ConfigError(
                f"model.vision.model_name='{config.model_name}' has no forward_intermediates in this timm version"
            )
        self.select_layer = config.select_layer
        self.freeze = config.freeze
        if config.freeze:
            self.model.requires_grad_(False)
        # Probe the token layout in eval mode: a train-mode forward would move BatchNorm statistics.
        training = self.model.training
        self.model.eval()
        with torch.no_grad():
            probe = self.tokens(torch.zeros(1, 3, config.image_size, config.image_size))
        self.model.train(training)
        self.num_tokens = probe.shape[1]
        self.out_dim = probe.shape[2]

    def load_local_weights(self, path: Path) -> None:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("head", "fc."))]
        if missing:
            raise ConfigError(
                f"model.vision.pretrained_path: {path} lacks {len(missing)} weights of '{type(self.model).__name__}' (first: {missing[0]})"
            )

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        (features,) = self.model.forward_intermediates(
            pixels, indices=[self.select_layer], intermediates_only=True
        )  # (N, C, H, W)
        return features.flatten(2).transpose(1, 2)  # (N, H*W, C)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.freeze:
            self.model.eval()
            with torch.no_grad():
                return self.tokens(pixels)
        return self.tokens(pixels)
