"""Scale-out: the Lightning strategy for `trainer.strategy`, FSDP2 sharding, checkpoints, data per rank.

- `auto`: Lightning's choice (one process, or DDP when `devices > 1`).
- `ddp`: DistributedDataParallel; gloo on CPU, nccl on GPU.
- `fsdp`: Lightning's FSDPStrategy (FSDP1, GPU only): auto-wrap at the LM's decoder-layer class and
  the timm block classes, optional activation checkpointing of the same classes, mixed precision
  from `trainer.precision`, `trainer.state_dict_type` sharded | full.
- `fsdp2`: Lightning's ModelParallelStrategy (data-parallel mesh only); `VLMModule.configure_model`
  calls `apply_fsdp2`, which puts `fully_shard` on every decoder layer and vision block, then on the
  root. Runs on CPU processes with gloo as well as on GPUs.

Why every rank joins every collective: the MoE block runs every built expert group on every
forward (an empty group gets zero-size inputs), and the model runs the vision encoder on a
zero-size batch when a training batch has no image, so the parameter set of the autograd graph
never depends on the data. DDP therefore needs no `find_unused_parameters`, and FSDP's per-module
all-gathers happen in the same order on every rank.

Known limits: BatchNorm running statistics are buffers, which FSDP does not synchronise (DDP
broadcasts rank 0's): with a BatchNorm encoder (ResNet) the ranks' statistics drift apart and a
checkpoint keeps rank 0's; LayerNorm encoders (ViT) are unaffected. Under `fsdp2` with bf16-mixed
the unsharded weights are bf16 (the fp32 master copy stays sharded); the hyperbolic groups cast
to float32 inside their fp32 islands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from asymoe.config import Config, ConfigError

STRATEGIES = ("auto", "ddp", "fsdp", "fsdp2")
# Lightning writes a sharded checkpoint as a folder: torch.distributed.checkpoint shards + meta.pt.
SHARDED_METADATA_FILE = "meta.pt"


# ---------------------------------------------------------------------------------------------
# Which modules are sharding / checkpointing units


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The LM's decoder-layer class(es) and the vision encoder's outermost timm block classes.

    timm names its repeated units `*Block` (ViT `Block`, ConvNeXt, Swin, EVA, ResNet `BasicBlock`)
    or `Bottleneck`; only the outermost such modules count, so nested blocks are not wrapped twice.
    """
    from asymoe.models.language import decoder_layers

    classes = {type(layer) for layer in decoder_layers(model.lm)}
    classes |= {type(module) for module in outermost_vision_blocks(model.vision)}
    return classes


def _is_vision_block(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("Block") or name == "Bottleneck"


def outermost_vision_blocks(encoder: nn.Module) -> list[nn.Module]:
    found: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if _is_vision_block(child):
                found.append(child)
            else:
                walk(child)

    walk(encoder)
    return found


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """Decoder layers and outermost vision blocks, in forward order (vision first)."""
    from asymoe.models.language import decoder_layers

    return outermost_vision_blocks(model.vision) + list(decoder_layers(model.lm))


# ---------------------------------------------------------------------------------------------
# Strategy construction


def check_devices(cfg: Config) -> None:
    """Machine-dependent checks the schema cannot do: fsdp needs CUDA; no more GPUs than exist."""
    t = cfg.trainer
    cuda = torch.cuda.is_available()
    on_cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not cuda)
    if t.accelerator == "gpu" and not cuda:
        raise ConfigError("trainer.accelerator='gpu' but no CUDA device is visible; use accelerator=cpu or auto")
    if t.strategy == "fsdp" and on_cpu:
        raise ConfigError(
            "trainer.strategy='fsdp' (Lightning FSDPStrategy) needs a GPU; on CPU use trainer.strategy=fsdp2 or ddp"
        )
    if not on_cpu and isinstance(t.devices, int) and t.devices > torch.cuda.device_count():
        raise ConfigError(
            f"trainer.devices={t.devices} but only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    if not on_cpu and isinstance(t.devices, (list, tuple)):
        missing = [d for d in t.devices if not 0 <= int(d) < torch.cuda.device_count()]
        if missing:
            raise ConfigError(f"trainer.devices lists GPU(s) {missing} that do not exist ({torch.cuda.device_count()} visible)")


def world_size(cfg: Config) -> int:
    """Processes in the run: devices per node (an int, a list of ids, or auto/-1) x num_nodes."""
    devices = cfg.trainer.devices
    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif isinstance(devices, int) and devices > 0:
        per_node = devices
    else:
        per_node = max(torch.cuda.device_count(), 1)
    return per_node * cfg.trainer.num_nodes


def fsdp_mixed_precision(precision: str):
    """FSDP1 MixedPrecision from `trainer.precision` (None for full precision)."""
    from torch.distributed.fsdp import MixedPrecision

    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    if dtype is None:
        return None
    return MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32, buffer_dtype=torch.float32)


def build_strategy(cfg: Config, model: nn.Module):
    """The Lightning strategy object (or name) for `cfg.trainer.strategy`."""
    t = cfg.trainer
    if t.strategy == "auto":
        return "auto"
    if t.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # Every parameter is in every step's graph (module docstring), so no unused-parameter search.
        return DDPStrategy(find_unused_parameters=False)
    if t.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        classes = block_classes(model)
        return FSDPStrategy(
            auto_wrap_policy=classes,
            activation_checkpointing_policy=classes if t.activation_checkpointing else None,
            mixed_precision=fsdp_mixed_precision(t.precision),
            state_dict_type=t.state_dict_type,
            use_orig_params=True,
        )
    assert t.strategy == "fsdp2", t.strategy
    from lightning.pytorch.strategies import ModelParallelStrategy

    # Pure data parallelism: one FSDP2 mesh over every process; tensor parallelism stays 1.
    return ModelParallelStrategy(
        data_parallel_size=world_size(cfg),
        tensor_parallel_size=1,
        save_distributed_checkpoint=t.state_dict_type == "sharded",
    )


def apply_fsdp2(model: nn.Module, mesh, precision: str, activation_checkpointing: bool) -> None:
    """`fully_shard` each vision block and decoder layer, then the root (embeddings, head, rest).

    Idempotent: Lightning calls `configure_model` again for `trainer.test` after `trainer.fit`.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    units = sharding_units(model)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        unit_ids = {id(unit) for unit in units}
        apply_activation_checkpointing(model, check_fn=lambda module: id(module) in unit_ids)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


# ---------------------------------------------------------------------------------------------
# Training data: one share of the batches per rank, resumable mid-epoch


class RankBatchSampler(Sampler[list[int]]):
    """Rank `rank`'s share of a batch sampler: batches rank, rank + world, ...; equal counts on all ranks.

    The image-grouped batches vary in size, so Lightning's DistributedSampler cannot be injected;
    every rank builds the same (seeded) batch list and keeps its stride. Dropping the remainder
    keeps the number of steps equal on every rank, which collective ops require. `skip` drops the
    first batches of the next epoch only (a resumed run continues where the checkpoint was taken).
    """

    def __init__(self, batch_sampler: Sampler[list[int]], rank: int, world_size: int):
        self.batch_sampler = batch_sampler
        self.rank = rank
        self.world_size = world_size
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        batches = list(self.batch_sampler)
        usable = len(batches) // self.world_size * self.world_size
        skip, self.skip = self.skip, 0
        yield from batches[self.rank : usable : self.world_size][skip:]

    def __len__(self) -> int:
        return len(self.batch_sampler) // self.world_size  # type: ignore[arg-type]


class TrainLoader(DataLoader):
    """The training loader of one rank, with Lightning's `state_dict` / `load_state_dict` protocol.

    Lightning stores `state_dict()` in the checkpoint's fit-loop state; a resumed run loads it back
    (`fit` does so explicitly: Lightning 2.6 skips the load when `estimated_stepping_batches` built
    the loader before the restore), so a mid-epoch resume continues with the next unseen batch
    instead of replaying the epoch from its start. Lightning fetches from a sized loader only when
    a step needs the batch (no prefetch), so batches pulled = batches consumed.
    """

    def __init__(self, loader: DataLoader, rank: int, world_size: int):
        super().__init__(
            loader.dataset,
            batch_sampler=RankBatchSampler(loader.batch_sampler, rank, world_size),
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
        )
        self._pulled = 0

    def __iter__(self):
        self._pulled = self.batch_sampler.skip
        for batch in super().__iter__():
            self._pulled += 1
            yield batch

    def state_dict(self) -> dict:
        return {"batches_consumed": self._pulled}

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state.get("batches_consumed", 0))
        self.batch_sampler.skip = consumed if consumed < len(self.batch_sampler) else 0


def shard_loader(loader: DataLoader, rank: int, world_size: int) -> TrainLoader:
    """`loader` restricted to this rank's share of the batches, resumable mid-epoch."""
    if len(loader.batch_sampler) < world_size:  # type: ignore[arg-type]
        raise ConfigError(
            f"the training split has {len(loader.batch_sampler)} batches, fewer than the {world_size} processes; "
            "lower data.images_per_batch or use fewer devices"
        )
    return TrainLoader(loader, rank, world_size)


# ---------------------------------------------------------------------------------------------
# Checkpoints: a single file, or a sharded folder (torch.distributed.checkpoint + meta.pt)


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / SHARDED_METADATA_FILE).is_file()


def checkpoint_metadata(path: Path) -> dict:
    """The non-tensor part of a checkpoint (step, loops, asymoe keys) without loading the weights."""
    if is_sharded_checkpoint(path):
        return torch.load(path / SHARDED_METADATA_FILE, map_location="cpu", weights_only=False)
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def saved_loader_state(metadata: dict) -> dict | None:
    """The training loader's state inside a Lightning checkpoint (None for an older checkpoint)."""
    states = metadata.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader", [])
    return states[0] if states else None


def load_full_checkpoint(path: Path) -> dict:
    """A checkpoint as one dict with a full `state_dict`, whether saved as a file or sharded.

    Sharded folders are consolidated in this process (no process group needed); the whole model
    must fit in CPU memory.
    """
    if not is_sharded_checkpoint(path):
        return torch.load(path, map_location="cpu", weights_only=False)
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    return _load_distributed_checkpoint(path)
