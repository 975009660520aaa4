"""Evaluation results as JSON, a markdown table and TensorBoard scalars, in one output folder."""

from __future__ import annotations

from pathlib import Path

from asymoe.files import read_json, write_json_atomic

PERCENT = ("accuracy", "precision", "recall", "f1", "yes_ratio", "coverage")


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """One row per benchmark; rates as percentages, counts as integers."""
    metrics = sorted({name for scores in results.values() for name in scores})
    lines = ["| benchmark | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for benchmark, scores in results.items():
        cells = []
        for name in metrics:
            value = scores.get(name)
            if value is None:
                cells.append("")
            elif name.startswith(PERCENT):
                cells.append(f"{100 * value:.2f}")
            else:
                cells.append(f"{value:.0f}")
        lines.append(f"| {benchmark} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, dict[str, float]], out_dir: str | Path, step: int = 0) -> dict:
    """out_dir/evaluation.json and evaluation.md (with the benchmarks already there), TensorBoard scalars
    `eval/<benchmark>/<metric>` in out_dir/tb; returns every benchmark's results in the folder."""
    from torch.utils.tensorboard import SummaryWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Benchmarks scored earlier into the same folder stay in the table.
    results = {**(read_json(out / "evaluation.json") or {}), **results}
    write_json_atomic(out / "evaluation.json", results)
    (out / "evaluation.md").write_text(markdown_table(results))
    writer = SummaryWriter(log_dir=str(out / "tb"))
    for benchmark, scores in results.items():
        for name, value in scores.items():
            writer.add_scalar(f"eval/{benchmark}/{name}", value, step)
    writer.close()
    return results
