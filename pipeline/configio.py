"""How typed configs are read and written: YAML files, dotted keys (--set a.b=value), values coerced into the
dataclasses' declared types (a key no dataclass declares is an error naming the closest one), the commented
reference of every key, and the resolved config saved next to every output. The sections themselves are
pipeline.config's."""
from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from pathlib import Path
from typing import Any, Dict, List

import yaml

from pipeline.errors import ConfigError


def config_dir() -> Path:
    """The folder holding the shipped YAML configs (a checkout's configs/, or the installed copy)."""
    here = Path(__file__).resolve().parent.parent / "configs"
    if here.is_dir():
        return here
    installed = Path(sys.prefix) / "share" / "resmtnet" / "configs"
    if installed.is_dir():
        return installed
    raise ConfigError(f"cannot find the configs folder (looked in {here} and {installed}); reinstall the package")


def resolve_config_path(name: str) -> Path:
    """A config given by path, or by bare name of a shipped config ('paper' -> configs/paper.yaml)."""
    path = Path(name)
    if path.exists():
        return path
    shipped = config_dir() / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if shipped.exists():
        return shipped
    raise ConfigError(f"config file '{name}' not found; pass a YAML path or one of: "
                      + ", ".join(sorted(p.stem for p in config_dir().glob("*.yaml"))))


def load_yaml(path: Path) -> Any:
    """Read YAML with safe_load; a syntax error names the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None


def _suggest(key: str, valid: List[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {', '.join(valid)}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return build(tp, value, where)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin in (list, List):
        if isinstance(value, (str, int, float)):
            value = [value]  # a single item where a list is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def build(cls: type, data: Dict[str, Any], where: str = "config") -> Any:
    """Instantiate dataclass `cls` from a mapping; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{key}'{_suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def to_dict(obj: Any) -> Dict[str, Any]:
    return dataclasses.asdict(obj)


def get_dotted(cfg: Any, key: str) -> Any:
    """The value of `section.key` (or `section.mapping.key`) on a built config."""
    node = cfg
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def set_dotted(cfg: Any, key: str, value: Any) -> None:
    """Set `section.key` (or `section.mapping.key`) on a built config, with the field's type checks."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(node):
            names = [f.name for f in dataclasses.fields(node)]
            if part not in names:
                prefix = ".".join(parts[:i]) or "config"
                raise ConfigError(f"unknown config key '{key}': {prefix} has no '{part}'{_suggest(part, names)}")
            if last:
                setattr(node, part, _coerce(value, typing.get_type_hints(type(node))[part], key))
                return
            node = getattr(node, part)
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"config key '{key}': '{'.'.join(parts[:i])}' is not a section")


def parse_set_options(items: typing.Iterable[str]) -> Dict[str, Any]:
    """Parse repeated `--set key.path=value` options; values are YAML scalars or lists."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--set '{item}': cannot parse value '{raw}'") from None
    return out


def _field_comments(cls: type) -> Dict[str, str]:
    """The inline comment after each field of a dataclass's source: the one-line meaning of the key."""
    import inspect
    import re

    out: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            match = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
            if match:
                out[match.group(1)] = match.group(2).strip()
    return out


def config_reference(cfg: Any, prefix: str = "") -> List[tuple]:
    """Every key of the config `cfg` (a dataclass instance) as (dotted key, value, meaning), in the order of the
    dataclasses; a mapping of sections (heads) lists each section's keys under its name."""
    comments = _field_comments(type(cfg))
    rows: List[tuple] = []
    for f in dataclasses.fields(cfg):
        key = f"{prefix}{f.name}"
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows += config_reference(value, key + ".")
        elif isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
            for name, section in value.items():
                rows += config_reference(section, f"{key}.{name}.")
        else:
            rows.append((key, value, comments.get(f.name, "")))
    return rows


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
