"""The threshold model of `bench check`: the `thresholds.toml` schema, its loading and checking, and the
evaluation of the newest stored runs against it (the command is bench/cli/check.py).

Schema (TOML, values of es/gs/ls are fractions in [0, 1] as stored; times in seconds; memory in bytes):

    schema = 1

    [[threshold]]                    # bounds on one run
    task = "synthetic"
    model = "tiny-gpt2"
    editor = "malmen"
    edits = 16
    set = { shift = "sum" }          # optional: the variant (`--set` values that differ from the
                                     # defaults); omitted = the default variant exactly
    seed = 0                         # optional: otherwise the newest row of any seed
    sequential = 10                  # optional: rows of `--sequential 10` (their final state); omitted =
                                     # one-batch rows only (a lifelong row never stands in for them)
    min = { es = 0.9, gs = 0.8, ls = 0.5 }
    max = { edit_s = 60.0 }          # optional

    [[ratio]]                        # numerator quantity / denominator quantity, same sweep
    task = "synthetic"
    model = "tiny-gpt2"
    edits = 16
    quantity = "edit_s"
    numerator = { editor = "malmen" }            # each side: editor and optional set
    denominator = { editor = "memit" }
    max = 3.0                                    # and/or min

A ratio uses the newest numerator row and the newest denominator row with the same seed, data,
device and machine, i.e. measured side by side in one sweep. Every threshold needs a matching `ok`
row; a threshold without one fails. Exit code: 0 all pass, 1 any failure, 2 bad thresholds file:
one that is not UTF-8 TOML, breaks the schema, has a NaN or infinite bound (NaN never passes, an
infinite bound checks nothing) or a bound outside its quantity's range (`value_range`: ES/GS/LS and
the other rates are fractions in [0, 1], times, memory, the residual and ratios are >= 0), or names an editor, task or `set` key that does not exist (such a
threshold could never match a row). Model names are not checked: any path or hub id is a model.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.results.variants import data_id, matches_set, variant_label
from bench.runner.overrides import TASK_IO_FIELDS, editor_keys, split_overrides, task_keys
from bench.store.schema import Row

METRICS = ("es", "gs", "ls", "ls_agree", "es_seq", "gs_seq", "ls_seq",
           "pre_es", "pre_gs", "pre_ls", "pre_es_seq", "pre_gs_seq", "pre_ls_seq")
TIMES = ("prepare_s", "edit_s", "eval_s")
TOP_LEVEL = ("peak_mem_prepare_bytes", "peak_mem_edit_bytes", "mean_residual")
QUANTITIES = METRICS + TIMES + TOP_LEVEL


def value_range(q: str) -> tuple[float, float | None, str]:
    """(low, high or None, in words) of the values quantity `q` can take: a bound outside it is a typo (90 for 0.9)."""
    if q in METRICS:
        return 0.0, 1.0, "a fraction in [0, 1]"
    what = {"peak_mem_prepare_bytes": "bytes", "peak_mem_edit_bytes": "bytes"}.get(q, "seconds" if q in TIMES else "")
    return 0.0, None, f"{what + ' ' if what else ''}>= 0".strip()
SELECTOR_KEYS = frozenset({"task", "model", "editor", "edits", "set", "seed", "sequential"})
RATIO_KEYS = frozenset({"task", "model", "edits", "seed", "sequential", "quantity", "numerator", "denominator",
                        "min", "max"})


class ThresholdError(ValueError):
    """The thresholds file is missing or does not follow the schema."""


@dataclass(frozen=True)
class Selector:
    """Which stored runs a threshold is about."""

    task: str
    model: str
    editor: str
    n_edits: int
    set: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    sequential: int = 0  # 0: one-batch rows; T: rows of --sequential T

    def matches(self, row: Row) -> bool:
        cfg = row.get("config", {})
        return (row.get("status") == "ok" and row.get("task") == self.task and row.get("model") == self.model
                and row.get("editor") == self.editor and row.get("n_edits") == self.n_edits
                and (self.seed is None or row.get("seed") == self.seed) and matches_set(cfg, self.set)
                and cfg.get("sequential", 0) == self.sequential)

    def label(self) -> str:
        seed = "" if self.seed is None else f" seed {self.seed}"
        seq = f" sequential {self.sequential}" if self.sequential else ""
        return f"{variant_label(self.editor, self.set)} m={self.n_edits}{seq}{seed}"

    def scope(self) -> str:
        return f"{self.model}/{self.task}"


@dataclass(frozen=True)
class Bound:
    """`quantity` must be >= limit (op "min") or <= limit (op "max")."""

    quantity: str
    op: str
    limit: float

    def margin(self, measured: float) -> float:
        """Positive when the bound holds."""
        return measured - self.limit if self.op == "min" else self.limit - measured


@dataclass(frozen=True)
class Threshold:
    sel: Selector
    bounds: tuple[Bound, ...]


@dataclass(frozen=True)
class Ratio:
    num: Selector
    den: Selector
    quantity: str
    bounds: tuple[Bound, ...]  # on the ratio; Bound.quantity is "ratio"


@dataclass
class Outcome:
    """One line of the check table."""

    what: str
    scope: str
    quantity: str
    measured: float | None
    bound: Bound
    passed: bool
    note: str = ""

    @property
    def margin(self) -> float | None:
        return None if self.measured is None else self.bound.margin(self.measured)


def _need(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ThresholdError(f"{where}: missing '{key}'")
    if not isinstance(d[key], kind) or isinstance(d[key], bool):
        raise ThresholdError(f"{where}: '{key}' has the wrong type ({type(d[key]).__name__})")
    return d[key]


def _limit(v: Any, what: str, where: str) -> float:
    """A bound's value: a finite number (NaN never passes a comparison, and an infinite bound checks nothing)."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise ThresholdError(f"{where}: {what} must be a number")
    if not math.isfinite(v):
        raise ThresholdError(f"{where}: {what} = {v} is not a finite number (nan never passes, inf checks "
                             "nothing); give a finite bound or remove it")
    return float(v)


def _bounds(d: dict[str, Any], where: str, quantity: str | None = None) -> tuple[Bound, ...]:
    out: list[Bound] = []
    for op in ("min", "max"):
        if op not in d:
            continue
        if quantity is not None:  # a ratio: min/max are numbers
            limit = _limit(_need(d, op, (int, float), where), f"'{op}'", where)
            if limit < 0:
                raise ThresholdError(f"{where}: {op} = {limit:g} is outside the range of a ratio of {quantity} (>= 0)")
            out.append(Bound("ratio", op, limit))
            continue
        table = _need(d, op, dict, where)
        for q, v in table.items():
            if q not in QUANTITIES:
                raise ThresholdError(f"{where}: unknown quantity '{q}' in {op}; choices: {', '.join(QUANTITIES)}")
            limit = _limit(v, f"{op}.{q}", where)
            low, high, words = value_range(q)
            if limit < low or (high is not None and limit > high):
                raise ThresholdError(f"{where}: {op}.{q} = {v:g} is outside the range of {q} ({words})"
                                     + ("; a percentage? write it as a fraction" if high == 1.0 and limit > 1 else ""))
            out.append(Bound(q, op, limit))
    if not out:
        raise ThresholdError(f"{where}: needs a 'min' or 'max'")
    return tuple(out)


def _selector(d: dict[str, Any], common: dict[str, Any], where: str, side: bool = False) -> Selector:
    merged = {**common, **d}
    allowed = SELECTOR_KEYS if side else SELECTOR_KEYS | {"min", "max"}  # a ratio's sides have no bounds
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ThresholdError(f"{where}: unknown key(s) {unknown}; expected {', '.join(sorted(allowed))}")
    seed = merged.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ThresholdError(f"{where}: 'seed' must be an integer")
    sets = merged.get("set", {})
    if not isinstance(sets, dict):
        raise ThresholdError(f"{where}: 'set' must be a table of key = value")
    sequential = merged.get("sequential", 0)
    if not isinstance(sequential, int) or isinstance(sequential, bool) or sequential < 0:
        raise ThresholdError(f"{where}: 'sequential' must be a non-negative integer")
    sel = Selector(_need(merged, "task", str, where), _need(merged, "model", str, where),
                   _need(merged, "editor", str, where), _need(merged, "edits", int, where), dict(sets), seed,
                   sequential)
    if sel.n_edits < 1:
        raise ThresholdError(f"{where}: 'edits' must be at least 1")
    _check_names(sel, where)
    return sel


def _check_names(sel: Selector, where: str) -> None:
    """Unknown editor, task or `set` key: the threshold could never match a row, so it is a bad file."""
    import editors
    import tasks

    for kind, name, registry in (("editor", sel.editor, editors.EDITORS), ("task", sel.task, tasks.TASKS)):
        if name not in registry:
            raise ThresholdError(f"{where}: unknown {kind} '{name}'; choices: {', '.join(sorted(registry))}")
    editor_cls, task_cls = editors.EDITORS[sel.editor], tasks.TASKS[sel.task]
    _, _, unknown = split_overrides(task_cls, editor_cls, sel.set)
    for k in sel.set:
        if k in TASK_IO_FIELDS:
            raise ThresholdError(f"{where}: 'set' key '{k}' is not a variant choice (rows are told apart by "
                                 "their data's content); remove it")
        if k in unknown:
            hp, tc = editor_keys(editor_cls), [f for f in task_keys(task_cls) if f not in TASK_IO_FIELDS]
            raise ThresholdError(f"{where}: unknown 'set' key '{k}' for editor '{sel.editor}' / task '{sel.task}'; "
                                 f"valid: editor {sorted(hp)}, task {sorted(tc)}")


def _entries(doc: dict[str, Any], key: str, path: Path) -> list[dict[str, Any]]:
    """The [[key]] entries of the file, each a table."""
    v = doc.get(key, [])
    if not isinstance(v, list):
        got = f"a single [{key}] table" if isinstance(v, dict) else f"{type(v).__name__} {v!r:.40}"
        raise ThresholdError(f"{path}: '{key}' must be an array of tables, written [[{key}]]; got {got}")
    for i, d in enumerate(v):
        if not isinstance(d, dict):
            raise ThresholdError(f"{path} {key} #{i + 1} must be a table (under [[{key}]]); got {type(d).__name__}")
    return v


def _read_toml(path: Path) -> dict[str, Any]:
    """The parsed file; ThresholdError when it is missing, not a file, not UTF-8 or not TOML."""
    if not path.exists():
        raise ThresholdError(f"{path}: no such thresholds file")
    if path.is_dir():
        raise ThresholdError(f"{path}: is a directory, not a thresholds file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ThresholdError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ThresholdError(f"{path}: not UTF-8 (byte 0x{raw[e.start]:02x} on line {line}); "
                             "TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ThresholdError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise ThresholdError(f"{path}: arrays or tables nested too deeply for the TOML parser") from None


def load_thresholds(path: str | Path) -> tuple[list[Threshold], list[Ratio]]:
    """Parse and validate a thresholds file; ThresholdError names the entry and key on any problem."""
    path = Path(path)
    doc = _read_toml(path)
    schema = doc.get("schema", 1)
    if isinstance(schema, bool) or schema != 1:
        raise ThresholdError(f"{path}: unsupported schema {schema!r} (this bench reads schema 1)")
    unknown = sorted(set(doc) - {"schema", "threshold", "ratio"})
    if unknown:
        raise ThresholdError(f"{path}: unknown top-level key(s) {unknown}; expected [[threshold]] and [[ratio]]")
    ths = [Threshold(_selector(d, {}, f"{path} threshold #{i + 1}"), _bounds(d, f"{path} threshold #{i + 1}"))
           for i, d in enumerate(_entries(doc, "threshold", path))]
    ratios = []
    for i, d in enumerate(_entries(doc, "ratio", path)):
        where = f"{path} ratio #{i + 1}"
        if unknown := sorted(set(d) - RATIO_KEYS):
            raise ThresholdError(f"{where}: unknown key(s) {unknown}; expected {', '.join(sorted(RATIO_KEYS))}")
        q = _need(d, "quantity", str, where)
        if q not in QUANTITIES:
            raise ThresholdError(f"{where}: unknown quantity '{q}'; choices: {', '.join(QUANTITIES)}")
        common = {k: d[k] for k in ("task", "model", "edits", "seed", "sequential") if k in d}
        num = _selector(_need(d, "numerator", dict, where), common, f"{where} numerator", side=True)
        den = _selector(_need(d, "denominator", dict, where), common, f"{where} denominator", side=True)
        ratios.append(Ratio(num, den, q, _bounds(d, where, quantity=q)))
    if not ths and not ratios:
        raise ThresholdError(f"{path}: no [[threshold]] or [[ratio]] entries; nothing would be checked")
    return ths, ratios


def quantity(row: Row, name: str) -> float | None:
    """A metric, time or top-level number of a row (None when absent or null)."""
    if name in METRICS:
        v = (row.get("metrics") or {}).get(name)
    elif name in TIMES:
        v = (row.get("times") or {}).get(name)
    else:
        v = row.get(name)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def newest(rows: list[Row], sel: Selector, like: Row | None = None) -> Row | None:
    """The last stored `ok` row matching `sel` (and, with `like`, measured in the same setting as `like`)."""
    for row in reversed(rows):
        if sel.matches(row) and (like is None or same_setting(row, like)):
            return row
    return None


def same_setting(a: Row, b: Row) -> bool:
    """Same seed, data, device and machine: the two rows were measured side by side."""
    ea, eb = a.get("env", {}), b.get("env", {})
    return (a.get("seed") == b.get("seed") and data_id(a["config"]) == data_id(b["config"])
            and a["config"].get("device") == b["config"].get("device")
            and all(ea.get(k) == eb.get(k) for k in ("device", "threads", "torch")))


def _measure(row: Row | None, what: str, scope: str, bounds: tuple[Bound, ...], q: str | None = None,
             value: float | None = None, missing: str = "") -> list[Outcome]:
    out = []
    for b in bounds:
        name = q or b.quantity
        if row is None:
            out.append(Outcome(what, scope, name, None, b, False, missing or "no matching ok row in the store"))
            continue
        v = value if q else quantity(row, b.quantity)
        if v is None:
            out.append(Outcome(what, scope, name, None, b, False, f"run {row['run_id'][:8]} has no value for {name}"))
            continue
        out.append(Outcome(what, scope, name, v, b, b.margin(v) >= 0, f"run {row['run_id'][:8]}, seed {row['seed']}"))
    return out


def evaluate(ths: list[Threshold], ratios: list[Ratio], rows: list[Row]) -> list[Outcome]:
    """Every bound of every threshold and ratio against the newest matching rows."""
    out: list[Outcome] = []
    for t in ths:
        out += _measure(newest(rows, t.sel), t.sel.label(), t.sel.scope(), t.bounds)
    for r in ratios:
        what = f"{r.num.label()} / {r.den.label()}"
        scope = r.num.scope() if r.num.scope() == r.den.scope() else f"{r.num.scope()} / {r.den.scope()}"
        num = newest(rows, r.num)
        den = newest(rows, r.den, like=num) if num is not None else None
        if num is None or den is None:
            side = "numerator" if num is None else "denominator measured beside the numerator (same seed/data/machine)"
            out += _measure(None, what, scope, r.bounds, f"ratio {r.quantity}", missing=f"no {side} row")
            continue
        a, b = quantity(num, r.quantity), quantity(den, r.quantity)
        if a is None or b is None or b == 0:
            out += [Outcome(what, scope, f"ratio {r.quantity}", None, bd, False, f"{r.quantity} missing or zero")
                    for bd in r.bounds]
            continue
        for o in _measure(num, what, scope, r.bounds, f"ratio {r.quantity}", value=a / b):
            o.note = f"{a:.4g} / {b:.4g} (runs {num['run_id'][:8]} / {den['run_id'][:8]}, seed {num['seed']})"
            out.append(o)
    return out
