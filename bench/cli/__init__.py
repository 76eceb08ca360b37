"""The `bench` command line: one Typer app assembling the commands of `bench/cli/` (Typer only).

Each command module parses its options, calls one function of the layers below and prints through
`bench.core.console`; report's pandas and matplotlib, and torch, load only when a command that needs them
runs. The layers and the rule that checks them: docs/design.md, `[tool.importlinter]` in pyproject.toml.
"""

from __future__ import annotations

import typer

from bench.cli.check import check
from bench.cli.derive import derive_cmd
from bench.cli.main import keys, list_, report, run
from bench.cli.sweep import sweep

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
