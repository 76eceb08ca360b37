"""Console output shared by the commands: stdout/stderr consoles, one-line errors, --json hygiene, plans.

The commands import this module, never `bench.cli` (which imports them), so there is no import circle.
"""

from __future__ import annotations

import contextlib
import json
import sys
import unicodedata
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

out = Console()
err = Console(stderr=True)


def shown(text: str) -> str:
    """`text` with control characters (C0, DEL, C1, newlines) written as escapes like `\\x1b`: a name from a shared
    file or a command line cannot move the cursor, recolour or retitle the terminal, or split a one-line error."""
    return "".join(repr(c)[1:-1] if unicodedata.category(c) == "Cc" else c for c in text)


def fail(msg: str, code: int = 2) -> None:
    """Print a one-line error and exit (2 = bad input, 1 = the run failed). `msg` is printed literally, its
    control characters escaped (`shown`): every user-given name in an error goes through here."""
    err.print(Text.assemble(("error:", "bold red"), " ", shown(msg)), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def console_log(console: Console) -> Any:
    """A `log` callable printing plain text (paths, names) literally on `console`."""
    return lambda s: console.print(s, highlight=False, markup=False, soft_wrap=True)


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool = True) -> Iterator[None]:
    """Send stray prints (loaders, libraries) to stderr while it runs, so --json leaves only JSON on stdout."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    with contextlib.redirect_stdout(sys.stderr):
        yield


def show_plans(plans: list[dict[str, Any]], as_json: bool, one: bool = False) -> None:
    """Print `bench.runner.run.plan` results: JSON (one object with `one`, else a list) or readable lines."""
    if as_json:
        print(json.dumps(plans[0] if one else plans, sort_keys=True))
        return
    for p in plans:
        sets = ", ".join(f"{k}={v}" for k, v in sorted(p["hparams"].items()))
        what = (f"skip: stored ok as run {p['stored_ok_run'][:8]} (--force reruns)" if p["action"] == "skip"
                else "would run")
        mc = p["model_cache"]
        out.print(f"{p['editor']} on {p['model']} / {p['task']}, {p['n_edits']} edits, seed {p['seed']}, "
                  f"{p['device']}: config hash {p['config_hash']}: {what}", markup=False, highlight=False, soft_wrap=True)
        out.print(f"  model: {mc['folder'] or p['model']}: {mc['note']}", markup=False, highlight=False, soft_wrap=True)
        out.print(f"  prepare: {p['prepare']}", markup=False, highlight=False, soft_wrap=True)
        out.print(f"  hparams: {sets}", markup=False, highlight=False, soft_wrap=True)
        if p["task_config"]:
            tc = ", ".join(f"{k}={v}" for k, v in sorted(p["task_config"].items()))
            out.print(f"  task config: {tc}", markup=False, highlight=False, soft_wrap=True)
