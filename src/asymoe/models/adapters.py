"""MLP layouts of Hugging Face causal LMs: read a decoder layer's feed-forward weights, whatever the family.

One adapter per *layout*, recognised from the module's structure rather than from a table of
model types:

- separate gated: `gate_proj`, `up_proj`, `down_proj` linears, out = down(act(gate x) * up x)
  (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma-2, OLMo-2, Granite);
- fused gated: `gate_up_proj` (2f, d) holding [gate; up] and `down_proj` (Phi-3);
- non-gated: exactly two linear maps d -> f -> d with an activation between, out = down(act(up x + b) + b);
  `nn.Linear` (fc1/fc2: Phi-1/2, ...) or GPT-2's `Conv1D` (c_fc/c_proj, weights stored transposed);
- sparse (an MoE checkpoint): `experts` with 3-D `gate_up_proj` (E, 2f, d) / `down_proj` (E, d, f)
  and a linear router `gate` (E, d) (Mixtral, OLMoE, Qwen3-MoE).

The activation is the one the module applies, named by the model config's activation key.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from asymoe.errors import ConfigError
from asymoe.models.dispatch import ExpertLayout, ExpertRows
from asymoe.models.experts import ExpertGroup

ACTIVATION_KEYS = ("hidden_activation", "hidden_act", "activation_function")
LAYOUTS = ("separate_gated", "fused_gated", "non_gated")


@dataclass
class DenseFFN:
    """The weights of one dense FFN in one convention: gated `down·(act(gate·x) ⊙ up·x)` or
    non-gated `down·act(up·x + up_bias) + down_bias`; every matrix is (out, in) as in nn.Linear."""

    layout: str
    up: torch.Tensor  # (f, d)
    down: torch.Tensor  # (d, f)
    activation: str
    gate: torch.Tensor | None = None  # (f, d), gated layouts only
    up_bias: torch.Tensor | None = None  # (f,)
    down_bias: torch.Tensor | None = None  # (d,)

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def width(self) -> int:
        return self.up.shape[0]

    # The names the gated expert groups' `upcycle_from` reads (those of a Llama MLP).
    @property
    def gate_proj(self) -> SimpleNamespace:
        return SimpleNamespace(weight=self.gate)

    @property
    def up_proj(self) -> SimpleNamespace:
        return SimpleNamespace(weight=self.up)

    @property
    def down_proj(self) -> SimpleNamespace:
        return SimpleNamespace(weight=self.down)


@dataclass
class SparseFFN:
    """A checkpoint's MoE layer: E gated experts and their top-k softmax router."""

    gate_up: torch.Tensor  # (E, 2f, d), [gate; up] per expert
    down: torch.Tensor  # (E, d, f)
    router: torch.Tensor  # (E, d)
    top_k: int
    activation: str

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    @property
    def width(self) -> int:
        return self.down.shape[2]


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (out, in), bias) of a linear-like module, or None if it is not one."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if isinstance(module, Conv1D):
        return module.weight.t(), module.bias
    return None


def activation_name(config, mlp: nn.Module) -> str:
    """The config's activation name that matches the activation module the MLP holds."""
    # Children that are neither weights nor dropout are the activation the MLP applies.
    applied = [
        child
        for child in mlp.children()
        if _linear_weight(child) is None and not isinstance(child, nn.Dropout) and not list(child.parameters())
    ]
    names = [getattr(config, key, None) for key in ACTIVATION_KEYS]
    names = [name for name in names if isinstance(name, str) and name in ACT2FN]
    for name in names:
        if not applied or any(type(ACT2FN[name]) is type(module) for module in applied):
            return name
    raise ConfigError(
        f"model.language: cannot tell the activation of {type(mlp).__name__} from the model config "
        f"(looked at {', '.join(ACTIVATION_KEYS)}; found {names or 'none'})"
    )


def _no_bias(mlp: nn.Module, names: tuple[str, ...]) -> None:
    if any(getattr(getattr(mlp, name), "bias", None) is not None for name in names):
        raise ConfigError(
            f"model.language: {type(mlp).__name__} is a gated MLP with biases (e.g. mlp_bias=true); "
            "gated experts have none, so it cannot be upcycled exactly"
        )


def _read_separate_gated(mlp: nn.Module, config) -> DenseFFN | None:
    names = ("gate_proj", "up_proj", "down_proj")
    if not all(isinstance(getattr(mlp, name, None), nn.Linear) for name in names):
        return None
    _no_bias(mlp, names)
    return DenseFFN(
        "separate_gated",
        up=mlp.up_proj.weight,
        down=mlp.down_proj.weight,
        gate=mlp.gate_proj.weight,
        activation=activation_name(config, mlp),
    )


def _read_fused_gated(mlp: nn.Module, config) -> DenseFFN | None:
    names = ("gate_up_proj", "down_proj")
    if not all(isinstance(getattr(mlp, name, None), nn.Linear) for name in names):
        return None
    _no_bias(mlp, names)
    gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)  # (f, d) each; the first half is the gate
    return DenseFFN("fused_gated", up=up, down=mlp.down_proj.weight, gate=gate, activation=activation_name(config, mlp))


def _read_non_gated(mlp: nn.Module, config) -> DenseFFN | None:
    linears = [weights for child in mlp.children() if (weights := _linear_weight(child)) is not None]
    if len(linears) != 2:
        return None
    (up, up_bias), (down, down_bias) = linears
    hidden = config.hidden_size
    if up.shape[1] != hidden or down.shape != (hidden, up.shape[0]):
        if down.shape[1] == hidden and up.shape == (hidden, down.shape[0]):
            (up, up_bias), (down, down_bias) = (down, down_bias), (up, up_bias)
        else:
            return None
    return DenseFFN(
        "non_gated", up=up, down=down, up_bias=up_bias, down_bias=down_bias, activation=activation_name(config, mlp)
    )


def read_dense_ffn(mlp: nn.Module, config) -> DenseFFN | None:
    """The DenseFFN view of a dense MLP, or None if the module has none of the known layouts."""
    for reader in (_read_separate_gated, _read_fused_gated, _read_non_gated):
        dense = reader(mlp, config)
        if dense is not None:
            return dense
    return None


def read_sparse_ffn(mlp: nn.Module, config) -> SparseFFN | None:
    """The SparseFFN view of a checkpoint's MoE layer, or None if `mlp` is not one.

    Refused (ConfigError) when the checkpoint's routing cannot be reproduced exactly: a gated
    shared expert (Qwen2-MoE) or top-k weights that are not renormalised (OLMoE/Qwen3-MoE with
    norm_topk_prob=false), since asymoe's routers always renormalise.
    """
    experts, router = getattr(mlp, "experts", None), getattr(mlp, "gate", None)
    gate_up = getattr(experts, "gate_up_proj", None)
    if not isinstance(gate_up, torch.Tensor) or gate_up.dim() != 3 or not hasattr(router, "weight"):
        return None
    kind = type(mlp).__name__
    if any(name.startswith("shared_expert") for name, _ in mlp.named_children()):
        raise ConfigError(
            f"model.language.pretrained_path: {kind} adds a sigmoid-gated shared expert to its routed experts; "
            "asymoe's expert groups cannot represent it exactly (supported MoE checkpoints: Mixtral, OLMoE, Qwen3-MoE)"
        )
    if getattr(router, "norm_topk_prob", getattr(config, "norm_topk_prob", True)) is False:
        raise ConfigError(
            f"model.language.pretrained_path: {kind} does not renormalise its top-k weights (norm_topk_prob=false); "
            "asymoe's routers do, so its experts cannot be mapped with equal outputs"
        )
    return SparseFFN(
        gate_up=gate_up,
        down=experts.down_proj,
        router=router.weight,
        top_k=int(router.top_k),
        activation=activation_name(config, experts),
    )


class PlainFFNExperts(ExpertGroup):
    """Non-gated FFN experts with biases, down·act(up·x + b_up) + b_down, as GPT-2 / Phi-2 MLPs.

    Weights: up_proj (E, f, d), down_proj (E, d, f), biases (E, f) and (E, d).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.act_fn = ACT2FN[activation]
        nn.init.normal_(self.up_proj, std=hidden_size**-0.5)
        nn.init.normal_(self.down_proj, std=intermediate_size**-0.5)

    @torch.no_grad()
    def upcycle_from(self, dense: DenseFFN) -> None:
        """Every expert becomes an exact copy of the dense non-gated MLP."""
        assert dense.up.shape == (self.intermediate_size, self.hidden_size), "upcycling needs the dense FFN's width"
        self.up_proj.copy_(dense.up.unsqueeze(0).expand_as(self.up_proj))
        self.down_proj.copy_(dense.down.unsqueeze(0).expand_as(self.down_proj))
        for bias, dense_bias in ((self.up_bias, dense.up_bias), (self.down_bias, dense.down_bias)):
            bias.copy_(torch.zeros_like(bias) if dense_bias is None else dense_bias.unsqueeze(0).expand_as(bias))

    def expert_forward(self, expert: int, tokens: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        inner = self.act_fn(nn.functional.linear(tokens, self.up_proj[expert], self.up_bias[expert]))  # (n, f)
        return nn.functional.linear(inner, self.down_proj[expert], self.down_bias[expert])  # (n, d)

    def forward_grouped(
        self,
        tokens: torch.Tensor,
        rows: ExpertRows,
        layout: ExpertLayout,
        extras: dict[str, torch.Tensor],
        row_weight: torch.Tensor | None,
    ) -> torch.Tensor:
        inner = self.act_fn(layout.linear(layout.gather(tokens), self.up_proj, self.up_bias))  # (layout, f)
        out = layout.linear(inner, self.down_proj, self.down_bias)  # (layout, d)
        return out if row_weight is None else out * row_weight.to(out.dtype)
