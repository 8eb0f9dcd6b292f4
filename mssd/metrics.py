"""Process-wide counters, written in the Prometheus text format (version 0.0.4).

This module owns the registry of named counters; code anywhere increments them, and an
exporter (none yet: ``render`` is what it will serve) reads them. Counters are per
process and start at zero: anything that must survive a restart or be seen by every
process goes to the store as well. No I/O here, no locking needed: one event loop per
process increments them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


class Counter:
    """A monotonically increasing count, optionally split by label values."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        if not _NAME.fullmatch(name) or not all(_NAME.fullmatch(label) for label in labels):
            raise ValueError(f"invalid metric or label name in {name}{tuple(labels)}")
        self.name = name
        self.help_text = help_text
        self.labels = tuple(labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        if len(label_values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {label_values}")
        self._values[label_values] = self._values.get(label_values, 0.0) + amount

    def value(self, *label_values: str) -> float:
        return self._values.get(label_values, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} counter"]
        for values, count in sorted(self._values.items()):
            if values:
                pairs = ",".join(
                    f'{label}="{_escape(value)}"'
                    for label, value in zip(self.labels, values, strict=True)
                )
                lines.append(f"{self.name}{{{pairs}}} {count:g}")
            else:
                lines.append(f"{self.name} {count:g}")
        return lines


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_REGISTRY: dict[str, Counter] = {}


def counter(name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
    """The counter called ``name``, created on first use."""
    existing = _REGISTRY.get(name)
    if existing is not None:
        if existing.labels != tuple(labels):
            raise ValueError(f"{name} is already registered with labels {existing.labels}")
        return existing
    created = _REGISTRY[name] = Counter(name, help_text, labels)
    return created


def render() -> str:
    """Every counter, in the Prometheus text exposition format."""
    return "".join(line + "\n" for c in _REGISTRY.values() for line in c.render())
