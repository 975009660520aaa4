"""``asymoe grid FILE --jobs N``: up to N cells at once on one machine, each pinned to its own devices.

With GPUs visible (CUDA_VISIBLE_DEVICES, else ``nvidia-smi``) the GPUs are dealt out into N equal
shares and each running cell sees only its share through CUDA_VISIBLE_DEVICES (so
``trainer.devices: auto`` uses exactly that share); without GPUs each cell gets a CPU thread
budget of cores // N (OMP_NUM_THREADS, MKL_NUM_THREADS), so N cells do not oversubscribe the
cores. Live output is one line at a time prefixed by ``[cell name]``; progress-bar redraws
(lines ended by a carriage return) are kept in the cell's log.txt but not echoed. Status files,
resume and failure isolation are those of the sequential runner: each cell is still its own
``asymoe fit`` process.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from asymoe.config import ConfigError
from asymoe.files import write_json_atomic
from asymoe.grid.cells import Cell
from asymoe.grid.report import write_report
from asymoe.grid.runner import (
    ANSI,
    main_metric_text,
    outcome_text,
    prepare_cell_dir,
    record_outcome,
    run_cell,
    stop_child,
)
from asymoe.grid.spec import Grid
from asymoe.grid.state import CELLS_DIR, STATUS_FILE

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class Slot:
    """The devices one running cell may use."""

    label: str  # e.g. "GPU 2,3" or "4 CPU threads"
    env: dict[str, str] = field(default_factory=dict)


def visible_gpus() -> list[str]:
    """GPU ids this process may hand out: CUDA_VISIBLE_DEVICES when set, else those nvidia-smi lists."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        ids = [item.strip() for item in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if item.strip()]
        return [] if ids and ids[0].startswith("-") else ids  # -1: CUDA's "no device"
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(index) for index, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def device_slots(jobs: int, gpus: list[str], cpu_count: int) -> list[Slot]:
    """`jobs` slots: equal shares of `gpus`, or, without GPUs, equal CPU thread budgets."""
    if gpus:
        if jobs > len(gpus):
            raise ConfigError(
                f"--jobs {jobs}: only {len(gpus)} GPU(s) visible ({','.join(gpus)}); "
                f"use --jobs {len(gpus)} or fewer, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run cells on CPU threads"
            )
        share = len(gpus) // jobs
        shares = [gpus[i * share : (i + 1) * share] for i in range(jobs)]
        return [Slot(f"GPU {','.join(ids)}", {"CUDA_VISIBLE_DEVICES": ",".join(ids)}) for ids in shares]
    threads = max(1, cpu_count // jobs)
    label = f"{threads} CPU thread{'s' if threads > 1 else ''}"
    return [Slot(label, dict.fromkeys(THREAD_VARIABLES, str(threads))) for _ in range(jobs)]


class PrefixedLines:
    """Writes a child's output to stdout line by line, each line prefixed by the cell name."""

    def __init__(self, prefix: str, lock: threading.Lock):
        self.prefix, self.lock, self.pending = prefix, lock, ""

    def __call__(self, text: str) -> None:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            shown = ANSI.sub("", line.rstrip("\r").rsplit("\r", 1)[-1])  # a progress bar's last redraw
            with self.lock:
                sys.stdout.write(f"[{self.prefix}] {shown}\n")
                sys.stdout.flush()


class _ParallelRun:
    """State shared by the worker threads of one parallel grid run."""

    def __init__(self, grid: Grid, grid_dir: Path, total: int, slots: list[Slot], after=None):
        self.grid, self.grid_dir, self.total, self.after = grid, grid_dir, total, after
        self.slots: queue.Queue[Slot] = queue.Queue()
        for slot in slots:
            self.slots.put(slot)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.children: dict[str, subprocess.Popen] = {}

    def say(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)

    def run(self, index: int, cell: Cell) -> bool:
        """Run one cell on a free slot; True when it failed."""
        slot = self.slots.get()
        try:
            if self.stopping.is_set():
                return False
            heading = f"cell {index} of {self.total}: {cell.name}"
            cell_dir = self.grid_dir / CELLS_DIR / cell.name
            prepare_cell_dir(cell, cell_dir)
            started = time.time()
            write_json_atomic(
                cell_dir / STATUS_FILE,
                {"status": "running", "started": started, "pid": os.getpid(), "devices": slot.label},
            )
            self.say(f"==> {heading} [{slot.label}]")
            returncode, last_line = run_cell(
                cell, cell_dir, env=slot.env, output=PrefixedLines(cell.name, self.lock), on_start=self._started(cell)
            )
            self.children.pop(cell.name, None)
            if self.stopping.is_set():
                write_json_atomic(
                    cell_dir / STATUS_FILE, {"status": "interrupted", "started": started, "ended": time.time()}
                )
                return False
            status = record_outcome(cell_dir, started, returncode, last_line)
            self.say(f"<== {heading}: {outcome_text(status, cell_dir, self.grid.metric)}")
            if returncode == 0 and self.after is not None and not self.stopping.is_set():
                # On the cell's own slot (its threads, its GPU), before the slot takes the next cell.
                return self.after(
                    cell, cell_dir, env=slot.env, output=PrefixedLines(cell.name, self.lock), say=self.say
                )
            return returncode != 0
        finally:
            self.slots.put(slot)

    def _started(self, cell: Cell):
        def register(child: subprocess.Popen) -> None:
            self.children[cell.name] = child

        return register

    def stop(self) -> None:
        self.stopping.set()
        for child in list(self.children.values()):
            stop_child(child)


def run_parallel(
    grid: Grid, grid_dir: Path, selected: list[Cell], states: dict[str, str], jobs: int, after=None
) -> list[str]:
    """Run the selected unfinished cells, up to `jobs` at once; return the failed ones (in grid order).

    `after(cell, cell_dir, env=, output=, say=)`, when given, runs on each cell that finished,
    on its slot; it returns True for a failure (e.g. `asymoe grid --analyze`'s analysis).
    """
    slots = device_slots(jobs, visible_gpus(), os.cpu_count() or 1)
    run = _ParallelRun(grid, grid_dir, len(selected), slots, after)
    pending = []
    for index, cell in enumerate(selected, 1):
        if states[cell.name] == "finished":
            metric = main_metric_text(grid_dir / CELLS_DIR / cell.name, grid.metric)
            print(f"cell {index} of {len(selected)}: {cell.name}: finished earlier{metric}, skipping", flush=True)
        else:
            pending.append((index, cell))
    print(f"running {len(pending)} cells, up to {jobs} at once: {', '.join(slot.label for slot in slots)}", flush=True)
    failed = set()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run.run, index, cell): cell.name for index, cell in pending}
        try:
            for future in as_completed(futures):
                if future.result():
                    failed.add(futures[future])
        except BaseException:  # Ctrl-C, SIGTERM: stop every running cell, mark it interrupted
            run.stop()
            for future in futures:
                future.cancel()
            pool.shutdown(wait=True)
            write_report(grid_dir)
            raise
    return [cell.name for cell in selected if cell.name in failed]
