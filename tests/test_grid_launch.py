"""Grid launchers without running cells: device slots, prefixed output, sbatch parameters, job reconciliation."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from asymoe import cli
from asymoe import grid as grid_lib
from asymoe.config import ConfigError
from asymoe.grid import parallel, slurm
from asymoe.grid.command import _launcher_options
from conftest import REPO

MOIIE = str(REPO / "experiments" / "moiie.yaml")
LAUNCHER = {
    "partition": "gpu",
    "account": "lab",
    "time": 240,
    "nodes": 2,
    "tasks_per_node": 8,
    "gpus_per_node": 8,
    "cpus_per_task": 12,
    "mem": "256G",
    "setup": ["module load cuda/12.4"],
    "extra": {"mail-type": "END", "exclusive": True},
}


def write_grid(path: Path, **fields) -> Path:
    path.write_text(json.dumps({"name": "g", "base": MOIIE, "axes": {"model.moe.routing.top_k": [1, 2]}, **fields}))
    return path


def test_device_slots_share_gpus_or_cpu_threads(monkeypatch):
    slots = parallel.device_slots(2, ["0", "1", "2", "3"], cpu_count=16)
    assert [(s.label, s.env) for s in slots] == [
        ("GPU 0,1", {"CUDA_VISIBLE_DEVICES": "0,1"}),
        ("GPU 2,3", {"CUDA_VISIBLE_DEVICES": "2,3"}),
    ]
    slots = parallel.device_slots(3, [], cpu_count=8)
    assert [s.env for s in slots] == [{"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}] * 3
    with pytest.raises(ConfigError, match=r"--jobs 3: only 2 GPU\(s\) visible \(4,7\)"):
        parallel.device_slots(3, ["4", "7"], cpu_count=8)
    for value, ids in (("4,7", ["4", "7"]), ("", []), ("-1", [])):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert parallel.visible_gpus() == ids


def test_output_is_prefixed_line_by_line_with_progress_redraws_collapsed(capsys):
    lines = parallel.PrefixedLines("cell-a", threading.Lock())
    lines("epoch 0:  10%\repoch 0:  50%\repoch 0: 100%\n\x1b[1mdo")
    assert capsys.readouterr().out == "[cell-a] epoch 0: 100%\n"
    lines("ne\x1b[0m\r\n")
    assert capsys.readouterr().out == "[cell-a] done\n"


def test_sbatch_parameters_from_the_launcher_block_and_command_line(tmp_path):
    grid = grid_lib.load_grid(write_grid(tmp_path / "g.yaml", launcher=LAUNCHER))
    options = _launcher_options(grid, ["time=60", "extra.mail-user=me@lab.org"])
    folder = tmp_path / "cells" / "c" / "slurm"
    script = slurm.sbatch_script(options, "routing.top_k=1__seed=0", folder)
    assert [line for line in script.splitlines() if line.startswith("#SBATCH")] == [
        "#SBATCH --account=lab",
        "#SBATCH --cpus-per-task=12",
        f"#SBATCH --error={folder}/%j_0_log.err",
        "#SBATCH --exclusive",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --job-name=routing.top_k=1__seed=0",
        "#SBATCH --mail-type=END",
        "#SBATCH --mail-user=me@lab.org",
        "#SBATCH --mem=256G",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={folder}/%j_0_log.out",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=USR2@90",
        "#SBATCH --time=60",
        "#SBATCH --wckey=submitit",
    ]
    assert "# setup\nmodule load cuda/12.4\n" in script
    assert f"srun --unbuffered --output {folder}/%j_%t_log.out" in script


def test_launcher_block_is_checked_and_not_part_of_the_grid_identity(tmp_path):
    path = write_grid(tmp_path / "g.yaml", launcher=LAUNCHER)
    other_time = write_grid(tmp_path / "h.yaml", launcher={**LAUNCHER, "time": 30})
    assert grid_lib.load_grid(path).sha256 == grid_lib.load_grid(other_time).sha256
    with pytest.raises(ConfigError, match="launcher: unknown option 'gpus'; valid: partition, account"):
        grid_lib.load_grid(write_grid(tmp_path / "bad.yaml", launcher={"gpus": 8}))
    with pytest.raises(ConfigError, match=r"launcher.time: expected int \(time limit in minutes\), got '4h'"):
        grid_lib.load_grid(write_grid(tmp_path / "bad.yaml", launcher={"time": "4h"}))


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_dry_run_prints_the_sbatch_script_and_bad_switches_are_one_line_errors(tmp_path):
    path = write_grid(tmp_path / "g.yaml", launcher=LAUNCHER)
    code, out, _ = run_main(["grid", str(path), "--output", str(tmp_path / "out"), "--launcher", "slurm", "--dry-run"])
    assert code == 0 and "#SBATCH --partition=gpu" in out and "#SBATCH --time=240" in out
    assert "cell 2 of 2: routing.top_k=2__seed=0  [run]" in out
    for argv, message in (
        (["--jobs", "2", "--launcher", "slurm"], "--jobs applies to --launcher local"),
        (["--slurm", "time=5"], "--slurm and --wait apply to --launcher slurm or submitit-local"),
        (["--launcher", "slurm", "--slurm", "time=0"], "launcher (grid file and --slurm).time: must be at least 1"),
        (["--jobs", "0"], "--jobs must be at least 1"),
    ):
        code, _, err = run_main(["grid", str(path), "--output", str(tmp_path / "out"), "--dry-run", *argv])
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_slurm_states_are_classified():
    assert [slurm.classify_slurm_state(s) for s in ("PENDING", "REQUEUED", "RUNNING", "COMPLETING")] == [
        "queued",
        "queued",
        "running",
        "running",
    ]
    for ended in ("COMPLETED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "CANCELLED by 1042"):
        assert slurm.classify_slurm_state(ended) == "ended"
    assert slurm.classify_slurm_state("UNKNOWN") == slurm.classify_slurm_state("") == "vanished"


def test_reconcile_a_vanished_job_and_a_finished_one(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now names no process: a job the scheduler no longer knows
    vanished, finished, slurm_cell = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for cell_dir, launcher in ((vanished, "submitit-local"), (finished, "submitit-local"), (slurm_cell, "slurm")):
        cell_dir.mkdir()
        status = {"status": "running", "job_id": str(gone.pid), "launcher": launcher}
        (cell_dir / "status.json").write_text(json.dumps(status))
    (finished / "metrics.json").write_text("{}")
    assert slurm.reconcile(vanished, "submitit-local") == ("vanished", str(gone.pid))
    assert slurm.reconcile(finished, "submitit-local") == ("finished", str(gone.pid))
    # No sacct on this machine: the id cannot be confirmed, so the cell counts as vanished.
    assert slurm.reconcile(slurm_cell, "slurm") == ("vanished", str(gone.pid))
    mine = tmp_path / "d"
    mine.mkdir()
    (mine / "status.json").write_text(json.dumps({"status": "running", "job_id": "1", "launcher": "submitit-local"}))
    assert slurm.reconcile(mine, "submitit-local")[0] == "running"  # pid 1 exists


@pytest.mark.parametrize("jobs", [1, 2])
def test_after_hook_runs_on_each_finished_cell_in_its_slot_before_the_next(tmp_path, monkeypatch, jobs):
    """`asymoe grid --analyze`: each cell is analysed as soon as it finished, with its slot's env."""
    from asymoe.grid import runner

    grid = grid_lib.load_grid(write_grid(tmp_path / "g.json", axes={"model.moe.routing.top_k": [1, 2, 3]}), [])
    cells = grid_lib.expand(grid)
    events, lock = [], threading.Lock()

    def fake_run_cell(cell, cell_dir, command=None, env=None, output=None, on_start=None):
        with lock:
            events.append(("fit", cell.name))
        return (1, "boom") if "top_k=2" in cell.name else (0, "")

    def after(cell, cell_dir, env=None, output=None, say=print):
        with lock:
            events.append(("after", cell.name, (env or {}).get("OMP_NUM_THREADS")))
        return "top_k=3" in cell.name  # the analysis of this cell fails

    monkeypatch.setattr(runner, "run_cell", fake_run_cell)
    monkeypatch.setattr(parallel, "run_cell", fake_run_cell)
    states = {cell.name: "missing" for cell in cells}
    if jobs == 1:
        failed = runner.run_sequential(grid, tmp_path / "grid", cells, states, after)
    else:
        monkeypatch.setattr(parallel, "visible_gpus", lambda: [])
        monkeypatch.setattr(parallel.os, "cpu_count", lambda: 4)
        failed = parallel.run_parallel(grid, tmp_path / "grid", cells, states, jobs, after)
    names = [cell.name for cell in cells]
    assert failed == [names[1], names[2]]  # the failed fit, the failed analysis
    threads = None if jobs == 1 else "2"
    assert sorted(e for e in events if e[0] == "after") == [("after", names[0], threads), ("after", names[2], threads)]
    for name in (names[0], names[2]):  # each analysis follows its own fit, in the same worker
        assert events.index(("after", name, threads)) > events.index(("fit", name))
    if jobs == 1:
        assert [e[1] for e in events] == [names[0], names[0], names[1], names[2], names[2]]
