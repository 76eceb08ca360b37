"""The `bench` commands, one module each (assembled into one Typer app by `bench.cli`).

They print through `bench.console` and call the run loop (`bench.run`), the store (`bench.store`)
and the models (`bench.models`); nothing below `bench/` imports a command.
"""
