"""LightningModule of the intent task: L = CE + λ·L_align (our reading of A-MESS), MIntRec metrics.

Semantic synchronisation (our reading): every training step encodes each label's description with
the same text encoder (no anchor slots) and aligns the fused sample embedding with its label's
description (triplet or InfoNCE, `intent.losses`); with `intent.semantic_sync.enabled=false` the
loss is plain cross-entropy. Predictions are the classifier's argmax.

Logged (×100 as MIntRec reports them): `{val,test}/acc|wf1|wp|r`; `{val,test}/accuracy` is the
same accuracy as a fraction, the framework-wide key that checkpoint selection and grids read.
Per-class F1 goes to TensorBoard only (`{stage}_f1_per_class/<label>`). When a split holds
out-of-scope utterances (MIntRec 2.0 `UNK`) the in-scope figures use only in-scope utterances and
`{stage}/oos/acc|f1|f1_ind|f1_oos` report out-of-scope detection (`intent.metrics`).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

from asymoe.config import Config
from asymoe.intent.datamodule import IntentDataModule
from asymoe.intent.losses import infonce_loss, triplet_loss
from asymoe.intent.metrics import classification_metrics, open_set_metrics
from asymoe.intent.model import IntentModel
from asymoe.training.module import is_decayed, warmup_cosine

VOCAB_KEY = "asymoe_vocab"


class IntentModule(L.LightningModule):
    def __init__(self, config: Config, datamodule: IntentDataModule):
        super().__init__()
        self.config = config
        self.intent = config.intent
        self.label_names = datamodule.label_names
        self.tokenizer = datamodule.tokenizer
        self.model = IntentModel(
            self.intent,
            self.tokenizer.vocab_size,
            self.tokenizer.pad_id,
            len(self.label_names),
            datamodule.modality_dims,
        )
        self.register_buffer("description_ids", datamodule.description_ids, persistent=False)
        self.outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}

    # -- training ------------------------------------------------------------------------------

    def alignment_loss(self, sample: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sync = self.intent.semantic_sync
        ids = self.description_ids
        descriptions = self.model.encode(ids, (ids != self.tokenizer.pad_id).long())  # (labels, h)
        if sync.loss == "infonce":
            return infonce_loss(sample, descriptions, labels, sync.temperature, sync.distance)
        return triplet_loss(sample, descriptions, labels, sync.margin, sync.distance, sync.negative)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits, sample = self.model(batch)
        ce = F.cross_entropy(logits, batch["label"])
        size = logits.shape[0]
        loss = ce
        if self.intent.semantic_sync.enabled:
            align = self.alignment_loss(sample, batch["label"])
            loss = ce + self.intent.semantic_sync.weight * align
            self.log("train/align_loss", align, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/ce_loss", ce, batch_size=size)
        if self.model.anchor_embedding is not None:
            self.log("train/anchor_gain", self.model.anchor_embedding.gain.detach(), batch_size=size)
        return loss

    # -- evaluation ----------------------------------------------------------------------------

    def _collect(self, batch: dict, stage: str) -> None:
        logits, _ = self.model(batch)
        self.outputs[stage].append((logits.float().softmax(-1).cpu(), batch["label"].cpu()))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._collect(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._collect(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        """Every rank evaluates the whole split (the framework's loaders), so no gathering is needed."""
        if not self.outputs[stage]:
            return
        probabilities = torch.cat([p for p, _ in self.outputs[stage]])  # (N, labels)
        targets = torch.cat([t for _, t in self.outputs[stage]])  # (N,)
        self.outputs[stage] = []
        num_labels = probabilities.shape[1]
        in_scope = targets < num_labels
        scores = classification_metrics(probabilities[in_scope].argmax(-1), targets[in_scope], num_labels)
        self.log(f"{stage}/accuracy", scores["acc"] / 100, prog_bar=True)
        for key in ("acc", "wf1", "wp", "r"):
            self.log(f"{stage}/{key}", scores[key])
        if not bool(in_scope.all()):
            for key, value in open_set_metrics(probabilities, targets, self.intent.ood_threshold).items():
                self.log(f"{stage}/oos/{key}", value)
        self._log_per_class(stage, scores["f1_per_class"])

    def _log_per_class(self, stage: str, f1: torch.Tensor) -> None:
        if not isinstance(self.logger, TensorBoardLogger) or self.trainer.sanity_checking or self.global_rank:
            return
        for name, value in zip(self.label_names, f1.tolist()):
            self.logger.experiment.add_scalar(f"{stage}_f1_per_class/{name}", 100 * value, self.global_step)

    # -- logging, checkpoints, optimiser -----------------------------------------------------------

    def on_fit_start(self) -> None:
        if isinstance(self.logger, TensorBoardLogger) and self.global_rank == 0:
            table = self.model.parameter_table()
            for name, value in table.items():
                self.logger.experiment.add_scalar(f"params/{name}", value, 0)
            self.logger.experiment.add_text("params", "\n".join(f"    {k}: {v:,}" for k, v in table.items()), 0)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.tokenizer.word is not None:
            checkpoint[VOCAB_KEY] = list(self.tokenizer.word.vocab)

    def configure_optimizers(self):
        optim = self.config.optim
        named = list(self.model.named_parameters())
        groups = [
            {"params": [p for n, p in named if is_decayed(n, p)], "weight_decay": optim.weight_decay},
            {"params": [p for n, p in named if not is_decayed(n, p)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=tuple(optim.betas))
        return warmup_cosine(optimizer, self.trainer.estimated_stepping_batches, optim)


def build_intent(cfg: Config) -> tuple[IntentDataModule, IntentModule]:
    """Data first (the model's vocabulary, labels and feature widths come from it), then the module."""
    datamodule = IntentDataModule(cfg)
    datamodule.prepare()
    return datamodule, IntentModule(cfg, datamodule)
