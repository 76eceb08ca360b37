"""The two ways a run ends other than with an `ok` row: bad input (`UserError`) and a stored failure (`RunFailed`)."""

from __future__ import annotations

from bench.store.schema import Row


class UserError(Exception):
    """Bad input from the user (unknown name, bad option, bad data); the CLI exits 2 without a traceback."""


class RunFailed(Exception):
    """The run itself failed; its row was stored with status 'failed'."""

    def __init__(self, row: Row):
        self.row = row
        super().__init__(row.get("error", "run failed"))
