"""summary.png: the grid's main metrics per group, one panel per metric, 95% intervals as error bars."""

from __future__ import annotations

from pathlib import Path

from asymoe.grid.stats import NOISE_MARK

REFERENCE_COLOR = "#8C8C8C"
GROUP_COLOR = "#4C72B0"


def _panel(axes, rows: list, summaries: dict, metric: str, labels: list[str]) -> None:
    positions = list(range(len(rows)))
    items = [summaries[row.group, metric] for row in rows]
    means = [0.0 if s.mean is None else s.mean for s in items]
    colors = [REFERENCE_COLOR if s.reference == row.group else GROUP_COLOR for row, s in zip(rows, items)]
    bars = axes.bar(positions, means, color=colors)
    spread = [(x, s.mean, s.mean - s.ci[0]) for x, s in zip(positions, items) if s.ci is not None]
    if spread:
        xs, ys, errors = zip(*spread)
        axes.errorbar(xs, ys, yerr=errors, fmt="none", ecolor="black", capsize=4)
    for bar, row, s in zip(bars, rows, items):
        if s.mean is None:
            label = f"no {metric}" if row.metrics else row.status
        else:
            label = f"{s.mean:.3f}" + ("" if s.std is None else f" ± {s.std:.3f}")
            if s.difference is not None and s.difference.beyond_noise:
                label += f" {NOISE_MARK}"
        top = bar.get_height() + (0.0 if s.ci is None else s.ci[1] - s.mean)
        axes.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, top),
            ha="center",
            va="bottom",
            xytext=(0, 3),
            textcoords="offset points",
            fontsize=8,
        )
    axes.set_xticks(positions, labels, fontsize=8)
    axes.set_ylabel(metric)
    axes.grid(axis="y", alpha=0.3)


def _title(spec: dict, rows: list, never_run: int) -> str:
    seeds = max(len(row.metrics) for row in rows)
    title = f"{spec['name']}: " + (
        f"mean over up to {seeds} seeds, error bars = 95% Student-t interval" if seeds > 1 else "one seed per group"
    )
    if spec.get("reference"):
        title += (
            f"\ngrey: reference {spec['reference']}; {NOISE_MARK} = Welch 95% interval of the difference excludes 0"
        )
    if never_run:
        title += f" ({never_run} group{'s' if never_run > 1 else ''} not run)"
    return title


def write_chart(path: Path, spec: dict, rows: list, summaries: dict, metrics: list[str]) -> None:
    """One bar panel per main metric (grid `metrics:`, default `metric`), groups side by side.

    `summaries`: (group, metric) -> :class:`asymoe.grid.report.MetricSummary`.

    Groups none of whose cells has started (--only) are left out; failed ones show their status.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    never_run = sum(set(row.states) == {"missing"} for row in rows)
    rows = [row for row in rows if set(row.states) != {"missing"}] or rows
    labels = [row.group.replace("__", "\n") for row in rows]
    longest = max(len(line) for label in labels for line in label.splitlines())
    width = max(6.0, max(1.1, 0.07 * longest) * len(rows) + 1.5)
    figure = Figure(figsize=(width, 1.0 + 4.0 * len(metrics)), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(len(metrics), 1, squeeze=False)[:, 0]
    for axes, metric in zip(panels, metrics):
        _panel(axes, rows, summaries, metric, labels)
    figure.suptitle(_title(spec, rows, never_run), fontsize=10)
    figure.savefig(path, dpi=120)
