"""The causal language model: built from a config or loaded from a local directory, then MoE-ified.

Supported families are those whose decoder layers hold a gated MLP at `layer.mlp` with
gate_proj / up_proj / down_proj (Llama, Qwen2, Mistral). Other families are refused with a
message rather than half-converted.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from asymoe.config import GROUP_NAMES, ConfigError, LanguageConfig, MoEConfig, moe_layer_indices
from asymoe.models.experts import ExpertGroup
from asymoe.models.factory import make_group
from asymoe.models.moe import MoEBlock, MoEState

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def build_language_model(config: LanguageConfig, vocab_size: int) -> PreTrainedModel:
    """A small LM from scratch (random init) or `from_pretrained` on a local directory."""
    if config.pretrained_path is not None:
        path = Path(config.pretrained_path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.language.pretrained_path: no config.json in {path}")
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
        if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model.language.pretrained_path: model type '{hf_config.model_type}' is not supported yet; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (gated Llama-family MLPs)"
            )
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
        return model
    hf_config = AutoConfig.for_model(
        config.arch,
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        tie_word_embeddings=False,
    )
    if config.hidden_size % config.num_heads:
        raise ConfigError(
            f"model.language.hidden_size={config.hidden_size} is not divisible by num_heads={config.num_heads}"
        )
    return AutoModelForCausalLM.from_config(hf_config)


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    return model.model.layers


def dense_ffn(layer: nn.Module) -> nn.Module:
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
        raise ConfigError(
            f"language model layer {type(layer).__name__} has no gated MLP (gate_proj/up_proj/down_proj); "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return mlp


def build_groups(moe: MoEConfig, hidden_size: int, dense_width: int, activation: str) -> dict[str, ExpertGroup]:
    """Instantiate the configured expert groups (those with num_experts > 0)."""
    groups: dict[str, ExpertGroup] = {}
    for name in GROUP_NAMES:
        group_config = getattr(moe.groups, name)
        if group_config.num_experts == 0:
            continue
        width = group_config.intermediate_size or dense_width
        if moe.upcycle and width != dense_width and group_config.geometry == "euclidean":
            raise ConfigError(
                f"model.moe.groups.{name}.intermediate_size={width} differs from the dense FFN's {dense_width}; "
                "upcycling copies the dense FFN, so leave it unset or set model.moe.upcycle=false"
            )
        groups[name] = make_group(name, moe, hidden_size, width, activation)
    return groups


def install_moe(model: PreTrainedModel, moe: MoEConfig, state: MoEState) -> list[int]:
    """Replace the FFN of each configured decoder layer with an (upcycled) MoEBlock."""
    layers = decoder_layers(model)
    indices = moe_layer_indices(moe.layers, len(layers))
    hf_config = model.config
    activation = hf_config.hidden_act
    for index in indices:
        mlp = dense_ffn(layers[index])
        dense_width = mlp.gate_proj.weight.shape[0]
        groups = build_groups(moe, hf_config.hidden_size, dense_width, activation)
        if moe.upcycle:
            for group in groups.values():
                upcycle = getattr(group, "upcycle_from", None)
                if upcycle is not None:
                    upcycle(mlp)
        block = MoEBlock(index, hf_config.hidden_size, groups, moe, state)
        block.to(next(mlp.parameters()).dtype)
        layers[index].mlp = block
    return indices
