"""Multi-stage training: the config's `stages:` list, run one after another under one run directory.

Stage i is the run's config with the stage's `overrides` applied (learning rates, data, epochs or
steps, whether MoE is on), trained by `fit` in RUN/stages/<i>-<name>/ (TensorBoard logs in each
stage's tb/, so `tensorboard --logdir RUN` shows all stages). Before its first step a stage takes
the previous stage's final weights (its last.ckpt): tensors present in both models are copied, and
MoE layers this stage turns on are upcycled from the previous stage's dense FFNs (every expert a
copy; routers freshly initialised), as at construction. The word tokenizer of the first stage is
reused by every later one. Modules outside the stage's `train` list are frozen: `vision` through
model.vision.freeze (BatchNorm statistics kept too), `projector`, `lm` (everything of the LM outside
the MoE layers' experts and routers), `experts` and `routers` through requires_grad; the optimiser
receives trainable parameters only. On a rerun, finished stages (metrics.json present) are skipped and
an unfinished stage with a checkpoint resumes from it (trainer.resume=last).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from asymoe import config as config_lib
from asymoe.config import Config
from asymoe.config.schema import StageConfig
from asymoe.data.tokenizer import WordTokenizer
from asymoe.errors import ConfigError
from asymoe.files import METRICS_FILE, write_json_atomic
from asymoe.models.language import build_language_model, decoder_layers, feed_forward
from asymoe.models.moe import MoEBlock

STAGE_DIR = "stages"
TRAINABLE = "vision, projector, lm, experts, routers"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def module_part(name: str) -> str:
    """Which trainable part a VisionLanguageModel parameter belongs to."""
    if name.startswith("vision."):
        return "vision"
    if name.startswith("projector."):
        return "projector"
    if ".routers." in name:
        return "routers"
    if ".groups." in name:
        return "experts"
    return "lm"


def stage_configs(cfg: Config, run_dir: Path) -> list[tuple[StageConfig, Config]]:
    """Every stage's full config, validated before anything trains."""
    names = [stage.name for stage in cfg.stages]
    for index, stage in enumerate(cfg.stages):
        if not _NAME.fullmatch(stage.name) or stage.name in names[:index]:
            raise ConfigError(f"stages[{index}].name='{stage.name}' must be unique, of letters, digits, '_', '-', '.'")
        if not stage.train:
            raise ConfigError(f"stages[{index}] ({stage.name}): train is empty; list what trains ({TRAINABLE})")
    base = config_lib.to_dict(cfg)
    base["stages"] = []
    base["trainer"]["resume"] = None
    result = []
    for index, stage in enumerate(cfg.stages):
        origin = f"stages[{index}] ({stage.name})"
        folder = run_dir / STAGE_DIR / f"{index + 1:02d}-{stage.name}"
        fixed = [f"output_dir={folder}", f"model.vision.freeze={'vision' not in stage.train}"]
        merged = config_lib.merge_onto_schema(
            [
                ("run config", OmegaConf.create(base)),
                (origin, config_lib.parse_overrides(stage.overrides, origin)),
                (f"{origin} folder and freezing", config_lib.parse_overrides(fixed, origin)),
            ]
        )
        stage_cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
        stage_cfg.source_file = cfg.source_file
        if stage_cfg.stages:
            raise ConfigError(f"{origin}: a stage cannot have stages of its own")
        config_lib.validate(stage_cfg)
        result.append((stage, stage_cfg))
    return result


@torch.no_grad()
def take_previous_weights(model, previous_state: dict, previous_cfg: Config) -> None:
    """Copy the previous stage's tensors; upcycle MoE layers that were dense in the previous stage."""
    own = model.state_dict()
    shared = {k: v for k, v in previous_state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    prefixes = {module: f"{name}.groups." for name, module in model.named_modules() if isinstance(module, MoEBlock)}
    new_blocks = [
        block for block in model.moe_blocks() if not any(k.startswith(prefixes[block]) for k in previous_state)
    ]
    if not new_blocks or not model.config.moe.upcycle:
        return
    dense = build_language_model(previous_cfg.model.language, model.lm.get_input_embeddings().num_embeddings)
    # strict=False: layers that were MoE already in the previous stage have no dense FFN there (and need none).
    dense.load_state_dict({k[len("lm.") :]: v for k, v in previous_state.items() if k.startswith("lm.")}, strict=False)
    layers = decoder_layers(dense)
    for block in new_blocks:
        _, ffn = feed_forward(layers[block.layer_index], dense.config)
        for group in block.groups.values():
            if hasattr(group, "upcycle_from"):
                group.upcycle_from(ffn)


class StageStart(L.Callback):
    """At setup (before the optimiser exists and before a resumed checkpoint is restored): the previous
    stage's weights, then the stage's freezing."""

    def __init__(self, train: list[str], previous_checkpoint: Path | None, previous_cfg: Config | None):
        self.train = set(train)
        self.previous_checkpoint = previous_checkpoint
        self.previous_cfg = previous_cfg

    def setup(self, trainer, pl_module, stage: str) -> None:
        model = pl_module.model
        if self.previous_checkpoint is not None:
            from asymoe.training.checkpoints import load_full_checkpoint

            state = load_full_checkpoint(self.previous_checkpoint)["state_dict"]
            previous = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
            take_previous_weights(model, previous, self.previous_cfg)
        for name, param in model.named_parameters():
            param.requires_grad_(module_part(name) in self.train)


def fit_stages(cfg: Config, callbacks: list | None = None) -> dict:
    """Run every stage in order; returns the last stage's metrics plus each stage's under `<name>/`."""
    from asymoe.training.run import fit, run_directory

    run_dir = run_directory(cfg)
    stages = stage_configs(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.output_dir = str(run_dir)
    config_lib.save(cfg, run_dir / "config.yaml")
    summary: dict = {}
    previous: tuple[Path, Config] | None = None
    for stage, stage_cfg in stages:
        folder = Path(stage_cfg.output_dir)
        done = folder / METRICS_FILE
        if done.is_file():
            metrics = json.loads(done.read_text())
        else:
            if (folder / "checkpoints" / "last.ckpt").exists():
                stage_cfg.trainer.resume = "last"
            if previous is not None and (Path(previous[1].output_dir) / WordTokenizer.FILENAME).is_file():
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy(Path(previous[1].output_dir) / WordTokenizer.FILENAME, folder / WordTokenizer.FILENAME)
            start = StageStart(stage.train, *(previous if previous else (None, None)))
            metrics = fit(stage_cfg, callbacks=[start, *(callbacks or [])])
        summary.update({f"{stage.name}/{key}": value for key, value in metrics.items() if key != "run_dir"})
        previous = (folder / "checkpoints" / "last.ckpt", stage_cfg)
    result = {**{k: v for k, v in metrics.items() if k != "run_dir"}, **summary}
    write_json_atomic(run_dir / METRICS_FILE, {"run_dir": str(run_dir), **result})
    return result
