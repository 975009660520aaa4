"""Grid statistics on hand-computed examples: t quantiles, confidence intervals, Welch's comparison, the summary."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest

from asymoe import cli
from asymoe import grid as grid_lib
from asymoe.config import ConfigError
from asymoe.grid import stats
from conftest import REPO

MOIIE = str(REPO / "experiments" / "moiie.yaml")


@pytest.mark.parametrize("df, quantile", [(1, 12.706205), (2, 4.302653), (4, 2.776445), (30, 2.042272)])
def test_t_quantile_matches_the_printed_table(df, quantile):
    assert stats.t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-6)


def test_confidence_interval_by_hand():
    # mean 2, s = 1, half-width t_{0.975,2} * 1 / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    assert stats.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    low, high = stats.confidence_interval([1.0, 2.0, 3.0])
    assert (low, high) == (pytest.approx(2 - 2.484138, abs=1e-6), pytest.approx(2 + 2.484138, abs=1e-6))
    # n = 2: s = sqrt(0.02), half-width 12.706205 * sqrt(0.02) / sqrt(2) = 1.2706205
    low, high = stats.confidence_interval([0.5, 0.7])
    assert low == pytest.approx(0.6 - 1.2706205, abs=1e-6) and high == pytest.approx(0.6 + 1.2706205, abs=1e-6)
    assert stats.confidence_interval([0.5]) is None and stats.mean_std([]) == (None, None)


def test_welch_df_by_hand():
    # var 1 over n 3 vs var 20/3 over n 4: a = 1/3, b = 5/3; df = 2^2 / (a^2/2 + b^2/3) = 4 / 0.981481
    assert stats.welch_df(1.0, 3, 20 / 3, 4) == pytest.approx(4.0754717, abs=1e-6)
    # Equal variances and sizes: Welch's df is the pooled 2(n - 1).
    assert stats.welch_df(2.5, 5, 2.5, 5) == pytest.approx(8.0)


def test_welch_difference_by_hand():
    # [4,5,6] - [1,2,3]: d = 3, se = sqrt(1/3 + 1/3) = 0.816497, df = 4, half = 2.776445 * 0.816497 = 2.266958
    d = stats.welch_difference([4.0, 5.0, 6.0], [1.0, 2.0, 3.0])
    assert d.diff == pytest.approx(3.0) and d.df == pytest.approx(4.0)
    assert d.low == pytest.approx(3 - 2.266958, abs=1e-6) and d.high == pytest.approx(3 + 2.266958, abs=1e-6)
    assert d.beyond_noise
    assert d.p_value == pytest.approx(0.0213116, abs=1e-6)  # t = 3.674235 on 4 df, two-sided
    # Overlapping seeds: the interval contains 0.
    close = stats.welch_difference([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
    assert close.low < 0 < close.high and not close.beyond_noise
    # Undefined: one seed on a side, or no spread on either.
    assert stats.welch_difference([1.0], [1.0, 2.0]) is None
    assert stats.welch_difference([1.0, 1.0], [2.0, 2.0]) is None


def _fake_grid_dir(tmp_path: Path, values: dict[str, list[float]], reference: str | None = "dense") -> Path:
    """A grid directory as `asymoe grid` leaves it, with hand-written metrics.json per cell."""
    fields = {
        "name": "stats",
        "base": MOIIE,
        "seeds": [0, 1, 2],
        "variants": {"dense": [], "moe": ["model.moe.routing.top_k=1"]},
    }
    fields["metrics"] = ["test/accuracy", "test_pope/f1"]
    if reference:
        fields["reference"] = reference
    path = tmp_path / "g.yaml"
    path.write_text(json.dumps(fields))
    grid = grid_lib.load_grid(path)
    cells = grid_lib.expand(grid)
    grid_lib.validate(grid, cells)
    grid_dir = tmp_path / "grid"
    (grid_dir / "cells").mkdir(parents=True)
    (grid_dir / "grid.json").write_text(json.dumps(grid_lib.grid_spec(grid, cells)))
    for cell in cells:
        cell_dir = grid_dir / "cells" / cell.name
        cell_dir.mkdir()
        variant = cell.switches["variant"]
        metrics = {
            "test/accuracy": values[variant][cell.seed],
            "test_pope/f1": 0.5 + 0.1 * cell.seed,  # the same in both groups: no difference
            "test_iid/accuracy_counting": 0.25,
            "params/activated_per_vision_token": 1000 if variant == "dense" else 1500,
            "params/activated_per_language_token": 400,
            "time/total_s": 10.0 + cell.seed,
            "time/train_s": 8.0,
        }
        (cell_dir / "metrics.json").write_text(json.dumps(metrics))
    return grid_dir


def test_summary_compares_each_group_with_the_reference(tmp_path):
    grid_dir = _fake_grid_dir(tmp_path, {"dense": [1.0, 2.0, 3.0], "moe": [4.0, 5.0, 6.0]})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["report", str(grid_dir)]) == 0
    rows = {row["variant"]: row for row in csv.DictReader(open(grid_dir / "summary.csv"))}
    dense, moe = rows["dense"], rows["moe"]
    assert float(moe["test/accuracy_ci_low"]) == pytest.approx(5 - 2.484138, abs=1e-6)
    assert float(moe["test/accuracy_diff"]) == pytest.approx(3.0)
    assert float(moe["test/accuracy_diff_low"]) == pytest.approx(3 - 2.266958, abs=1e-6)
    assert float(moe["test/accuracy_diff_df"]) == pytest.approx(4.0)
    assert moe["test/accuracy_diff_beyond_noise"] == "True" and moe["reference"] == "variant=dense"
    assert dense["test/accuracy_diff"] == "" and dense["reference"] == "variant=dense"
    # Every numeric metrics.json key flows into the summary. Equal groups: difference 0, within noise;
    # no spread on either side: no comparison (the test is undefined).
    assert float(moe["test_pope/f1_diff"]) == pytest.approx(0.0) and moe["test_pope/f1_diff_beyond_noise"] == "False"
    assert float(moe["test_iid/accuracy_counting_mean"]) == 0.25 and moe["test_iid/accuracy_counting_diff"] == ""
    assert float(moe["time/total_s_mean"]) == pytest.approx(11.0)
    # FLOP proxy: 2 x activated parameters per token.
    assert int(moe["flops/vision_token"]) == 3000 and int(dense["flops/language_token"]) == 800
    md = (grid_dir / "summary.md").read_text()
    assert (
        "| moe | 3/3 |  | 1,500 | 400 | 3k | 800 | 8s | 11s | 5.0000 ± 1.0000 |" in md
        and "+3.0000 [+0.7330, +5.2670] *" in md
    )
    assert "Welch's unequal-variance t-test" in md and "FLOPs/token ≈ 2 × activated parameters" in md
    assert (
        "| test/accuracy | variant=moe | 3 | 5.0000 ± 1.0000 | [2.5159, 7.4841] "
        "| +3.0000 [+0.7330, +5.2670] * | 0.0213 |" in md
    )
    assert md in out.getvalue()  # `asymoe report` prints the same table
    assert (grid_dir / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overlapping_groups_are_not_marked(tmp_path):
    grid_dir = _fake_grid_dir(tmp_path, {"dense": [1.0, 2.0, 3.0], "moe": [1.5, 2.5, 3.5]})
    grid_lib.write_report(grid_dir)
    moe = [row for row in csv.DictReader(open(grid_dir / "summary.csv")) if row["variant"] == "moe"][0]
    assert float(moe["test/accuracy_diff"]) == pytest.approx(0.5) and moe["test/accuracy_diff_beyond_noise"] == "False"
    assert " *" not in (grid_dir / "summary.md").read_text().split("## Every metric")[1]


def test_reference_variant_is_matched_at_the_same_axis_values(tmp_path):
    fields = {"name": "r", "base": MOIIE, "variants": {"a": [], "b": []}, "axes": {"model.moe.routing.top_k": [1, 2]}}
    path = tmp_path / "g.yaml"
    path.write_text(json.dumps({**fields, "reference": "a"}))
    grid = grid_lib.load_grid(path)
    spec = {"reference": "a"}
    rows = [grid_lib.GroupRow(cell.group, cell.switches, [], []) for cell in grid_lib.expand(grid)]
    assert [grid_lib.report.reference_row(spec, row, rows).group for row in rows] == [
        "variant=a__routing.top_k=1",
        "variant=a__routing.top_k=2",
        "variant=a__routing.top_k=1",
        "variant=a__routing.top_k=2",
    ]
    path.write_text(json.dumps({**fields, "reference": "c"}))
    with pytest.raises(ConfigError, match=r"reference 'c' is neither a variant nor a group; use a variant \(a, b\)"):
        grid_lib.expand(grid_lib.load_grid(path))
    path.write_text(json.dumps({**fields, "metrics": []}))
    with pytest.raises(ConfigError, match="metrics must be a non-empty list"):
        grid_lib.load_grid(path)
