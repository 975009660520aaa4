"""The experiment schema: typed dataclasses, their defaults, and every list of valid choices.

Each choice is one ``Literal`` type here (or in :mod:`asymoe.layout` for the expert-group
topology); OmegaConf enforces it when a YAML file or an override is merged onto the schema, and
:func:`choices` reads it back for messages and for code that dispatches on the value.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal, get_args, get_origin

from asymoe.intent.config import IntentConfig
from asymoe.layout import Modality, RoutingMode

Task = Literal["vqa", "intent"]
ProjectorKind = Literal["mlp2x_gelu", "linear"]
# The parts of the model a training stage may train (asymoe.training.stages).
TrainableModule = Literal["vision", "projector", "lm", "experts", "routers"]
# PIL resampling filters timm pretrained configs name.
Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
# Hugging Face model types a scratch LM may be built as (gated MLPs; any local causal LM loads by path).
LMArch = Literal["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "olmo2", "granite"]
# ffn: gated FFN experts; evidence: AsyMoE evidence-priority experts (language group only).
ExpertKind = Literal["ffn", "evidence"]
# AsyMoE hyperbolic inter-modality experts (shared group only) or the Euclidean FFN.
Geometry = Literal["euclidean", "lorentz", "poincare"]
# How a group's experts run (asymoe.models.dispatch): eager loops over experts in Python; the
# kernels sort a block's assignments once and multiply all experts' weights at once; grouped uses
# torch's grouped_mm where the build has it for the device and dtype (else padded); auto uses the
# kernel measured fastest for the device and dtype (benchmarks/results/moe_block.md).
ExpertKernel = Literal["grouped_mm", "padded", "segment"]
ExpertsBackend = Literal["auto", "eager", "grouped", ExpertKernel]
# learned: alpha = sigmoid(w_alpha . h + b_alpha); fixed: alpha = alpha_init throughout.
AlphaMode = Literal["learned", "fixed"]
# evidence: t from the evidence-priority experts' output (paper Eq. 13); shared: from the shared group.
TextSource = Literal["evidence", "shared"]
DataSource = Literal["easy_vqa", "llava_json", "scenes"]
# The scenes benchmark's question families (asymoe.data.scenes.questions implements each).
SceneFamily = Literal["attribute", "existence", "count", "relation", "closest", "compare", "two_hop"]
OnError = Literal["raise", "skip"]
# auto | ddp | fsdp (Lightning FSDPStrategy, GPU only) | fsdp2 (ModelParallelStrategy + fully_shard).
Strategy = Literal["auto", "ddp", "fsdp", "fsdp2"]
Precision = Literal["32-true", "32", "bf16-mixed", "bf16-true", "16-mixed"]
# fsdp / fsdp2 checkpoints: sharded (a folder, one shard per rank) | full (one file from rank 0).
StateDictType = Literal["sharded", "full"]
# A non-finite loss or gradient: stop the run with a report, or skip that optimizer step and count it.
NonFinite = Literal["stop", "skip"]

# Method defaults: MoE-LLaVA's Switch coefficient for the one shared-mode router, MoIIE's for
# each modality router. A router that the routing mode does not build must keep its default.
DEFAULT_BALANCE_COEF = {"all": 0.01, "vision": 0.001, "language": 0.001}
DEFAULT_CURVATURE = 1.0


@dataclass
class VisionConfig:
    model_name: str = "resnet10t"
    # Extra keyword arguments for timm.create_model (e.g. channels for a small ResNet).
    model_kwargs: dict = field(default_factory=dict)
    pretrained_path: str | None = None
    # Preprocessing; None = from the timm model's pretrained config (input size, mean, std, interpolation).
    image_size: int | None = 64
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: Interpolation | None = None
    # Keep a ViT's class (and register) tokens in front of its patch tokens.
    keep_prefix_tokens: bool = False
    # Which feature level supplies the tokens: -1 = last; an index into forward_intermediates.
    select_layer: int = -1
    freeze: bool = False


@dataclass
class ProjectorConfig:
    kind: ProjectorKind = "mlp2x_gelu"


@dataclass
class LanguageConfig:
    # Build a causal LM from scratch (`arch` + sizes) or load one with from_pretrained.
    pretrained_path: str | None = None
    arch: LMArch = "llama"
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
    intermediate_size: int | None = None
    # Only the language group may be `evidence`; vision and shared experts are always `ffn`.
    kind: ExpertKind = "ffn"
    # Only the shared (inter-modality) group may be hyperbolic.
    geometry: Geometry = "euclidean"
    # Hyperbolic shared group only: initial curvature c (the manifold has sectional curvature -c),
    # learnable in log space and clamped to [c/10, 10c]. Elsewhere they must keep their defaults.
    curvature: float = DEFAULT_CURVATURE
    learn_curvature: bool = True


@dataclass
class EvidenceConfig:
    """AsyMoE evidence-priority experts: memory FFN + causal evidence cross-attention, gated by alpha."""

    heads: int = 4
    alpha: AlphaMode = "learned"
    alpha_init: float = 0.3
    # Add s_evd = sigmoid(w_evd . Attn(h, c)) to the language router's evidence-expert logits.
    route_bias: bool = True


@dataclass
class GeometryLossConfig:
    """AsyMoE geometry losses on pooled vision / text points of the hyperbolic shared group."""

    align_weight: float = 0.0
    order_weight: float = 0.0
    cone_k: float = 0.1
    text_source: TextSource = "evidence"


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
    # None = every expert eligible for vision tokens; otherwise top_k < top_a <= that number.
    top_a: int | None = None


@dataclass
class RoutingConfig:
    # shared: one router `all` over every expert; modality: one router per modality over its
    # eligible groups (asymoe.layout).
    mode: RoutingMode = "modality"
    top_k: int = 2
    jitter: float = 0.0
    z_loss_coef: float = 0.0
    # Switch balance coefficient per router: `all` in shared mode, `vision`/`language` in modality mode.
    balance_coef: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_BALANCE_COEF))
    # Which modalities' tokens enter the balance loss (LTDR uses [language]).
    balance_modalities: list[Modality] = field(default_factory=lambda: ["vision", "language"])
    vision_tail: VisionTailConfig = field(default_factory=VisionTailConfig)


@dataclass
class MoEConfig:
    enabled: bool = True
    # A pattern of asymoe.layout.LayerPattern or a list of layer indices (negative from the end).
    layers: Any = "every_other_odd"
    groups: GroupsConfig = field(default_factory=GroupsConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    geometry_loss: GeometryLossConfig = field(default_factory=GeometryLossConfig)
    upcycle: bool = True
    experts_backend: ExpertsBackend = "auto"


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class ScenesConfig:
    """The generated scenes benchmark (data.source=scenes); generated once per parameter set."""

    seed: int = 0
    # Root of the generated data sets (one folder per parameter hash); None = ~/.cache/asymoe/scenes
    # (or $XDG_CACHE_HOME/asymoe/scenes).
    cache_dir: str | None = None
    image_size: int = 64
    min_objects: int = 4
    max_objects: int = 6
    families: list[SceneFamily] = field(default_factory=lambda: list(get_args(SceneFamily)))
    train_questions: int = 40000
    val_questions: int = 500
    # Questions of the iid and of the prior-shift test split (the blind split repeats the iid one).
    test_questions: int = 1500
    # POPE: images probed, 3 present + 3 absent objects each, per negative sampling.
    pope_images: int = 100
    questions_per_image: int = 10
    # Long tail: per question template, answer of rank r is kept with probability (r + 1)^-answer_skew.
    answer_skew: float = 1.5
    # Object types: popularity (rank + 1)^-object_skew; each scene boosts one of `contexts` subsets
    # of `context_size` types by `context_boost` (co-occurrence, for POPE's adversarial negatives).
    object_skew: float = 1.0
    contexts: int = 3
    context_size: int = 6
    context_boost: float = 4.0
    # Spatial questions are asked only when positions / distances differ by more than this
    # (a fraction of the image side).
    margin: float = 0.05


@dataclass
class DataConfig:
    source: DataSource = "easy_vqa"
    # llava_json: train/val/test JSON files and the image folder they refer to.
    train_path: str | None = None
    val_path: str | None = None
    test_path: str | None = None
    image_root: str | None = None
    # Fraction of easy-VQA's train images held out for validation (split by image, fixed seed).
    val_fraction: float = 0.1
    split_seed: int = 0
    # Training batches hold all questions of `images_per_batch` images; the encoder runs once per image.
    images_per_batch: int = 16
    eval_batch_size: int = 256
    # Cap the number of samples per split (None = all): for quick runs and tests.
    limit_train: int | None = None
    limit_val: int | None = None
    limit_test: int | None = None
    num_workers: int = 0
    on_error: OnError = "raise"
    max_answer_tokens: int = 4
    # Question-only reading: every record loses its image (the language prior of the same LM).
    drop_images: bool = False
    scenes: ScenesConfig = field(default_factory=ScenesConfig)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    lr_vision: float | None = None
    lr_projector: float | None = None
    lr_router: float | None = None
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    # Cosine decays to min_lr_ratio * lr.
    min_lr_ratio: float = 0.1
    # AdamW's fused kernel (all parameters of a device updated in one pass): null = where torch has
    # it for every parameter's device (CPU, CUDA); true = always (torch refuses other devices);
    # false = torch's default loop (per tensor on CPU, foreach on CUDA).
    fused: bool | None = None


@dataclass
class TrainerConfig:
    """Lightning Trainer arguments, under their own names."""

    max_epochs: int = 3
    max_steps: int = -1
    max_time: str | None = None
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Strategy = "auto"
    precision: Precision = "32-true"
    # fsdp / fsdp2: recompute each decoder layer and vision block in the backward pass.
    activation_checkpointing: bool = False
    state_dict_type: StateDictType = "sharded"
    # Continue a run: `last` (output_dir/checkpoints/last.ckpt) or a checkpoint path.
    resume: str | None = None
    gradient_clip_val: float | None = 1.0
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
    nonfinite: NonFinite = "stop"


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    # Routing heat-maps and histograms at each validation.
    routing_images: bool = True


@dataclass
class StageConfig:
    """One stage of a multi-stage run (asymoe.training.stages): what trains and what changes.

    `overrides` are `key.sub=value` items over the run's config (learning rates, data, epochs or
    steps, model.moe.enabled, ...); modules not in `train` are frozen.
    """

    name: str = "stage"
    train: list[TrainableModule] = field(default_factory=lambda: ["vision", "projector", "lm", "experts", "routers"])
    overrides: list[str] = field(default_factory=list)


@dataclass
class Config:
    experiment: str = "default"
    seed: int = 0
    output_dir: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # vqa: the vision-language MoE models (model, data); intent: multimodal intent recognition (intent).
    task: Task = "vqa"
    intent: IntentConfig = field(default_factory=IntentConfig)
    # Multi-stage training (e.g. projector alignment, then MoE fine-tuning); empty = one stage.
    stages: list[StageConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        # The file load() read (for messages): an attribute, not a schema key, so users cannot set it.
        self.source_file: str | None = None


@functools.cache
def all_keys(schema: type = Config, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key of the schema, sections included."""
    keys: list[str] = []
    hints = typing.get_type_hints(schema)
    for item in fields(schema):
        name = f"{prefix}{item.name}"
        keys.append(name)
        if is_dataclass(hints[item.name]):
            keys.extend(all_keys(hints[item.name], name + "."))
    return tuple(keys)


def _field_hint(key: str) -> Any:
    """The annotation of a dotted key (list indices dropped), or None when the schema has no such key."""
    schema: Any = Config
    for part in key.split("[", 1)[0].split("."):
        if not is_dataclass(schema) or part not in {item.name for item in fields(schema)}:
            return None
        schema = typing.get_type_hints(schema)[part]
    return schema


def choices(key: str) -> tuple[str, ...] | None:
    """The valid values of a dotted key (`model.moe.routing.mode`, `...balance_modalities[0]`), if it is a choice."""
    hint = _field_hint(key)
    if get_origin(hint) in (list, typing.Union, types.UnionType):  # list[Literal[...]], Literal[...] | None
        hint = _only_argument(hint)
    return get_args(hint) if get_origin(hint) is Literal else None


def _only_argument(hint: Any) -> Any:
    """X for list[X], X | None and Optional[X]; the hint itself when it has several arguments."""
    inner = [arg for arg in get_args(hint) if arg is not type(None)]
    return inner[0] if len(inner) == 1 else hint


def is_section(key: str) -> bool:
    """Whether a dotted key names a section of the schema (a nested dataclass), not a value."""
    return is_dataclass(_field_hint(key))


def container_type(key: str) -> type | None:
    """dict for a section or a mapping field, list for a list field (`list[float] | None` too), None
    for a scalar or unknown key."""
    hint = _field_hint(key)
    if get_origin(hint) in (typing.Union, types.UnionType):  # an optional field: what it holds when set
        hint = _only_argument(hint)
    if is_dataclass(hint) or hint is dict or get_origin(hint) is dict:
        return dict
    return list if hint is list or get_origin(hint) is list else None
