"""Running a grid: each cell's ``asymoe fit`` in its own process, resumable, failures isolated.

A crash or OOM kill ends its cell only. A cell's output is shown live and kept in its
``log.txt``; on a terminal the child gets a pseudo-terminal, so its progress bar draws as usual.
Rerunning a grid skips finished cells and reruns every other cell from scratch.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from asymoe.files import METRICS_FILE, read_json, write_json_atomic
from asymoe.grid.cells import Cell
from asymoe.grid.report import format_seconds, write_report
from asymoe.grid.spec import Grid
from asymoe.grid.state import (
    CELL_FILE,
    CELLS_DIR,
    LOG_FILE,
    STATUS_FILE,
)

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _last_error_line(tail: bytes) -> str:
    text = ANSI.sub("", tail.decode("utf-8", errors="replace"))
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    return lines[-1] if lines else "no output"


def stop_child(child: subprocess.Popen) -> None:
    child.terminate()
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _spawn(command: list[str], env: dict, use_pty: bool) -> tuple[subprocess.Popen, int]:
    """The child and the file descriptor its output is read from."""
    if use_pty:
        import pty

        env["COLUMNS"] = str(shutil.get_terminal_size().columns)
        read_fd, child_fd = pty.openpty()
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=child_fd, stderr=child_fd, env=env)
        os.close(child_fd)
        return child, read_fd
    child = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    return child, child.stdout.fileno()


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_cell(
    cell: Cell,
    cell_dir: Path,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
    output: Callable[[str], None] | None = None,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> tuple[int, str]:
    """Run one cell's `asymoe fit` in a child process, its output shown live and kept in log.txt.

    `command` defaults to the cell's; `env` adds to this process's environment (device pinning);
    `output` receives the decoded output (default: this process's stdout, through a
    pseudo-terminal when that is a terminal); `on_start` is given the child once it runs.
    Returns (exit status, the output's last line).
    """
    command = command or cell.command(cell_dir)
    use_pty = output is None and sys.stdout.isatty()
    child, read_fd = _spawn(command, {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, use_pty)
    if on_start is not None:
        on_start(child)
    output = output or _write_stdout
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail = b""
    try:
        with open(cell_dir / LOG_FILE, "ab") as log:
            log.write(f"$ {shlex.join(command)}\n".encode())
            while True:
                try:
                    chunk = os.read(read_fd, 65536)
                except OSError:  # a pseudo-terminal reports EIO once the child has exited
                    break
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                output(decoder.decode(chunk))
                tail = (tail + chunk)[-8192:]
        returncode = child.wait()
    except BaseException:
        stop_child(child)
        raise
    finally:
        if use_pty:
            os.close(read_fd)
        elif child.stdout is not None:
            child.stdout.close()
    return returncode, _outcome(returncode, cell_dir, tail)


def _outcome(returncode: int, cell_dir: Path, tail: bytes) -> str:
    if returncode < 0:
        killed = f"killed by signal {signal.Signals(-returncode).name}"
        return killed + (" (out of memory?)" if returncode == -signal.SIGKILL else "")
    if returncode == 0 and not (cell_dir / METRICS_FILE).is_file():
        return f"exited 0 without writing {METRICS_FILE}"
    return _last_error_line(tail)


def main_metric_text(cell_dir: Path, metric: str) -> str:
    value = (read_json(cell_dir / METRICS_FILE) or {}).get(metric)
    return f", {metric} {value:.4f}" if isinstance(value, (int, float)) else ""


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (a scheduler's stop, `kill`) ends the grid like Ctrl-C: the running child is stopped
    and marked interrupted instead of being left to write into a cell the next run will clear."""

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def prepare_cell_dir(cell: Cell, cell_dir: Path) -> None:
    """An empty cell directory holding cell.json: leftovers of an unfinished run would mix into its logs."""
    shutil.rmtree(cell_dir, ignore_errors=True)
    cell_dir.mkdir(parents=True)
    write_json_atomic(
        cell_dir / CELL_FILE, {"name": cell.name, "command": cell.command(cell_dir), "config": cell.config}
    )


def record_outcome(cell_dir: Path, started: float, returncode: int, last_line: str, job: dict | None = None) -> dict:
    """Write the cell's final status.json (finished | failed), with `job` (its id, launcher) if any; return it."""
    seconds = time.time() - started
    if returncode == 0:
        status = {"status": "finished", "started": started, "seconds": seconds}
    else:
        log = str(cell_dir / LOG_FILE)
        status = {
            "status": "failed",
            "returncode": returncode,
            "error": last_line,
            "log": log,
            "started": started,
            "seconds": seconds,
        }
    status.update(job or {})
    write_json_atomic(cell_dir / STATUS_FILE, status)
    return status


def outcome_text(status: dict, cell_dir: Path, metric: str) -> str:
    if status["status"] == "finished":
        return f"finished in {format_seconds(status['seconds'])}{main_metric_text(cell_dir, metric)}"
    return (
        f"FAILED (exit {status['returncode']}) after {format_seconds(status['seconds'])}: {status['error']}; "
        f"log: {status['log']}"
    )


def run_sequential(grid: Grid, grid_dir: Path, selected: list[Cell], states: dict[str, str], after=None) -> list[str]:
    """Run the selected cells that have not finished, one after another; return the failed ones.

    `after` (as for `run_parallel`) runs on each cell right after it finished.
    """
    to_run = [cell for cell in selected if states[cell.name] != "finished"]
    failed, durations = [], []
    for index, cell in enumerate(selected, 1):
        heading = f"cell {index} of {len(selected)}: {cell.name}"
        cell_dir = grid_dir / CELLS_DIR / cell.name
        if states[cell.name] == "finished":
            print(f"{heading}: finished earlier{main_metric_text(cell_dir, grid.metric)}, skipping", flush=True)
            continue
        remaining = len(to_run) - len(durations)
        eta = f" (about {format_seconds(remaining * sum(durations) / len(durations))} left)" if durations else ""
        print(f"==> {heading}{eta}", flush=True)
        prepare_cell_dir(cell, cell_dir)
        started = time.time()
        write_json_atomic(cell_dir / STATUS_FILE, {"status": "running", "started": started, "pid": os.getpid()})
        try:
            returncode, last_line = run_cell(cell, cell_dir)
        except KeyboardInterrupt:
            write_json_atomic(
                cell_dir / STATUS_FILE, {"status": "interrupted", "started": started, "ended": time.time()}
            )
            write_report(grid_dir)
            raise
        status = record_outcome(cell_dir, started, returncode, last_line)
        durations.append(status["seconds"])
        if returncode != 0:
            failed.append(cell.name)
        print(f"<== {heading}: {outcome_text(status, cell_dir, grid.metric)}", flush=True)
        if returncode == 0 and after is not None and after(cell, cell_dir, say=lambda text: print(text, flush=True)):
            failed.append(cell.name)
    return failed
