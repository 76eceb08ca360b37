"""The valid values of editor hyperparameters, declared next to each dataclass and checked in one place.

Every hyperparameter dataclass (`Editor.hparams_cls`) has a class attribute `RANGES` mapping each
field to a `Range`: a short description ("a finite number > 0") and a test. It is a ClassVar, not a
field, so it is neither recorded in a row nor part of the config hash. `editors.base.hparams_from`,
where `--set` values and the per-model files `editors/hparams/<editor>/<model>.json` become
hyperparameters, checks every given value against it before the dataclass is built; `bench run`
reports a failure as a one-line error (exit 2) before any model loads, e.g.
`bad --set value: lr=nan is not a finite number > 0`. A subclass extends its parent's table
(`RANGES = {**Parent.RANGES, ...}`); tests/editors/test_bad_input_hparams.py checks that every field of every
registered editor has a range and that every default and every shipped per-model value is in it.

What depends on the model (a `last_n` above the model's depth, MEMIT block indices) is checked
by `bench.runner.run.check_depth` once the depth is known (bench/runner/depth.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """The valid values of one hyperparameter: `text` completes "lr=nan is not ..."."""

    text: str
    test: Callable[[Any], bool]

    def __call__(self, value: Any) -> bool:
        return bool(self.test(value))

    def or_none(self, meaning: str = "") -> Range:
        """The same range, or None (`--set key=none`); `meaning` says what None does."""
        why = f" ({meaning})" if meaning else ""
        return Range(f"{self.text}, or none{why}", lambda v: v is None or self.test(v))


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive() -> Range:
    """A finite number > 0 (NaN and ±inf are refused)."""
    return Range("a finite number > 0", lambda v: _real(v) and math.isfinite(v) and v > 0)


def non_negative() -> Range:
    """A finite number >= 0."""
    return Range("a finite number >= 0", lambda v: _real(v) and math.isfinite(v) and v >= 0)


def at_least(low: int) -> Range:
    """An integer >= `low`."""
    return Range(f"an integer >= {low}", lambda v: _integer(v) and v >= low)


def one_of(*choices: str) -> Range:
    """One of the given words."""
    return Range(f"one of {', '.join(choices)}", lambda v: v in choices)


def int_list(low: int = 0) -> Range:
    """A non-empty list of integers >= `low` (on the command line: comma-separated)."""
    return Range(f"a non-empty comma-separated list of integers >= {low}",
                 lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_integer(x) and x >= low for x in v))


def text_list() -> Range:
    """A list of texts (comma-separated on the command line; may be empty)."""
    return Range("a comma-separated list of words", lambda v: isinstance(v, (list, tuple)) and
                 all(isinstance(x, str) for x in v))


def text(containing: str = "") -> Range:
    """Any text, or one containing `containing`."""
    if not containing:
        return Range("a text", lambda v: isinstance(v, str))
    return Range(f"a text containing {containing}", lambda v: isinstance(v, str) and containing in v)


def ranges_of(cls: type) -> dict[str, Range]:
    """The declared ranges of a hyperparameter dataclass ({} for one without a table, e.g. a task config)."""
    return dict(getattr(cls, "RANGES", {}))


def shown(value: Any) -> str:
    """A value as the user would type it after `key=`."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(shown(x) for x in value)
    return str(value)


def violation(cls: type, key: str, value: Any, as_typed: str | None = None) -> str | None:
    """'key=value is not <range>' when `value` is outside the declared range of `cls.key`, else None.

    `as_typed` is the text the user gave (shown instead of the parsed value, so `lr=1e-3` stays `1e-3`).
    """
    r = ranges_of(cls).get(key)
    if r is None or r(value):
        return None
    return f"{key}={as_typed if as_typed is not None else shown(value)} is not {r.text}"


def unparsable(cls: type, key: str, typed: str) -> str | None:
    """'key=text is not <range>' for a `--set` text that did not parse, when `cls.key` has a declared range."""
    r = ranges_of(cls).get(key)
    return None if r is None else f"{key}={typed} is not {r.text}"


def bad_fields(cls: type, values: Sequence[tuple[str, Any]]) -> list[str]:
    """Every violation among (key, value) pairs (for tests and diagnostics)."""
    return [v for k, x in values if (v := violation(cls, k, x)) is not None]


class BadValue(ValueError):
    """A hyperparameter value outside its declared range; the message is the whole one-line error."""
