"""TensorBoard HParams for a grid: one session per finished cell, seeds of a group share a group name."""

from __future__ import annotations

import shutil
from pathlib import Path

from asymoe.files import METRICS_FILE, read_json
from asymoe.grid.cells import switch_text
from asymoe.grid.state import CELLS_DIR


def _hparam_domain(values: list) -> tuple[list, type]:
    if all(isinstance(v, bool) for v in values):
        return values, bool
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], float
    return [switch_text(v) for v in values], str


def write_hparams(hparams_dir: Path, spec: dict) -> None:
    """TensorBoard HParams: the experiment (switched keys, metrics) at the top, one session per cell.

    A session's hparams are the variant and every config key that differs between cells (seed
    excluded); its group name is the cell's group, so the dashboard aggregates seeds.
    """
    from tensorboard.plugins.hparams import summary_v2 as hp
    from torch.utils.tensorboard.summary import scalar
    from torch.utils.tensorboard.writer import FileWriter

    shutil.rmtree(hparams_dir, ignore_errors=True)
    grid_dir = hparams_dir.parent
    finished = []
    for cell in spec["cells"]:
        metrics = read_json(grid_dir / CELLS_DIR / cell["name"] / METRICS_FILE)
        if metrics is not None:
            numbers = {
                k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            finished.append((cell, numbers))
    hparams_dir.mkdir(parents=True)
    if not finished:
        return
    names = list(spec["cells"][0]["hparams"])
    domains = {name: _hparam_domain([cell["hparams"].get(name) for cell, _ in finished]) for name in names}
    metric_tags = sorted({key for _, numbers in finished for key in numbers})
    top = FileWriter(str(hparams_dir))
    top.add_summary(
        hp.hparams_config_pb(
            hparams=[
                hp.HParam(name, hp.Discrete(sorted(set(values)), dtype=dtype))
                for name, (values, dtype) in domains.items()
            ],
            metrics=[hp.Metric(tag) for tag in metric_tags],
        )
    )
    top.close()
    for index, (cell, numbers) in enumerate(finished):
        writer = FileWriter(str(hparams_dir / cell["name"]))
        session = {name: domains[name][0][index] for name in names}
        writer.add_summary(hp.hparams_pb(session, trial_id=cell["group"]))
        for tag, value in numbers.items():
            writer.add_summary(scalar(tag, value), global_step=0)
        writer.close()
