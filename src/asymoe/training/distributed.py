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

Known limits: BatchNorm running statistics are buffers, which FSDP does not synchronise (DDP
broadcasts rank 0's): with a BatchNorm encoder (ResNet) the ranks' statistics drift apart and a
checkpoint keeps rank 0's; LayerNorm encoders (ViT) are unaffected. Under `fsdp2` with bf16-mixed
the unsharded weights are bf16 (the fp32 master copy stays sharded); the hyperbolic groups cast
to float32 inside their fp32 islands.
"""

from __future__ import annotations

import torch
from torch import nn

from asymoe.config import Config, ConfigError

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
    """Machine-dependent checks the schema cannot do: the GPUs a config asks for exist."""
    t = cfg.trainer
    cuda = torch.cuda.is_available()
    if t.accelerator == "gpu" and not cuda:
        raise ConfigError("trainer.accelerator='gpu' but no CUDA device is visible; use accelerator=cpu or auto")
    if t.accelerator == "cpu" or not cuda:
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
