"""Typed values with ranges, declared beside the options they check.

A module that reads a config group declares its options once, e.g. the optimizer's::

    OPTIONS = {"lr": Num(lo=0, lo_open=True), "betas": Seq(Num(lo=0, hi=1, hi_open=True), 2)}

and :func:`check_options` refuses a value of the wrong type or out of range with a
:class:`~rwkv_diffusion_rnn.common.errors.ConfigError` naming the key, the value and what is
allowed, before any work starts. Numbers must be finite (``nan`` and ``inf`` are refused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .errors import ConfigError


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class Num:
    """A finite number (``integer``: a whole one) in a range; ``optional``: null is allowed too."""
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    optional: bool = False
    null_means: str = ""            # what null does, for the message (e.g. "no clipping")

    def describe(self) -> str:
        what = "an integer" if self.integer else "a number"
        if self.lo == 0 and self.lo_open and self.hi is None:
            text = f"a positive {'integer' if self.integer else 'number'}"
        elif self.lo is not None and self.hi is not None:
            text = (f"{what} in {'(' if self.lo_open else '['}{_fmt(self.lo)}, "
                    f"{_fmt(self.hi)}{')' if self.hi_open else ']'}")
        elif self.lo is not None:
            text = f"{what} {'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        elif self.hi is not None:
            text = f"{what} {'<' if self.hi_open else '<='} {_fmt(self.hi)}"
        else:
            text = f"a finite {what.split()[-1]}"
        if self.optional:
            text += f" or null{f' ({self.null_means})' if self.null_means else ''}"
        return text

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.optional
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.integer and not isinstance(v, int):
            return False
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def check(self, key: str, v: Any) -> None:
        if not self.ok(v):
            raise ConfigError(f"{key}={v!r} must be {self.describe()}")


@dataclass(frozen=True)
class Flag:
    """true or false."""

    def check(self, key: str, v: Any) -> None:
        if not isinstance(v, bool):
            raise ConfigError(f"{key}={v!r} must be true or false")


@dataclass(frozen=True)
class Seq:
    """A list of ``length`` values, each checked by ``item``."""
    item: Num
    length: int

    def check(self, key: str, v: Any) -> None:
        values = list(v) if isinstance(v, (list, tuple)) or hasattr(v, "__len__") and not isinstance(v, str) else None
        if values is None or len(values) != self.length or not all(self.item.ok(x) for x in values):
            raise ConfigError(f"{key}={_plain(v)!r} must be a list of {self.length} values, each "
                              f"{self.item.describe()}")


def _plain(v: Any) -> Any:
    try:
        from omegaconf import OmegaConf
        return OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
    except ImportError:
        return v


def check_options(group: str, node: Mapping, options: Mapping[str, Any]) -> None:
    """Checks each declared option present in ``node`` (the config group ``group``)."""
    for name, spec in options.items():
        if name in node:
            spec.check(f"{group}.{name}", node[name])
