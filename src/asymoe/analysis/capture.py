"""Capture what one analysis forward computed: attention probabilities, routing, evidence gates.

Nothing here changes how a model trains. Inside `capture(model)`:
- the language model runs its eager attention (`set_attn_implementation("eager")`), which
  materialises the probabilities, and a forward hook on each decoder layer's attention module
  records them; the previous implementation (e.g. SDPA) is restored on exit;
- each MoE block's routing (top-k experts, weights and slots per position) is recorded by wrapping
  the block instance's route step (the class is untouched; the wrapper is removed on exit);
- each expert group with a `prepare` hook (evidence-priority experts) has its per-token extras
  recorded: the gate α (tokens, experts) and the routing-bias score s_evd (tokens,).
The attention modules are the ones transformers itself records `output_attentions` from (the
base model's `_can_record_outputs["attentions"]`), so every family it supports works here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from asymoe.errors import ConfigError
from asymoe.models.experts import ExpertGroup
from asymoe.models.language import decoder_layers
from asymoe.models.moe import BlockRouting, MoEBlock
from asymoe.models.vlm import VisionLanguageModel

RECORDED_EXTRAS = ("alpha", "s_evd")


@dataclass
class Captured:
    """One forward's records, keyed by decoder-layer index; tensors detached, float32."""

    attention: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H, S, S)
    routing: dict[int, BlockRouting] = field(default_factory=dict)  # (T, slots) each field
    extras: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> (T, ...) per layer

    def clear(self) -> None:
        self.attention, self.routing, self.extras = {}, {}, {}


def attention_modules(lm: nn.Module) -> dict[int, tuple[nn.Module, int]]:
    """Decoder-layer index -> (its self-attention module, index of the probabilities in its output)."""
    recorded = getattr(lm.base_model, "_can_record_outputs", None) or {}
    spec = recorded.get("attentions")
    if spec is None:
        raise ConfigError(f"language model {type(lm).__name__}: transformers records no attentions for it")
    target, output_index = (spec, 1) if isinstance(spec, type) else (spec.target_class, spec.index)
    found = {}
    for index, layer in enumerate(decoder_layers(lm)):
        modules = [m for m in layer.modules() if isinstance(m, target)]
        if not modules:
            raise ConfigError(f"language model layer {index}: no {target.__name__} module to read attentions from")
        found[index] = (modules[0], output_index)
    return found


def _record_attention(captured: Captured, layer: int, output_index: int):
    def hook(module, args, output):
        probabilities = output[output_index]
        assert probabilities is not None, "eager attention returned no probabilities"
        captured.attention[layer] = probabilities.detach().float()

    return hook


def _record_routing(captured: Captured, block: MoEBlock):
    route = block._route

    def recording_route(*args, **kwargs):
        decisions, routing = route(*args, **kwargs)
        captured.routing[block.layer_index] = BlockRouting(
            routing.expert_index.detach(), routing.expert_weight.detach().float(), routing.slot_mask.detach()
        )
        return decisions, routing

    return recording_route


def _record_extras(captured: Captured, layer: int, group: ExpertGroup):
    prepare = group.prepare

    def recording_prepare(hidden, meta, reachable=None):
        extras = prepare(hidden, meta, reachable)
        captured.extras[layer] = {k: extras[k].detach().float() for k in RECORDED_EXTRAS if k in extras}
        return extras

    return recording_prepare


@contextlib.contextmanager
def capture(model: VisionLanguageModel, attention: bool = True) -> Iterator[Captured]:
    """Record every forward of `model` inside the block into the yielded `Captured` (the last one wins)."""
    captured = Captured()
    lm = model.lm
    previous = lm.config._attn_implementation
    handles, patched = [], []
    try:
        if attention:
            lm.set_attn_implementation("eager")
            for layer, (module, output_index) in attention_modules(lm).items():
                handles.append(module.register_forward_hook(_record_attention(captured, layer, output_index)))
        for block in model.moe_blocks():
            block._route = _record_routing(captured, block)
            patched.append((block, "_route"))
            for group in block.groups.values():
                if type(group).prepare is not ExpertGroup.prepare:
                    group.prepare = _record_extras(captured, block.layer_index, group)
                    patched.append((group, "prepare"))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        for owner, name in patched:
            delattr(owner, name)  # the class's method shows through again
        if attention:
            lm.set_attn_implementation(previous)
