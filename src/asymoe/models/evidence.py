"""AsyMoE evidence-priority language experts and the evidence routing bias.

Each expert e of the group mixes a memory branch and an evidence branch (AsyMoE, Eqs. 7-9):

    F_mem(h)    = W2 · act(W1 · h)                                   (Eq. 7)
    F_evd(h, c) = W4 · act(W3 · [h ; CrossAttn(h, c)])                (Eq. 8)
    E(h)        = α · F_mem(h) + (1 − α) · F_evd(h, c),  α = σ(w_α · h + b_α)   (Eq. 9)

and the language router's logits of every evidence expert get a bias (Eqs. 18-19):

    s_evd = σ(w_evd · Attn(h, c)),   logit_e += s_evd.

c is the layer's input hidden states at the *evidence* positions j ≤ i of the same sample: image
tokens and prompt/question tokens, never answers or padding (TokenMeta.evidence).

Our reading (the paper leaves these points open):
- act(W·x) is read as the base model's gated unit, act(W_gate·x) ⊙ (W_up·x), in both branches, as
  the dense Llama-family FFN the experts are upcycled from. So W1 = gate_up_proj (E, 2f, d),
  W2 = down_proj (E, d, f), W3 = evidence_gate_up_proj (E, 2f, 2d), W4 = evidence_down_proj (E, d, f).
- CrossAttn is multi-head scaled dot-product attention with learned q/k/v/o projections
  (`heads` heads), causal (j ≤ i) and restricted to evidence positions. The paper does not say
  whether each expert owns one; we compute it once per layer, in `prepare`, and the group's
  experts share it (an expert only adds its own W3/W4 on top), so its cost does not grow with the
  number of experts. It runs for every position that can reach the group (its routers' tokens: the
  language tokens in modality routing, packed per sample by asymoe.models.positions), whatever
  the routing, so the activated-parameter count includes it (and w_evd) in full for every
  language token; other positions get a context and s_evd of 0, which nothing reads.
- Attn in the routing bias is the parameter-free single-head version of the same attention (q, k,
  v = h); only w_evd (d,) is learned. A position with no evidence at or before it gets a context of
  exactly 0 and s_evd = 0 (no evidence, no priority) rather than σ(0) = 0.5.
- α has one (w_α, b_α) per expert; b_α starts at logit(alpha_init) and w_α at 0, so σ(b_α) =
  alpha_init (0.3, the paper's best constant). `alpha: fixed` makes α ≡ alpha_init, no parameters.
- Upcycling: both branches start as copies of the dense FFN, with W3's context columns at 0, so an
  upcycled layer reproduces the dense output exactly whatever α (α·F + (1 − α)·F = F). The context
  columns receive gradient from the first step; the attention projections do from the second, once
  those columns are non-zero (the zero-init-adapter pattern). Without upcycling every weight is random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from asymoe.config import ConfigError, EvidenceConfig
from asymoe.models.dispatch import ExpertLayout, ExpertRows, row_values
from asymoe.models.experts import FFNExperts, gated_ffn
from asymoe.models.positions import PackedPositions

if TYPE_CHECKING:
    from asymoe.models.moe import TokenMeta


@dataclass(eq=False)
class EvidenceMask:
    """Which positions each query attends: its sample's evidence positions j ≤ i.

    Built once per batch for the positions that run the evidence attentions (`EvidenceExperts.prepare`
    caches it on the batch's TokenMeta), so the cross-attention and the routing-bias attention of
    every layer share one mask instead of each building it. A query with no evidence at or before
    it attends its own position instead (a softmax over nothing is NaN in value and gradient); its
    output is then multiplied by 0 (`has_evidence`).
    """

    allowed: torch.Tensor  # (batch, 1, Q, seq) bool
    has_evidence: torch.Tensor  # (batch, Q) bool
    _additive: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)

    @staticmethod
    def of(evidence_mask: torch.Tensor, query_position: torch.Tensor | None = None) -> EvidenceMask:
        """evidence_mask (batch, seq) bool; query_position (batch, Q): each query's position (default: query
        q at position q, Q = seq)."""
        batch, seq = evidence_mask.shape
        key_position = torch.arange(seq, device=evidence_mask.device)
        if query_position is None:
            query_position = key_position.expand(batch, -1)
        allowed = (key_position <= query_position.unsqueeze(-1)) & evidence_mask.unsqueeze(1)  # (batch, Q, seq)
        has_evidence = allowed.any(dim=-1)  # (batch, Q)
        allowed |= (key_position == query_position.unsqueeze(-1)) & ~has_evidence.unsqueeze(-1)
        return EvidenceMask(allowed.unsqueeze(1), has_evidence)

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as SDPA adds it (0 where allowed, −inf elsewhere) in `dtype`, converted once per dtype:
        the same values SDPA derives from a bool mask on every call."""
        if dtype not in self._additive:
            zeros = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device)
            self._additive[dtype] = zeros.masked_fill_(~self.allowed, float("-inf"))
        return self._additive[dtype]


def evidence_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: EvidenceMask
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention of each query over its sample's evidence positions j ≤ i (`mask`).

    query (batch, heads, Q, head_dim); key, value (batch, heads, seq, head_dim). Returns the attention
    output (batch, heads, Q, head_dim), exactly 0 on rows with no evidence, and has_evidence (batch, Q).
    """
    out = _masked_attention(query, key, value, mask.additive(query.dtype))
    return out * mask.has_evidence[:, None, :, None].to(out.dtype), mask.has_evidence


def _masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA with an additive mask (batch, 1, Q, seq); on CPU, queries split into chunks when batch × heads
    is below the thread count.

    torch's CPU flash-attention backward runs one thread per (sample, head): the single-head routing-bias
    attention of a one-sample batch would run its backward on one core. Query chunks become heads sharing
    their head's keys and values (grouped-query attention): the same attention row by row, in parallel.
    """
    batch, heads, queries, head_dim = query.shape
    chunks = min(torch.get_num_threads(), queries) // (batch * heads) if query.device.type == "cpu" else 1
    if chunks <= 1:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    padded = -(-queries // chunks) * chunks
    if padded > queries:  # padding queries attend every key; their rows are dropped
        query = F.pad(query, (0, 0, 0, padded - queries))
        mask = F.pad(mask, (0, 0, 0, padded - queries))
    split = query.reshape(batch, heads * chunks, padded // chunks, head_dim)
    split_mask = mask.expand(batch, heads, padded, mask.shape[-1]).reshape(batch, heads * chunks, padded // chunks, -1)
    out = F.scaled_dot_product_attention(split, key, value, attn_mask=split_mask, enable_gqa=True)
    return out.reshape(batch, heads, padded, head_dim)[:, :, :queries]


class EvidenceCrossAttention(nn.Module):
    """CrossAttn(h, c): multi-head attention of queries h over the evidence states c (Eq. 8)."""

    def __init__(self, hidden_size: int, heads: int):
        super().__init__()
        if hidden_size % heads:
            raise ConfigError(f"model.moe.evidence.heads={heads} must divide the language hidden size {hidden_size}")
        self.heads = heads
        self.head_dim = hidden_size // heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        # No bias: a position without evidence keeps a context of exactly 0.
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def _split(self, states: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = states.shape
        return states.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)  # (batch, heads, seq, head_dim)

    def forward(self, query_states: torch.Tensor, evidence_states: torch.Tensor, mask: EvidenceMask) -> torch.Tensor:
        """query_states (batch, Q, d), evidence_states (batch, seq, d) -> context (batch, Q, d); `mask` says
        which positions each query attends."""
        batch, queries, width = query_states.shape
        attended, _ = evidence_attention(
            self._split(self.q_proj(query_states)),
            self._split(self.k_proj(evidence_states)),
            self._split(self.v_proj(evidence_states)),
            mask,
        )
        return self.o_proj(attended.transpose(1, 2).reshape(batch, queries, width))


class EvidenceExperts(FFNExperts):
    """AsyMoE evidence-priority experts (module docstring: equations and our reading).

    The memory branch is the inherited gated-FFN experts (W1 = gate_up_proj, W2 = down_proj).

    prepare() returns per-token extras: "context" (tokens, d) = CrossAttn(h, c), "alpha"
    (tokens, experts) = each expert's gate, and with route_bias "s_evd" (tokens,) in float32.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        config: EvidenceConfig | None = None,
    ):
        # Memory branch (Eq. 7): W1, W2.
        super().__init__(num_experts, hidden_size, intermediate_size, activation)
        config = config if config is not None else EvidenceConfig()
        # Evidence branch (Eq. 8): W3 over [h ; context], W4.
        self.evidence_gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, 2 * hidden_size))
        self.evidence_down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.evidence_gate_up_proj, std=(2 * hidden_size) ** -0.5)
        nn.init.normal_(self.evidence_down_proj, std=intermediate_size**-0.5)
        self.cross_attention = EvidenceCrossAttention(hidden_size, config.heads)
        # Gate (Eq. 9). `fixed_alpha` is None for a learned gate.
        self.fixed_alpha: float | None = None
        if config.alpha == "fixed":
            self.fixed_alpha = float(config.alpha_init)
        else:
            self.alpha_weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
            alpha_logit = math.log(config.alpha_init / (1 - config.alpha_init))
            self.alpha_bias = nn.Parameter(torch.full((num_experts,), alpha_logit))
        # Routing bias (Eqs. 18-19); absent when off, so no parameter is left without a gradient.
        self.route_bias = bool(config.route_bias)
        if self.route_bias:
            self.route_weight = nn.Parameter(torch.zeros(hidden_size))
        self._last: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None

    @property
    def family(self) -> str:
        return "evidence"

    @torch.no_grad()
    def upcycle_from(self, dense_mlp: nn.Module) -> None:
        """Both branches of every expert become the dense MLP (W3's context columns 0): exact parity."""
        super().upcycle_from(dense_mlp)
        gate_up = self.gate_up_proj[0]  # (2f, d), the dense FFN's
        down = self.down_proj[0]  # (d, f)
        self.evidence_gate_up_proj.zero_()
        self.evidence_gate_up_proj[:, :, : self.hidden_size] = gate_up
        self.evidence_down_proj.copy_(down.unsqueeze(0).expand_as(self.evidence_down_proj))

    def prepare(
        self, hidden: torch.Tensor, meta: TokenMeta, reachable: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        batch, seq, width = hidden.shape
        tokens = hidden.reshape(batch * seq, width)
        # Both attentions run only for the positions that can reach the group (the others' extras are 0).
        positions = meta.packed(reachable) if reachable is not None else PackedPositions.everywhere(hidden)
        queries = positions.gather(hidden)  # (batch, Q, d)
        # One mask per batch for both attentions of every layer.
        mask = meta.memo(("evidence_mask", positions), lambda: EvidenceMask.of(meta.evidence, positions.index))
        attended = self.cross_attention(queries, hidden, mask)
        extras = {"context": positions.scatter(attended).reshape(batch * seq, width)}
        if self.fixed_alpha is None:
            extras["alpha"] = torch.sigmoid(F.linear(tokens, self.alpha_weight, self.alpha_bias))  # (tokens, experts)
        else:
            extras["alpha"] = tokens.new_full((batch * seq, self.num_experts), self.fixed_alpha)
        if self.route_bias:
            score = self._evidence_score(queries, hidden, mask)  # (batch, Q)
            extras["s_evd"] = positions.scatter(score).reshape(batch * seq)
        # Kept for `scalars`, which reduces them only when statistics are read.
        self._last = (
            meta.language.reshape(-1),
            {key: extras[key].detach() for key in ("alpha", "s_evd") if key in extras},
        )
        return extras

    def _evidence_score(self, queries: torch.Tensor, hidden: torch.Tensor, mask: EvidenceMask) -> torch.Tensor:
        """s_evd = σ(w_evd · Attn(h, c)) (Eqs. 18-19) for queries (batch, Q, d), float32 like the router;
        0 without evidence."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            states = hidden.float().unsqueeze(1)  # (batch, 1, seq, d): one head, k = v = h
            query = queries.float().unsqueeze(1)  # q = h at the query positions
            attended, has_evidence = evidence_attention(query, states, states, mask)
            score = torch.sigmoid(F.linear(attended.squeeze(1), self.route_weight.float().unsqueeze(0)))
            return score.squeeze(-1) * has_evidence  # (batch, Q)

    def logit_bias(self, extras: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return extras["s_evd"] if self.route_bias else None

    def scalars(self) -> dict[str, torch.Tensor]:
        """Mean α (over the experts) and mean s_evd over the last forward's real language tokens."""
        if self._last is None:
            return {}
        language, values = self._last
        count = language.sum().clamp(min=1)
        return {
            key: (value.float().reshape(language.shape[0], -1).mean(-1) * language).sum() / count
            for key, value in values.items()
        }

    def always_active_parameter_count(self) -> int:
        """The cross-attention and the routing-bias weight run for every token, whatever its experts."""
        count = sum(p.numel() for p in self.cross_attention.parameters())
        return count + (self.route_weight.numel() if self.route_bias else 0)

    def expert_forward(self, expert: int, tokens: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        alpha = extras["alpha"][:, expert : expert + 1]  # (n, 1)
        return self._mix(tokens, extras["context"], alpha, F.linear, lambda weight: weight[expert])

    def forward_grouped(
        self,
        tokens: torch.Tensor,
        rows: ExpertRows,
        layout: ExpertLayout,
        extras: dict[str, torch.Tensor],
        row_weight: torch.Tensor | None,
    ) -> torch.Tensor:
        # The cross-attention context was computed once per layer, in `prepare`; rows only gather it.
        alpha = row_values(rows, extras["alpha"]).unsqueeze(-1)  # (N, 1): the gate of each row's expert
        routed, context = layout.gather(tokens), layout.gather(extras["context"])
        return self._mix(routed, context, layout.pack(alpha), layout.linear, lambda w: w, row_weight)

    def _mix(self, tokens, context, alpha, linear, select, row_weight=None) -> torch.Tensor:
        """w·(α·F_mem + (1 − α)·F_evd) (Eqs. 7-9) for tokens and context (..., d), gate α (..., 1)
        and routing weight w (..., 1) (default 1).

        With w (`folds_routing_weight`: f < d), w·α and w·(1 − α) scale the two branches' gated
        units (both end in a bias-free linear layer), f values per row instead of d. `select`
        picks the weights of the experts at hand from each 3-D tensor and `linear` applies them
        (one expert: indexing and F.linear; all: identity and a layout's linear).
        """
        memory_weights = select(self.gate_up_proj), select(self.down_proj)
        joint = torch.cat([tokens, context.to(tokens.dtype)], dim=-1)  # (..., 2d)
        evidence_weights = select(self.evidence_gate_up_proj), select(self.evidence_down_proj)
        if row_weight is None:
            memory = gated_ffn(tokens, *memory_weights, self.act_fn, linear)
            evidence = gated_ffn(joint, *evidence_weights, self.act_fn, linear)
            alpha = alpha.to(memory.dtype)
            return alpha * memory + (1 - alpha) * evidence
        scale = row_weight.to(alpha.dtype)
        memory = gated_ffn(tokens, *memory_weights, self.act_fn, linear, alpha * scale)
        return memory + gated_ffn(joint, *evidence_weights, self.act_fn, linear, (1 - alpha) * scale)
