"""analysis/ of a run: analysis.json, analysis.md, PNG plots and the same figures in TensorBoard (tb/).

Plots (each written only when the model has what it shows):
- entropy.png: H_V(l) and H_L(l) over the decoder layers, with H_L's least-squares line (β);
- grounding.png / evidence_dependence.png: F(E_k) and R_k as layers × experts heat maps;
- specialisation.png: per MoE layer, the routing share of each expert per question family and per
  token part (image, prompt, answer);
- image_sensitivity.png: per question family, accuracy with the real and the blank image and the
  fraction of answers an image swap changes;
- evidence_experts.png: histograms of α and s_evd per MoE layer.
TensorBoard: per-layer curves `analysis/entropy_{vision,language}`, `analysis/grounding/<expert>`,
`analysis/evidence_dependence/<expert>` (step = layer index), the headline scalars at step 0 and
every plot as an image under `analysis/plots/<name>`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from asymoe.analysis.cells import ANALYSIS_FILE
from asymoe.analysis.plots import PLOTS
from asymoe.files import write_json_atomic


def _number(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _expert_table(section: dict, key: str, experts: list[str]) -> list[str]:
    lines = ["| layer | " + " | ".join(experts) + " |", "|---" * (len(experts) + 1) + "|"]
    for layer, values in section.items():
        lines.append(f"| {layer} | " + " | ".join(_number(values[e][key]) for e in experts) + " |")
    return lines


def markdown(result: dict) -> str:
    experts = result["experts"]
    entropy = result["entropy"]
    sensitivity = result["image_sensitivity"]
    lines = [
        f"# Analysis of {result['run_dir']}",
        "",
        f"checkpoint `{result['checkpoint']}`, split `{result['split']}`, {result['questions']} questions, "
        f"{result['seconds']:.0f} s",
        "",
        "## Headline numbers",
        "",
        "| key | value |",
        "|---|---|",
        *[f"| {key} | {value:.4f} |" for key, value in sorted(result["scalars"].items())],
        "",
        "## Attention entropy per layer (nats)",
        "",
        "| layer | H_V | H_L |",
        "|---|---|---|",
        *[
            f"| {layer} | {_number(v)} | {_number(lang)} |"
            for layer, v, lang in zip(entropy["layers"], entropy["vision"], entropy["language"])
        ],
        "",
        f"slope β of H_L over layers: {_number(entropy['language_slope'], 4)}; "
        f"of H_V: {_number(entropy['vision_slope'], 4)}",
        "",
        "## Image sensitivity",
        "",
        "| family | questions | accuracy | accuracy (blank image) | swappable | changed by swap | follows swap |",
        "|---|---|---|---|---|---|---|",
    ]
    for family, row in [("all", sensitivity), *sensitivity["per_family"].items()]:
        lines.append(
            f"| {family} | {row['questions']} | {_number(row['accuracy'])} | {_number(row['accuracy_blank'])} | "
            f"{row['swappable']} | {_number(row['changed'])} | {_number(row['follows'])} |"
        )
    if experts:
        lines += ["", "## Evidence grounding ratio F(E_k)", "", *_expert_table(result["grounding"], "F", experts)]
        lines += [
            "",
            "## Evidence-dependence ratio R_k",
            "",
            *_expert_table(result["evidence_dependence"], "R", experts),
        ]
    return "\n".join(lines) + "\n"


def _png_array(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def write_tensorboard(out: Path, result: dict, plots: list[Path]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(out / "tb"))
    entropy = result["entropy"]
    for kind in ("vision", "language"):
        for layer, value in zip(entropy["layers"], entropy[kind]):
            if value is not None:
                writer.add_scalar(f"analysis/entropy_{kind}", value, layer)
    for section, key in (("grounding", "F"), ("evidence_dependence", "R")):
        for layer, values in result[section].items():
            for expert, entry in values.items():
                if entry[key] is not None:
                    writer.add_scalar(f"analysis/{section}/{expert}", entry[key], int(layer))
    for key, value in result["scalars"].items():
        writer.add_scalar(key, value, 0)
    for path in plots:
        writer.add_image(f"analysis/plots/{path.stem}", _png_array(path), 0, dataformats="HWC")
    writer.close()


def write_analysis(out: Path, result: dict) -> list[Path]:
    """Write every file of analysis/ into `out`; returns the plot paths."""
    out.mkdir(parents=True, exist_ok=True)
    plots = [path for plot in PLOTS if (path := plot(result, out)) is not None]
    write_json_atomic(out / ANALYSIS_FILE, result)
    (out / "analysis.md").write_text(markdown(result) + "".join(f"\n![{p.stem}]({p.name})\n" for p in plots))
    write_tensorboard(out, result, plots)
    return plots
