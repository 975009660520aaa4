"""Reading configs: YAML files with ``extends:``, ``key.sub=value`` overrides, the merge onto the schema.

An experiment is one YAML file that may ``extends:`` another (its path relative to the file),
merged with OmegaConf onto the dataclass schema, then the CLI overrides in order. Unknown keys,
wrong types and values outside a choice list are refused here, during the merge; cross-field
rules run afterwards in :mod:`asymoe.config.validation`. Every problem raises
:class:`~asymoe.errors.ConfigError` with one line naming the file (or ``overrides``) and the key.

The override syntax lives here alone: :func:`parse_overrides` reads ``key.sub=value`` items and
:func:`format_override` writes a value so that it parses back to itself (grid cells use both).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from asymoe.config.schema import Config, all_keys, choices, container_type, is_section
from asymoe.config.validation import validate
from asymoe.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[3]
# Keys that older versions accepted, and why they are refused now.
RETIRED_KEYS = {
    "source_file": "load() records the file a config came from itself; delete the key",
}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _closest(key: str) -> str:
    """A did-you-mean hint for an unknown dotted key."""
    candidates = all_keys()
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not match:
        leaf = key.rsplit(".", 1)[-1]
        match = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf][:1]
    return f"; did you mean '{match[0]}'?" if match else ""


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """One YAML file with its `extends:` chain merged underneath it."""
    if not _is_file(path):
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    raw = _parse_yaml_mapping(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: 'extends' must be one file path, got {parent!r}")
    base = _read_yaml((path.parent / parent).resolve(), seen + (path.resolve(),))
    return merge_layer(base, raw)


def _parse_yaml_mapping(path: Path) -> DictConfig:
    """The file's top-level mapping. OmegaConf alone would misread a top-level string as a key."""
    try:
        text = path.read_text(encoding="utf-8")
        top = yaml.safe_load(text)
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except Exception as error:  # yaml errors carry multi-line marks; keep the first line
        raise ConfigError(f"{path}: not valid YAML ({_first_line(error)})") from None
    if top is None:  # an empty file
        return OmegaConf.create({})
    if not isinstance(top, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(top).__name__}")
    try:
        return OmegaConf.create(text)  # type: ignore[return-value]
    except Exception as error:  # what OmegaConf's loader adds: duplicate keys, key types
        raise ConfigError(f"{path}: not valid YAML ({_first_line(error)})") from None


def merge_layer(base: DictConfig, layer: DictConfig) -> DictConfig:
    """OmegaConf.merge, except that `model.vision.model_kwargs` is replaced rather than merged when the
    layer names another `model_name` (one model's kwargs mean nothing to another) or sets it to {} / null."""
    vision = OmegaConf.select(layer, "model.vision", default=None)
    if isinstance(vision, DictConfig):
        renamed = "model_name" in vision and vision.model_name != OmegaConf.select(base, "model.vision.model_name")
        cleared = "model_kwargs" in vision and not vision.model_kwargs
        if cleared:
            layer = layer.copy()
            layer.model.vision.model_kwargs = {}
        if (renamed or cleared) and OmegaConf.select(base, "model.vision.model_kwargs"):
            base = base.copy()
            base.model.vision.model_kwargs = {}
    return OmegaConf.merge(base, layer)  # type: ignore[return-value]


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte: no such file either
        return False


def parse_overrides(overrides: Sequence[str], origin: str = "overrides") -> DictConfig:
    """`key.sub=value` items (values in YAML syntax) as one config layer; no schema check yet."""
    dotlist = []
    for item in overrides:
        if not isinstance(item, str) or "=" not in item or item.startswith("="):
            raise ConfigError(f"{origin}: {item!r} is not of the form key.sub=value")
        key = item.split("=", 1)[0]
        if not key.strip() or any(not part for part in key.split(".")):
            raise ConfigError(f"{origin}: {item!r} has an empty key component; use key.sub=value")
        dotlist.append(item)
    try:
        return OmegaConf.from_dotlist(dotlist)
    except Exception as error:
        raise ConfigError(f"{origin}: {_first_line(error)}") from None


def format_override(key: str, value: Any) -> str:
    """`key=value` written so that :func:`parse_overrides` gives `value` back (strings stay strings)."""
    if isinstance(value, str):
        try:
            if OmegaConf.from_dotlist([f"x={value}"]).x == value:
                return f"{key}={value}"
        except Exception:  # not valid YAML unquoted (e.g. `[`): JSON quoting below reads back
            pass
    return f"{key}={json.dumps(value)}"


def _misfit(tree: Any, prefix: str = "") -> tuple[str, Any, type] | None:
    """(key, value, expected container) for the first value of a layer (as plain containers) whose
    container kind contradicts the schema: a scalar or list for a section, a dict for a list, ..."""
    if not isinstance(tree, dict):
        return None
    for key, value in tree.items():
        name = f"{prefix}{key}"
        expected = container_type(name)
        if expected is not None and not isinstance(value, expected) and value is not None:
            return name, value, expected
        found = _misfit(value, name + ".") if is_section(name) else None
        if found is not None:
            return found
    return None


def _merge_error(origin: str, error: Exception, layer: DictConfig) -> ConfigError:
    key = getattr(error, "full_key", None) or str(getattr(error, "key", "") or "")
    if isinstance(error, ConfigKeyError):
        leaf = key.rsplit(".", 1)[-1]
        if leaf in RETIRED_KEYS:
            return ConfigError(f"{origin}: '{key}' is not a config key: {RETIRED_KEYS[leaf]}")
        return ConfigError(f"{origin}: unknown key '{key}'{_closest(key)}")
    misfit = _misfit(OmegaConf.to_container(layer, resolve=False))
    if misfit is not None:
        name, value, expected = misfit
        if is_section(name):
            return ConfigError(f"{origin}: '{name}' is a section of keys ({name}.*), not a value; got {value!r}")
        return ConfigError(f"{origin}: key '{name}' needs a {expected.__name__}, got {value!r}")
    value = getattr(error, "value", None)
    if isinstance(error, ValidationError):
        valid = choices(key)
        if valid is not None:
            return ConfigError(f"{origin}: {key}={value!r} is not valid; use one of {', '.join(map(str, valid))}")
        return ConfigError(f"{origin}: key '{key}' has a wrong value {value!r} ({_first_line(error)})")
    return ConfigError(f"{origin}: {_first_line(error)}")


@functools.cache
def _schema() -> DictConfig:
    """The schema with its defaults, built once (OmegaConf.merge copies it, never changes it)."""
    return OmegaConf.structured(Config)


def merge_onto_schema(layers: Sequence[tuple[str, DictConfig]]) -> DictConfig:
    """The schema's defaults with each (origin, layer) merged on in order; origin names the layer in errors."""
    merged = _schema().copy()  # the cached schema itself is never handed out or changed
    for origin, layer in layers:
        try:
            merged = merge_layer(merged, layer)
        except (OmegaConfBaseException, TypeError) as error:  # TypeError: a dict merged onto a list, and the like
            raise _merge_error(origin, error, layer) from None
    return merged


def check_overrides(overrides: Sequence[str], origin: str = "overrides") -> None:
    """Refuse overrides whose keys, types or choices do not fit the schema (cross-field rules not applied)."""
    merge_onto_schema([(origin, parse_overrides(overrides, origin))])


def resolve_named_yaml(name_or_path: str, folder: str) -> Path:
    """A YAML path, or a bare name looked up as NAME.yaml in ./<folder> and the repo's <folder>/."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or _is_file(path):
        return path
    for root in (Path.cwd(), REPO_ROOT):
        candidate = root / folder / f"{name_or_path}.yaml"
        if _is_file(candidate):
            return candidate
    return path


def resolve_config_path(name_or_path: str) -> Path:
    """An experiment YAML path, or an experiment name in experiments/."""
    return resolve_named_yaml(name_or_path, "experiments")


def load(config: str | os.PathLike | None = None, overrides: Sequence[str] | None = None) -> Config:
    """Load an experiment YAML (optional), apply overrides, validate, and return a typed Config."""
    layers: list[tuple[str, DictConfig]] = []
    source = None
    if config is not None:
        path = resolve_config_path(str(config))
        source = str(path)
        layers.append((source, _read_yaml(path)))
    if overrides:
        layers.append(("overrides", parse_overrides(list(overrides))))
    merged = merge_onto_schema(layers)
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as error:  # e.g. a missing value (???) or an unresolvable ${...}
        key = getattr(error, "full_key", None)
        raise ConfigError(f"{source or 'overrides'}: {f'key {key!r}: ' if key else ''}{_first_line(error)}") from None
    cfg.source_file = source
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(to_yaml(cfg))


def to_dict(cfg: Config) -> dict:
    """The config as plain dicts and lists, as `OmegaConf.to_container` of it gives them, by a direct
    walk over its dataclasses (a loaded config holds no interpolations): 0.26 s a config through
    OmegaConf under a profiler, which a grid's validation paid for every cell."""
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {item.name: _plain(getattr(value, item.name)) for item in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


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
