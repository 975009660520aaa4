"""Grid reports from what is on disk: summary.csv, summary.md, summary.png, hparams/.

Rebuilt after every run and by ``asymoe report GRID_DIR`` (also while cells are still running):
one row per group (a cell without its seed). Every numeric key of the cells' metrics.json is
summarised over the finished seeds: mean ± sample std, the 95% Student-t interval of the mean,
and the difference from the grid's reference group with its 95% Welch interval (see
:mod:`asymoe.grid.stats`). Compute is reported next to the metrics: parameters (total, activated
per vision / language token), a FLOP proxy of 2 x activated parameters per token (one
multiply-add per activated weight; attention-score FLOPs, which grow with sequence length, are
not counted) and the wall time of training and of the whole cell.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asymoe.analysis.cells import analysis_scalars
from asymoe.config import ConfigError
from asymoe.files import METRICS_FILE, read_json
from asymoe.grid import stats
from asymoe.grid.cells import switch_text
from asymoe.grid.chart import write_chart
from asymoe.grid.hparams import write_hparams
from asymoe.grid.state import CELLS_DIR, SPEC_FILE, cell_state

PARAM_KEYS = ("params/total", "params/activated_per_vision_token", "params/activated_per_language_token")
FLOP_KEYS = {
    "flops/vision_token": "params/activated_per_vision_token",
    "flops/language_token": "params/activated_per_language_token",
}
TIME_KEYS = ("time/train_s", "time/total_s")
# Metric order in the tables after the main metrics (by the key's first component, e.g. test_iid/):
# evaluation first, bookkeeping last.
_PREFIX_ORDER = ("test", "val", "train", "time")


@dataclass
class GroupRow:
    group: str
    switches: dict[str, Any]
    states: list[str]  # one per seed
    metrics: list[dict]  # metrics.json of each finished seed

    def values(self, key: str) -> list[float]:
        return [float(m[key]) for m in self.metrics if _is_number(m.get(key))]

    def mean_std(self, key: str) -> tuple[float | None, float | None]:
        """Mean and sample standard deviation (n - 1) over finished seeds; std None for one seed."""
        return stats.mean_std(self.values(key))

    @property
    def status(self) -> str:
        counts = {state: self.states.count(state) for state in dict.fromkeys(self.states)}
        if list(counts) == ["finished"]:
            return "finished"
        return ", ".join(f"{count} {state}" for state, count in counts.items())


@dataclass
class MetricSummary:
    """One metric of one group: its seeds' statistics and the comparison with the reference."""

    n: int
    mean: float | None
    std: float | None
    ci: tuple[float, float] | None
    reference: str | None  # the reference group's name; None without a reference
    difference: stats.Difference | None  # None for the reference itself or too few seeds


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_rows(grid_dir: Path) -> tuple[dict, list[GroupRow]]:
    spec = read_json(grid_dir / SPEC_FILE)
    if spec is None:
        raise ConfigError(f"{grid_dir}: not a grid directory (no readable {SPEC_FILE}); run `asymoe grid` first")
    rows: dict[str, GroupRow] = {}
    for cell in spec["cells"]:
        row = rows.setdefault(cell["group"], GroupRow(cell["group"], cell["switches"], [], []))
        cell_dir = grid_dir / CELLS_DIR / cell["name"]
        state = cell_state(cell_dir)
        row.states.append(state)
        if state == "finished":
            row.metrics.append({**(read_json(cell_dir / METRICS_FILE) or {}), **analysis_scalars(cell_dir)})
    return spec, list(rows.values())


def main_metrics(spec: dict) -> list[str]:
    return spec.get("metrics") or [spec["metric"]]


def metric_columns(spec: dict, rows: list[GroupRow]) -> list[str]:
    """Every numeric metrics.json key but the parameter counts: main metrics, then test/, val/, train/, time/, rest."""
    keys = {key for row in rows for m in row.metrics for key, value in m.items() if _is_number(value)}
    keys = {key for key in keys if not key.startswith("params/")}
    main = main_metrics(spec)

    def order(key: str) -> tuple[int, str]:
        section = key.split("/", 1)[0]  # test, test_iid, val, ...
        ranks = [rank for rank, prefix in enumerate(_PREFIX_ORDER) if section.startswith(prefix)]
        return (ranks[0] if ranks else len(_PREFIX_ORDER), key)

    return main + sorted(keys - set(main), key=order)


def reference_row(spec: dict, row: GroupRow, rows: list[GroupRow]) -> GroupRow | None:
    """The group `row` is compared with: the named group, or the reference variant at row's axis values."""
    reference = spec.get("reference")
    if reference is None:
        return None
    for other in rows:
        if other.group == reference or other.switches == {**row.switches, "variant": reference}:
            return other
    return None


def summarise(spec: dict, rows: list[GroupRow], metrics: list[str]) -> dict[tuple[str, str], MetricSummary]:
    """(group, metric) -> its summary; computed once for the tables and the chart."""
    summaries = {}
    for row in rows:
        reference = reference_row(spec, row, rows)
        for key in metrics:
            values = row.values(key)
            mean, std = stats.mean_std(values)
            difference = None
            if reference is not None and reference is not row:
                difference = stats.welch_difference(values, reference.values(key))
            summaries[row.group, key] = MetricSummary(
                len(values), mean, std, stats.confidence_interval(values), reference and reference.group, difference
            )
    return summaries


def _number(value: float | None, digits: int = 4, sign: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def mean_text(summary: MetricSummary) -> str:
    return (
        "" if summary.mean is None else _number(summary.mean) + ("" if summary.std is None else f" ± {summary.std:.4f}")
    )


def ci_text(summary: MetricSummary) -> str:
    return "" if summary.ci is None else f"[{_number(summary.ci[0])}, {_number(summary.ci[1])}]"


def difference_text(row: GroupRow, summary: MetricSummary) -> str:
    if summary.reference is None or not summary.n:
        return ""
    if summary.reference == row.group:
        return "reference"
    d = summary.difference
    if d is None:
        return "n/a"
    mark = f" {stats.NOISE_MARK}" if d.beyond_noise else ""
    return f"{_number(d.diff, sign=True)} [{_number(d.low, sign=True)}, {_number(d.high, sign=True)}]{mark}"


def flops(row: GroupRow, key: str) -> float | None:
    mean = row.mean_std(FLOP_KEYS[key])[0]
    return None if mean is None else 2 * mean


def _csv_metric_cells(summary: MetricSummary) -> list:
    d = summary.difference
    ci = summary.ci or ("", "")
    values = [summary.mean, summary.std, summary.n, *ci]
    values += [d.diff, d.low, d.high, d.df, d.p_value, d.beyond_noise] if d else [""] * 6
    return ["" if value is None else value for value in values]


CSV_METRIC_FIELDS = ("mean", "std", "n", "ci_low", "ci_high", "diff", "diff_low", "diff_high", "diff_df", "diff_p")
CSV_METRIC_FIELDS += ("diff_beyond_noise",)


def write_summary_csv(path: Path, spec: dict, rows: list[GroupRow], metrics: list[str], summaries: dict) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["group", *spec["switch_columns"], "seeds_finished", "seeds", "status", *PARAM_KEYS, *FLOP_KEYS]
            + ["reference"]
            + [f"{key}_{field}" for key in metrics for field in CSV_METRIC_FIELDS]
        )
        for row in rows:
            params = [row.mean_std(key)[0] for key in PARAM_KEYS]
            reference = reference_row(spec, row, rows)
            writer.writerow(
                [row.group, *[switch_text(row.switches.get(c)) for c in spec["switch_columns"]]]
                + [len(row.metrics), len(row.states), row.status]
                + ["" if p is None else int(round(p)) for p in params]
                + ["" if (f := flops(row, key)) is None else int(round(f)) for key in FLOP_KEYS]
                + ["" if reference is None else reference.group]
                + [cell for key in metrics for cell in _csv_metric_cells(summaries[row.group, key])]
            )


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines),
    ]


def _preamble(spec: dict, rows: list[GroupRow]) -> list[str]:
    seeds = max(len(row.states) for row in rows)
    reference = spec.get("reference")
    comparison = (
        f"Δ: difference of means from the reference `{reference}`"
        + (" (the group of that variant at the same axis values)" if "variant" in spec["switch_columns"] else "")
        + ", with its 95% interval from Welch's unequal-variance t-test (Welch–Satterthwaite degrees of "
        f"freedom); {stats.NOISE_MARK} marks an interval that excludes 0 (beyond seed noise); n/a: fewer than two "
        "seeds on a side, or no spread on either."
        if reference
        else "No `reference:` group in the grid file, so no comparisons."
    )
    return [
        f"# Grid `{spec['name']}`",
        "",
        f"From `{spec['grid_file']}`{' with --quick' if spec.get('quick') else ''}. "
        f"Metrics: mean ± sample std over the finished seeds (of {seeds}); 95% CI: Student-t interval of "
        f"the mean over seeds. {comparison}",
        "",
        "Compute: parameters as the model counts them (total, activated per vision / language token); "
        "FLOPs/token ≈ 2 × activated parameters per token (a FLOP proxy: one multiply-add per activated "
        "weight, attention scores not counted); train and total: wall time of a cell (mean over seeds).",
        "",
    ]


def _group_lines(spec: dict, rows: list[GroupRow], summaries: dict) -> list[str]:
    main = main_metrics(spec)
    header = [*spec["switch_columns"], "seeds", "params", "activated/vision token", "activated/language token"]
    header += ["FLOPs/vision token", "FLOPs/language token", "train time", "total time"]
    header += [h for key in main for h in (key, f"Δ {key}")] + ["status"]
    lines = []
    for row in rows:
        cells = [switch_text(row.switches.get(c)) for c in spec["switch_columns"]]
        cells.append(f"{len(row.metrics)}/{len(row.states)}")
        cells += ["" if (m := row.mean_std(key)[0]) is None else f"{int(round(m)):,}" for key in PARAM_KEYS]
        cells += ["" if (f := flops(row, key)) is None else si_text(f) for key in FLOP_KEYS]
        cells += ["" if (s := row.mean_std(key)[0]) is None else format_seconds(s) for key in TIME_KEYS]
        for key in main:
            summary = summaries[row.group, key]
            cells += [mean_text(summary), difference_text(row, summary)]
        cells.append(row.status)
        lines.append(cells)
    return _table(header, lines)


def write_summary_md(path: Path, spec: dict, rows: list[GroupRow], metrics: list[str], summaries: dict) -> None:
    lines = _preamble(spec, rows) + ["## Groups", ""] + _group_lines(spec, rows, summaries)
    detail = []
    for key in metrics:
        for row in rows:
            summary = summaries[row.group, key]
            if summary.n:
                p = summary.difference.p_value if summary.difference else None
                detail.append(
                    [key, row.group, str(summary.n), mean_text(summary), ci_text(summary)]
                    + [difference_text(row, summary), "" if p is None else f"{p:.3g}"]
                )
    if detail:
        header = ["metric", "group", "seeds", "mean ± std", "95% CI", "Δ vs reference [95% CI]", "p (Welch)"]
        lines += ["", "## Every metric", ""] + _table(header, detail)
    path.write_text("\n".join(lines) + "\n")


def si_text(value: float) -> str:
    """A count with an SI suffix and three significant digits: 3.00k, 12.4M, 1.50G."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def write_report(grid_dir: Path) -> tuple[dict[str, Path], list[GroupRow]]:
    """Rebuild summary.csv, summary.md, summary.png and hparams/ from what is on disk."""
    spec, rows = load_rows(grid_dir)
    metrics = metric_columns(spec, rows)
    summaries = summarise(spec, rows, metrics)
    paths = {
        "csv": grid_dir / "summary.csv",
        "md": grid_dir / "summary.md",
        "png": grid_dir / "summary.png",
        "hparams": grid_dir / "hparams",
    }
    write_summary_csv(paths["csv"], spec, rows, metrics, summaries)
    write_summary_md(paths["md"], spec, rows, metrics, summaries)
    write_chart(paths["png"], spec, rows, summaries, main_metrics(spec))
    write_hparams(paths["hparams"], spec)
    return paths, rows


def report_cli(args) -> int:
    """`asymoe report GRID_DIR`: rebuild the summary from the grid directory and print it."""
    grid_dir = Path(args.grid_dir)
    paths, rows = write_report(grid_dir)
    print(paths["md"].read_text())
    print(f"wrote {paths['csv']}, {paths['md']}, {paths['png']}; tensorboard --logdir {paths['hparams']}")
    incomplete = sum(row.status != "finished" for row in rows)
    if incomplete:
        print(f"{incomplete} of {len(rows)} groups have unfinished seeds (see the status column)")
    return 0
