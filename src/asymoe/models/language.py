"""The causal language model: built from a config or loaded from a local directory, then MoE-ified.

Any Hugging Face causal LM loads; MoE layers need a feed-forward layer of a known layout (see
`adapters`): separate gated, fused gated, non-gated, or a checkpoint's own sparse MoE layer.
Dense FFNs are upcycled (every expert an exact copy); a sparse checkpoint layer's E experts fill
the configured groups in global order vision, shared, language (checkpoint expert i becomes
global expert i) and each router takes the checkpoint router's rows of its eligible experts, so a
shared-mode block with the checkpoint's top-k reproduces the checkpoint's layer exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from asymoe.config import ConfigError, LanguageConfig, MoEConfig
from asymoe.layout import GROUP_NAMES, moe_layer_indices
from asymoe.models.adapters import DenseFFN, PlainFFNExperts, SparseFFN, read_dense_ffn, read_sparse_ffn
from asymoe.models.experts import ExpertGroup, FFNExperts
from asymoe.models.factory import make_group
from asymoe.models.moe import MoEBlock, MoEState

LAYOUT_HELP = (
    "known layouts: gate_proj/up_proj/down_proj, gate_up_proj/down_proj, "
    "two linear maps d->f->d (fc1/fc2, c_fc/c_proj), or experts + gate (sparse MoE)"
)


def build_language_model(config: LanguageConfig, vocab_size: int) -> PreTrainedModel:
    """A small LM from scratch (random init) or `from_pretrained` on a local directory."""
    if config.pretrained_path is not None:
        return load_pretrained_lm(Path(config.pretrained_path), vocab_size)
    if config.hidden_size % config.num_heads:
        raise ConfigError(
            f"model.language.hidden_size={config.hidden_size} is not divisible by num_heads={config.num_heads}"
        )
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
        # Families differ in their default head width (Qwen3 128, Gemma 256): use hidden / heads for all.
        head_dim=config.hidden_size // config.num_heads,
        # The family defaults (e.g. Phi-3's 32000) may lie outside a small vocabulary; the data pipeline
        # supplies its own ids, and `asymoe export` writes the tokenizer's.
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(hf_config)


def load_pretrained_lm(path: Path, vocab_size: int) -> PreTrainedModel:
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.language.pretrained_path: no config.json in {path}")
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except ValueError as error:
        raise ConfigError(
            f"model.language.pretrained_path: {path} ('{hf_config.model_type}') is not a causal LM "
            f"transformers can load ({str(error).splitlines()[0]})"
        ) from None
    if model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder's layer stack: the module list with one entry per hidden layer."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ConfigError(f"language model {type(model).__name__}: no list of {count} decoder layers found")


def feed_forward(layer: nn.Module, config) -> tuple[str, DenseFFN | SparseFFN]:
    """(attribute name, weights view) of the layer's feed-forward child."""
    for name, child in layer.named_children():
        found = read_sparse_ffn(child, config) or read_dense_ffn(child, config)
        if found is not None:
            return name, found
    raise ConfigError(f"language model layer {type(layer).__name__} has no feed-forward module of a {LAYOUT_HELP}")


def build_groups(
    moe: MoEConfig, hidden_size: int, dense_width: int, activation: str, gated: bool = True
) -> dict[str, ExpertGroup]:
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
        if gated:
            groups[name] = make_group(name, moe, hidden_size, width, activation)
        elif group_config.kind == "ffn" and group_config.geometry == "euclidean":
            groups[name] = PlainFFNExperts(group_config.num_experts, hidden_size, width, activation)
        else:
            raise ConfigError(
                f"model.moe.groups.{name}: kind='{group_config.kind}', geometry='{group_config.geometry}' "
                "needs a gated MLP; this language model's MLP is non-gated, "
                "which supports kind=ffn, geometry=euclidean only"
            )
    return groups


@torch.no_grad()
def map_sparse_experts(block: MoEBlock, sparse: SparseFFN, layer_index: int) -> None:
    """Checkpoint expert i -> global expert i (vision, shared, language order); router rows alike."""
    if sparse.num_experts != block.num_experts:
        counts = "+".join(f"{name} {group.num_experts}" for name, group in block.groups.items())
        raise ConfigError(
            f"model.moe.groups: layer {layer_index} of the checkpoint has {sparse.num_experts} experts but the "
            f"configured groups hold {block.num_experts} ({counts}); they must be equal to map the checkpoint's experts"
        )
    for name, group in block.groups.items():
        if type(group) is not FFNExperts:
            raise ConfigError(
                f"model.moe.groups.{name}: mapping a sparse checkpoint's experts needs kind=ffn, "
                "geometry=euclidean groups"
            )
        offset = block.offsets[name]
        group.gate_up_proj.copy_(sparse.gate_up[offset : offset + group.num_experts])
        group.down_proj.copy_(sparse.down[offset : offset + group.num_experts])
    for name, router in block.routers.items():
        router.weight.copy_(sparse.router[getattr(block, f"eligible_{name}")])


def install_moe(model: PreTrainedModel, moe: MoEConfig, state: MoEState) -> list[int]:
    """Replace the FFN of each configured decoder layer with an MoEBlock (upcycled or mapped)."""
    layers = decoder_layers(model)
    indices = moe_layer_indices(moe.layers, len(layers))
    hf_config = model.config
    sparse_layers = [i for i, layer in enumerate(layers) if isinstance(feed_forward(layer, hf_config)[1], SparseFFN)]
    if set(sparse_layers) - set(indices):
        raise ConfigError(
            f"model.moe.layers={indices} must include every sparse layer of the checkpoint ({sparse_layers}); "
            "a checkpoint MoE layer cannot be left as it is"
        )
    for index in indices:
        name, ffn = feed_forward(layers[index], hf_config)
        gated = isinstance(ffn, SparseFFN) or ffn.gated
        groups = build_groups(moe, hf_config.hidden_size, ffn.width, ffn.activation, gated=gated)
        if moe.upcycle and isinstance(ffn, DenseFFN):
            for group in groups.values():
                upcycle = getattr(group, "upcycle_from", None)
                if upcycle is not None:
                    upcycle(ffn)
        block = MoEBlock(index, hf_config.hidden_size, groups, moe, state)
        if isinstance(ffn, SparseFFN):
            map_sparse_experts(block, ffn, index)
        block.to(ffn.down.dtype)
        setattr(layers[index], name, block)
    return indices
