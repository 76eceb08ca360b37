"""`bench check`: compare the newest stored runs with the regression thresholds in `thresholds.toml`.

The schema and the rules are in bench/results/thresholds.py; this module reads the store, prints the
pass/fail table and one line per failure, and sets the exit code (0 all pass, 1 any failure, 2 bad input).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from bench.results.thresholds import Outcome, ThresholdError, evaluate, load_thresholds
from bench.store import ResultStore, StoreError


def table(outcomes: list[Outcome], title: str) -> Table:
    """The pass/fail table: measured value, bound and margin (positive = inside the bound)."""
    scopes = sorted({o.scope for o in outcomes})
    one = len(scopes) == 1  # a single model/task goes into the title instead of a column
    t = Table(title=escape(title + (f" — {scopes[0]}" if one else "")), title_justify="left", box=box.SIMPLE_HEAD,
              pad_edge=False, collapse_padding=True, caption_justify="left",
              caption="margin > 0: inside the bound; ES/GS/LS as fractions; failures are explained below")
    cols = [("result", True), ("model/task", False), ("runs", False), ("quantity", True), ("measured", True),
            ("bound", True), ("margin", True)]
    for c, num in cols:
        if not (one and c == "model/task"):
            t.add_column(c, justify="right" if num and c != "quantity" else "left", no_wrap=num, overflow="fold")
    for o in outcomes:
        op = ">=" if o.bound.op == "min" else "<="
        cells = ["[green]pass[/]" if o.passed else "[bold red]FAIL[/]", escape(o.scope), escape(o.what), o.quantity,
                 "-" if o.measured is None else f"{o.measured:.4g}", f"{op} {o.bound.limit:.4g}",
                 "-" if o.margin is None else f"{o.margin:+.3g}"]
        t.add_row(*(cells[:1] + cells[2:] if one else cells))
    return t


def check(
    thresholds: Annotated[Path, typer.Option(help="TOML file of thresholds (schema in bench/results/thresholds.py)")] = Path(
        "thresholds.toml"),
    results: Annotated[Path, typer.Option(help="result store folder")] = Path("results"),
) -> None:
    """Compare the newest stored runs with thresholds.toml; exit 1 on any violation or missing run."""
    from bench.core.console import fail, out

    try:
        ths, ratios = load_thresholds(thresholds)
    except ThresholdError as e:
        fail(str(e), 2)
    if not results.is_dir():
        fail(f"--results {results}: {'not a folder' if results.exists() else 'no such folder'}", 2)
    try:
        rows = list(ResultStore(results).rows())
    except StoreError as e:
        fail(str(e), 2)
    outcomes = evaluate(ths, ratios, rows)
    n_fail = sum(not o.passed for o in outcomes)
    title = (f"bench check: {thresholds} against {results / 'runs.jsonl'} — "
             f"{len(outcomes) - n_fail} pass, {n_fail} fail")
    out.print(table(outcomes, title))
    for o in outcomes:  # one unwrapped line per failure, for CI logs
        if not o.passed:
            bound = f"{'>=' if o.bound.op == 'min' else '<='} {o.bound.limit:.4g}"
            got = "no value" if o.measured is None else f"{o.measured:.4g}"
            out.print(f"FAIL {o.scope} {o.what}: {o.quantity} = {got}, needs {bound} ({o.note})", soft_wrap=True,
                      highlight=False, markup=False)
    raise typer.Exit(1 if n_fail else 0)
