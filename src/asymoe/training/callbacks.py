"""TensorBoard views of what the experts do: per-layer routing scalars, heat-maps, parameters."""

from __future__ import annotations

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402


def _writer(trainer: L.Trainer):
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class RoutingLogger(L.Callback):
    """Per MoE layer and router: expert shares, entropy, balance f/P, LTDR stats, module scalars.

    `heatmaps`: also a layers x experts image per router at every validation (logging.routing_images).
    """

    def __init__(self, heatmaps: bool = True):
        self.heatmaps = heatmaps

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        writer = _writer(trainer)
        if writer is None or trainer.global_rank != 0:
            return
        table = pl_module.model.parameter_table()
        for name, value in table.items():
            writer.add_scalar(f"params/{name}", value, 0)
        writer.add_text("params", "\n".join(f"    {k}: {v:,}" for k, v in table.items()), 0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        writer = _writer(trainer)
        step = trainer.global_step
        if writer is None or trainer.global_rank != 0 or step % trainer.log_every_n_steps:
            return
        for layer, record in pl_module.model.moe_state.records.items():
            prefix = f"routing/layer{layer:02d}"
            for key, value in record.scalars.items():
                value = value.float().cpu()
                if value.ndim == 0:
                    writer.add_scalar(f"{prefix}/{key}", value.item(), step)
                else:
                    for expert, item in enumerate(value.tolist()):
                        writer.add_scalar(f"{prefix}/{key}/expert{expert}", item, step)
            for router, share in record.expert_share.items():
                for expert, item in enumerate(share.float().cpu().tolist()):
                    writer.add_scalar(f"{prefix}/share/{router}/expert{expert}", item, step)
            if record.rpv is not None and record.rpv.numel():
                writer.add_histogram(f"{prefix}/rpv", record.rpv.float().cpu(), step)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        writer = _writer(trainer)
        if not self.heatmaps or writer is None or trainer.global_rank != 0 or trainer.sanity_checking:
            return
        shares = pl_module.routing_share()
        for router in sorted({router for _, router in shares}):
            layers = sorted(layer for layer, r in shares if r == router)
            matrix = torch.stack([shares[(layer, router)] for layer in layers]).numpy()  # (layers, experts)
            figure = routing_heatmap(matrix, layers, pl_module.model.moe_blocks()[0], router)
            writer.add_figure(f"routing_heatmap/{router}", figure, trainer.global_step)
            plt.close(figure)


def expert_labels(block, router: str) -> list[str]:
    labels = []
    for group in block.router_groups[router]:
        labels += [f"{group[0]}{i}" for i in range(block.groups[group].num_experts)]
    return labels


def routing_heatmap(matrix: np.ndarray, layers: list[int], block, router: str):
    """Layers x experts image of the share of `router`'s routing assignments each expert received."""
    figure, axis = plt.subplots(figsize=(max(4.0, 1.6 + 0.7 * matrix.shape[1]), 1.4 + 0.45 * matrix.shape[0]))
    image = axis.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(float(matrix.max()), 1e-6), aspect="auto")
    axis.set_xticks(range(matrix.shape[1]), expert_labels(block, router))
    axis.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    for (row, col), value in np.ndenumerate(matrix):
        axis.text(
            col,
            row,
            f"{value:.2f}",
            ha="center",
            va="center",
            color="white" if value < 0.5 * matrix.max() else "black",
            fontsize=8,
        )
    axis.set_title(f"{router} router: share per expert", fontsize=10)
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    return figure
