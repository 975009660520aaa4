"""``asymoe grid FILE --launcher slurm``: one SLURM job per cell through submitit, resumable.

Each cell becomes one submitit job whose task runs the cell's ``asymoe fit`` command; the job's
own logs go to ``cells/<cell>/slurm/`` and the command's output to the cell's log.txt, as in a
local run. SLURM options come from the grid file's ``launcher:`` block, then ``--slurm KEY=VALUE``
on the command line (:data:`asymoe.grid.spec.LAUNCHER_OPTIONS`). A multi-node cell (``nodes`` > 1,
``tasks_per_node`` = GPUs per node) runs one task per rank, and Lightning reads the SLURM environment
(SLURM_PROCID, ...) in each, so the cell's own strategy (``trainer.strategy: fsdp`` with
``trainer.num_nodes`` and ``trainer.devices`` set to match) spans the nodes.

``status.json`` records the job id. Running ``asymoe grid FILE --launcher slurm`` again reconciles
every cell with the scheduler: finished (metrics.json exists) and queued / running jobs are
left alone; a job that ended without metrics.json, or whose id the scheduler no longer knows, is
submitted again — with ``trainer.resume=last`` when the cell has a checkpoint, so a preempted or
timed-out cell continues, never restarts. submitit also requeues a job itself on timeout or
preemption (:meth:`CellJob.checkpoint`), with the same rule. ``--launcher submitit-local`` runs
the same code path with submitit's local executor (jobs are local processes), which is how
the tests exercise it without a cluster.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from asymoe.files import read_json, write_json_atomic
from asymoe.grid.cells import Cell
from asymoe.grid.spec import LAUNCHER_OPTIONS
from asymoe.grid.state import CELLS_DIR, STATUS_FILE, cell_state

LAUNCHERS = ("local", "slurm", "submitit-local")
SLURM_DIR = "slurm"
CHECKPOINT = Path("checkpoints") / "last.ckpt"
# Scheduler states (sacct) of a job that still holds its cell.
QUEUED_STATES = ("PENDING", "REQUEUED", "CONFIGURING", "RESIZING", "SUSPENDED", "READY")
RUNNING_STATES = ("RUNNING", "COMPLETING")
POLL_SECONDS = 2.0  # --wait: how often the scheduler is asked
# submitit's local executor stops a job after 2 minutes unless told otherwise; a cell may take days.
LOCAL_TIME_LIMIT_MIN = 7 * 24 * 60


def sbatch_parameters(options: dict, job_name: str) -> dict:
    """submitit SlurmExecutor parameters for `options` (one task on one node unless they say otherwise)."""
    parameters = {"job_name": job_name, "nodes": 1, "ntasks_per_node": 1}
    for key, value in options.items():
        parameters[LAUNCHER_OPTIONS[key][0]] = value
    return parameters


def make_executor(launcher: str, folder: Path, options: dict, job_name: str):
    """submitit's SlurmExecutor, or its LocalExecutor (one local process per job) for submitit-local."""
    import submitit

    if launcher == "slurm":
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**sbatch_parameters(options, job_name))
        return executor
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(tasks_per_node=1, timeout_min=options.get("time", LOCAL_TIME_LIMIT_MIN))
    return executor


def sbatch_script(options: dict, job_name: str, folder: Path) -> str:
    """The sbatch script SlurmExecutor writes for a cell with these options (shown by --dry-run).

    Rendered by submitit's own script writer, which SlurmExecutor calls with the same parameters
    at submission; building the executor itself needs `srun`, which a login-less machine lacks.
    """
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command="<cell command>", folder=folder, **sbatch_parameters(options, job_name))


def resume_command(cell: Cell, cell_dir: Path) -> list[str]:
    """The cell's command, continuing from its last checkpoint when it has one."""
    command = cell.command(cell_dir)
    return [*command, "trainer.resume=last"] if (cell_dir / CHECKPOINT).exists() else command


@dataclass
class CellJob:
    """What one SLURM job runs: the cell's command (on every rank), status.json and log.txt on rank 0."""

    cell: Cell
    cell_dir: Path
    launcher: str

    def __call__(self) -> int:
        import submitit

        from asymoe.grid.runner import record_outcome, run_cell

        rank = submitit.JobEnvironment().global_rank
        command = resume_command(self.cell, self.cell_dir)
        if rank != 0:  # Lightning's other ranks: their output stays in submitit's per-task log
            return subprocess.run(command, stdin=subprocess.DEVNULL, check=False).returncode
        started = time.time()
        job_id = submitit.JobEnvironment().job_id
        job = {"job_id": job_id, "launcher": self.launcher}
        write_json_atomic(self.cell_dir / STATUS_FILE, {"status": "running", "started": started, **job})
        returncode, last_line = run_cell(self.cell, self.cell_dir, command=command)
        status = record_outcome(self.cell_dir, started, returncode, last_line, job)
        if returncode != 0:
            raise RuntimeError(f"cell {self.cell.name} failed: {status['error']}")
        return returncode

    def checkpoint(self, *args, **kwargs):
        """Requeued after a timeout or preemption: the next attempt resumes from the last checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(CellJob(self.cell, self.cell_dir, self.launcher))


def job_state(launcher: str, folder: Path, job_id: str) -> str:
    """queued | running | ended | vanished (the scheduler no longer knows the id)."""
    if launcher == "submitit-local":
        return _local_job_state(folder, job_id)
    return classify_slurm_state(_sacct_state(folder, job_id))


def _local_job_state(folder: Path, job_id: str) -> str:
    """A local job id is its controller's process id."""
    try:
        pid = int(job_id)
        with contextlib.suppress(ChildProcessError):  # our own child: reap it if it has exited
            os.waitpid(pid, os.WNOHANG)
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError):
        return "ended" if any(folder.glob(f"{job_id}_*_result.pkl")) else "vanished"
    except PermissionError:  # another user's process: alive
        pass
    return "running"


def _sacct_state(folder: Path, job_id: str) -> str:
    import submitit

    try:
        return str(submitit.SlurmJob(folder=folder, job_id=job_id).state)
    except Exception:  # sacct missing or failing: the id cannot be confirmed
        return "UNKNOWN"


def classify_slurm_state(state: str) -> str:
    state = state.split()[0].upper() if state else "UNKNOWN"  # "CANCELLED by 123"
    if state in QUEUED_STATES:
        return "queued"
    if state in RUNNING_STATES:
        return "running"
    return "vanished" if state == "UNKNOWN" else "ended"


def reconcile(cell_dir: Path, launcher: str) -> tuple[str, str | None]:
    """(state, job id): finished | queued | running | failed | vanished | missing | unfinished."""
    state = cell_state(cell_dir)
    status = read_json(cell_dir / STATUS_FILE) or {}
    job_id = status.get("job_id")
    # The job's own last word (finished | failed) needs no scheduler; neither does a cell without a job.
    if state == "finished" or status.get("status") not in ("queued", "running") or job_id is None:
        return state, job_id
    if status.get("launcher") != launcher:
        return state, job_id
    scheduler = job_state(launcher, cell_dir / SLURM_DIR, str(job_id))
    if scheduler in ("queued", "running"):
        return scheduler, job_id
    if scheduler == "vanished":
        return "vanished", job_id
    return "failed", job_id


def submit(cell: Cell, cell_dir: Path, launcher: str, options: dict, fresh: bool = False) -> str:
    """Submit one cell; its directory is cleared first unless it has a checkpoint to resume from.

    `fresh`: clear it in any case (a stale cell: its checkpoint belongs to another config).
    """
    from asymoe.grid.runner import prepare_cell_dir

    resuming = (cell_dir / CHECKPOINT).exists() and not fresh
    if not resuming:
        prepare_cell_dir(cell, cell_dir)
    executor = make_executor(launcher, cell_dir / SLURM_DIR, options, job_name=cell.name)
    job = executor.submit(CellJob(cell, cell_dir, launcher))
    status = {"status": "queued", "job_id": str(job.job_id), "launcher": launcher, "submitted": time.time()}
    write_json_atomic(cell_dir / STATUS_FILE, {**status, "resume": resuming})
    return str(job.job_id)


def _job_ended(cell_dir: Path, launcher: str) -> bool:
    """The cell's job has had its last word (status.json) or the scheduler says it is gone.

    (metrics.json appears a moment before the job writes its final status and exits.)
    """
    status = read_json(cell_dir / STATUS_FILE) or {}
    if status.get("status") not in ("queued", "running") or status.get("job_id") is None:
        return True
    return job_state(launcher, cell_dir / SLURM_DIR, str(status["job_id"])) not in ("queued", "running")


def launch(
    grid_dir: Path,
    selected: list[Cell],
    states: dict[str, str],
    job_ids: dict[str, str | None],
    launcher: str,
    options: dict,
    wait: bool,
) -> list[str]:
    """Submit every selected cell that is neither finished nor queued / running; return the failed ones.

    `states` and `job_ids`: each cell's reconciled state and recorded job. With `wait`, poll
    until no selected cell is queued or running (the summary is then complete).
    """
    for index, cell in enumerate(selected, 1):
        cell_dir = grid_dir / CELLS_DIR / cell.name
        state, old_job = states[cell.name], job_ids.get(cell.name)
        heading = f"cell {index} of {len(selected)}: {cell.name}"
        if state in ("finished", "queued", "running"):
            print(f"{heading}: {state}" + (f" (job {old_job})" if old_job and state != "finished" else ""), flush=True)
            continue
        fresh = state == "stale"
        resume = " with trainer.resume=last" if (cell_dir / CHECKPOINT).exists() and not fresh else ""
        job_id = submit(cell, cell_dir, launcher, options, fresh)
        was = "" if state == "missing" else f" (was {state}{f', job {old_job}' if old_job else ''})"
        print(f"{heading}: submitted job {job_id}{resume}{was}", flush=True)
    if not wait:
        print("run the same command again to see the jobs' states and resubmit what ended unfinished")
        return []
    while not all(_job_ended(grid_dir / CELLS_DIR / cell.name, launcher) for cell in selected):
        time.sleep(POLL_SECONDS)
    states = {cell.name: reconcile(grid_dir / CELLS_DIR / cell.name, launcher)[0] for cell in selected}
    for index, cell in enumerate(selected, 1):
        print(f"cell {index} of {len(selected)}: {cell.name}: {states[cell.name]}", flush=True)
    return [name for name, state in states.items() if state != "finished"]
