"""Per-batch accumulation of the analysis measurements, and their final values.

What each number means is written in `asymoe.analysis.measures` (grounding, evidence dependence,
entropy), `asymoe.analysis.conditions` (blank / shuffled / swapped inputs) and here:
- routing share: the mean routing weight a position sends to each expert (rows sum to 1 over
  experts), per MoE layer over the real positions of one part — image tokens, prompt (question)
  tokens, answer tokens — and per question family over the language tokens (prompt, template and
  answer) of that family's sequences; image tokens precede the question, so their routing cannot
  depend on it and is left out of the family shares;
- evidence experts: the gate α of each evidence-priority expert and the routing-bias score s_evd,
  over the real language tokens (mean, std, quantiles, a 20-bin histogram on [0, 1], the mean per
  question family), and α's mean weighted by the routing weight the expert received
  (`alpha_routed`: the gate where it acts);
- image sensitivity: answers are greedy, compared after normalisation; `accuracy_blank` with the
  blank image; `changed` is the fraction of swappable questions whose answer differs between the
  real and the swapped image, `follows` the fraction answering the swapped image's correct answer
  (the accuracy with respect to the swapped image, whether or not the answer changed).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from asymoe.analysis import measures
from asymoe.analysis.capture import Captured
from asymoe.models.moe import MoEBlock, TokenMeta
from asymoe.training.metrics import normalise_answer

PARTS = ("vision", "prompt", "answer")
HISTOGRAM_BINS = 20
QUANTILES = (0.1, 0.5, 0.9)


def expert_names(block: MoEBlock) -> list[str]:
    """Global expert order of a block as names: vision0, shared0, shared1, language0, ..."""
    return [f"{name}{j}" for name, group in block.groups.items() for j in range(group.num_experts)]


def expert_columns(block: MoEBlock) -> dict[str, list[int]]:
    """Each group's global expert ids in a block."""
    return {
        name: list(range(block.offsets[name], block.offsets[name] + group.num_experts))
        for name, group in block.groups.items()
    }


def eligible_experts(block: MoEBlock, meta: TokenMeta) -> torch.Tensor:
    """(T, E) bool: which experts each position's router may choose."""
    eligible = torch.zeros(meta.valid.numel(), block.num_experts, dtype=torch.bool, device=meta.valid.device)
    for router in block.routers:
        columns = torch.zeros(block.num_experts, dtype=torch.bool, device=eligible.device)
        columns[getattr(block, f"eligible_{router}")] = True
        eligible |= meta.router_tokens(router).reshape(-1, 1) & columns
    return eligible


def _add(store: dict, key, value: torch.Tensor) -> None:
    value = value.detach().double().cpu()
    store[key] = store[key] + value if key in store else value


class AnalysisTally:
    """Sums and per-question outcomes over every analysed batch."""

    def __init__(self, blocks: list[MoEBlock]):
        self.blocks = {block.layer_index: block for block in blocks}
        self.entropy: dict[tuple[str, int], torch.Tensor] = {}  # (vision|language, layer) -> (2,)
        self.grounding: dict[int, torch.Tensor] = {}  # layer -> (3, E)
        self.activation: dict[tuple[str, int], torch.Tensor] = {}  # (evidence|memory, layer) -> (2, E)
        self.part_share: dict[tuple[int, str], torch.Tensor] = {}  # (layer, part) -> (E + 1,): sums, count
        self.family_share: dict[tuple[int, str], torch.Tensor] = {}
        self.gates: dict[int, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
        self.outcomes: list[dict] = []

    # -- the real inputs: attention, routing, gates ------------------------------------------------

    def add_real(self, captured: Captured, meta: TokenMeta, families: list[str]) -> None:
        for layer, attention in captured.attention.items():
            entropy = measures.row_entropy(attention)  # (B, S)
            _add(self.entropy, ("vision", layer), measures.entropy_sums(entropy, meta.vision))
            _add(self.entropy, ("language", layer), measures.entropy_sums(entropy, meta.language))
        names = sorted(set(families))
        row_family = torch.tensor([names.index(f) for f in families], device=meta.valid.device)
        token_family = row_family.repeat_interleave(meta.valid.shape[1])  # (T,) index into names
        for layer, routing in captured.routing.items():
            block = self.blocks[layer]
            weights = measures.dense_routing_weights(
                routing.expert_index, routing.expert_weight, routing.slot_mask, block.num_experts
            )  # (T, E)
            a_evd, a_mem = measures.evidence_memory_mass(captured.attention[layer], meta.evidence)
            _add(self.grounding, layer, measures.grounding_sums(weights, a_evd.reshape(-1), a_mem.reshape(-1)))
            eligible = eligible_experts(block, meta)
            _add(self.activation, ("evidence", layer), measures.activation_counts(weights, eligible))
            for part in PARTS:
                _add(self.part_share, (layer, part), _share_sums(weights, getattr(meta, part).reshape(-1)))
            language = meta.language.reshape(-1)
            for code, family in enumerate(names):
                _add(self.family_share, (layer, family), _share_sums(weights, language & (token_family == code)))
            if layer in captured.extras:
                token_names = [names[code] for code in token_family[language].tolist()]
                self._add_gates(layer, block, captured.extras[layer], weights, language, token_names)

    def _add_gates(self, layer, block, extras, weights, language, token_families: list[str]) -> None:
        """Evidence-expert gates at the real language tokens, with each token's question family."""
        gates = self.gates[layer]
        gates["family"].append(token_families)
        if "alpha" in extras:
            first = block.offsets["language"]
            count = block.groups["language"].num_experts
            gates["alpha"].append(extras["alpha"][language].cpu())  # (n, experts of the group)
            gates["alpha_weight"].append(weights[language, first : first + count].cpu())
        if "s_evd" in extras:
            gates["s_evd"].append(extras["s_evd"][language].cpu())

    def add_memory(self, captured: Captured, meta: TokenMeta) -> None:
        """Routing with the blank image and shuffled question (Eq. 4's memory-driven condition)."""
        for layer, routing in captured.routing.items():
            block = self.blocks[layer]
            weights = measures.dense_routing_weights(
                routing.expert_index, routing.expert_weight, routing.slot_mask, block.num_experts
            )
            _add(self.activation, ("memory", layer), measures.activation_counts(weights, eligible_experts(block, meta)))

    def add_answers(self, families, references, real, blank, swapped, partner_answers) -> None:
        """One outcome per question; `swapped` / `partner_answers` hold None where there was no swap partner."""
        for family, reference, ours, blanked, other, partner in zip(
            families, references, real, blank, swapped, partner_answers
        ):
            reference, ours, blanked = map(normalise_answer, (reference, ours, blanked))
            outcome = {"family": family, "correct": ours == reference, "correct_blank": blanked == reference}
            if other is not None:
                other = normalise_answer(other)
                outcome.update(changed=other != ours, follows=other == normalise_answer(partner))
            self.outcomes.append(outcome)


def _share_sums(weights: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(E + 1,): routing weight per expert summed over `tokens` (T,) bool, then the token count."""
    tokens = tokens.to(weights.device)
    return torch.cat([weights[tokens].sum(0), tokens.sum().reshape(1).to(weights.dtype)])
