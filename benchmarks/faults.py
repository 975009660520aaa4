"""Crash-safety scenarios: kill -9 a training run (at a random step, or inside a checkpoint save),
corrupt its last checkpoint, then `resume=last`; count how often the resumed run ends with the
weights of an uninterrupted run and trained on exactly the same batches.

    python benchmarks/faults.py --repeats 3            # writes benchmarks/results/faults.{json,md}
    python benchmarks/faults.py --repeats 1 --fsdp2    # also the 2-process FSDP2 scenarios

Each scenario starts the run in a child process (this file with `--worker`; under FSDP2 two, one
per rank, started together as torchrun or SLURM would start them), which records every step's
batch and kills itself -- or, under FSDP2, its whole process group -- with SIGKILL at the
chosen moment. A save fault tears the checkpoint write: half the bytes of the new file, or (sharded
folder) the old folder moved aside and the new one not yet in place. The resume runs in this
process (single process) or again as two processes (FSDP2: the uninterrupted run and every
scenario's resume one after another in one pair of ranks, which pays the 2-process start once).
"survived" means: resume worked, the final weights equal the uninterrupted run's within rtol 1e-5 /
atol 1e-6, and the resumed run's batches are the uninterrupted run's from the step after its
checkpoint on ("exact batch").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments.lightning import find_free_network_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RUN_TIMEOUT_S = 300
RTOL, ATOL = 1e-5, 1e-6
# A run with a checkpoint every 2 steps: steps 1..MAX_STEPS, checkpoints at 2, 4, ...
MAX_STEPS = 6
# One image per batch: an epoch has ~16 batches (8 per rank under FSDP2), so every resume is mid-epoch.
FAULT_OVERRIDES = [
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.val_check_interval=2",
    "data.images_per_batch=1",
    "data.limit_train=160",
    "data.limit_val=8",
    "data.limit_test=8",
]
FSDP2_RANKS = 2
FSDP2_OVERRIDES = ["trainer.strategy=fsdp2", f"trainer.devices={FSDP2_RANKS}"]


# ---------------------------------------------------------------------------------------------
# What a run records: each step's batch, the final weights


def batch_digest(batch: dict) -> int:
    return zlib.crc32(batch["input_ids"].cpu().numpy().tobytes())


class Recorder(L.Callback):
    """Logs (step, batch digest) per step (to `log_dir/rank<N>.jsonl` when given); keeps the final weights.

    `kill_at_step`: SIGKILL this process (its whole group when `group`) after that step.
    """

    def __init__(self, log_dir: Path | None = None, kill_at_step: int | None = None, group: bool = False):
        self.log_dir = log_dir
        self.kill_at_step = kill_at_step
        self.group = group
        self.steps: list[tuple[int, int]] = []
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        entry = (trainer.global_step, batch_digest(batch))
        self.steps.append(entry)
        if self.log_dir is not None:
            with open(self.log_dir / f"rank{trainer.global_rank}.jsonl", "a") as handle:
                handle.write(json.dumps(entry) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        if self.kill_at_step is not None and trainer.global_step == self.kill_at_step and trainer.global_rank == 0:
            kill(self.group)

    def on_train_end(self, trainer, pl_module) -> None:
        weights = {}
        for name, tensor in pl_module.state_dict().items():  # full_tensor() is a collective: every rank calls it
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            weights[name] = full.detach().cpu().clone()
        self.weights = weights
        if self.log_dir is not None and trainer.global_rank == 0:
            torch.save(weights, self.log_dir / "weights.pt")


def kill(group: bool) -> None:
    if group:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def read_steps(log_dir: Path, rank: int = 0) -> list[tuple[int, int]]:
    path = log_dir / f"rank{rank}.jsonl"
    if not path.is_file():
        return []
    return [tuple(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Faults inside a checkpoint save (installed in the child process)


def install_save_fault(kind: str, on_save: int, group: bool) -> None:
    """Kill the process inside its `on_save`-th checkpoint write.

    `torn_file`: half the new file's bytes are on disk (in its temporary file) when the process dies.
    `torn_swap`: the old sharded folder is moved aside, the complete new one not yet renamed into place.
    """
    from asymoe.training import checkpoints

    count = [0]
    if kind == "torn_file":
        write = checkpoints._write_durable

        def torn_write(path: Path, data: bytes) -> None:
            if path.suffix == ".ckpt":
                count[0] += 1
                if count[0] == on_save:
                    with open(path.with_name(path.name + ".tmp"), "wb") as handle:
                        handle.write(data[: len(data) // 2])
                        handle.flush()
                        os.fsync(handle.fileno())
                    kill(group)
            write(path, data)

        checkpoints._write_durable = torn_write
    elif kind == "torn_swap":
        swap = checkpoints.swap_folder_into_place

        def torn_swap(staging: Path, path: Path) -> None:
            count[0] += 1
            if count[0] >= on_save and path.exists():  # the first replacement of a folder from then on
                os.replace(path, path.with_name(path.name + checkpoints.RETIRED_SUFFIX))
                kill(group)
            swap(staging, path)

        checkpoints.swap_folder_into_place = torn_swap
    else:
        raise ValueError(kind)


# Rank 0 writes this line (and the run's index) to stderr before each run of a spec.
RUN_MARKER = "faults: run "
REFUSED_FILE = "refused.txt"


def worker(spec_path: Path) -> None:
    """The runs of one spec, one after another in this process (and, under FSDP2, in its ranks)."""
    from asymoe import config as config_lib
    from asymoe.config import ConfigError
    from asymoe.training.run import fit
    from asymoe.training.rundir import is_first_process

    spec = json.loads(spec_path.read_text())
    # The parent's thread count: CPU reductions (and so the weights) depend on it.
    torch.set_num_threads(spec["threads"])
    group = spec.get("group", False)
    if spec.get("save_fault"):
        install_save_fault(spec["save_fault"], spec["on_save"], group)
    for index, run in enumerate(spec["runs"]):
        if is_first_process():
            print(f"{RUN_MARKER}{index}", file=sys.stderr, flush=True)
        log_dir = Path(run["log_dir"])
        log_dir.mkdir(parents=True, exist_ok=True)
        recorder = Recorder(log_dir, spec.get("kill_at_step"), group)
        try:
            fit(config_lib.load("asymoe", run["overrides"]), callbacks=[recorder])
        except ConfigError as error:  # raised by every rank before training: the next run can go on
            if is_first_process():
                (log_dir / REFUSED_FILE).write_text(str(error))


def launch(runs: list[dict], folder: Path, ranks: int = 1, **process) -> tuple[int, str]:
    """Run `worker` over `runs` in `ranks` processes of a new process group; returns (exit status, output).

    Each run: `overrides` and `log_dir` (default `folder`). `process`: the fault (`kill_at_step`, or
    `save_fault` and `on_save`) and whether a kill ends the whole process group (`group`). With
    ranks > 1 every rank starts at once with its rank in the environment, as torchrun or SLURM start
    them (Lightning then spawns none): their imports overlap, where Lightning's own launcher starts
    rank 1 only once rank 0 has imported everything and reached `fit` (~12 s later on 2 cores). The
    status is that of the first rank seen to fail (the others are then ended: they would wait for it
    until the timeout), else 0; the output is every rank's, in order of writing.
    """
    folder.mkdir(parents=True, exist_ok=True)
    runs = [{"log_dir": str(folder), **run} for run in runs]
    spec = {**process, "runs": runs, "threads": torch.get_num_threads()}
    (folder / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(folder / "spec.json")]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    if ranks > 1:
        port = find_free_network_port()  # the port Lightning's own launcher would pick
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", WORLD_SIZE=str(ranks))
    log_path = folder / "output.log"
    processes: list[subprocess.Popen] = []
    with open(log_path, "ab") as log:
        for rank in range(ranks):
            rank_env = {**env, "LOCAL_RANK": str(rank)} if ranks > 1 else env
            # Rank 0 leads a new process group and the others join it: a hang, or a fault that kills
            # the group, ends every rank with one killpg.
            # (A group, not a session: a process may join another group of its own session only.)
            group_id = processes[0].pid if processes else 0
            processes.append(
                subprocess.Popen(
                    command,
                    cwd=folder,
                    env=rank_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=lambda group_id=group_id: os.setpgid(0, group_id),
                )
            )
    deadline = time.monotonic() + RUN_TIMEOUT_S * len(runs)
    failed = None  # the first rank seen to fail: the others, waiting for it in a collective, end with it
    while failed is None and any(process.poll() is None for process in processes):
        if time.monotonic() > deadline:
            _end_group(processes)
            return -9999, "timed out: " + log_path.read_text(errors="replace")[-2000:]
        failed = next((process.returncode for process in processes if process.returncode not in (None, 0)), None)
        time.sleep(0.05)
    _end_group(processes)
    if failed is None:
        failed = next((process.returncode for process in processes if process.returncode != 0), 0)
    return failed, log_path.read_text(errors="replace")


def _end_group(processes: list[subprocess.Popen]) -> None:
    """SIGKILL whatever is left of the launch's process group, and reap every rank."""
    if any(process.poll() is None for process in processes):
        try:
            os.killpg(processes[0].pid, signal.SIGKILL)
        except ProcessLookupError:  # the last one ended in between
            pass
    for process in processes:
        process.wait()


def run_outputs(output: str, count: int) -> list[str]:
    """A launch's output split into its `count` runs (at rank 0's markers); runs never reached get ''."""
    parts = re.split(rf"^{re.escape(RUN_MARKER)}\d+$", output, flags=re.MULTILINE)[1:]
    return (parts + [""] * count)[:count]


def recorded_run(log_dir: Path) -> Recorder:
    """A finished run's steps (rank 0) and final weights, read back from its log folder."""
    recorder = Recorder()
    recorder.steps = read_steps(log_dir)
    recorder.weights = torch.load(log_dir / "weights.pt", weights_only=True)
    return recorder


# ---------------------------------------------------------------------------------------------
# Scenarios


@dataclass
class Outcome:
    scenario: str
    survived: bool
    detail: str
    kill_step: int | None = None
    resumed_from_step: int | None = None
    max_abs_diff: float | None = None
    notices: list[str] = field(default_factory=list)


def compare(reference: Recorder, resumed_steps, resumed_weights, killed_steps) -> tuple[bool, str, float | None, int]:
    """Whether the resumed run finished like the reference: same weights, same batches from its checkpoint on."""
    if not resumed_steps:
        return False, "resumed run trained no step", None, -1
    first = resumed_steps[0][0]
    expected = [entry for entry in reference.steps if entry[0] >= first]
    if resumed_steps != expected:
        return False, f"resumed batches differ from the uninterrupted run's from step {first}", None, first - 1
    if first - 1 > max((s for s, _ in killed_steps), default=0):
        return False, f"resumed after step {first - 1}, later than the run got", None, first - 1
    worst = 0.0
    for name, value in reference.weights.items():
        other = resumed_weights[name]
        if value.is_floating_point():
            worst = max(worst, (other.double() - value.double()).abs().max().item() if value.numel() else 0.0)
            if not torch.allclose(other, value, rtol=RTOL, atol=ATOL):
                return False, f"{name} differs by {worst:.2e}", worst, first - 1
        elif not torch.equal(other, value):
            return False, f"{name} differs", None, first - 1
    return True, "ok", worst, first - 1


def corrupt_last(run_dir: Path) -> None:
    """Truncate last.ckpt to half, as an in-place writer killed mid-write would leave it."""
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])


SCENARIOS = ("kill_at_step", "kill_in_save", "corrupt_last")
FSDP2_SCENARIOS = ("fsdp2_kill_at_step", "fsdp2_kill_in_swap")


def fault_spec(scenario: str, rng: random.Random) -> dict:
    """The child's fault for one scenario: a kill after a random step, or in a random checkpoint save."""
    # The step-k checkpoint is written after step k's batch-end hook: a kill after step 3 or later
    # finds the step-2 checkpoint on disk, an earlier one has nothing to resume from.
    if scenario in ("kill_at_step", "fsdp2_kill_at_step"):
        return {"kill_at_step": rng.randint(3, MAX_STEPS - 1)}
    if scenario == "corrupt_last":
        return {"kill_at_step": MAX_STEPS - 1}  # two checkpoints written: one stays good after the truncation
    if scenario == "kill_in_save":
        return {"save_fault": "torn_file", "on_save": rng.randint(2, 4)}  # a good checkpoint exists by then
    assert scenario == "fsdp2_kill_in_swap", scenario
    return {"save_fault": "torn_swap", "on_save": rng.randint(1, 2)}


def start_scenario(scenario: str, overrides: list[str], folder: Path, seed: int) -> tuple[dict, Outcome | None]:
    """The faulty child run of one scenario and its fault checks; the fault, and an Outcome if it went wrong."""
    fsdp2 = scenario.startswith("fsdp2")
    run_dir = folder / "run"
    fault = fault_spec(scenario, random.Random(seed))
    runs = [{"overrides": overrides + [f"output_dir={run_dir}"]}]
    code, output = launch(runs, folder / "killed", ranks=FSDP2_RANKS if fsdp2 else 1, group=fsdp2, **fault)
    if code != -signal.SIGKILL:
        return fault, Outcome(scenario, False, f"the faulty run was not killed (exit {code}): {output[-300:]}")
    if scenario == "corrupt_last":
        corrupt_last(run_dir)
    return fault, None


def resume_overrides(overrides: list[str], folder: Path) -> list[str]:
    return overrides + [f"output_dir={folder / 'run'}", "trainer.resume=last"]


def finish_scenario(scenario: str, fault: dict, reference: Recorder, folder: Path, resumed: Recorder, notices=()):
    """The Outcome of a scenario whose resumed run trained `resumed.steps` and ended with `resumed.weights`."""
    killed_steps = read_steps(folder / "killed")
    survived, detail, worst, from_step = compare(reference, resumed.steps, resumed.weights, killed_steps)
    return Outcome(scenario, survived, detail, fault.get("kill_at_step"), from_step, worst, list(notices))


def run_scenario(scenario: str, overrides: list[str], reference: Recorder, folder: Path, seed: int) -> Outcome:
    """One single-process scenario end to end: the faulty child run, the fault checks, `resume=last` in
    this process, the comparison."""
    from asymoe import config as config_lib
    from asymoe.config import ConfigError
    from asymoe.training.run import fit

    assert not scenario.startswith("fsdp2"), "FSDP2 scenarios run together: run_fsdp2_scenarios"
    fault, failed = start_scenario(scenario, overrides, folder, seed)
    if failed is not None:
        return failed
    resumed = Recorder()
    try:
        fit(config_lib.load("asymoe", resume_overrides(overrides, folder)), callbacks=[resumed])
    except ConfigError as error:
        return Outcome(scenario, False, f"resume refused: {error}", **_kill(fault))
    return finish_scenario(scenario, fault, reference, folder, resumed)


def run_fsdp2_scenarios(cases: list[tuple[str, int]], overrides: list[str], folder: Path) -> list[Outcome]:
    """FSDP2 scenarios ((scenario, seed) pairs, in `folder/<scenario>-<i>`) against one uninterrupted run.

    A 2-process launch costs its imports and process-group set-up before any step (tens of seconds
    on 2 cores), so after one faulty launch per scenario a single launch trains the reference and then
    every resume, one after another in the same two ranks (each `fit` seeds itself and builds its own
    model, data and trainer). The reference is in `folder/reference`.
    """
    started = []
    outcomes: dict[int, Outcome] = {}
    for index, (scenario, seed) in enumerate(cases):
        case_folder = folder / f"{scenario}-{index}"
        fault, failed = start_scenario(scenario, overrides, case_folder, seed)
        if failed is not None:
            outcomes[index] = failed
        else:
            started.append((index, scenario, fault, case_folder))
    reference_dir = folder / "reference"
    runs = [{"overrides": overrides + [f"output_dir={reference_dir / 'run'}"], "log_dir": str(reference_dir)}]
    runs += [{"overrides": resume_overrides(overrides, f), "log_dir": str(f / "resumed")} for *_, f in started]
    code, output = launch(runs, folder / "reference-and-resumes", ranks=FSDP2_RANKS)
    outputs = run_outputs(output, len(runs))
    assert (reference_dir / "weights.pt").is_file(), f"the reference run failed (exit {code}): {outputs[0][-3000:]}"
    reference = recorded_run(reference_dir)
    for (index, scenario, fault, case_folder), run_output in zip(started, outputs[1:]):
        resumed_dir = case_folder / "resumed"
        if (resumed_dir / REFUSED_FILE).is_file():
            detail = f"resume refused: {(resumed_dir / REFUSED_FILE).read_text()}"
            outcomes[index] = Outcome(scenario, False, detail, **_kill(fault))
        elif not (resumed_dir / "weights.pt").is_file():
            detail = f"resume failed (exit {code}): {(run_output or 'not reached')[-300:]}"
            outcomes[index] = Outcome(scenario, False, detail, **_kill(fault))
        else:
            notices = [line for line in run_output.splitlines() if line.startswith("asymoe:")]
            resumed = recorded_run(resumed_dir)
            outcomes[index] = finish_scenario(scenario, fault, reference, case_folder, resumed, notices)
    return [outcomes[index] for index in range(len(cases))]


def _kill(fault: dict) -> dict:
    return {"kill_step": fault.get("kill_at_step")}


def reference_run(overrides: list[str], folder: Path) -> Recorder:
    """The uninterrupted single-process run (in this process) every single-process scenario is compared with."""
    from asymoe import config as config_lib
    from asymoe.training.run import fit

    recorder = Recorder()
    fit(config_lib.load("asymoe", overrides + [f"output_dir={folder / 'run'}"]), callbacks=[recorder])
    return recorder


# ---------------------------------------------------------------------------------------------
# Benchmark entry point


def _write_results(outcomes: list[Outcome], args, seconds: float) -> None:
    from machine import cpu_model

    table: dict[str, dict[str, int]] = {}
    for outcome in outcomes:
        row = table.setdefault(outcome.scenario, {"survived": 0, "lost": 0})
        row["survived" if outcome.survived else "lost"] += 1
    payload = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPU cores (2-core CPU dev machine, shared with other jobs)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "lightning": L.__version__},
        "repeats": args.repeats,
        "seed": args.seed,
        "tolerance": {"rtol": RTOL, "atol": ATOL},
        "seconds": round(seconds, 1),
        "table": table,
        "outcomes": [outcome.__dict__ for outcome in outcomes],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(payload, indent=2))
    lines = [
        "# Crash safety: kill -9 / corrupt checkpoint, then `resume=last`",
        "",
        f"Command: `{payload['command']}`  ",
        f"Machine: {payload['machine']}; torch {torch.__version__}, lightning {L.__version__}  ",
        f"Survived = final weights equal an uninterrupted run's (rtol {RTOL}, atol {ATOL}) and the resumed "
        "batches continue exactly; {:.0f} s in all.".format(seconds),
        "",
        "| scenario | survived | lost |",
        "|---|---|---|",
        *[f"| {name} | {row['survived']} | {row['lost']} |" for name, row in table.items()],
        "",
        *[
            f"- {o.scenario}: kill after step {o.kill_step}, resumed from step {o.resumed_from_step}, "
            f"max |dw| {o.max_abs_diff}: {o.detail}"
            for o in outcomes
        ],
    ]
    (RESULTS / "faults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=2, help="runs per scenario (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill steps")
    parser.add_argument("--fsdp2", action="store_true", help="also the 2-process FSDP2 scenarios (slow)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/asymoe-faults"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    sys.path.insert(0, str(REPO / "tests"))
    import shutil

    from conftest import TINY

    shutil.rmtree(args.workdir, ignore_errors=True)
    started = time.time()
    overrides = TINY + FAULT_OVERRIDES
    outcomes = []
    reference = reference_run(overrides, args.workdir / "reference")
    for scenario in SCENARIOS:
        for repeat in range(args.repeats):
            seed = args.seed * 1000 + repeat
            folder = args.workdir / f"{scenario}-{repeat}"
            outcomes.append(run_scenario(scenario, overrides, reference, folder, seed))
            print(outcomes[-1], flush=True)
    if args.fsdp2:
        seeds = [args.seed * 1000 + repeat for repeat in range(args.repeats)]
        cases = [(scenario, seed) for scenario in FSDP2_SCENARIOS for seed in seeds]
        for outcome in run_fsdp2_scenarios(cases, overrides + FSDP2_OVERRIDES, args.workdir / "fsdp2"):
            outcomes.append(outcome)
            print(outcome, flush=True)
    _write_results(outcomes, args, time.time() - started)


if __name__ == "__main__":
    main()
