"""Scale-out: the Lightning strategy for `trainer.strategy` and FSDP2 sharding.

- `auto`: Lightning's choice (one process, or DDP when `devices > 1`).
- `ddp`: DistributedDataParallel; gloo on CPU, nccl on GPU.
- `fsdp`: Lightning's FSDPStrategy (FSDP1, GPU only; config validation refuses it without one):
  auto-wrap at the LM's decoder-layer class and the timm block classes, optional activation
  checkpointing of the same classes, mixed precision from `trainer.precision`,
  `trainer.state_dict_type` sharded | full.
- `fsdp2`: Lightning's ModelParallelStrategy (data-parallel mesh only); `VLMModule.configure_model`
  calls `apply_fsdp2`, which puts `fully_shard` on every decoder layer and vision block, then on the
  root. Runs on CPU processes with gloo as well as on GPUs.

Why every rank joins every collective: the MoE block runs every built expert group on every
forward (an empty group gets zero-size inputs), and the model runs the vision encoder on a
zero-size batch when a training batch has no image, so the parameter set of the autograd graph
never depends on the data. DDP therefore needs no `find_unused_parameters`, and FSDP's per-module
all-gathers happen in the same order on every rank.

Buffers: BatchNorm running statistics are buffers, which FSDP neither shards nor synchronises
(DDP broadcasts rank 0's before every forward). Left alone, the ranks' statistics drift apart, a
sharded checkpoint stores whichever rank's copy the planner picks, and a resumed run differs from
an uninterrupted one. `broadcast_buffers` gives FSDP and FSDP2 DDP's semantics: after every
training backward rank 0's floating-point buffers are copied to every rank in one collective, so
all ranks (and every checkpoint) hold the same statistics. Under `fsdp2` with bf16-mixed
the unsharded weights are bf16 (the fp32 master copy stays sharded); the hyperbolic groups cast
to float32 inside their fp32 islands.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from asymoe.config import Config, ConfigError
from asymoe.config.validation import check_fsdp_accelerator
from asymoe.training import checkpoints

# `trainer.precision` values that run the forward in a lower-precision dtype (FSDP1 and FSDP2 policies).
MIXED_PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def mixed_precision_dtype(precision: str) -> torch.dtype | None:
    return MIXED_PRECISION_DTYPES.get(str(precision))


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
    """Machine-dependent checks the schema cannot do: the accelerator `auto` resolves to, the GPUs asked for."""
    t = cfg.trainer
    cuda = torch.cuda.is_available()
    if t.accelerator == "gpu" and not cuda:
        raise ConfigError("trainer.accelerator='gpu' but no CUDA device is visible; use accelerator=cpu or auto")
    on_cpu = t.accelerator == "cpu" or not cuda
    check_fsdp_accelerator(t.strategy, "cpu" if on_cpu else "gpu")
    if on_cpu:
        return
    visible = torch.cuda.device_count()
    if isinstance(t.devices, int) and t.devices > visible:
        raise ConfigError(f"trainer.devices={t.devices} but only {visible} CUDA device(s) are visible")
    if isinstance(t.devices, (list, tuple)):
        missing = [d for d in t.devices if not 0 <= int(d) < visible]
        if missing:
            raise ConfigError(f"trainer.devices lists GPU(s) {missing} that do not exist ({visible} visible)")


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

    dtype = mixed_precision_dtype(precision)
    if dtype is None:
        return None
    return MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32, buffer_dtype=torch.float32)


def build_strategy(cfg: Config, model: nn.Module):
    """The Lightning strategy object (or name) for `cfg.trainer.strategy`."""
    t = cfg.trainer
    if t.strategy == "auto":
        return "auto"
    if t.strategy == "ddp":
        # Every parameter is in every step's graph (module docstring), so no unused-parameter search.
        return DDPStrategy(find_unused_parameters=False)
    if t.strategy == "fsdp":
        classes = block_classes(model)
        return AtomicFSDPStrategy(
            auto_wrap_policy=classes,
            activation_checkpointing_policy=classes if t.activation_checkpointing else None,
            mixed_precision=fsdp_mixed_precision(t.precision),
            state_dict_type=t.state_dict_type,
            use_orig_params=True,
        )
    assert t.strategy == "fsdp2", t.strategy
    # Pure data parallelism: one FSDP2 mesh over every process; tensor parallelism stays 1.
    return AtomicModelParallelStrategy(
        data_parallel_size=world_size(cfg),
        tensor_parallel_size=1,
        save_distributed_checkpoint=t.state_dict_type == "sharded",
    )


class AtomicShardedSave:
    """Strategy mixin: a sharded checkpoint folder is written aside, recorded, then swapped into place.

    Every rank writes its shards into `<path>.partial`; after a barrier rank 0 records the folder's
    files (`checkpoints.write_folder_manifest`) and swaps it in, so `<path>` is always a whole
    checkpoint. Loads are verified first and use `weights_only=True`.
    """

    def _writes_folders(self) -> bool:
        return (
            getattr(self, "_save_distributed_checkpoint", False) or getattr(self, "_state_dict_type", "") == "sharded"
        )

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if not self._writes_folders():
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        staging = path.with_name(path.name + checkpoints.STAGING_SUFFIX)
        if self.global_rank == 0 and staging.exists():
            checkpoints.remove_checkpoint(staging)
        self.barrier("asymoe_checkpoint_staging")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("asymoe_checkpoint_written")
        if self.global_rank == 0:
            checkpoints.write_folder_manifest(staging)
            checkpoints.swap_folder_into_place(staging, path)
        self.barrier("asymoe_checkpoint_swapped")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        checkpoints.verify_checkpoint(Path(checkpoint_path))
        return super().load_checkpoint(checkpoint_path, weights_only=True)


class AtomicFSDPStrategy(AtomicShardedSave, FSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1) with atomic, recorded sharded checkpoints."""


class AtomicModelParallelStrategy(AtomicShardedSave, ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2) with atomic, recorded sharded checkpoints."""


def shards_without_buffer_sync(strategy) -> bool:
    """True for the strategies that leave buffers per rank (FSDP1, FSDP2), with more than one process."""
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) and strategy.world_size > 1


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s floating-point buffers (e.g. BatchNorm running statistics) to every rank, in one collective."""
    buffers = [b for b in module.buffers() if b.is_floating_point() and b.numel()]
    if not buffers or not torch.distributed.is_initialized():
        return
    flat = torch.cat([b.detach().reshape(-1).float() for b in buffers])
    torch.distributed.broadcast(flat, src=src)
    offset = 0
    for b in buffers:
        b.detach().copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


def apply_fsdp2(model: nn.Module, mesh, precision: str, activation_checkpointing: bool) -> None:
    """`fully_shard` each vision block and decoder layer, then the root (embeddings, head, rest).

    Idempotent: Lightning calls `configure_model` again for `trainer.test` after `trainer.fit`.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return
    dtype = mixed_precision_dtype(precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    units = sharding_units(model)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        unit_ids = {id(unit) for unit in units}
        apply_activation_checkpointing(model, check_fn=lambda module: id(module) in unit_ids)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
