"""Typed experiment configuration: ``load(yaml, overrides) -> Config``, validated, or one-line ConfigError.

- :mod:`asymoe.config.schema`: the dataclasses, their defaults and every ``Literal`` choice list;
- :mod:`asymoe.config.loading`: YAML files with ``extends:``, ``key.sub=value`` overrides, saving;
- :mod:`asymoe.config.validation`: cross-field rules, including refusing keys that would do nothing.

The expert-group topology (groups, routers, MoE layer patterns) lives in :mod:`asymoe.layout`,
shared with the models; its names are re-exported here for existing imports.
"""

from asymoe.config.loading import (
    check_overrides,
    format_override,
    load,
    merge_onto_schema,
    parse_overrides,
    resolve_config_path,
    resolve_named_yaml,
    save,
    switched_hparams,
    to_dict,
    to_yaml,
)
from asymoe.config.schema import (
    Config,
    DataConfig,
    EvidenceConfig,
    GeometryLossConfig,
    GroupConfig,
    GroupsConfig,
    LanguageConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ProjectorConfig,
    RoutingConfig,
    TrainerConfig,
    VisionConfig,
    VisionTailConfig,
    choices,
)
from asymoe.config.validation import check_evidence_heads, check_fsdp_accelerator, validate
from asymoe.errors import ConfigError
from asymoe.layout import GROUP_NAMES, LAYER_PATTERNS, MODALITIES, eligible_groups, moe_layer_indices

__all__ = [
    "GROUP_NAMES",
    "LAYER_PATTERNS",
    "MODALITIES",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvidenceConfig",
    "GeometryLossConfig",
    "GroupConfig",
    "GroupsConfig",
    "LanguageConfig",
    "LoggingConfig",
    "MoEConfig",
    "ModelConfig",
    "OptimConfig",
    "ProjectorConfig",
    "RoutingConfig",
    "TrainerConfig",
    "VisionConfig",
    "VisionTailConfig",
    "check_evidence_heads",
    "check_fsdp_accelerator",
    "check_overrides",
    "choices",
    "eligible_groups",
    "format_override",
    "load",
    "merge_onto_schema",
    "moe_layer_indices",
    "parse_overrides",
    "resolve_config_path",
    "resolve_named_yaml",
    "save",
    "switched_hparams",
    "to_dict",
    "to_yaml",
    "validate",
]
