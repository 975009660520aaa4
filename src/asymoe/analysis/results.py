"""Final values of an analysis from its tally: the analysis.json sections and the headline scalars.

Headline scalars (`scalars` in analysis.json; the grid summary reads them under these names):
- `analysis/accuracy`, `analysis/accuracy_blank`: greedy exact match with the real / blank image;
- `analysis/image_changed`, `analysis/image_follows`: answers changed by an image swap / equal to
  the swapped image's answer (fractions of the swappable questions);
- `analysis/entropy_slope_language`, `analysis/entropy_slope_vision`: β of H_L(l), H_V(l) over l;
- `analysis/grounding/<group>`: F over the group's experts and every MoE layer (their sums pooled);
- `analysis/evidence_dependence/<group>`: R over the group's experts and every MoE layer (pooled counts);
- `analysis/alpha`, `analysis/alpha_routed`, `analysis/s_evd`: evidence-expert gate means, averaged
  over MoE layers and experts (when the model has evidence experts).
"""

from __future__ import annotations

import torch

from asymoe.analysis import measures
from asymoe.analysis.tally import HISTOGRAM_BINS, PARTS, QUANTILES, AnalysisTally


def _by_expert(values: dict[str, list], experts: list[str]) -> dict[str, dict]:
    return {name: {key: column[j] for key, column in values.items()} for j, name in enumerate(experts)}


def entropy_section(tally: AnalysisTally, layers: list[int]) -> dict:
    section: dict = {"layers": layers}
    for kind in ("vision", "language"):
        zero = torch.zeros(2, dtype=torch.float64)
        values = [measures.mean_of(tally.entropy.get((kind, layer), zero)) for layer in layers]
        section[kind] = values
        section[f"{kind}_slope"] = measures.least_squares_slope(layers, values)
    return section


def routing_sections(tally: AnalysisTally, experts: list[str]) -> dict:
    grounding = {str(layer): _by_expert(measures.grounding_ratio(s), experts) for layer, s in tally.grounding.items()}
    dependence = {}
    for layer in tally.grounding:
        evd, mem = tally.activation[("evidence", layer)], tally.activation[("memory", layer)]
        dependence[str(layer)] = _by_expert(measures.evidence_dependence(evd, mem), experts)
    share: dict = {"part": {}, "family": {}}
    for kind, store in (("part", tally.part_share), ("family", tally.family_share)):
        for (layer, label), sums in sorted(store.items()):
            count = float(sums[-1])
            shares = [float(v) / count if count else None for v in sums[:-1]]
            share[kind].setdefault(str(layer), {})[label] = {"tokens": int(count), **dict(zip(experts, shares))}
    return {"grounding": grounding, "evidence_dependence": dependence, "specialisation": share}


def _fraction(outcomes: list[dict], key: str) -> float | None:
    values = [o[key] for o in outcomes if key in o]
    return sum(values) / len(values) if values else None


def sensitivity_section(outcomes: list[dict]) -> dict:
    def summary(items: list[dict]) -> dict:
        return {
            "questions": len(items),
            "accuracy": _fraction(items, "correct"),
            "accuracy_blank": _fraction(items, "correct_blank"),
            "swappable": sum("changed" in o for o in items),
            "changed": _fraction(items, "changed"),
            "follows": _fraction(items, "follows"),
        }

    families = sorted({o["family"] for o in outcomes})
    return {
        **summary(outcomes),
        "per_family": {f: summary([o for o in outcomes if o["family"] == f]) for f in families},
    }


def distribution(values: torch.Tensor) -> dict:
    """Mean, std, quantiles and a histogram on [0, 1] of a 1-D tensor of gate values."""
    values = values.double()
    if values.numel() == 0:
        return {"count": 0}
    quantiles = torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64))
    return {
        "count": values.numel(),
        "mean": float(values.mean()),
        "std": float(values.std()) if values.numel() > 1 else 0.0,
        **{f"p{round(100 * q)}": float(v) for q, v in zip(QUANTILES, quantiles)},
        "histogram": torch.histc(values.clamp(0, 1), bins=HISTOGRAM_BINS, min=0, max=1).long().tolist(),
    }


def _per_family(values: torch.Tensor, families: list[str]) -> dict:
    labels = sorted(set(families))
    return {label: float(values[torch.tensor([f == label for f in families])].double().mean()) for label in labels}


def gates_section(tally: AnalysisTally) -> dict | None:
    if not tally.gates:
        return None
    section = {}
    for layer, gates in sorted(tally.gates.items()):
        families = [f for chunk in gates["family"] for f in chunk]
        entry: dict = {}
        if gates["alpha"]:
            alpha = torch.cat(gates["alpha"])  # (n, experts)
            weight = torch.cat(gates["alpha_weight"]).double()
            entry["alpha"] = {}
            for j in range(alpha.shape[1]):
                routed = float((alpha[:, j].double() * weight[:, j]).sum() / weight[:, j].sum())
                entry["alpha"][f"language{j}"] = {
                    **distribution(alpha[:, j]),
                    "routed_mean": routed if weight[:, j].sum() > 0 else None,
                    "per_family": _per_family(alpha[:, j], families),
                }
        if gates["s_evd"]:
            s_evd = torch.cat(gates["s_evd"])
            entry["s_evd"] = {**distribution(s_evd), "per_family": _per_family(s_evd, families)}
        section[str(layer)] = entry
    return section


def _pooled(store: dict, layers, columns: list[int], kind: str | None = None) -> torch.Tensor:
    return sum(store[layer if kind is None else (kind, layer)][:, columns].sum(-1) for layer in layers)


def headline_scalars(tally: AnalysisTally, result: dict, groups: dict[str, list[int]]) -> dict[str, float]:
    """The flat `analysis/...` numbers (module docstring); keys without a value are left out."""
    sensitivity, entropy = result["image_sensitivity"], result["entropy"]
    scalars = {
        "analysis/accuracy": sensitivity["accuracy"],
        "analysis/accuracy_blank": sensitivity["accuracy_blank"],
        "analysis/image_changed": sensitivity["changed"],
        "analysis/image_follows": sensitivity["follows"],
        "analysis/entropy_slope_language": entropy["language_slope"],
        "analysis/entropy_slope_vision": entropy["vision_slope"],
    }
    layers = list(tally.grounding)
    for group, columns in groups.items():
        weight, evd, mem = _pooled(tally.grounding, layers, columns)
        scalars[f"analysis/grounding/{group}"] = (
            measures.finite_or_none(float(evd / (evd + mem))) if weight > 0 else None
        )
        evd_counts = _pooled(tally.activation, layers, columns, "evidence")
        mem_counts = _pooled(tally.activation, layers, columns, "memory")
        scalars[f"analysis/evidence_dependence/{group}"] = measures.evidence_dependence(
            evd_counts.unsqueeze(-1), mem_counts.unsqueeze(-1)
        )["R"][0]
    gate_means: dict[str, list[float]] = {"alpha": [], "alpha_routed": [], "s_evd": []}
    for layer_gates in (result["evidence_experts"] or {}).values():
        for stats in layer_gates.get("alpha", {}).values():
            gate_means["alpha"].append(stats.get("mean"))
            gate_means["alpha_routed"].append(stats.get("routed_mean"))
        gate_means["s_evd"].append(layer_gates.get("s_evd", {}).get("mean"))
    for key, means in gate_means.items():
        known = [m for m in means if m is not None]
        scalars[f"analysis/{key}"] = sum(known) / len(known) if known else None
    return {key: float(value) for key, value in scalars.items() if value is not None}


def build_results(tally: AnalysisTally, layers: list[int], experts: list[str], groups: dict[str, list[int]]) -> dict:
    result = {
        "entropy": entropy_section(tally, layers),
        **routing_sections(tally, experts),
        "image_sensitivity": sensitivity_section(tally.outcomes),
        "evidence_experts": gates_section(tally),
    }
    result["scalars"] = headline_scalars(tally, result, groups)
    return result


__all__ = ["PARTS", "build_results", "distribution", "headline_scalars"]
