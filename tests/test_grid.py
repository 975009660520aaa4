"""Ablation grids: expansion and validation, cells in child processes, failure, resume, reports."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from asymoe import cli
from asymoe import grid as grid_lib
from asymoe.config import ConfigError
from conftest import REPO, TINY

MOIIE = str(REPO / "experiments" / "moiie.yaml")


def write_grid(path: Path, **fields) -> Path:
    path.write_text(json.dumps(fields, indent=1))  # JSON is YAML
    return path


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def hparams_contents(logdir: Path) -> dict[str, bytes]:
    """The HParams plugin's summaries in one run directory, by tag."""
    events = EventAccumulator(str(logdir))
    events.Reload()
    return events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)


def experiment_of(logdir: Path):
    return hparams_metadata.parse_experiment_plugin_data(hparams_contents(logdir)[hparams_metadata.EXPERIMENT_TAG])


def session_of(logdir: Path):
    content = hparams_contents(logdir)[hparams_metadata.SESSION_START_INFO_TAG]
    return hparams_metadata.parse_session_start_info_plugin_data(content)


# ---------------------------------------------------------------------------------------------
# Expansion and validation (no running)


def test_two_by_two_grid_with_two_seeds_expands_to_eight_cells(tmp_path):
    path = write_grid(
        tmp_path / "g.yaml",
        name="g",
        base=MOIIE,
        axes={"model.moe.routing.top_k": [1, 2], "model.moe.routing.balance_coef.language": [0.001, 0.01]},
        seeds=[0, 1],
    )
    grid = grid_lib.load_grid(path)
    cells = grid_lib.expand(grid)
    grid_lib.validate(grid, cells)
    assert [cell.name for cell in cells] == [
        f"routing.top_k={k}__balance_coef.language={c}__seed={s}" for k in (1, 2) for c in (0.001, 0.01) for s in (0, 1)
    ]
    assert len({cell.group for cell in cells}) == 4
    last = cells[-1]
    assert last.switches == {"model.moe.routing.top_k": 2, "model.moe.routing.balance_coef.language": 0.01}
    assert last.config["model.moe.routing.top_k"] == 2
    assert last.config["model.moe.routing.balance_coef.language"] == 0.01
    assert last.config["model.moe.routing.balance_coef.vision"] == 0.001  # moiie.yaml's, untouched
    assert last.config["model.moe.groups.shared.num_experts"] == 2
    assert last.config["seed"] == 1
    assert cells[0].config["model.moe.routing.top_k"] == 1 and cells[0].config["seed"] == 0
    spec = grid_lib.grid_spec(grid, cells)
    # HParams: exactly what differs between cells, seeds excluded (they aggregate within a group).
    assert set(spec["cells"][0]["hparams"]) == {"model.moe.routing.top_k", "model.moe.routing.balance_coef.language"}


def test_variants_switch_experiments_and_quick_preset_applies(tmp_path):
    path = write_grid(
        tmp_path / "g.yaml",
        name="g",
        base="moiie",
        overrides=["optim.lr=0.001"],
        variants={"vanilla": {"experiment": "vanilla_moe"}, "top 1": ["model.moe.routing.top_k=1"]},
        quick=["data.limit_train=10"],
    )
    for quick, limit in ((False, "None"), (True, 10)):  # switched_hparams writes None as "None"
        grid = grid_lib.load_grid(path, ["trainer.max_epochs=7"], quick=quick)
        cells = grid_lib.expand(grid)
        grid_lib.validate(grid, cells)
        assert [cell.name for cell in cells] == ["variant=vanilla__seed=0", "variant=top_1__seed=0"]
        vanilla, top1 = (cell.config for cell in cells)
        assert vanilla["model.moe.routing.mode"] == "shared" and vanilla["model.moe.groups.shared.num_experts"] == 4
        assert top1["model.moe.routing.mode"] == "modality" and top1["model.moe.routing.top_k"] == 1
        for config in (vanilla, top1):
            assert config["optim.lr"] == 0.001 and config["trainer.max_epochs"] == 7
            assert config["data.limit_train"] == limit


def test_extends_inherits_keys_with_paths_relative_to_the_file_that_wrote_them(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "experiment.yaml").write_text(f"extends: {MOIIE}\noptim:\n  lr: 0.002\n")
    write_grid(
        tmp_path / "shared" / "_presets.yaml",
        base="experiment.yaml",  # relative to shared/, not to the grid that extends it
        seeds=[0, 1, 2],
        quick=["data.limit_train=10"],
        variants={"inherited": []},
    )
    path = write_grid(
        tmp_path / "g.yaml",
        extends="shared/_presets.yaml",
        name="g",
        seeds=[5],
        axes={"model.moe.routing.top_k": [1, 2]},
    )
    grid = grid_lib.load_grid(path, quick=True)
    assert grid.base == str(tmp_path / "shared" / "experiment.yaml")
    assert grid.seeds == [5] and grid.overrides == ["data.limit_train=10"]
    # Top-level keys replace, they do not merge: the preset's variants stay, the grid adds axes.
    cells = grid_lib.expand(grid)
    assert [cell.name for cell in cells] == [f"variant=inherited__routing.top_k={k}__seed=5" for k in (1, 2)]
    grid_lib.validate(grid, cells)
    assert cells[0].config["optim.lr"] == 0.002 and cells[0].config["data.limit_train"] == 10
    # The grid's identity covers the keys of the files it extends (not their comments).
    before = grid.sha256
    preset = tmp_path / "shared" / "_presets.yaml"
    preset.write_text(preset.read_text() + "\n# a comment\n")
    assert grid_lib.load_grid(path, quick=True).sha256 == before
    preset.write_text(preset.read_text().replace("data.limit_train=10", "data.limit_train=20"))
    assert grid_lib.load_grid(path, quick=True).sha256 != before


def test_extends_cycle_and_unknown_key_in_extended_file_are_one_line_errors(tmp_path):
    write_grid(tmp_path / "a.yaml", extends="b.yaml", name="a", base=MOIIE, axes={"model.moe.routing.top_k": [1]})
    write_grid(tmp_path / "b.yaml", extends="a.yaml")
    with pytest.raises(ConfigError, match="'extends' forms a cycle"):
        grid_lib.load_grid(tmp_path / "a.yaml")
    write_grid(tmp_path / "b.yaml", qiuck=["data.limit_train=10"])
    with pytest.raises(ConfigError, match=re.escape("b.yaml: unknown key 'qiuck'; did you mean 'quick'?")):
        grid_lib.load_grid(tmp_path / "a.yaml")
    write_grid(tmp_path / "a.yaml", extends="missing.yaml", name="a", base=MOIIE, axes={"model.moe.routing.top_k": [1]})
    with pytest.raises(ConfigError, match="grid file not found: .*missing.yaml"):
        grid_lib.load_grid(tmp_path / "a.yaml")


def test_shipped_grids_share_one_quick_preset():
    presets = grid_lib.read_grid_file(REPO / "ablations" / "_presets.yaml")[0]
    for path in SHIPPED_GRIDS:
        if "extends: _presets.yaml" in path.read_text():
            assert grid_lib.load_grid(path, quick=True).overrides == presets["quick"]


# Files named _*.yaml hold presets that grids extend; they are not grids themselves.
SHIPPED_GRIDS = sorted(p for p in (REPO / "ablations").glob("*.yaml") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", SHIPPED_GRIDS, ids=lambda p: p.stem)
def test_shipped_grids_validate(path):
    grid = grid_lib.load_grid(path, quick=True)
    cells = grid_lib.expand(grid)
    missing = [cell for cell in cells if not Path(cell.experiment).is_file()]
    if missing:  # an experiment another change has not added yet: one line naming the cell
        with pytest.raises(ConfigError, match=re.escape(f"'{missing[0].name}'")):
            grid_lib.validate(grid, cells)
    else:
        grid_lib.validate(grid, cells)
    assert len(cells) == len(grid.seeds) * max(1, len(grid.variants)) * math.prod(len(v) for v in grid.axes.values())


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"axes": {"model.moe.routing.topk": [1, 2]}},
            "axes: unknown key 'model.moe.routing.topk'; did you mean 'model.moe.routing.top_k'?",
        ),
        ({"axes": {"model.moe.routing.top_k": []}}, "axes.model.moe.routing.top_k is empty"),
        ({"axes": {}}, "axes and variants are both empty"),
        ({"axes": {"model.moe.routing.top_k": [1, 1]}}, "cells 1 and 2 are both named 'routing.top_k=1__seed=0'"),
        ({"variants": {"top 1": [], "top/1": []}}, "both named 'variant=top_1__seed=0'"),
        ({"axes": {"model.moe.routing.top_k": [5]}}, "cell 1 of 1 'routing.top_k=5__seed=0'"),
        (
            {"axes": {"model.moe.routing.top_k": [1]}, "overrides": ["model.moe.routing.top_k=2"]},
            "which the grid varies",
        ),
        ({"variants": {"missing": {"experiment": "no_such_experiment.yaml"}}}, "cell 1 of 1 'variant=missing__seed=0'"),
    ],
    ids=[
        "unknown-axis-key",
        "empty-axis",
        "nothing-varies",
        "duplicate-values",
        "duplicate-variants",
        "invalid-cell",
        "override-vs-axis",
        "missing-experiment",
    ],
)
def test_bad_grid_is_one_line_error_exit_2(tmp_path, fields, message):
    path = write_grid(tmp_path / "bad.yaml", name="bad", base=MOIIE, **fields)
    code, out, err = run_main(["grid", str(path), "--output", str(tmp_path / "out"), "--dry-run"])
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_report_aggregates_seeds_and_writes_hparams(tmp_path):
    """Report from disk alone: two groups x two seeds, one seed failed."""
    path = write_grid(
        tmp_path / "g.yaml",
        name="agg",
        base=MOIIE,
        axes={"model.moe.routing.top_k": [1, 2]},
        seeds=[0, 1],
        metric="test/accuracy",
    )
    grid = grid_lib.load_grid(path)
    cells = grid_lib.expand(grid)
    grid_lib.validate(grid, cells)
    grid_dir = tmp_path / "grid"
    (grid_dir / "cells").mkdir(parents=True)
    (grid_dir / "grid.json").write_text(json.dumps(grid_lib.grid_spec(grid, cells)))
    accuracy = {cells[0].name: 0.5, cells[1].name: 0.7, cells[2].name: 0.9}
    for cell in cells:
        cell_dir = grid_dir / "cells" / cell.name
        cell_dir.mkdir()
        if cell.name in accuracy:
            metrics = {
                "test/accuracy": accuracy[cell.name],
                "test/lm_loss": 1.0,
                "params/total": 1000,
                "time/total_s": 10.0,
            }
            (cell_dir / "metrics.json").write_text(json.dumps(metrics))
        else:
            (cell_dir / "status.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    code, out, _ = run_main(["report", str(grid_dir)])
    assert code == 0
    rows = list(csv.DictReader(open(grid_dir / "summary.csv")))
    assert [row["model.moe.routing.top_k"] for row in rows] == ["1", "2"]
    assert float(rows[0]["test/accuracy_mean"]) == pytest.approx(0.6)
    assert float(rows[0]["test/accuracy_std"]) == pytest.approx(math.sqrt(0.02))  # sample std
    assert rows[0]["status"] == "finished" and rows[0]["seeds_finished"] == "2"
    assert float(rows[1]["test/accuracy_mean"]) == pytest.approx(0.9) and rows[1]["test/accuracy_std"] == ""
    assert rows[1]["status"] == "1 finished, 1 failed"
    assert "0.6000 ± 0.1414" in (grid_dir / "summary.md").read_text()
    assert (grid_dir / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    experiment = experiment_of(grid_dir / "hparams")
    assert [info.name for info in experiment.hparam_infos] == ["model.moe.routing.top_k"]
    assert {info.name.tag for info in experiment.metric_infos} >= {"test/accuracy", "params/total"}
    sessions = sorted(p.name for p in (grid_dir / "hparams").iterdir() if p.is_dir())
    assert sessions == sorted(accuracy)  # finished cells only
    start = session_of(grid_dir / "hparams" / cells[1].name)
    assert start.group_name == cells[1].group  # the seeds of a group aggregate in the dashboard
    assert start.hparams["model.moe.routing.top_k"].number_value == 1


def test_finished_cell_with_changed_config_is_refused_then_rerun_with_force(tmp_path):
    path = write_grid(tmp_path / "g.yaml", name="g", base=MOIIE, axes={"model.moe.routing.top_k": [1, 2]})
    grid = grid_lib.load_grid(path)
    cells = grid_lib.expand(grid)
    grid_lib.validate(grid, cells)
    grid_dir = tmp_path / "grid"
    grid_dir.mkdir()
    (grid_dir / "grid.json").write_text(json.dumps(grid_lib.grid_spec(grid, cells)))
    for cell, lr in zip(cells, (cells[0].config["optim.lr"], 0.123)):  # the 2nd ran under another lr
        cell_dir = grid_dir / "cells" / cell.name
        cell_dir.mkdir(parents=True)
        (cell_dir / "cell.json").write_text(json.dumps({"config": {**cell.config, "optim.lr": lr}}))
        (cell_dir / "metrics.json").write_text("{}")
    with pytest.raises(
        ConfigError, match=re.escape(f"cell '{cells[1].name}' finished under another config (optim.lr: 0.123 -> ")
    ):
        grid_lib.check_grid_dir(grid_dir, grid, cells, force=False)
    states = grid_lib.check_grid_dir(grid_dir, grid, cells, force=True)
    assert states == {cells[0].name: "finished", cells[1].name: "stale"}


# ---------------------------------------------------------------------------------------------
# Running: a grid killed mid-cell, resumed, with a cell whose data is broken at load time


@pytest.fixture(scope="module")
def resumed_grid(tmp_path_factory):
    """Start a 3-cell grid, kill it once the 2nd cell started, rerun it; record what happened.

    The 3rd cell's LLaVA JSON names a missing image: the config validates (the JSON exists), the
    child fails while loading data (exit 2).
    """
    root = tmp_path_factory.mktemp("grid")
    (root / "train.json").write_text(
        json.dumps(
            [
                {
                    "image": "missing.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nshape?"},
                        {"from": "gpt", "value": "circle"},
                    ],
                }
            ]
        )
    )
    path = write_grid(
        root / "tiny.yaml",
        name="tiny",
        base=MOIIE,
        # Evaluation dominates a TINY run's time: one batch of 8, two generated tokens.
        overrides=TINY
        + ["data.limit_val=8", "data.limit_test=8", "data.eval_batch_size=8", "data.max_answer_tokens=2"],
        variants={
            "top 1": ["model.moe.routing.top_k=1"],
            "top 2": ["model.moe.routing.top_k=2"],
            "missing image": ["data.source=llava_json", f"data.train_path={root / 'train.json'}"],
        },
    )
    grid_dir = root / "out"
    names = ["variant=top_1__seed=0", "variant=top_2__seed=0", "variant=missing_image__seed=0"]
    cells = [grid_dir / "cells" / name for name in names]
    with open(root / "killed.log", "wb") as log:
        grid_process = subprocess.Popen(
            [sys.executable, "-m", "asymoe.cli", "grid", str(path), "--output", str(grid_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 240
        while not ((cells[0] / "metrics.json").exists() and (cells[1] / "status.json").exists()):
            assert grid_process.poll() is None, (root / "killed.log").read_text()[-3000:]
            assert time.time() < deadline, "the first cell did not finish in time"
            time.sleep(0.1)
        os.killpg(grid_process.pid, signal.SIGKILL)
        grid_process.wait()
    killed_at = time.time()
    killed_second_state = grid_lib.cell_state(cells[1])
    first_finished_at = (cells[0] / "metrics.json").stat().st_mtime_ns
    code, out, err = run_main(["grid", str(path), "--output", str(grid_dir)])
    return {
        "path": path,
        "grid_dir": grid_dir,
        "cells": cells,
        "code": code,
        "out": out,
        "err": err,
        "killed_second_state": killed_second_state,
        "first_finished_at": first_finished_at,
        "killed_at": killed_at,
    }


def test_kill_then_rerun_resumes_without_rerunning_finished_cells(resumed_grid):
    first, second, _ = resumed_grid["cells"]
    assert resumed_grid["killed_second_state"] == "unfinished"
    assert (first / "metrics.json").stat().st_mtime_ns == resumed_grid["first_finished_at"]
    assert f"cell 1 of 3: {first.name}: finished earlier" in resumed_grid["out"]
    assert f"==> cell 2 of 3: {second.name}" in resumed_grid["out"]
    assert grid_lib.cell_state(second) == "finished"
    # The killed attempt's leftovers are gone: every file of the cell comes from the rerun.
    assert all(p.stat().st_mtime >= resumed_grid["killed_at"] for p in second.rglob("*") if p.is_file())
    assert (second / "log.txt").read_text().count("$ ") == 1


def test_failed_cell_is_recorded_and_the_others_finish(resumed_grid):
    _, _, broken = resumed_grid["cells"]
    assert resumed_grid["code"] == 1
    status = json.loads((broken / "status.json").read_text())
    assert status["status"] == "failed" and status["returncode"] == 2
    assert "image not found" in status["error"] and status["error"].startswith("asymoe: error:")
    assert status["error"] in Path(status["log"]).read_text()
    assert "FAILED (exit 2)" in resumed_grid["out"] and "image not found" in resumed_grid["out"]
    assert "1 failed: variant=missing_image__seed=0" in resumed_grid["out"]


def test_summary_has_one_row_per_group_with_switches_and_metrics(resumed_grid):
    rows = list(csv.DictReader(open(resumed_grid["grid_dir"] / "summary.csv")))
    assert [row["variant"] for row in rows] == ["top 1", "top 2", "missing image"]
    assert [row["status"] for row in rows] == ["finished", "finished", "1 failed"]
    for row in rows[:2]:
        assert 0.0 <= float(row["test/accuracy_mean"]) <= 1.0
        assert math.isfinite(float(row["test/lm_loss_mean"]))
        assert int(row["params/total"]) > 0
    # top-1 activates fewer expert parameters per language token than top-2, same total.
    assert int(rows[0]["params/activated_per_language_token"]) < int(rows[1]["params/activated_per_language_token"])
    assert rows[0]["params/total"] == rows[1]["params/total"]
    assert rows[2]["test/accuracy_mean"] == ""
    assert (resumed_grid["grid_dir"] / "summary.png").stat().st_size > 0


def test_hparams_entries_are_readable_by_tensorboard(resumed_grid):
    hparams_dir = resumed_grid["grid_dir"] / "hparams"
    experiment = experiment_of(hparams_dir)
    names = {info.name for info in experiment.hparam_infos}
    assert {"variant", "model.moe.routing.top_k", "data.source"} <= names
    for cell, top_k in zip(resumed_grid["cells"][:2], (1, 2)):
        start = session_of(hparams_dir / cell.name)
        assert start.hparams["model.moe.routing.top_k"].number_value == top_k
        assert start.hparams["variant"].string_value == f"top {top_k}"
        events = EventAccumulator(str(hparams_dir / cell.name))
        events.Reload()
        metrics = json.loads((cell / "metrics.json").read_text())
        assert events.Scalars("test/accuracy")[0].value == pytest.approx(metrics["test/accuracy"])


def test_grid_dir_of_another_grid_is_refused_unless_forced(resumed_grid, tmp_path):
    other = write_grid(tmp_path / "other.yaml", name="other", base=MOIIE, axes={"model.moe.routing.top_k": [1]})
    argv = ["grid", str(other), "--output", str(resumed_grid["grid_dir"]), "--dry-run"]
    code, _, err = run_main(argv)
    assert code == 2 and "made by a different grid" in err and "--force" in err
    code, out, _ = run_main(argv + ["--force"])
    assert code == 0 and "cell 1 of 1: routing.top_k=1__seed=0  [run]" in out
    # The same grid file with other command-line overrides is a different grid too.
    code, _, err = run_main(
        [
            "grid",
            str(resumed_grid["path"]),
            "trainer.max_steps=3",
            "--output",
            str(resumed_grid["grid_dir"]),
            "--dry-run",
        ]
    )
    assert code == 2 and "made by a different grid" in err


def test_rerun_runs_only_the_failed_cell(resumed_grid):
    first, second, broken = resumed_grid["cells"]
    before = {cell.name: (cell / "log.txt").stat().st_mtime_ns for cell in (first, second, broken)}
    code, out, _ = run_main(["grid", str(resumed_grid["path"]), "--output", str(resumed_grid["grid_dir"])])
    assert code == 1
    assert (first / "log.txt").stat().st_mtime_ns == before[first.name]
    assert (second / "log.txt").stat().st_mtime_ns == before[second.name]
    assert (broken / "log.txt").stat().st_mtime_ns > before[broken.name]
    assert out.count("finished earlier") == 2 and out.count("==> cell") == 1
    rows = list(csv.DictReader(open(resumed_grid["grid_dir"] / "summary.csv")))
    assert [row["status"] for row in rows] == ["finished", "finished", "1 failed"]


# ---------------------------------------------------------------------------------------------
# The same grid directory run in parallel (--jobs 2) and through submitit's local executor


def _copy_grid_dir(resumed_grid, target: Path) -> Path:
    shutil.copytree(resumed_grid["grid_dir"], target)
    return target


def _metrics(cell_dir: Path) -> dict:
    return json.loads((cell_dir / "metrics.json").read_text())


def test_parallel_run_resumes_and_matches_the_sequential_metrics(resumed_grid, tmp_path, monkeypatch):
    """--jobs 2 over a copy of the sequential grid with its 2nd cell gone: the 1st is kept, the 2nd
    reruns next to the broken 3rd, and its metrics equal the sequential run's (same seed)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU slots even where GPUs are visible
    threads = max(1, (os.cpu_count() or 1) // 2)
    slot = f"{threads} CPU thread{'s' if threads > 1 else ''}"
    grid_dir = _copy_grid_dir(resumed_grid, tmp_path / "parallel")
    first, second, broken = (grid_dir / "cells" / cell.name for cell in resumed_grid["cells"])
    kept = (first / "metrics.json").stat().st_mtime_ns
    shutil.rmtree(second)
    code, out, _ = run_main(["grid", str(resumed_grid["path"]), "--output", str(grid_dir), "--jobs", "2"])
    assert code == 1 and (first / "metrics.json").stat().st_mtime_ns == kept
    assert f"cell 1 of 3: {first.name}: finished earlier" in out and f"up to 2 at once: {slot}, {slot}" in out
    assert f"==> cell 2 of 3: {second.name} [{slot}]" in out and f"[{second.name}] " in out
    sequential = _metrics(resumed_grid["cells"][1])
    parallel = _metrics(second)
    assert parallel["test/accuracy"] == sequential["test/accuracy"]
    assert parallel["test/lm_loss"] == pytest.approx(sequential["test/lm_loss"], rel=1e-5)
    assert parallel["train/loss"] == pytest.approx(sequential["train/loss"], rel=1e-5)
    status = json.loads((broken / "status.json").read_text())
    assert status["status"] == "failed" and "image not found" in status["error"]
    rows = list(csv.DictReader(open(grid_dir / "summary.csv")))
    assert [row["status"] for row in rows] == ["finished", "finished", "1 failed"]


def test_submitit_local_resubmits_a_vanished_job_with_resume_last(resumed_grid, tmp_path):
    """A cell whose recorded job is gone and left no metrics.json is resubmitted, continuing from its
    checkpoint; a finished cell is not. Same code path as --launcher slurm, jobs as local processes."""
    grid_dir = _copy_grid_dir(resumed_grid, tmp_path / "submitit")
    first, second = (grid_dir / "cells" / cell.name for cell in resumed_grid["cells"][:2])
    kept = (first / "metrics.json").stat().st_mtime_ns
    (second / "metrics.json").unlink()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (second / "status.json").write_text(
        json.dumps({"status": "running", "job_id": str(gone.pid), "launcher": "submitit-local"})
    )
    argv = [
        "grid",
        str(resumed_grid["path"]),
        "--output",
        str(grid_dir),
        "--only",
        "variant=top_*",
        "--launcher",
        "submitit-local",
    ]
    code, out, err = run_main(argv + ["--wait"])
    assert code == 0, out + err
    assert f"cell 1 of 2: {first.name}: finished" in out and (first / "metrics.json").stat().st_mtime_ns == kept
    assert f"cell 2 of 2: {second.name}: submitted job" in out and "with trainer.resume=last (was vanished" in out
    status = json.loads((second / "status.json").read_text())
    assert status["status"] == "finished"
    log = (second / "log.txt").read_text()
    assert log.count("$ ") == 2 and "trainer.resume=last" in log.split("$ ")[-1].splitlines()[0]
    assert _metrics(second)["test/accuracy"] == _metrics(resumed_grid["cells"][1])["test/accuracy"]
    assert list((second / "slurm").glob("*_0_log.out"))  # submitit's own log, inside the cell
    # Run again: nothing to submit, every selected cell is finished.
    code, out, _ = run_main(argv)
    assert code == 0 and "submitted" not in out and out.count(": finished") >= 2
