"""The sweep engine: a grid of run configs and the loop that runs its cells in this process.

`grid` builds the cells (editors x seeds x edit counts, per-editor `--set` keys); `run_sweep` runs them
through `bench.runner.run.execute` with one shared `ModelCache`, a live progress display and one log line
per cell (`describe`). The `local` executor is `run_sweep`; the `ray` executor (bench/executors/ray_exec.py)
reuses `CellResult`, `describe` and the progress display. `bench sweep` (bench/cli/sweep.py) parses the
options and prints the summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, TaskID

from bench.core import config
from bench.core.progress import progress_factory
from bench.runner.overrides import check_plain_sets, per_editor
from bench.store import ResultStore, ensure_cache
from bench.store.schema import Row


@dataclass
class CellResult:
    """What happened to one grid cell."""

    cfg: config.RunConfig
    status: str  # "ok" (ran now), "skipped" (already stored ok), "failed" (stored failed), "error" (bad input)
    row: Row | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status in ("failed", "error")


def parse_list(text: str, what: str, kind: type = str) -> list[Any]:
    """"a,b,c" -> [a, b, c] converted by `kind`; ValueError naming the option on bad items or duplicates."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{what} is empty")
    try:
        out = [kind(t) for t in items]
    except ValueError:
        raise ValueError(f"--{what} expects a comma-separated list of {kind.__name__}, got {text!r}") from None
    if len(set(out)) != len(out):
        raise ValueError(f"--{what} lists a value twice: {text!r}")
    return out


def grid(editors: Sequence[str], edits: Sequence[int], seeds: Sequence[int], overrides: dict[str, str] | None = None,
         **common: Any) -> list[config.RunConfig]:
    """The sweep's configs, ordered by editor (as given), then seed, then number of edits.

    An override key "editor.key" applies to that editor only (e.g. `malmen.steps=200`), since one
    editor's hparams are unknown keys to another's; a plain key applies to every cell.
    """
    per = per_editor(overrides or {}, editors)
    check_plain_sets(overrides or {}, editors, common.get("task", config.DEFAULT_TASK))
    return [config.RunConfig(editor=e, n_edits=m, seed=s, overrides=per[e], **common)
            for e in editors for s in seeds for m in edits]


class NestedProgress:
    """A `Progress`-like view that adds an editor's bars to the sweep's live display and removes them on exit.

    The editors open their bars with `with factory() as prog`; giving them this instead of a fresh
    `Progress` keeps one live display (the grid bar stays on top) instead of stacking finished bars.
    """

    def __init__(self, progress: Progress):
        self._progress = progress
        self._tasks: list[TaskID] = []

    def __enter__(self) -> NestedProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for t in self._tasks:
            self._progress.remove_task(t)
        self._tasks.clear()

    def add_task(self, description: str, **kwargs: Any) -> TaskID:
        kwargs.setdefault("status", "")
        t = self._progress.add_task(f"  {description}", **kwargs)
        self._tasks.append(t)
        return t

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        self._progress.update(task_id, **kwargs)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        self._progress.advance(task_id, advance)

    @property
    def console(self) -> Console:
        return self._progress.console


def sweep_progress(console: Console | None, enabled: bool = True) -> Progress:
    """The live display of a sweep: the grid bar with its ETA, plus the running cell's inner bars."""
    return progress_factory(console, enabled)()


def cell_name(cfg: config.RunConfig) -> str:
    """Short human name of a cell."""
    return f"{cfg.editor} seed {cfg.seed} m={cfg.n_edits}"


def run_sweep(
    cfgs: Sequence[config.RunConfig],
    results_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    force: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
    run: Callable[..., tuple[Row, bool]] | None = None,
) -> list[CellResult]:
    """Run every config through `run` (default `bench.runner.run.execute`) with one shared model cache.

    Every config is resolved and the folders are checked first, so a bad name or `--set` key (UserError)
    or an unusable --results / --cache-dir (StoreError) stops the sweep before anything runs. A row that
    cannot be stored (StoreWriteError) and KeyboardInterrupt stop it too; rerunning resumes from the store.
    """
    from bench.runner.run import (  # torch: only when a sweep runs
        ModelCache,
        RunFailed,
        UserError,
        execute,
        resolve,
    )

    run = run or execute
    console = console or Console(stderr=True)
    store = ResultStore(results_dir)
    stored = set() if force else {r["config_hash"] for r in store.rows() if r.get("status") == "ok"}
    hashes = [resolve(c).config_hash for c in cfgs]  # raises UserError before any run
    store.ensure_writable()
    ensure_cache(cache_dir if cache_dir is not None else results_dir,
                 "--cache-dir" if cache_dir is not None else "--results")
    todo = [h not in stored for h in hashes]
    models = ModelCache()
    results: list[CellResult] = []
    ran_s: list[float] = []  # durations of the cells that actually ran, for the ETA
    with sweep_progress(console, show_progress) as prog:
        grid_bar = prog.add_task("sweep", total=len(cfgs), status="", eta_s=None)

        said: set[str] = set()

        def log(msg: str) -> None:  # the editors' plain-text lines (paths, names): printed literally
            if msg.startswith("note:") and msg in said:
                return  # the same note for every cell of an editor: once is enough
            said.add(msg)
            prog.console.print(msg, highlight=False, markup=False)

        def note(markup: str) -> None:  # the sweep's own styled lines; user text in them is escaped
            prog.console.print(markup, highlight=False)

        for i, cfg in enumerate(cfgs):
            prog.update(grid_bar, status=f"running {escape(cell_name(cfg))}")
            t0 = time.perf_counter()
            try:
                row, skipped = run(cfg, results_dir, force=force, progress=lambda: NestedProgress(prog),
                                   models=models, log=log, cache_dir=cache_dir)
                res = CellResult(cfg, "skipped" if skipped else "ok", row)
            except RunFailed as e:
                res = CellResult(cfg, "failed", e.row, e.row.get("error", "run failed"))
            except UserError as e:  # e.g. a model that does not fit the task: nothing stored, counted as failed
                res = CellResult(cfg, "error", None, str(e))
            res.seconds = time.perf_counter() - t0
            results.append(res)
            if res.status != "skipped":
                ran_s.append(res.seconds)
            note(describe(res))
            if res.row is not None and res.row.get("config_hash") != hashes[i]:
                # e.g. an editors/hparams/<editor>/<model>.json edited while the sweep ran: the cell is
                # stored under its actual config, but it no longer shares a checkpoint with the others
                note(f"[yellow]! {escape(cell_name(cfg))}: its config changed since the sweep started "
                     f"(hash {hashes[i]} -> {res.row['config_hash']}); defaults or data were edited meanwhile[/]")
            left = sum(todo[i + 1 :])
            eta = sum(ran_s) / len(ran_s) * left if ran_s else (0.0 if left == 0 else None)
            prog.update(grid_bar, advance=1, eta_s=eta, status="")
    return results


def describe(res: CellResult) -> str:
    """One log line per finished cell, as rich markup (user text escaped)."""
    name = escape(cell_name(res.cfg))
    if res.status == "skipped":
        return f"[dim]= {name}: already stored ok (run {escape(res.row['run_id'][:8])}), skipped[/]"
    if res.failed:
        return f"[red]x {name}: {res.status}: {escape(str(res.error))}[/]"
    m = res.row["metrics"]
    return (f"[green]✓[/] {name}: ES {100 * m['es']:.1f}  GS {100 * m['gs']:.1f}  LS {100 * m['ls']:.1f}  "
            f"({res.seconds:.1f} s; edit {res.row['times']['edit_s']:.2f} s, "
            f"prepare {prepare_source(res.row)})")


def prepare_source(row: Row, short: bool = False) -> str:
    """Whether the run's prepare phase reused a cached artifact, computed it, or had nothing to do."""
    info = (row.get("info") or {}).get("prepare") or {}
    reused = info.get("reused", info.get("stats_reused"))
    secs = row.get("times", {}).get("prepare_s", 0.0)
    text = f"{secs:.1f}s" if short else f"{secs:.2f}s"
    if reused is None:
        return text
    return f"{text} {'cache' if reused else 'new'}" if short else f"{text} {'cached' if reused else 'computed'}"


def exit_code(results: Sequence[CellResult]) -> int:
    """2 if a cell met bad input, else 1 if a cell failed, else 0 (the codes of `bench run`)."""
    if any(r.status == "error" for r in results):
        return 2
    return 1 if any(r.failed for r in results) else 0
