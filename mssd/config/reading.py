"""Reading the TOML file and the ``MSSD_*`` environment overrides into
:class:`Settings`: typed parsing per field, deprecated names moved to their new
ones (with a warning), unknown keys refused, then :func:`validate`."""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mssd.config.checks import validate
from mssd.config.sections import DEPRECATED, SECTIONS, ConfigError, Settings

log = logging.getLogger("mssd.config")


def _parse_bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _parse_int(key: str, value: object) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def _parse_float(key: str, value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected a number, got {value!r}")


def _parse_str(key: str, value: object) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected a string, got {value!r}")


def _parse_tuple(key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{key}: expected a list of strings, got {value!r}")


def _parse_path(key: str, value: object) -> Path:
    return Path(_parse_str(key, value))


def _parse_optional_path(key: str, value: object) -> Path | None:
    text = _parse_str(key, value)
    return Path(text) if text else None


_PARSERS: dict[str, Callable[[str, object], Any]] = {
    "bool": _parse_bool,
    "int": _parse_int,
    "float": _parse_float,
    "str": _parse_str,
    "tuple[str, ...]": _parse_tuple,
    "Path": _parse_path,
    "Path | None": _parse_optional_path,
}


def env_name(section: str, key: str) -> str:
    return f"MSSD_{section}_{key}".upper()


def all_keys() -> list[tuple[str, str]]:
    """Every ``(section, key)`` pair mssd knows, in declaration order."""
    return [(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _build_section(
    section: str, cls: type[Any], table: Mapping[str, object], env: Mapping[str, str]
) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(
                f"{section}.{key}: unknown setting (known: {', '.join(sorted(known))})"
            )
    values: dict[str, Any] = {}
    for name, f in known.items():
        full = f"{section}.{name}"
        raw: object | None = table.get(name)
        source = full
        env_value = env.get(env_name(section, name))
        if env_value is not None:
            raw, source = env_value, f"{full} (from {env_name(section, name)})"
        if raw is None:
            continue
        parser = _PARSERS[str(f.type)]
        values[name] = parser(source, raw)
    return cls(**values)


def _renamed(
    document: dict[str, object], env: Mapping[str, str]
) -> tuple[dict[str, object], dict[str, str]]:
    """The file and the environment with each deprecated name moved to its new one."""
    tables = {name: dict(t) if isinstance(t, dict) else t for name, t in document.items()}
    variables = dict(env)
    for (section, key), (new_section, new_key) in DEPRECATED.items():
        new = f"{new_section}.{new_key}"
        table, new_table = tables.get(section), tables.setdefault(new_section, {})
        if isinstance(table, dict) and isinstance(new_table, dict):
            _move(table, key, new_table, new_key, f"{section}.{key}", new)
        old_env, new_env = env_name(section, key), env_name(new_section, new_key)
        _move(variables, old_env, variables, new_env, old_env, new)
    return tables, variables


def _move(
    source: dict[str, Any], name: str, target: dict[str, Any], new_name: str, old: str, new: str
) -> None:
    if name in source:
        value = source.pop(name)
        log.warning("%s is deprecated: it is now %s", old, new)
        if target.get(new_name, value) != value:
            raise ConfigError(f"{old}: deprecated name of {new}, which is set to another value")
        target[new_name] = value


def load(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (if any), apply ``MSSD_*`` overrides, validate.

    ``path`` defaults to ``$MSSD_CONFIG``; with neither, built-in defaults apply.
    """
    env = os.environ if env is None else env
    if path is None and env.get("MSSD_CONFIG"):
        path = Path(env["MSSD_CONFIG"])
    document: dict[str, object] = {}
    if path is not None:
        try:
            with path.open("rb") as handle:
                document = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"configuration file {path} is not valid TOML: {error}") from None
    for section, table in document.items():
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table [{section}]")
    document, env = _renamed(document, env)
    known_env = {env_name(s, k) for s, k in all_keys()} | {"MSSD_CONFIG", "MSSD_REQUIRE_ALL"}
    for name in env:
        if name.startswith("MSSD_") and not name.startswith("MSSD_TEST_") and name not in known_env:
            raise ConfigError(f"{name}: unknown environment override")
    sections = {
        name: _build_section(name, cls, document.get(name, {}), env)  # type: ignore[arg-type]
        for name, cls in SECTIONS.items()
    }
    return validate(Settings(**sections))
