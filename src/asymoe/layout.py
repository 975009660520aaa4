"""Expert-group topology: which groups exist, which tokens may reach them, which layers hold MoE.

Torch-free, so that config validation and the model builders in ``asymoe.models`` share one
definition. Global expert order is ``GROUP_NAMES`` (vision, shared, language): expert ids of a
router count through its eligible groups in that order.

Routing modes:
- ``shared``: one router ``all`` over every expert (vanilla MoE, MoE-LLaVA);
- ``modality``: router ``vision`` over vision ∪ shared and router ``language`` over
  shared ∪ language (modality-specific MoE when shared is empty, MoIIE, AsyMoE).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

from asymoe.errors import ConfigError

GroupName = Literal["vision", "shared", "language"]
Modality = Literal["vision", "language"]
RoutingMode = Literal["shared", "modality"]
RouterName = Literal["all", "vision", "language"]
# every_other_odd: MoIIE (layers 1, 3, ...); every_other_even: MoE-LLaVA's "sparse" mode (0, 2, ...).
LayerPattern = Literal["every_other_odd", "every_other_even", "all", "first_half", "second_half"]

GROUP_NAMES: tuple[str, ...] = get_args(GroupName)
MODALITIES: tuple[str, ...] = get_args(Modality)
ROUTER_NAMES: tuple[str, ...] = get_args(RouterName)
LAYER_PATTERNS: tuple[str, ...] = get_args(LayerPattern)
# The router of shared mode; modality mode has one router per modality, named after it.
SHARED_ROUTER = "all"


def router_names(mode: str) -> tuple[str, ...]:
    """The routers a block builds in routing mode `mode`."""
    return (SHARED_ROUTER,) if mode == "shared" else MODALITIES


def eligible_groups(mode: str, modality: str) -> tuple[str, ...]:
    """Expert groups a token of `modality` may be routed to."""
    if mode == "shared":
        return GROUP_NAMES
    return ("vision", "shared") if modality == "vision" else ("shared", "language")


def eligible_experts(counts: Mapping[str, int], mode: str, modality: str) -> int:
    """How many experts the router of `modality` tokens chooses among; `counts` maps group -> experts."""
    return sum(counts.get(group, 0) for group in eligible_groups(mode, modality))


def _pattern_indices(pattern: str, num_layers: int) -> list[int]:
    return {
        "every_other_odd": list(range(1, num_layers, 2)),
        "every_other_even": list(range(0, num_layers, 2)),
        "all": list(range(num_layers)),
        "first_half": list(range(num_layers // 2)),
        "second_half": list(range(num_layers // 2, num_layers)),
    }[pattern]


def _listed_indices(layers: Any, num_layers: int, where: str) -> list[int]:
    indices = []
    for index in layers:
        if not isinstance(index, int) or isinstance(index, bool):
            raise ConfigError(f"{where}: model.moe.layers entry {index!r} is not an integer layer index")
        if not -num_layers <= index < num_layers:
            raise ConfigError(
                f"{where}: model.moe.layers index {index} is outside the language model's {num_layers} layers "
                f"(valid: 0..{num_layers - 1})"
            )
        indices.append(index % num_layers)
    return indices


def moe_layer_indices(layers: Any, num_layers: int, where: str = "config") -> list[int]:
    """Resolve `model.moe.layers` (a pattern name or a list of indices, negative from the end) to sorted indices."""
    if isinstance(layers, str):
        if layers not in LAYER_PATTERNS:
            raise ConfigError(
                f"{where}: model.moe.layers={layers!r} is not valid; use one of {', '.join(LAYER_PATTERNS)} "
                "or a list of indices"
            )
        indices = _pattern_indices(layers, num_layers)
    elif isinstance(layers, (list, tuple)):
        indices = _listed_indices(layers, num_layers, where)
    else:
        raise ConfigError(f"{where}: model.moe.layers must be a pattern name or a list of indices, got {layers!r}")
    if not indices:
        raise ConfigError(f"{where}: model.moe.layers={layers!r} selects no layer of a {num_layers}-layer model")
    return sorted(set(indices))
