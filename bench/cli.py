"""The `bench` command line: one Typer app assembling the commands of `bench/commands/`.

Each command lives in its own module and prints through `bench.console`; report's pandas and
matplotlib, and torch, load only when a command that needs them runs.
"""

from __future__ import annotations

import typer

from bench.commands.check import check
from bench.commands.derive import derive_cmd
from bench.commands.main import keys, list_, report, run
from bench.commands.sweep import sweep

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Benchmark harness for editing facts in LMs.")
app.command("run")(run)
app.command("list")(list_)
app.command("sweep")(sweep)
app.command("check")(check)
app.command("derive")(derive_cmd)
app.command("report")(report)
app.command("keys")(keys)


def main() -> None:  # pragma: no cover
    app()
