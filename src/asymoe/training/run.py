"""Run orchestration: fit (train + test), test from a checkpoint, parameter table.

A run directory holds config.yaml (resolved, re-loadable with `asymoe fit run_dir/config.yaml`),
tokenizer.json, checkpoints/ (written atomically with size + SHA-256 records: `checkpoints`),
tb/ (TensorBoard) and, once everything finished, metrics.json (written atomically: a run is
complete exactly when metrics.json exists). `rundir` keeps a directory from being reused silently
and picks the checkpoint a resume continues from.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from asymoe import config as config_lib
from asymoe.config import Config, ConfigError, switched_hparams
from asymoe.data.datamodule import VQADataModule
from asymoe.data.tokenizer import WordTokenizer
from asymoe.files import METRICS_FILE, write_json_atomic
from asymoe.training.callbacks import RoutingLogger
from asymoe.training.checkpoints import AtomicCheckpointIO, load_full_checkpoint, verify_checkpoint
from asymoe.training.distributed import build_strategy, check_devices
from asymoe.training.guards import NonFiniteGuard
from asymoe.training.loaders import saved_loader_state, shard_loader
from asymoe.training.module import MODEL_CONFIG_KEY, VLMModule
from asymoe.training.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LAST_CHECKPOINT,
    claim_run_directory,
    is_first_process,
    resume_checkpoint,
)


def run_directory(cfg: Config) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / cfg.experiment / stamp


def build_trainer(cfg: Config, run_dir: Path, callbacks: list, logger=True, model=None) -> L.Trainer:
    """The Lightning Trainer for `cfg.trainer`; `model` (the VisionLanguageModel) names FSDP's wrap units."""
    t = cfg.trainer
    check_devices(cfg)
    if logger is True:
        logger = TensorBoardLogger(save_dir=str(run_dir), name="tb", version="", default_hp_metric=False)
    return L.Trainer(
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        max_time=t.max_time,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg, model),
        # Training batches are split per rank by `shard_loader`; evaluation runs in full on every rank.
        use_distributed_sampler=False,
        precision=t.precision,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        limit_test_batches=t.limit_test_batches,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.enable_progress_bar,
        num_sanity_val_steps=t.num_sanity_val_steps,
        deterministic=t.deterministic,
        default_root_dir=str(run_dir),
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )


def _scalar_metrics(metrics: dict) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items() if torch.is_tensor(v) and v.numel() == 1 or isinstance(v, (int, float))
    }


def fit(cfg: Config, callbacks: list | None = None, overwrite: bool = False) -> dict:
    """Train, validate, test the best checkpoint; return (and write) the final metrics.

    `callbacks`: extra Lightning callbacks (instrumentation, tests) next to checkpointing and routing logs.
    `overwrite`: clear a run directory that already holds a run (otherwise refused unless resuming).
    """
    started = time.time()
    check_devices(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = run_directory(cfg)
    claim_run_directory(cfg, run_dir, overwrite)
    # Data and model are built before the run directory exists: a bad config leaves nothing behind.
    if cfg.task == "intent":
        from asymoe.intent.module import build_intent

        datamodule, module = build_intent(cfg)
        tokenizer = module.tokenizer
    else:
        datamodule = VQADataModule(cfg)
        # A run being overwritten lends nothing: another rank may get here before rank 0 has
        # cleared the directory, and must not load the old run's tokenizer from it.
        tokenizer = datamodule.prepare(None if overwrite else run_dir)
        module = VLMModule(cfg, tokenizer)
        datamodule.encode(module.model.num_image_tokens)
    resume, resume_metadata = resume_checkpoint(cfg, run_dir, MODEL_CONFIG_KEY)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.output_dir = str(run_dir)
    if is_first_process():
        # Ranks that a launcher starts together (torchrun, SLURM) reach this point before or after
        # rank 0 has claimed the directory: a config.yaml another rank wrote first would make rank 0
        # refuse its own fresh run (and leave the others waiting for it), so only rank 0 writes here.
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        config_lib.save(cfg, run_dir / CONFIG_FILE)
        tokenizer.save(run_dir)

    checkpoint, last_checkpoint = _checkpoint_callbacks(run_dir)
    trainer = build_trainer(
        cfg,
        run_dir,
        [
            checkpoint,
            last_checkpoint,
            *([RoutingLogger(heatmaps=cfg.logging.routing_images)] if cfg.task == "vqa" else []),
        ]
        + list(callbacks or []),
        logger=cfg.logging.tensorboard,
        model=module.model,
    )
    train_loader = shard_loader(datamodule.train_dataloader(), trainer.global_rank, trainer.world_size)
    if resume_metadata is not None and (loader_state := saved_loader_state(resume_metadata)) is not None:
        train_loader.load_state_dict(loader_state)
    guard = _nonfinite_guard(cfg, train_loader, datamodule)
    trainer.callbacks.append(guard)
    trainer.fit(
        module,
        train_dataloaders=train_loader,
        val_dataloaders=datamodule.val_dataloader(),
        ckpt_path=str(resume) if resume else None,
        weights_only=True,
    )
    train_seconds = time.time() - started
    fit_metrics = _scalar_metrics(trainer.callback_metrics)
    skipped_steps = guard.skipped  # read before testing the best checkpoint restores an older count
    ckpt_path = checkpoint.best_model_path or None
    test_results = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False, weights_only=True)
    metrics = {
        **fit_metrics,
        **{k: v for results in test_results for k, v in _scalar_metrics(results).items()},
        **{f"params/{k}": v for k, v in module.model.parameter_table().items()},
        "time/train_s": train_seconds,
        "time/total_s": time.time() - started,
        "data/skipped": sum(datamodule.skipped.values()),
        "train/nonfinite_skipped": skipped_steps,
    }
    if trainer.global_rank == 0:
        _write_results(trainer, cfg, run_dir, ckpt_path, metrics)
    return metrics


def _checkpoint_callbacks(run_dir: Path) -> tuple[ModelCheckpoint, ModelCheckpoint]:
    """The best checkpoint by validation accuracy, and `last.ckpt` at every validation.

    Lightning's `save_last=True` writes last.ckpt only when a best checkpoint is written, so a
    resume would lose every step since the last improvement; the second callback has no monitor
    and keeps its one file, `last.ckpt`, current. The directory is this run's alone
    (claim_run_directory): files are replaced, never joined by `-v1` copies.
    """
    folder = str(run_dir / CHECKPOINT_DIR)
    best = ModelCheckpoint(
        dirpath=folder,
        filename="best-{epoch}-{step}",
        monitor="val/accuracy",
        mode="max",
        save_top_k=1,
        enable_version_counter=False,
    )
    last = ModelCheckpoint(
        dirpath=folder, filename=Path(LAST_CHECKPOINT).stem, save_top_k=1, enable_version_counter=False
    )
    return best, last


def _nonfinite_guard(cfg: Config, train_loader, datamodule: VQADataModule) -> NonFiniteGuard:
    """The guard of `trainer.nonfinite`, able to name the records of the batch being trained on."""
    origins = [sample.origin for sample in datamodule.samples["train"]]
    return NonFiniteGuard(cfg.trainer.nonfinite, lambda: train_loader.current_indices, origins)


def _write_results(trainer: L.Trainer, cfg: Config, run_dir: Path, ckpt_path: str | None, metrics: dict) -> None:
    writer_logger = trainer.logger
    if isinstance(writer_logger, TensorBoardLogger):
        hparam_metrics = {k: v for k, v in metrics.items() if k.startswith(("test", "val/", "params/"))}
        writer_logger.log_hyperparams(switched_hparams(cfg), hparam_metrics)
        writer_logger.finalize("success")
    write_json_atomic(run_dir / METRICS_FILE, {"run_dir": str(run_dir), "best_checkpoint": ckpt_path, **metrics})


def checkpoint_tokenizer(checkpoint: dict) -> WordTokenizer | None:
    """The word tokenizer VLMModule.on_save_checkpoint stored, if the run used one."""
    vocab = checkpoint.get("asymoe_vocab")
    if vocab is not None:
        return WordTokenizer(vocab)
    return None


def test(cfg: Config, ckpt: str) -> dict:
    """Evaluate a checkpoint on the test split of `cfg`'s data."""
    path = Path(ckpt)
    if not path.exists():
        raise ConfigError(f"ckpt: checkpoint not found: {path} (a .ckpt file or a sharded checkpoint folder)")
    verify_checkpoint(path)
    state = load_full_checkpoint(path)
    if cfg.task == "intent":
        from asymoe.intent.module import build_intent

        datamodule, module = build_intent(cfg)
    else:
        datamodule = VQADataModule(cfg)
        datamodule.prepare()
        tokenizer = checkpoint_tokenizer(state) or datamodule.tokenizer
        datamodule.tokenizer = tokenizer
        module = VLMModule(cfg, tokenizer)
    try:
        module.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        raise ConfigError(
            f"ckpt: {path} does not match the model of this config ({str(error).splitlines()[0]})"
        ) from None
    if cfg.task == "vqa":
        datamodule.encode(module.model.num_image_tokens)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    trainer = build_trainer(cfg, run_dir / "test", [], logger=False, model=module.model)
    results = trainer.test(module, datamodule=datamodule, verbose=False)
    return {k: v for split_results in results for k, v in _scalar_metrics(split_results).items()}


def params(cfg: Config) -> dict[str, int]:
    """The parameter table of `cfg`'s model, built without data (vocabulary of easy-VQA size)."""
    from asymoe.models.vlm import VisionLanguageModel

    if cfg.task == "intent":  # the intent model's vocabulary and feature widths come from its data
        from asymoe.intent.module import build_intent

        return build_intent(cfg)[1].model.parameter_table()
    datamodule = VQADataModule(cfg)
    tokenizer = datamodule.prepare()
    model = VisionLanguageModel(cfg.model, tokenizer.vocab_size, tokenizer.image_id)
    return model.parameter_table()
