"""Typed experiment configuration.

An experiment is one YAML file that may ``extends:`` another (paths relative to the file), merged
with OmegaConf onto the dataclass schema below, then CLI overrides ``key.sub=value``. Unknown keys
and wrong types are rejected by the schema; cross-field rules live in ``validate``. Every
user-caused problem raises :class:`ConfigError`, whose message is one line naming the key or file.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line."""


LAYER_PATTERNS = ("every_other_odd", "every_other_even", "all", "first_half", "second_half")
GROUP_NAMES = ("vision", "shared", "language")
MODALITIES = ("vision", "language")


@dataclass
class VisionConfig:
    model_name: str = "resnet10t"
    # Extra keyword arguments for timm.create_model (e.g. channels for a small ResNet).
    model_kwargs: dict = field(default_factory=dict)
    pretrained_path: Optional[str] = None
    image_size: int = 64
    # Which feature level supplies the tokens: -1 = last; an index into forward_intermediates.
    select_layer: int = -1
    freeze: bool = False


@dataclass
class ProjectorConfig:
    kind: str = "mlp2x_gelu"


@dataclass
class LanguageConfig:
    # Build a causal LM from scratch (`arch` + sizes) or load one with from_pretrained.
    pretrained_path: Optional[str] = None
    arch: str = "llama"
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 256
    # Std of the scratch LM's weight init (HF's default 0.02 is tuned for wide models).
    initializer_range: float = 0.02


@dataclass
class GroupConfig:
    num_experts: int = 0
    # Expert width; None = the dense FFN's intermediate size (needed for exact upcycling).
    intermediate_size: Optional[int] = None
    # ffn: gated FFN experts; evidence: AsyMoE evidence-priority experts (language group only).
    kind: str = "ffn"
    # euclidean | lorentz | poincare: AsyMoE hyperbolic inter-modality experts (shared group only).
    geometry: str = "euclidean"
    # Initial curvature c (the manifold has sectional curvature -c); learnable in log space,
    # clamped to [c/10, 10c].
    curvature: float = 1.0
    learn_curvature: bool = True


@dataclass
class EvidenceConfig:
    """AsyMoE evidence-priority experts (DESIGN.md section 1)."""

    heads: int = 4
    # learned: alpha = sigmoid(w_alpha . h + b_alpha); fixed: alpha = alpha_init throughout.
    alpha: str = "learned"
    alpha_init: float = 0.3
    # Add s_evd = sigmoid(w_evd . Attn(h, c)) to the language router's evidence-expert logits.
    route_bias: bool = True


@dataclass
class GeometryLossConfig:
    """AsyMoE geometry losses on pooled vision / text points of the hyperbolic shared group."""

    align_weight: float = 0.0
    order_weight: float = 0.0
    cone_k: float = 0.1
    # evidence: t from the evidence-priority experts' output (paper Eq. 13); shared: from the shared group.
    text_source: str = "evidence"


@dataclass
class GroupsConfig:
    # Default: MoIIE's 1 + 2 + 1 layout for E = 4.
    vision: GroupConfig = field(default_factory=lambda: GroupConfig(num_experts=1))
    shared: GroupConfig = field(default_factory=lambda: GroupConfig(num_experts=2))
    language: GroupConfig = field(default_factory=lambda: GroupConfig(num_experts=1))


@dataclass
class VisionTailConfig:
    """LTDR: vision tokens with above-average routing-probability variance get top-a experts."""

    enabled: bool = False
    # None = every expert eligible for vision tokens.
    top_a: Optional[int] = None


@dataclass
class RoutingConfig:
    # shared: one router over every expert (vanilla MoE);
    # modality: one router per modality over its eligible groups (vision -> vision+shared,
    # language -> shared+language): modality-specific MoE, MoIIE, AsyMoE.
    mode: str = "modality"
    top_k: int = 2
    jitter: float = 0.0
    z_loss_coef: float = 0.0
    # Switch balance coefficient per router: `all` is the shared-mode router,
    # `vision`/`language` the modality-mode routers.
    balance_coef: dict = field(default_factory=lambda: {"all": 0.01, "vision": 0.001, "language": 0.001})
    # Which modalities' tokens enter the balance loss (LTDR uses [language]).
    balance_modalities: list = field(default_factory=lambda: ["vision", "language"])
    vision_tail: VisionTailConfig = field(default_factory=VisionTailConfig)


@dataclass
class MoEConfig:
    enabled: bool = True
    # every_other_odd | every_other_even | all | first_half | second_half | [indices]
    layers: Any = "every_other_odd"
    groups: GroupsConfig = field(default_factory=GroupsConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    geometry_loss: GeometryLossConfig = field(default_factory=GeometryLossConfig)
    upcycle: bool = True


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class DataConfig:
    # easy_vqa | llava_json
    source: str = "easy_vqa"
    # llava_json: train/val/test JSON files and the image folder they refer to.
    train_path: Optional[str] = None
    val_path: Optional[str] = None
    test_path: Optional[str] = None
    image_root: Optional[str] = None
    # Fraction of easy-VQA's train images held out for validation (split by image, fixed seed).
    val_fraction: float = 0.1
    split_seed: int = 0
    # Training batches hold all questions of `images_per_batch` images; the encoder runs once per image.
    images_per_batch: int = 16
    eval_batch_size: int = 256
    # Cap the number of samples per split (None = all): for quick runs and tests.
    limit_train: Optional[int] = None
    limit_val: Optional[int] = None
    limit_test: Optional[int] = None
    num_workers: int = 0
    on_error: str = "raise"
    max_answer_tokens: int = 4


@dataclass
class OptimConfig:
    lr: float = 5e-4
    lr_vision: Optional[float] = None
    lr_projector: Optional[float] = None
    lr_router: Optional[float] = None
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    # Cosine decays to min_lr_ratio * lr.
    min_lr_ratio: float = 0.1


@dataclass
class TrainerConfig:
    """Lightning Trainer arguments, under their own names."""

    max_epochs: int = 3
    max_steps: int = -1
    max_time: Optional[str] = None
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    # auto | ddp | fsdp (Lightning FSDPStrategy, GPU only) | fsdp2 (ModelParallelStrategy + fully_shard).
    strategy: str = "auto"
    precision: str = "32-true"
    # fsdp / fsdp2: recompute each decoder layer and vision block in the backward pass.
    activation_checkpointing: bool = False
    # fsdp / fsdp2 checkpoints: sharded (a folder, one shard per rank) | full (one file from rank 0).
    state_dict_type: str = "sharded"
    # Continue a run: `last` (output_dir/checkpoints/last.ckpt) or a checkpoint path.
    resume: Optional[str] = None
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    val_check_interval: Any = 1.0
    check_val_every_n_epoch: int = 1
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    log_every_n_steps: int = 25
    enable_progress_bar: bool = True
    num_sanity_val_steps: int = 0
    deterministic: bool = False


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    # Routing heat-maps and histograms at each validation.
    routing_images: bool = True


@dataclass
class Config:
    experiment: str = "default"
    seed: int = 0
    output_dir: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Set by load(): the file the config came from (for messages), not a user key.
    source_file: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# Loading


def _all_keys(schema: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(schema):
        name = f"{prefix}{f.name}"
        keys.append(name)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_all_keys(default, name + "."))
    return keys


def _closest(key: str) -> str:
    candidates = _all_keys(Config)
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not match:
        leaf = key.rsplit(".", 1)[-1]
        match = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf][:1] or difflib.get_close_matches(
            leaf, [c.rsplit(".", 1)[-1] for c in candidates], n=1
        )
    return f"; did you mean '{match[0]}'?" if match else ""


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    try:
        raw = OmegaConf.load(path)
    except Exception as error:  # yaml errors carry multi-line marks; keep the first line
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = _read_yaml((path.parent / str(parent)).resolve(), seen + (path.resolve(),))
    return OmegaConf.merge(base, raw)  # type: ignore[return-value]


def _parse_overrides(overrides: list[str]) -> DictConfig:
    dotlist = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        dotlist.append(item)
    try:
        return OmegaConf.from_dotlist(dotlist)
    except Exception as error:
        raise ConfigError(f"overrides: {str(error).splitlines()[0]}") from None


def merge_onto_schema(layers: list[tuple[str, DictConfig]]) -> DictConfig:
    merged = OmegaConf.structured(Config)
    for origin, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except ConfigKeyError as error:
            key = error.full_key or str(error.key)
            raise ConfigError(f"{origin}: unknown key '{key}'{_closest(key)}") from None
        except ValidationError as error:
            key = error.full_key
            value = error.value if hasattr(error, "value") else "?"
            message = str(error).splitlines()[0]
            raise ConfigError(f"{origin}: key '{key}' has a wrong value {value!r} ({message})") from None
        except OmegaConfBaseException as error:
            raise ConfigError(f"{origin}: {str(error).splitlines()[0]}") from None
    return merged  # type: ignore[return-value]


def resolve_named_yaml(name_or_path: str, folder: str) -> Path:
    """A YAML path, or a bare name looked up as NAME.yaml in ./<folder> and the repo's <folder>/."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = root / folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    return path


def resolve_config_path(name_or_path: str) -> Path:
    """An experiment YAML path, or an experiment name in experiments/."""
    return resolve_named_yaml(name_or_path, "experiments")


def load(config: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load an experiment YAML (optional), apply overrides, validate, and return a typed Config."""
    layers: list[tuple[str, DictConfig]] = []
    source = None
    if config is not None:
        path = resolve_config_path(str(config))
        source = str(path)
        layers.append((str(path), _read_yaml(path)))
    if overrides:
        layers.append(("overrides", _parse_overrides(list(overrides))))
    merged = merge_onto_schema(layers)
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {str(error).splitlines()[0]}") from None
    cfg.source_file = source
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(to_yaml(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def switched_hparams(cfg: Config) -> dict:
    """The config flattened to dotted keys with scalar values (TensorBoard HParams)."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", to_dict(cfg))
    return flat


# ---------------------------------------------------------------------------------------------
# Validation (cross-field rules the schema cannot express)


def _where(cfg: Config) -> str:
    return cfg.source_file or "config"


def moe_layer_indices(layers: Any, num_layers: int, where: str = "config") -> list[int]:
    """Resolve `model.moe.layers` to sorted layer indices of an LM with `num_layers` layers."""
    if isinstance(layers, str):
        patterns = {
            "every_other_odd": list(range(1, num_layers, 2)),
            "every_other_even": list(range(0, num_layers, 2)),
            "all": list(range(num_layers)),
            "first_half": list(range(num_layers // 2)),
            "second_half": list(range(num_layers // 2, num_layers)),
        }
        if layers not in patterns:
            raise ConfigError(
                f"{where}: model.moe.layers='{layers}' is not valid; use one of {', '.join(LAYER_PATTERNS)} or a list of indices"
            )
        indices = patterns[layers]
    elif isinstance(layers, (list, tuple, ListConfig)):
        indices = []
        for index in layers:
            if not isinstance(index, int) or isinstance(index, bool):
                raise ConfigError(f"{where}: model.moe.layers entry {index!r} is not an integer layer index")
            if not -num_layers <= index < num_layers:
                raise ConfigError(
                    f"{where}: model.moe.layers index {index} is outside the language model's {num_layers} layers (valid: 0..{num_layers - 1})"
                )
            indices.append(index % num_layers)
    else:
        raise ConfigError(f"{where}: model.moe.layers must be a pattern name or a list of indices, got {layers!r}")
    if not indices:
        raise ConfigError(f"{where}: model.moe.layers='{layers}' selects no layer of a {num_layers}-layer model")
    return sorted(set(indices))


def eligible_groups(mode: str, modality: str) -> tuple[str, ...]:
    """Expert groups a token of `modality` may be routed to."""
    if mode == "shared":
        return GROUP_NAMES
    return ("vision", "shared") if modality == "vision" else ("shared", "language")


def _choice(value: Any, key: str, valid: tuple, where: str) -> None:
    if value not in valid:
        raise ConfigError(f"{where}: {key}='{value}' is not valid; use one of {', '.join(map(str, valid))}")


def validate(cfg: Config) -> None:
    where = _where(cfg)
    model = cfg.model
    _choice(model.projector.kind, "model.projector.kind", ("mlp2x_gelu", "linear"), where)
    _choice(model.language.arch, "model.language.arch", ("llama", "qwen2", "mistral"), where)
    _choice(cfg.data.source, "data.source", ("easy_vqa", "llava_json"), where)
    _choice(cfg.data.on_error, "data.on_error", ("raise", "skip"), where)
    if model.vision.image_size <= 0:
        raise ConfigError(f"{where}: model.vision.image_size must be positive, got {model.vision.image_size}")
    for key in ("pretrained_path",):
        for section, name in ((model.vision, "model.vision"), (model.language, "model.language")):
            value = getattr(section, key)
            if value is not None and not Path(value).exists():
                raise ConfigError(f"{where}: {name}.{key}: path does not exist: {value}")
    if cfg.data.source == "llava_json":
        if cfg.data.train_path is None:
            raise ConfigError(f"{where}: data.train_path is required when data.source='llava_json'")
        for key in ("train_path", "val_path", "test_path", "image_root"):
            value = getattr(cfg.data, key)
            if value is not None and not Path(value).exists():
                raise ConfigError(f"{where}: data.{key}: path does not exist: {value}")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"{where}: data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    if cfg.data.images_per_batch < 1 or cfg.data.eval_batch_size < 1:
        raise ConfigError(f"{where}: data.images_per_batch and data.eval_batch_size must be >= 1")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"{where}: optim.lr must be positive, got {cfg.optim.lr}")
    _choice(
        str(cfg.trainer.precision),
        "trainer.precision",
        ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed"),
        where,
    )
    _validate_trainer(cfg, where)
    _validate_moe(cfg, where)


def _validate_trainer(cfg: Config, where: str) -> None:
    t = cfg.trainer
    _choice(t.strategy, "trainer.strategy", ("auto", "ddp", "fsdp", "fsdp2"), where)
    _choice(t.state_dict_type, "trainer.state_dict_type", ("sharded", "full"), where)
    if t.num_nodes < 1:
        raise ConfigError(f"{where}: trainer.num_nodes must be >= 1, got {t.num_nodes}")
    if t.strategy == "fsdp" and t.accelerator == "cpu":
        raise ConfigError(
            f"{where}: trainer.strategy='fsdp' (Lightning FSDPStrategy) needs a GPU; on CPU use trainer.strategy=fsdp2 or ddp"
        )
    if t.activation_checkpointing and t.strategy not in ("fsdp", "fsdp2"):
        raise ConfigError(f"{where}: trainer.activation_checkpointing needs trainer.strategy fsdp or fsdp2")
    devices = t.devices
    many = t.num_nodes > 1 or (isinstance(devices, int) and devices > 1) or (isinstance(devices, (list, ListConfig)) and len(devices) > 1)
    if many and not cfg.output_dir:
        raise ConfigError(f"{where}: a multi-process run (trainer.devices/num_nodes) needs output_dir, so every process writes to one run directory")
    if t.resume == "last" and not cfg.output_dir:
        raise ConfigError(f"{where}: trainer.resume='last' needs output_dir (the run directory to continue)")
    if t.resume not in (None, "last") and not Path(t.resume).exists():
        raise ConfigError(f"{where}: trainer.resume: checkpoint not found: {t.resume} (give a .ckpt file, a sharded checkpoint folder, or 'last')")


def _validate_moe(cfg: Config, where: str) -> None:
    moe = cfg.model.moe
    _choice(moe.routing.mode, "model.moe.routing.mode", ("shared", "modality"), where)
    counts = {name: getattr(moe.groups, name).num_experts for name in GROUP_NAMES}
    for name, count in counts.items():
        if count < 0:
            raise ConfigError(f"{where}: model.moe.groups.{name}.num_experts must be >= 0, got {count}")
        width = getattr(moe.groups, name).intermediate_size
        if width is not None and width <= 0:
            raise ConfigError(f"{where}: model.moe.groups.{name}.intermediate_size must be positive, got {width}")
    for name in GROUP_NAMES:
        group = getattr(moe.groups, name)
        _choice(group.kind, f"model.moe.groups.{name}.kind", ("ffn", "evidence"), where)
        _choice(group.geometry, f"model.moe.groups.{name}.geometry", ("euclidean", "lorentz", "poincare"), where)
        if group.kind == "evidence" and name != "language":
            raise ConfigError(f"{where}: model.moe.groups.{name}.kind='evidence' is only valid for the language group")
        if group.geometry != "euclidean" and name != "shared":
            raise ConfigError(
                f"{where}: model.moe.groups.{name}.geometry='{group.geometry}' is only valid for the shared (inter-modality) group"
            )
        if not group.curvature > 0:
            raise ConfigError(f"{where}: model.moe.groups.{name}.curvature must be > 0, got {group.curvature}")
    evidence = moe.evidence
    _choice(evidence.alpha, "model.moe.evidence.alpha", ("learned", "fixed"), where)
    if not 0.0 < evidence.alpha_init < 1.0:
        raise ConfigError(f"{where}: model.moe.evidence.alpha_init must be in (0, 1), got {evidence.alpha_init}")
    hidden = cfg.model.language.hidden_size
    if evidence.heads < 1 or (cfg.model.language.pretrained_path is None and hidden % evidence.heads):
        raise ConfigError(
            f"{where}: model.moe.evidence.heads={evidence.heads} must divide the language hidden size {hidden}"
        )
    geometry = moe.geometry_loss
    _choice(geometry.text_source, "model.moe.geometry_loss.text_source", ("evidence", "shared"), where)
    if not 0.0 < geometry.cone_k < 1.0:
        raise ConfigError(f"{where}: model.moe.geometry_loss.cone_k must be in (0, 1), got {geometry.cone_k}")
    if geometry.align_weight < 0 or geometry.order_weight < 0:
        raise ConfigError(f"{where}: model.moe.geometry_loss weights must be >= 0")
    if not moe.enabled:
        if moe.routing.vision_tail.enabled:
            raise ConfigError(
                f"{where}: model.moe.routing.vision_tail.enabled needs MoE layers (model.moe.enabled=false builds none)"
            )
        return
    if geometry.align_weight > 0 or geometry.order_weight > 0:
        shared = moe.groups.shared
        if shared.num_experts == 0 or shared.geometry == "euclidean":
            raise ConfigError(
                f"{where}: model.moe.geometry_loss needs a hyperbolic shared group "
                "(model.moe.groups.shared.num_experts > 0 and geometry lorentz|poincare)"
            )
    moe_layer_indices(moe.layers, cfg.model.language.num_layers if cfg.model.language.pretrained_path is None else 10**6, where)
    if sum(counts.values()) == 0:
        raise ConfigError(
            f"{where}: model.moe.enabled is true but every expert group is empty (model.moe.groups.*.num_experts = 0); set model.moe.enabled=false for a dense model"
        )
    routing = moe.routing
    if routing.top_k < 1:
        raise ConfigError(f"{where}: model.moe.routing.top_k must be >= 1, got {routing.top_k}")
    if routing.jitter < 0 or routing.z_loss_coef < 0:
        raise ConfigError(f"{where}: model.moe.routing.jitter and z_loss_coef must be >= 0")
    for modality in MODALITIES:
        eligible = sum(counts[g] for g in eligible_groups(routing.mode, modality))
        if eligible == 0:
            raise ConfigError(
                f"{where}: {modality} tokens have no eligible expert in routing.mode='{routing.mode}' "
                f"(groups {', '.join(eligible_groups(routing.mode, modality))} are empty)"
            )
        if routing.top_k > eligible:
            raise ConfigError(
                f"{where}: model.moe.routing.top_k={routing.top_k} exceeds the {eligible} experts eligible for {modality} tokens"
            )
    for key, value in routing.balance_coef.items():
        if key not in ("all",) + MODALITIES:
            raise ConfigError(
                f"{where}: model.moe.routing.balance_coef has unknown router '{key}'; use all, vision, language"
            )
        if not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{where}: model.moe.routing.balance_coef.{key} must be a number >= 0, got {value!r}")
    tail = routing.vision_tail
    if tail.enabled:
        vision_eligible = sum(counts[g] for g in eligible_groups(routing.mode, "vision"))
        if tail.top_a is not None and not routing.top_k < tail.top_a <= vision_eligible:
            raise ConfigError(
                f"{where}: model.moe.routing.vision_tail.top_a={tail.top_a} must be > top_k={routing.top_k} "
                f"and <= the {vision_eligible} experts eligible for vision tokens"
            )
        if tail.top_a is None and vision_eligible <= routing.top_k:
            raise ConfigError(
                f"{where}: model.moe.routing.vision_tail needs more than top_k={routing.top_k} experts eligible for vision tokens (has {vision_eligible})"
            )
    for modality in routing.balance_modalities:
        if modality not in MODALITIES:
            raise ConfigError(
                f"{where}: model.moe.routing.balance_modalities entry '{modality}' is not valid; use vision, language"
            )
