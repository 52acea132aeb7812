"""Configuration: one YAML file per environment plus ``--set dotted.key=value`` overrides.

Every path and parameter a job uses lives here, so a job behaves the same in a
test, on a laptop and on a cluster except for what its configuration says.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

from ctlake.core.deid import DEV_KEY
from ctlake.errors import ConfigError

_MISSING = object()


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Read a YAML configuration file and apply ``dotted.key=value`` overrides.

    Override values are parsed as YAML scalars, so ``--set cohort.patients=8``
    gives the integer 8 and ``--set ingest.input=null`` gives ``None``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}".splitlines()[0]) from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, found {type(config).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        config = with_value(config, key, value)
    return config


def with_value(config: dict, key: str, value: Any) -> dict:
    """Return a copy of ``config`` with the dotted ``key`` set to ``value``."""
    config = copy.deepcopy(config)
    node = config
    parts = key.split(".")
    if parts[:2] == ["spark", "conf"] and len(parts) > 2:
        # Spark property names contain dots themselves: spark.conf.<spark.property.name>
        parts = parts[:2] + [".".join(parts[2:])]
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {part} is a {type(child).__name__}, not a section")
        node = child
    node[parts[-1]] = value
    return config


def get(config: dict, key: str, kind: type | tuple[type, ...] | None = None, default: Any = _MISSING) -> Any:
    """Look up a dotted key, checking its type; a missing required key is a ConfigError.

    ``kind`` may be a type or a tuple of types; ``bool`` is never accepted where
    a number is asked for, because YAML turns ``yes`` into ``True``.
    """
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _MISSING:
                raise ConfigError(f"missing configuration key {key}")
            return default
        node = node[part]
    if kind is not None and node is not None:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        wants_number = any(k in (int, float) for k in kinds) and bool not in kinds
        if (wants_number and isinstance(node, bool)) or not isinstance(node, kinds):
            if float in kinds and isinstance(node, int) and not isinstance(node, bool):
                return float(node)
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"configuration key {key} must be {names}, found {node!r}")
    return node


def positive_int(config: dict, key: str, default: Any = _MISSING) -> int:
    """A configured integer that must be at least 1 (counts, sizes, partitions)."""
    value = get(config, key, int, default)
    if value is None or value < 1:
        raise ConfigError(f"configuration key {key} must be a positive integer, found {value!r}")
    return value


def table_path(config: dict, table: str) -> str:
    """Where a Delta table lives: ``<warehouse>/<table>``, on any Hadoop filesystem."""
    warehouse = get(config, "warehouse", str)
    return f"{warehouse.rstrip('/')}/{table}"


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)b?\s*$", re.IGNORECASE)


def size_bytes(config: dict, key: str, default: Any = _MISSING) -> int:
    """A configured size such as ``64m``, ``512k``, ``1g`` or plain bytes, in bytes."""
    value = get(config, key, (str, int), default)
    match = _SIZE.match(str(value))
    if not match or int(match.group(1)) <= 0:
        raise ConfigError(f"configuration key {key} must be a size such as 64m, found {value!r}")
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]


def load_key(config: dict) -> bytes:
    """Find the pseudonymization key: environment variable, then secret file, then dev key.

    The development key is accepted only where the configuration says
    ``privacy.allow_dev_key: true`` (``conf/local.yaml``); a cluster
    configuration without a key is refused before any data is read.
    """
    env_name = get(config, "privacy.key_env", str, "CTLAKE_PSEUDONYM_KEY")
    if env_name and os.environ.get(env_name):
        return os.environ[env_name].encode("utf-8")
    key_file = get(config, "privacy.key_file", str, None)
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise ConfigError(f"privacy.key_file {key_file} does not exist")
        key = path.read_bytes().strip()
        if len(key) < 16:
            raise ConfigError(f"privacy.key_file {key_file} holds {len(key)} bytes; use at least 16")
        return key
    if get(config, "privacy.allow_dev_key", bool, False):
        return DEV_KEY
    raise ConfigError(
        f"no pseudonymization key: set the environment variable {env_name} or privacy.key_file "
        "(the development key is allowed only in local configuration)"
    )
