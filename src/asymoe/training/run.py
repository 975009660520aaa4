"""Run orchestration: fit (train + test), test from a checkpoint, parameter table.

A run directory holds config.yaml (resolved, re-loadable with `asymoe fit run_dir/config.yaml`),
tokenizer.json, checkpoints/, tb/ (TensorBoard) and, once everything finished, metrics.json
(written atomically: a run is complete exactly when metrics.json exists).
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
from asymoe.training.checkpoints import checkpoint_metadata, is_sharded_checkpoint, load_full_checkpoint
from asymoe.training.distributed import build_strategy, check_devices
from asymoe.training.loaders import saved_loader_state, shard_loader
from asymoe.training.module import MODEL_CONFIG_KEY, VLMModule


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
    )


def _scalar_metrics(metrics: dict) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items() if torch.is_tensor(v) and v.numel() == 1 or isinstance(v, (int, float))
    }


def fit(cfg: Config, callbacks: list | None = None) -> dict:
    """Train, validate, test the best checkpoint; return (and write) the final metrics.

    `callbacks`: extra Lightning callbacks (instrumentation, tests) next to checkpointing and routing logs.
    """
    started = time.time()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = run_directory(cfg)
    # Data and model are built before the run directory exists: a bad config leaves nothing behind.
    datamodule = VQADataModule(cfg)
    tokenizer = datamodule.prepare(run_dir)
    module = VLMModule(cfg, tokenizer)
    datamodule.encode(module.model.num_image_tokens)
    resume, resume_metadata = resume_checkpoint(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / METRICS_FILE).unlink(missing_ok=True)
    cfg.output_dir = str(run_dir)
    config_lib.save(cfg, run_dir / "config.yaml")
    tokenizer.save(run_dir)

    checkpoint = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="best-{epoch}-{step}",
        monitor="val/accuracy",
        mode="max",
        save_last=True,
        save_top_k=1,
    )
    trainer = build_trainer(
        cfg,
        run_dir,
        [checkpoint, RoutingLogger(heatmaps=cfg.logging.routing_images), *(callbacks or [])],
        logger=cfg.logging.tensorboard,
        model=module.model,
    )
    train_loader = shard_loader(datamodule.train_dataloader(), trainer.global_rank, trainer.world_size)
    if resume_metadata is not None and (loader_state := saved_loader_state(resume_metadata)) is not None:
        train_loader.load_state_dict(loader_state)
    trainer.fit(
        module,
        train_dataloaders=train_loader,
        val_dataloaders=datamodule.val_dataloader(),
        ckpt_path=str(resume) if resume else None,
    )
    train_seconds = time.time() - started
    fit_metrics = _scalar_metrics(trainer.callback_metrics)
    ckpt_path = checkpoint.best_model_path or None
    test_results = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    metrics = {
        **fit_metrics,
        **(_scalar_metrics(test_results[0]) if test_results else {}),
        **{f"params/{k}": v for k, v in module.model.parameter_table().items()},
        "time/train_s": train_seconds,
        "time/total_s": time.time() - started,
        "data/skipped": sum(datamodule.skipped.values()),
    }
    if trainer.global_rank == 0:
        writer_logger = trainer.logger
        if isinstance(writer_logger, TensorBoardLogger):
            hparam_metrics = {k: v for k, v in metrics.items() if k.startswith(("test/", "val/", "params/"))}
            writer_logger.log_hyperparams(switched_hparams(cfg), hparam_metrics)
            writer_logger.finalize("success")
        write_json_atomic(run_dir / METRICS_FILE, {"run_dir": str(run_dir), "best_checkpoint": ckpt_path, **metrics})
    return metrics


def resume_checkpoint(cfg: Config, run_dir: Path) -> tuple[Path | None, dict | None]:
    """The checkpoint `trainer.resume` names and its metadata, checked to hold a model of this config."""
    resume = cfg.trainer.resume
    if resume is None:
        return None, None
    path = run_dir / "checkpoints" / "last.ckpt" if resume == "last" else Path(resume)
    if not path.exists():
        raise ConfigError(f"trainer.resume={resume}: checkpoint not found: {path}")
    metadata = checkpoint_metadata(path)
    saved = metadata.get(MODEL_CONFIG_KEY)
    current = config_lib.to_dict(cfg)["model"]
    if saved is not None and saved != current:
        differing = sorted(_differing_keys(saved, current, "model"))
        raise ConfigError(
            f"trainer.resume={resume}: {path} holds a different model (config differs at {', '.join(differing[:3])})"
        )
    return path, metadata


def _differing_keys(a, b, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return [k for key in keys for k in _differing_keys(a.get(key), b.get(key), f"{prefix}.{key}")]
    return [] if a == b else [prefix]


def checkpoint_tokenizer(checkpoint: dict) -> WordTokenizer | None:
    """The word tokenizer VLMModule.on_save_checkpoint stored, if the run used one."""
    vocab = checkpoint.get("asymoe_vocab")
    if vocab is not None:
        return WordTokenizer(vocab)
    return None


def test(cfg: Config, ckpt: str) -> dict:
    """Evaluate a checkpoint on the test split of `cfg`'s data."""
    path = Path(ckpt)
    if not (path.is_file() or is_sharded_checkpoint(path)):
        raise ConfigError(f"ckpt: checkpoint not found: {path} (a .ckpt file or a sharded checkpoint folder)")
    state = load_full_checkpoint(path)
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
    datamodule.encode(module.model.num_image_tokens)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    trainer = build_trainer(cfg, run_dir / "test", [], logger=False, model=module.model)
    results = trainer.test(module, datamodule=datamodule, verbose=False)
    return _scalar_metrics(results[0])


def params(cfg: Config) -> dict[str, int]:
    """The parameter table of `cfg`'s model, built without data (vocabulary of easy-VQA size)."""
    from asymoe.models.vlm import VisionLanguageModel

    datamodule = VQADataModule(cfg)
    tokenizer = datamodule.prepare()
    model = VisionLanguageModel(cfg.model, tokenizer.vocab_size, tokenizer.image_id)
    return model.parameter_table()
