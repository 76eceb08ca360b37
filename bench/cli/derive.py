"""`bench derive`: write the regression thresholds derived from a measurement campaign's stores.

The rule is in bench/results/derive.py; this module reads the stores, writes the TOML and sets the exit code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bench.results.derive import derive, derive_ratios, to_toml
from bench.store import ResultStore, StoreError


def derive_cmd(
    results: Annotated[list[Path], typer.Option(help="campaign store folder(s); repeat for several")],
    out: Annotated[Path | None, typer.Option(help="write the thresholds file here (default: stdout)")] = None,
    min_runs: Annotated[int, typer.Option(help="cells with fewer runs are left out")] = 3,
    header: Annotated[Path | None, typer.Option(help="text put first (the method, as TOML comments)")] = None,
    leave_out_ungateable: Annotated[bool, typer.Option(
        help="leave out (with a comment) cells whose runs do not beat doing nothing, instead of refusing")] = False,
) -> None:
    """Derive regression thresholds from a measurement campaign (rule in bench/results/derive.py)."""
    from bench.core.console import fail

    try:  # bad input first, before the store is read: a missing header or campaign folder is exit 2
        head = header.read_text(encoding="utf-8") if header else ""
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text" if isinstance(
            e, UnicodeDecodeError) else str(e)
        fail(f"--header {header}: cannot read it ({why})", 2)
    if missing := [d for d in results if not d.is_dir()]:
        fail(f"--results {missing[0]}: {'not a folder' if missing[0].exists() else 'no such folder'}", 2)
    try:
        rows = [r for d in results for r in ResultStore(d).rows()]
    except StoreError as e:
        fail(str(e), 2)
    left_out: list[str] | None = [] if leave_out_ungateable else None
    try:
        cells = derive(rows, min_runs, left_out)
    except ValueError as e:
        fail(str(e), 1)
    if not cells:
        fail(f"no cell has {min_runs} or more ok runs in {', '.join(map(str, results))}", 1)
    if left_out:
        head += "".join(f"# Not gated: {w}\n" for w in left_out)
    text = to_toml(cells, derive_ratios(rows, min_runs), head)
    if out is None:
        print(text)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        fail(f"--out {out}: cannot write the thresholds file ({e.strerror or e})", 2)
