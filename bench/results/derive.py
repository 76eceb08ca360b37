"""Regression thresholds computed from a measurement campaign, never typed in (`bench derive`, bench/cli/derive.py).

A campaign (`.ci/gate-campaign`) runs the CI smoke cells over several seeds and thread counts, with
the tiny models retrained in a fresh cache. For every cell (task, model, editor, m; default
variant) and every success metric the campaign gives values v_1..v_k over n = m probes each:

    sigma = max(sd(v), sqrt(mean(v) * (1 - mean(v)) / n), 1 / n)
    bound = max(0, floor_to_0.01(min(min(v), mean(v) - K * sigma)))          (K = 3)

The spread of seeds stands in for what varies between machines: a last-bit difference in one
kernel, amplified over hundreds of optimiser steps, gives another trajectory, as another seed does.
The binomial and one-probe floors keep a cell whose runs happened to agree from getting a bound no
other machine could meet. A success bound must stay above the pre-edit value by K * sigma, so an
editor that changes nothing fails it (the derivation refuses otherwise). Residual bounds are
`RESIDUAL_FACTOR` x the largest measured residual (MALMEN's sum-of-shifts ablation leaves ~100x more).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bench.results.variants import matches_set
from bench.store.schema import Row

K = 3.0
RESIDUAL_FACTOR = 4.0
SUCCESS = ("es", "gs", "ls")
# Editors whose mean residual is meaningful (an exact or near-exact least-squares solve).
RESIDUAL_EDITORS = ("malmen", "memit")
# Time ratios measured side by side (same seed and thread count): (editor, quantity, m_num, m_den).
# Fine-tuning's steps grow linearly with m; the bound catches a super-linear regression. Bound:
# RATIO_FACTOR x the largest measured ratio (timings on a shared 2-core machine are noisy).
RATIOS = (("ft", "edit_s", 128, 32),)
RATIO_FACTOR = 2.0


@dataclass
class CellBound:
    """The derived bounds of one cell, with the measurements behind them."""

    task: str
    model: str
    editor: str
    n_edits: int
    mins: dict[str, float]
    maxs: dict[str, float]
    notes: list[str]


def _floor2(x: float) -> float:
    return math.floor(x * 100 + 1e-9) / 100


def _ceil_sig(x: float, digits: int = 2) -> float:
    """Round up to `digits` significant digits."""
    if x <= 0:
        return 0.0
    p = 10 ** (math.floor(math.log10(x)) - digits + 1)
    return math.ceil(x / p - 1e-9) * p


def success_bound(values: list[float], n: int) -> tuple[float, float]:
    """(bound, sigma) for a success metric measured `values` over n probes each (module docstring)."""
    mu = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    sigma = max(sd, math.sqrt(max(mu * (1 - mu), 0.0) / n), 1 / n)
    return max(0.0, _floor2(min(min(values), mu - K * sigma))), sigma


def _num(v: Any) -> bool:
    """A measured number (rows are schema-checked on read, so this only tells null and NaN apart from values)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)


def group_rows(rows: Iterable[Row]) -> dict[tuple[str, str, str, int], list[Row]]:
    """ok rows of the default variant, grouped by (task, model, editor, m)."""
    groups: dict[tuple[str, str, str, int], list[Row]] = defaultdict(list)
    for r in rows:
        if r.get("status") != "ok" or not matches_set(r["config"], {}):  # default variants only
            continue
        groups[(r["task"], r["model"], r["editor"], r["n_edits"])].append(r)
    return dict(sorted(groups.items()))


def derive(rows: Iterable[Row], min_runs: int = 3, left_out: list[str] | None = None) -> list[CellBound]:
    """Bounds for every cell with at least `min_runs` runs; ValueError if a bound could not catch a no-op.

    With a `left_out` list such a cell is not gated instead: the reason is appended to the list.
    """
    out = []
    for (task, model, editor, m), rs in group_rows(rows).items():
        rs = [r for r in rs if all(_num(r["metrics"].get(k)) for q in SUCCESS for k in (q, f"pre_{q}"))]
        if len(rs) < min_runs:
            continue
        mins: dict[str, float] = {}
        maxs: dict[str, float] = {}
        seeds = sorted({r["seed"] for r in rs})
        threads = sorted({(r.get("env") or {}).get("threads") for r in rs}, key=lambda t: (t is None, t or 0))
        notes = [f"{len(rs)} runs: seeds {seeds}, threads {threads}"]
        for q in SUCCESS:
            vals = [float(r["metrics"][q]) for r in rs]
            pre = max(float(r["metrics"][f"pre_{q}"]) for r in rs)
            bound, sigma = success_bound(vals, m)
            if q != "ls" and bound <= pre + K * sigma:
                why = (f"{editor} m={m} {q}: bound {bound:.2f} is not above the pre-edit value {pre:.3f} "
                       f"by {K:g} sigma ({sigma:.3f}); an editor that does nothing would pass")
                if left_out is None:
                    raise ValueError(why)
                left_out.append(f"{task} / {model}: {why}")
                break
            mins[q] = bound
            notes.append(f"{q}: min {min(vals):.3f} mean {statistics.fmean(vals):.3f} sigma {sigma:.3f} "
                         f"(pre <= {pre:.3f}) -> >= {bound:.2f}")
        if len(mins) < len(SUCCESS):  # left out above
            continue
        if editor in RESIDUAL_EDITORS:
            res = [float(r["mean_residual"]) for r in rs if r.get("mean_residual") is not None]
            if res:
                maxs["mean_residual"] = _ceil_sig(RESIDUAL_FACTOR * max(res))
                notes.append(f"mean_residual: max {max(res):.4g} -> <= {maxs['mean_residual']:.4g}")
        out.append(CellBound(task, model, editor, m, mins, maxs, notes))
    return out


@dataclass
class RatioBound:
    """A derived [[ratio]] entry: quantity(m_num) / quantity(m_den) of one editor <= limit."""

    task: str
    model: str
    editor: str
    quantity: str
    m_num: int
    m_den: int
    limit: float
    note: str


def derive_ratios(rows: Iterable[Row], min_runs: int = 3) -> list[RatioBound]:
    """RATIOS entries with at least `min_runs` side-by-side pairs in the campaign."""
    groups = group_rows(rows)
    out = []
    for editor, q, m_num, m_den in RATIOS:
        for (task, model, ed, m), num_rows in groups.items():
            if ed != editor or m != m_num:
                continue
            den = {(r["seed"], (r.get("env") or {}).get("threads")): r for r in groups.get((task, model, ed, m_den), [])}
            ratios = [r["times"][q] / d["times"][q] for r in num_rows
                      if (d := den.get((r["seed"], (r.get("env") or {}).get("threads"))))
                      and _num(r["times"].get(q)) and _num(d["times"].get(q)) and d["times"][q] > 0]
            if len(ratios) >= min_runs:
                limit = math.ceil(RATIO_FACTOR * max(ratios) * 2) / 2
                out.append(RatioBound(task, model, editor, q, m_num, m_den, limit,
                                      f"{len(ratios)} pairs: ratio min {min(ratios):.2f} max {max(ratios):.2f} "
                                      f"-> <= {limit:g}"))
    return out


def _table(d: dict[str, float]) -> str:
    return "{ " + ", ".join(f"{k} = {v:.4g}" for k, v in d.items()) + " }"


def to_toml(cells: list[CellBound], ratios: list[RatioBound] = (), header: str = "") -> str:
    """The [[threshold]] and [[ratio]] entries as TOML, each with its measurements as comments."""
    lines = [header.rstrip(), "schema = 1", ""] if header else ["schema = 1", ""]
    for r in ratios:
        lines += [f"# {r.note}", "[[ratio]]", f'task = "{r.task}"', f'model = "{r.model}"',
                  f'quantity = "{r.quantity}"', f'numerator = {{ editor = "{r.editor}", edits = {r.m_num} }}',
                  f'denominator = {{ editor = "{r.editor}", edits = {r.m_den} }}', f"max = {r.limit:g}", ""]
    for c in cells:
        lines += [f"# {n}" for n in c.notes]
        lines += ["[[threshold]]", f'task = "{c.task}"', f'model = "{c.model}"', f'editor = "{c.editor}"',
                  f"edits = {c.n_edits}", f"min = {_table(c.mins)}"]
        if c.maxs:
            lines.append(f"max = {_table(c.maxs)}")
        lines.append("")
    return "\n".join(lines)
