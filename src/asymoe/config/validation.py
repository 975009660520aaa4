"""Cross-field rules the schema's types cannot express, each a small function raising ConfigError.

Besides ranges and paths, a key that would have no effect in the configured model is refused
rather than silently ignored (curvature on a Euclidean group, the balance coefficient of a
router the routing mode does not build, `vision_tail.top_a` with the tail rule off).
:func:`check_fsdp_accelerator` and :func:`check_evidence_heads` are public so that code which
learns the accelerator or the hidden size only at run time applies the same rule and message.
"""

from __future__ import annotations

from pathlib import Path

from asymoe.config.schema import DEFAULT_BALANCE_COEF, DEFAULT_CURVATURE, Config, GroupConfig, MoEConfig
from asymoe.errors import ConfigError
from asymoe.intent.config import validate_intent
from asymoe.layout import (
    GROUP_NAMES,
    MODALITIES,
    ROUTER_NAMES,
    eligible_experts,
    eligible_groups,
    moe_layer_indices,
    router_names,
)

# A pretrained LM's depth and width are known only when it is built; the models check them then.
UNKNOWN_DEPTH = 10**6


def _prefix(where: str | None) -> str:
    return f"{where}: " if where else ""


def check_fsdp_accelerator(strategy: str, accelerator: str, where: str | None = None) -> None:
    """Lightning's FSDPStrategy (FSDP1) refuses a CPU accelerator; fsdp2 and ddp run on CPU."""
    if strategy == "fsdp" and accelerator == "cpu":
        raise ConfigError(
            f"{_prefix(where)}trainer.strategy='fsdp' (Lightning FSDPStrategy) needs a GPU; "
            "on CPU use trainer.strategy=fsdp2 or ddp"
        )


def check_evidence_heads(heads: int, hidden_size: int | None, where: str | None = None) -> None:
    """The evidence cross-attention splits the hidden size into `heads` equal heads (None: not known yet)."""
    if heads < 1 or (hidden_size is not None and hidden_size % heads):
        raise ConfigError(
            f"{_prefix(where)}model.moe.evidence.heads={heads} must divide the language hidden size {hidden_size}"
        )


def _path_exists(value: str) -> bool:
    try:
        return Path(value).exists()
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def _check_path(value: str | None, key: str, where: str) -> None:
    if value is not None and not _path_exists(value):
        raise ConfigError(f"{where}: {key}: path does not exist: {value}")


def _positive(value: int | float, key: str, where: str) -> None:
    if not value > 0:
        raise ConfigError(f"{where}: {key} must be positive, got {value}")


def validate(cfg: Config) -> None:
    """Every cross-field rule; the first broken one raises ConfigError naming the file and key."""
    where = cfg.source_file or "config"
    _validate_model(cfg, where)
    _validate_data(cfg, where)
    _validate_optim(cfg, where)
    _validate_trainer(cfg, where)
    _validate_moe(cfg, where)
    if cfg.task == "intent":
        validate_intent(cfg.intent, where)


def _validate_model(cfg: Config, where: str) -> None:
    model = cfg.model
    if model.vision.image_size is not None:
        _positive(model.vision.image_size, "model.vision.image_size", where)
    for key in ("mean", "std"):
        values = getattr(model.vision, key)
        if values is not None and (len(values) != 3 or (key == "std" and min(values) <= 0)):
            raise ConfigError(f"{where}: model.vision.{key} must be 3 numbers (one per RGB channel), got {values}")
    _check_path(model.vision.pretrained_path, "model.vision.pretrained_path", where)
    _check_path(model.language.pretrained_path, "model.language.pretrained_path", where)
    language = model.language
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        _positive(getattr(language, key), f"model.language.{key}", where)
    _positive(language.max_position_embeddings, "model.language.max_position_embeddings", where)
    _positive(language.initializer_range, "model.language.initializer_range", where)


def _validate_data(cfg: Config, where: str) -> None:
    data = cfg.data
    if data.source == "llava_json":
        if data.train_path is None:
            raise ConfigError(f"{where}: data.train_path is required when data.source='llava_json'")
        for key in ("train_path", "val_path", "test_path", "image_root"):
            _check_path(getattr(data, key), f"data.{key}", where)
    if not 0.0 < data.val_fraction < 1.0:
        raise ConfigError(f"{where}: data.val_fraction must be in (0, 1), got {data.val_fraction}")
    if data.images_per_batch < 1 or data.eval_batch_size < 1:
        raise ConfigError(f"{where}: data.images_per_batch and data.eval_batch_size must be >= 1")
    for key in ("limit_train", "limit_val", "limit_test"):
        limit = getattr(data, key)
        if limit is not None and limit < 1:
            raise ConfigError(f"{where}: data.{key} must be >= 1 or null (all samples), got {limit}")
    if data.num_workers < 0:
        raise ConfigError(f"{where}: data.num_workers must be >= 0, got {data.num_workers}")
    _positive(data.max_answer_tokens, "data.max_answer_tokens", where)
    if data.source == "scenes":
        _validate_scenes(data.scenes, where)


def _validate_scenes(scenes, where: str) -> None:
    for key in (
        "image_size",
        "train_questions",
        "val_questions",
        "test_questions",
        "pope_images",
        "questions_per_image",
        "contexts",
        "context_size",
        "context_boost",
    ):
        _positive(getattr(scenes, key), f"data.scenes.{key}", where)
    # POPE probes 3 present objects per image; more than 8 objects do not fit without overlap.
    if not 3 <= scenes.min_objects <= scenes.max_objects <= 8:
        raise ConfigError(
            f"{where}: data.scenes needs 3 <= min_objects <= max_objects <= 8, "
            f"got {scenes.min_objects}..{scenes.max_objects}"
        )
    if not scenes.families:
        raise ConfigError(f"{where}: data.scenes.families is empty; list at least one question family")
    if scenes.answer_skew < 0 or scenes.object_skew < 0:
        raise ConfigError(f"{where}: data.scenes.answer_skew and object_skew must be >= 0")
    if not 0 <= scenes.margin < 0.5:
        raise ConfigError(f"{where}: data.scenes.margin must be in [0, 0.5), got {scenes.margin}")


def _validate_optim(cfg: Config, where: str) -> None:
    optim = cfg.optim
    _positive(optim.lr, "optim.lr", where)
    for key in ("lr_vision", "lr_projector", "lr_router"):
        value = getattr(optim, key)
        if value is not None:
            _positive(value, f"optim.{key}", where)
    if optim.weight_decay < 0 or optim.warmup_steps < 0:
        raise ConfigError(f"{where}: optim.weight_decay and optim.warmup_steps must be >= 0")
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"{where}: optim.min_lr_ratio must be in [0, 1], got {optim.min_lr_ratio}")
    betas = optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"{where}: optim.betas must be two numbers in [0, 1), got {betas!r}")


def _many_processes(cfg: Config) -> bool:
    devices = cfg.trainer.devices
    many_devices = (isinstance(devices, int) and devices > 1) or (isinstance(devices, list) and len(devices) > 1)
    return cfg.trainer.num_nodes > 1 or many_devices


def _validate_trainer(cfg: Config, where: str) -> None:
    t = cfg.trainer
    if t.num_nodes < 1:
        raise ConfigError(f"{where}: trainer.num_nodes must be >= 1, got {t.num_nodes}")
    if t.accumulate_grad_batches < 1 or t.log_every_n_steps < 1 or t.check_val_every_n_epoch < 1:
        raise ConfigError(
            f"{where}: trainer.accumulate_grad_batches, log_every_n_steps and check_val_every_n_epoch must be >= 1"
        )
    check_fsdp_accelerator(t.strategy, t.accelerator, where)
    if t.activation_checkpointing and t.strategy not in ("fsdp", "fsdp2"):
        raise ConfigError(f"{where}: trainer.activation_checkpointing needs trainer.strategy fsdp or fsdp2")
    if _many_processes(cfg) and not cfg.output_dir:
        raise ConfigError(
            f"{where}: a multi-process run (trainer.devices/num_nodes) needs output_dir, "
            "so every process writes to one run directory"
        )
    if t.resume == "last" and not cfg.output_dir:
        raise ConfigError(f"{where}: trainer.resume='last' needs output_dir (the run directory to continue)")
    if t.resume not in (None, "last") and not _path_exists(t.resume):
        raise ConfigError(
            f"{where}: trainer.resume: checkpoint not found: {t.resume} "
            "(give a .ckpt file, a sharded checkpoint folder, or 'last')"
        )


def _validate_moe(cfg: Config, where: str) -> None:
    moe = cfg.model.moe
    for name in GROUP_NAMES:
        _validate_group(name, getattr(moe.groups, name), where)
    _validate_evidence(cfg, where)
    _validate_geometry_loss(moe, where)
    if not moe.enabled:
        if moe.routing.vision_tail.enabled:
            raise ConfigError(
                f"{where}: model.moe.routing.vision_tail.enabled needs MoE layers (model.moe.enabled=false builds none)"
            )
        return
    num_layers = cfg.model.language.num_layers if cfg.model.language.pretrained_path is None else UNKNOWN_DEPTH
    moe_layer_indices(moe.layers, num_layers, where)
    counts = {name: getattr(moe.groups, name).num_experts for name in GROUP_NAMES}
    if sum(counts.values()) == 0:
        raise ConfigError(
            f"{where}: model.moe.enabled is true but every expert group is empty (model.moe.groups.*.num_experts = 0); "
            "set model.moe.enabled=false for a dense model"
        )
    _validate_routing(moe, counts, where)
    _validate_balance(moe, where)
    _validate_vision_tail(moe, counts, where)


def _validate_group(name: str, group: GroupConfig, where: str) -> None:
    key = f"model.moe.groups.{name}"
    if group.num_experts < 0:
        raise ConfigError(f"{where}: {key}.num_experts must be >= 0, got {group.num_experts}")
    if group.intermediate_size is not None:
        _positive(group.intermediate_size, f"{key}.intermediate_size", where)
    if group.kind == "evidence" and name != "language":
        raise ConfigError(
            f"{where}: {key}.kind='evidence' is only valid for the language group ({name} experts are always ffn)"
        )
    if group.geometry != "euclidean" and name != "shared":
        raise ConfigError(
            f"{where}: {key}.geometry='{group.geometry}' is only valid for the shared (inter-modality) group"
        )
    if not group.curvature > 0:
        raise ConfigError(f"{where}: {key}.curvature must be > 0, got {group.curvature}")
    if group.geometry == "euclidean":
        _refuse_curvature_keys(name, group, where)


def _refuse_curvature_keys(name: str, group: GroupConfig, where: str) -> None:
    """Curvature exists only on a hyperbolic shared group; anywhere else a non-default value does nothing."""
    key = f"model.moe.groups.{name}"
    why = (
        "curvature applies only to a hyperbolic shared group (geometry lorentz|poincare)"
        if name != "shared"
        else "model.moe.groups.shared.geometry is 'euclidean'; set lorentz or poincare, or drop the key"
    )
    if group.curvature != DEFAULT_CURVATURE:
        raise ConfigError(f"{where}: {key}.curvature={group.curvature} has no effect: {why}")
    if not group.learn_curvature:
        raise ConfigError(f"{where}: {key}.learn_curvature=false has no effect: {why}")


def _validate_evidence(cfg: Config, where: str) -> None:
    evidence = cfg.model.moe.evidence
    if not 0.0 < evidence.alpha_init < 1.0:
        raise ConfigError(f"{where}: model.moe.evidence.alpha_init must be in (0, 1), got {evidence.alpha_init}")
    language = cfg.model.language
    check_evidence_heads(evidence.heads, language.hidden_size if language.pretrained_path is None else None, where)


def _validate_geometry_loss(moe: MoEConfig, where: str) -> None:
    geometry = moe.geometry_loss
    if not 0.0 < geometry.cone_k < 1.0:
        raise ConfigError(f"{where}: model.moe.geometry_loss.cone_k must be in (0, 1), got {geometry.cone_k}")
    if geometry.align_weight < 0 or geometry.order_weight < 0:
        raise ConfigError(f"{where}: model.moe.geometry_loss weights must be >= 0")
    shared = moe.groups.shared
    if moe.enabled and (geometry.align_weight > 0 or geometry.order_weight > 0):
        if shared.num_experts == 0 or shared.geometry == "euclidean":
            raise ConfigError(
                f"{where}: model.moe.geometry_loss needs a hyperbolic shared group "
                "(model.moe.groups.shared.num_experts > 0 and geometry lorentz|poincare)"
            )


def _validate_routing(moe: MoEConfig, counts: dict[str, int], where: str) -> None:
    routing = moe.routing
    if routing.top_k < 1:
        raise ConfigError(f"{where}: model.moe.routing.top_k must be >= 1, got {routing.top_k}")
    if routing.jitter < 0 or routing.z_loss_coef < 0:
        raise ConfigError(f"{where}: model.moe.routing.jitter and z_loss_coef must be >= 0")
    for modality in MODALITIES:
        eligible = eligible_experts(counts, routing.mode, modality)
        if eligible == 0:
            raise ConfigError(
                f"{where}: {modality} tokens have no eligible expert in routing.mode='{routing.mode}' "
                f"(groups {', '.join(eligible_groups(routing.mode, modality))} are empty)"
            )
        if routing.top_k > eligible:
            raise ConfigError(
                f"{where}: model.moe.routing.top_k={routing.top_k} exceeds the {eligible} experts eligible "
                f"for {modality} tokens"
            )


def _validate_balance(moe: MoEConfig, where: str) -> None:
    routing = moe.routing
    built = router_names(routing.mode)
    for router, value in routing.balance_coef.items():
        key = f"model.moe.routing.balance_coef.{router}"
        if router not in ROUTER_NAMES:
            raise ConfigError(
                f"{where}: model.moe.routing.balance_coef has unknown router {router!r}; use {', '.join(ROUTER_NAMES)}"
            )
        if value < 0:
            raise ConfigError(f"{where}: {key} must be >= 0, got {value}")
        if router not in built and value != DEFAULT_BALANCE_COEF[router]:
            raise ConfigError(
                f"{where}: {key}={value} has no effect in routing.mode='{routing.mode}', "
                f"whose router(s) are {', '.join(built)}"
            )


def _validate_vision_tail(moe: MoEConfig, counts: dict[str, int], where: str) -> None:
    """LTDR's top-a acts on the vision router alone, so it is bounded by that router's eligible experts."""
    routing = moe.routing
    tail = routing.vision_tail
    if not tail.enabled:
        if tail.top_a is not None:
            raise ConfigError(
                f"{where}: model.moe.routing.vision_tail.top_a={tail.top_a} has no effect "
                "while model.moe.routing.vision_tail.enabled=false"
            )
        return
    vision_eligible = eligible_experts(counts, routing.mode, "vision")
    if tail.top_a is not None and not routing.top_k < tail.top_a <= vision_eligible:
        raise ConfigError(
            f"{where}: model.moe.routing.vision_tail.top_a={tail.top_a} must be > top_k={routing.top_k} "
            f"and <= the {vision_eligible} experts eligible for vision tokens"
        )
    if tail.top_a is None and vision_eligible <= routing.top_k:
        raise ConfigError(
            f"{where}: model.moe.routing.vision_tail needs more than top_k={routing.top_k} experts eligible "
            f"for vision tokens (has {vision_eligible})"
        )
