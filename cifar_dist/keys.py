"""The declaration of one config key: its default, one-line description, and the values it allows.

Config sections declare their keys as dataclass fields with `config.option(...)`; a model declares
its own keys at registration (`Key(..., name="widths")` becomes `model.widths`). Either way the
allowed values are written once, where the key is declared — a tuple of choices, an interval such as
`"[0, 1)"` or `"(0, inf)"`, or a check for what an interval cannot say — and `Key.check` enforces
them, so the code that reads a validated config trusts it instead of checking again.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

from cifar_dist.errors import ConfigError

_INTERVAL = re.compile(r"^([\[(])\s*(-?inf|[-+0-9.e]+)\s*,\s*(-?inf|[-+0-9.e]+)\s*([\])])$")


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    low_open: bool
    high_open: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> "Interval":
        match = _INTERVAL.match(text.strip())
        if not match:
            raise ValueError(f"not an interval like '[0, 1)': {text!r}")
        left, low, high, right = match.groups()
        return cls(float(low), float(high), left == "(", right == ")", text)

    def __contains__(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


@dataclass(frozen=True)
class Key:
    """One setting. `range` applies to a number, or to each element of a list; `check(value)` returns
    what is wrong (a phrase completing "must be ...") or None, for rules an interval cannot express."""

    default: object
    help: str
    choices: tuple = ()
    range: str = ""
    check: Callable[[object], str | None] | None = None
    name: str = ""  # a model's own key: its name under `model.`
    type: type | None = None  # a model's own key: its value type (default: the default's type)
    interval: Interval | None = field(init=False, default=None, compare=False)

    def __post_init__(self):
        if self.range:
            object.__setattr__(self, "interval", Interval.parse(self.range))

    @property
    def value_type(self) -> type:
        return self.type or type(self.default)

    def describe(self) -> str:
        """The description with the allowed values, as `cifar-dist config` prints it."""
        text = self.help
        if self.choices:
            text += f" [{' | '.join(map(str, self.choices))}]"
        elif self.range:
            text += f" {self.range}"
        return text

    def validate(self, dotted: str, value) -> None:
        """Raise ConfigError naming the key when value is not allowed."""
        if self.choices and value not in self.choices:
            raise ConfigError(f"config key '{dotted}' must be one of {', '.join(map(str, self.choices))}; "
                              f"got {value!r}")
        if self.interval is not None:
            numbers = value if isinstance(value, list) else [value]
            bad = [v for v in numbers if not isinstance(v, (int, float)) or v not in self.interval]
            if bad:
                each = " (each element)" if isinstance(value, list) else ""
                raise ConfigError(f"config key '{dotted}' must be in {self.range}{each}; got {value!r}")
        problem = self.check(value) if self.check else None
        if problem:
            raise ConfigError(f"config key '{dotted}' must be {problem}; got {value!r}")


def coerce(dotted: str, value, expected_type: type, raw: str | None = None):
    """Return value as expected_type, or raise ConfigError naming the key.

    raw is the override's text: a string key takes it as written, so `train.sync_bn=on` stays "on"
    and `run.name=0123` stays "0123", although YAML reads them as a boolean and a number; in YAML
    files, on/off/yes/no become "on"/"off".
    """
    if expected_type is str and raw is not None and not isinstance(value, str):
        return raw.strip()
    if expected_type is str and isinstance(value, bool):
        return "on" if value else "off"
    if expected_type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected_type is float and isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if expected_type is list and isinstance(value, tuple):
        return list(value)
    if isinstance(value, expected_type) and not (expected_type is int and isinstance(value, bool)):
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"config key '{dotted}' expects a number, got nan")
        return value
    raise ConfigError(f"config key '{dotted}' expects {expected_type.__name__}, got {value!r} ({type(value).__name__})")
