"""Rich progress bars with ETA, shared by long phases (training, meta-training, statistics, sweeps)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text


class EtaColumn(ProgressColumn):
    """ETA: the sweep's own estimate (field `eta_s`) for the grid bar, rich's speed estimate for inner bars."""

    def render(self, task: Any) -> Text:
        if "eta_s" in task.fields:
            secs = task.fields["eta_s"]
        else:
            secs = task.time_remaining
        if secs is None:
            return Text("ETA -:--:--", style="progress.remaining")
        return Text(f"ETA {dt.timedelta(seconds=int(secs))}", style="progress.remaining")


def progress_factory(console: Console | None = None, enabled: bool = True) -> Callable[[], Progress]:
    """A zero-argument callable returning a fresh Progress (bar, M/N, elapsed, ETA, free-form status)."""

    def make() -> Progress:
        return Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            EtaColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            disable=not enabled,
        )

    return make


def open_progress(factory: Callable[[], Progress] | None) -> Progress:
    """A Progress from `factory`, or a disabled one when there is none (tests, library use)."""
    return factory() if factory is not None else Progress(disable=True)
