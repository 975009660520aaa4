"""The analysis plots (matplotlib, no display): each takes the results and the folder, returns its PNG or None."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DPI = 110


def _figure(width: float, height: float, panels: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI)
    return path


def _heatmap(axes, values: np.ndarray, rows: list[str], columns: list[str], vmin: float, vmax: float, cmap: str):
    image = axes.imshow(np.ma.masked_invalid(values), vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(rows)), rows, fontsize=8)
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            # Sequential maps are dark at their low end, the diverging one light in its middle.
            dark = cmap != "coolwarm" and (value - vmin) / (vmax - vmin) < 0.5
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    return image


def _matrix(section: dict, key: str, experts: list[str]) -> tuple[list[str], np.ndarray]:
    layers = list(section)
    values = np.array(
        [[np.nan if section[layer][e][key] is None else section[layer][e][key] for e in experts] for layer in layers],
        dtype=float,
    )
    return [f"layer {layer}" for layer in layers], values


def entropy_plot(result: dict, out: Path) -> Path | None:
    entropy = result["entropy"]
    layers = np.array(entropy["layers"], dtype=float)
    figure, (axes,) = _figure(5.5, 3.6)
    for kind, label in (("vision", "H_V (image rows)"), ("language", "H_L (language rows)")):
        values = np.array([np.nan if v is None else v for v in entropy[kind]], dtype=float)
        if np.isfinite(values).any():
            axes.plot(layers, values, marker="o", label=label)
    slope = entropy["language_slope"]
    if slope is not None:
        values = np.array([np.nan if v is None else v for v in entropy["language"]], dtype=float)
        known = np.isfinite(values)
        intercept = values[known].mean() - slope * layers[known].mean()
        axes.plot(layers, intercept + slope * layers, linestyle="--", color="grey", label=f"H_L fit, β = {slope:.3f}")
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("attention entropy (nats)")
    axes.set_xticks(layers)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return _save(figure, out / "entropy.png")


def _expert_heatmap(result: dict, out: Path, section: str, key: str, title: str, vmin: float, cmap: str):
    experts = result["experts"]
    if not experts or not result[section]:
        return None
    rows, values = _matrix(result[section], key, experts)
    figure, (axes,) = _figure(1.2 + 0.9 * len(experts), 1.2 + 0.45 * len(rows))
    image = _heatmap(axes, values, rows, experts, vmin, 1.0, cmap)
    figure.colorbar(image, ax=axes)
    axes.set_title(title, fontsize=9)
    return _save(figure, out / f"{section}.png")


def grounding_plot(result: dict, out: Path) -> Path | None:
    return _expert_heatmap(result, out, "grounding", "F", "evidence grounding ratio F(E_k)", 0.0, "viridis")


def dependence_plot(result: dict, out: Path) -> Path | None:
    return _expert_heatmap(result, out, "evidence_dependence", "R", "evidence-dependence ratio R_k", -1.0, "coolwarm")


def specialisation_plot(result: dict, out: Path) -> Path | None:
    experts = result["experts"]
    share = result["specialisation"]
    if not experts or not share["family"]:
        return None
    layers = list(share["family"])
    figure, axes = _figure(1.6 + 3.2 * len(layers), 5.0, len(layers))
    for panel, layer in zip(axes, layers):
        labels = [f"family: {f}" for f in share["family"][layer]] + [f"part: {p}" for p in share["part"][layer]]
        entries = list(share["family"][layer].values()) + list(share["part"][layer].values())
        values = np.array([[np.nan if e[x] is None else e[x] for x in experts] for e in entries], dtype=float)
        _heatmap(panel, values, labels, experts, 0.0, 1.0, "magma")
        panel.set_title(f"layer {layer}: routing share", fontsize=9)
    return _save(figure, out / "specialisation.png")


def sensitivity_plot(result: dict, out: Path) -> Path | None:
    sensitivity = result["image_sensitivity"]
    families = ["all", *sensitivity["per_family"]]
    rows = [sensitivity, *sensitivity["per_family"].values()]
    keys = (("accuracy", "accuracy"), ("accuracy_blank", "accuracy, blank image"), ("changed", "changed by swap"))
    figure, (axes,) = _figure(1.8 + 1.1 * len(families), 3.6)
    width = 0.8 / len(keys)
    for offset, (key, label) in enumerate(keys):
        heights = [0.0 if row[key] is None else row[key] for row in rows]
        axes.bar(np.arange(len(families)) + offset * width, heights, width, label=label)
    axes.set_xticks(np.arange(len(families)) + width, families, fontsize=8, rotation=30, ha="right")
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("fraction of questions")
    axes.legend(fontsize=7)
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, out / "image_sensitivity.png")


def evidence_plot(result: dict, out: Path) -> Path | None:
    gates = result["evidence_experts"]
    if not gates:
        return None
    figure, axes = _figure(4.0 * len(gates), 3.2, len(gates))
    edges = np.linspace(0, 1, 21)
    for panel, (layer, entry) in zip(axes, gates.items()):
        series = [(f"α {name}", stats) for name, stats in entry.get("alpha", {}).items()]
        if "s_evd" in entry:
            series.append(("s_evd", entry["s_evd"]))
        for label, stats in series:
            if stats.get("count"):
                counts = np.array(stats["histogram"], dtype=float)
                panel.stairs(counts / counts.sum(), edges, label=label)
        panel.set_title(f"layer {layer}: evidence-expert gates", fontsize=9)
        panel.set_xlabel("value")
        panel.legend(fontsize=7)
    axes[0].set_ylabel("share of language tokens")
    return _save(figure, out / "evidence_experts.png")


PLOTS = (entropy_plot, grounding_plot, dependence_plot, specialisation_plot, sensitivity_plot, evidence_plot)
