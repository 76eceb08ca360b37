"""`bench sweep`: a grid of runs (editors x seeds x edit counts) through the same run loop as `bench run`.

Sharing: one `ModelCache` loads each model once for the whole grid; MEMIT statistics are cached by
a hash that does not include the number of edits, so they are computed once and reused by the other
cells; hyper-network checkpoints are keyed by seed and `train_edits` (by default the cell's m). Cells stored `ok` are
skipped by `execute`, so an interrupted sweep resumes where it stopped. A failed cell is stored as
`failed` and the sweep goes on; the exit code is 1 when a cell failed, 2 when a cell met bad input. The
result and cache folders are checked before the first cell; a row that cannot be written (disk
full, file-size limit) stops the sweep with exit 1, since every later row would be lost too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    Progress,
    TaskID,
)
from rich.table import Table

from bench import config as C
from bench.commands.options import (
    BatchesOpt,
    CfScoresOpt,
    FluencyOpt,
    GenerationOpt,
    LogSamplesOpt,
    SequentialOpt,
)
from bench.progress import progress_factory
from bench.store import ResultStore, StoreError, StoreWriteError, ensure_cache


@dataclass
class CellResult:
    """What happened to one grid cell."""

    cfg: C.RunConfig
    status: str  # "ok" (ran now), "skipped" (already stored ok), "failed" (stored failed), "error" (bad input)
    row: dict[str, Any] | None = None
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
         **common: Any) -> list[C.RunConfig]:
    """The sweep's configs, ordered by editor (as given), then seed, then number of edits.

    An override key "editor.key" applies to that editor only (e.g. `malmen.steps=200`), since one
    editor's hparams are unknown keys to another's; a plain key applies to every cell.
    """
    per = split_overrides(overrides or {}, editors)
    check_plain_sets(overrides or {}, editors, common.get("task", C.DEFAULT_TASK))
    return [C.RunConfig(editor=e, n_edits=m, seed=s, overrides=per[e], **common)
            for e in editors for s in seeds for m in edits]


def split_overrides(overrides: dict[str, str], editors: Sequence[str]) -> dict[str, dict[str, str]]:
    """Per-editor `--set` dicts from plain keys (all editors) and "editor.key" keys (that editor)."""
    per: dict[str, dict[str, str]] = {e: {} for e in editors}
    for k, v in overrides.items():
        head, dot, rest = k.partition(".")
        if dot and head in per:
            per[head][rest] = v
        elif dot:
            raise ValueError(f"--set {k}={v}: '{head}' is not one of the sweep's editors ({', '.join(editors)})")
        else:
            for e in editors:
                per[e].setdefault(k, v)
    for k, v in overrides.items():  # an editor-specific value wins over a plain one
        head, dot, rest = k.partition(".")
        if dot:
            per[head][rest] = v
    return per


def check_plain_sets(overrides: dict[str, str], editors: Sequence[str], task: str) -> None:
    """ValueError for a plain `--set key=value` that only some of the sweep's editors have, naming the `editor.key` form."""
    import dataclasses

    import editors as E
    import tasks

    if task not in tasks.TASKS or any(e not in E.EDITORS for e in editors):
        return  # the unknown name is reported by `resolve`
    task_keys = {f.name for f in dataclasses.fields(tasks.TASKS[task].config_cls)}
    for k, v in overrides.items():
        if "." in k or k in task_keys:
            continue
        having = [e for e in editors if k in {f.name for f in dataclasses.fields(E.EDITORS[e].hparams_cls)}]
        if having and len(having) < len(editors):
            lacking = [e for e in editors if e not in having]
            forms = " ".join(f"--set {e}.{k}={v}" for e in having)
            raise ValueError(f"--set {k}={v}: only {', '.join(having)} of the sweep's editors have '{k}' "
                             f"({', '.join(lacking)} do{'es' if len(lacking) == 1 else ''} not); give it as {forms}, "
                             "which applies to that editor's cells only")


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


def cell_name(cfg: C.RunConfig) -> str:
    """Short human name of a cell."""
    return f"{cfg.editor} seed {cfg.seed} m={cfg.n_edits}"


def run_sweep(
    cfgs: Sequence[C.RunConfig],
    results_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    force: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
    run: Callable[..., tuple[dict[str, Any], bool]] | None = None,
) -> list[CellResult]:
    """Run every config through `run` (default `bench.run.execute`) with one shared model cache.

    Every config is resolved and the folders are checked first, so a bad name or `--set` key (UserError)
    or an unusable --results / --cache-dir (StoreError) stops the sweep before anything runs. A row that
    cannot be stored (StoreWriteError) and KeyboardInterrupt stop it too; rerunning resumes from the store.
    """
    from bench.run import ModelCache, RunFailed, UserError, execute, resolve  # torch: only when a sweep runs

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


def prepare_source(row: dict[str, Any], short: bool = False) -> str:
    """Whether the run's prepare phase reused a cached artifact, computed it, or had nothing to do."""
    info = (row.get("info") or {}).get("prepare") or {}
    reused = info.get("reused", info.get("stats_reused"))
    secs = row.get("times", {}).get("prepare_s", 0.0)
    text = f"{secs:.1f}s" if short else f"{secs:.2f}s"
    if reused is None:
        return text
    return f"{text} {'cache' if reused else 'new'}" if short else f"{text} {'cached' if reused else 'computed'}"


def summary(results: Sequence[CellResult], title: str) -> Table:
    """A rich table with one line per cell (errors are in the per-cell log lines and the store)."""
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
              caption="LS = locality on gold answers; LSagr = agreement with the pre-edit prediction; "
                      "prepare: seconds, and whether the checkpoint/statistics were cached or new", caption_justify="left")
    for col, num in [("editor", False), ("seed", True), ("m", True), ("status", True), ("ES%", True),
                     ("GS%", True), ("LS%", True), ("LSagr%", True), ("edit s", True), ("prepare", True)]:
        # numbers never wrap; editor names fold when the terminal is narrow
        t.add_column(col, justify="right" if num else "left", no_wrap=num, overflow="fold", min_width=6 if not num else None)
    style = {"ok": "green", "skipped": "dim", "failed": "red", "error": "red"}
    for r in results:
        ok = r.row is not None and not r.failed
        m = r.row["metrics"] if ok else {}
        pct = [f"{100 * m[k]:.1f}" if isinstance(m.get(k), int | float) else "-" for k in ("es", "gs", "ls", "ls_agree")]
        edit_s = r.row["times"].get("edit_s") if ok else None
        t.add_row(escape(r.cfg.editor), str(r.cfg.seed), str(r.cfg.n_edits), f"[{style[r.status]}]{r.status}[/]", *pct,
                  "-" if edit_s is None else f"{edit_s:.3g}", prepare_source(r.row, short=True) if ok else "-")
    return t


def exit_code(results: Sequence[CellResult]) -> int:
    """2 if a cell met bad input, else 1 if a cell failed, else 0 (the codes of `bench run`)."""
    if any(r.status == "error" for r in results):
        return 2
    return 1 if any(r.failed for r in results) else 0


def sweep(
    editors: Annotated[str, typer.Option(help="comma-separated editor names, e.g. malmen,mend,memit,ft")],
    model: Annotated[str, typer.Option(help="embedded alias, Hugging Face id or local folder")] = C.DEFAULT_MODEL,
    task: Annotated[str, typer.Option(help="task name")] = C.DEFAULT_TASK,
    edits: Annotated[str, typer.Option(help="comma-separated numbers of edits, e.g. 16,64,256,1024")] = "16,64",
    seeds: Annotated[str, typer.Option(help="comma-separated seeds, e.g. 0,1,2")] = "0",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="the model's weights: float32, bfloat16 or float16")] = "float32",
    device_map: Annotated[str | None, typer.Option(
        help="auto: accelerate spreads the model over the visible GPUs (or balanced, sequential, a device); "
             "Hugging Face ids and folders only")] = None,
    executor: Annotated[str, typer.Option(help="local: cells one after another here; ray: cells as Ray tasks")] = "local",
    address: Annotated[str | None, typer.Option(help="--executor ray: the Ray cluster (default: start a local one)")] = None,
    gpus_per_cell: Annotated[float, typer.Option(help="--executor ray: GPUs reserved per cell")] = 0.0,
    cpus_per_cell: Annotated[float, typer.Option(help="--executor ray: CPUs reserved per cell")] = 1.0,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="key=value for every cell (task config or hparams); editor.key=value for one editor")] = None,
    results: Annotated[Path, typer.Option(help="result store folder")] = Path("results"),
    cache_dir: Annotated[Path | None, typer.Option(help="cache for models/checkpoints/stats (default: --results)")] = None,
    data: Annotated[Path | None, typer.Option(help="your own evaluation data file (JSON or JSONL)")] = None,
    train_data: Annotated[Path | None, typer.Option(help="your own meta-training data file")] = None,
    skip_bad: Annotated[bool, typer.Option(help="skip malformed records (counted in the row)")] = False,
    force: Annotated[bool, typer.Option(help="rerun cells already stored as ok")] = False,
    dry_run: Annotated[bool, typer.Option(help="check every cell and show what would run or be reused; load nothing")] = False,
    batches: BatchesOpt = "1",
    generation: GenerationOpt = True,
    cf_scores: CfScoresOpt = True,
    fluency: FluencyOpt = False,
    log_samples: LogSamplesOpt = False,
    sequential: SequentialOpt = 0,
    json_: Annotated[bool, typer.Option("--json", help="with --dry-run: print only the plans as JSON on stdout")] = False,
) -> None:
    """Run editors x seeds x edit counts; resumes from the store; exit 0 all ok, 1 a cell failed, 2 bad input."""
    from bench.console import err, fail, out, show_plans
    from bench.executors import ExecutorOptions, ExecutorUnavailable, get_executor
    from bench.run import UserError, plan, resolve

    try:
        cfgs = grid(parse_list(editors, "editors"), parse_list(edits, "edits", int), parse_list(seeds, "seeds", int),
                    model=model, task=task, device=device, overrides=C.parse_sets(set_),
                    data=str(data) if data else None, train_data=str(train_data) if train_data else None,
                    skip_bad=skip_bad, dtype=dtype, device_map=device_map,
                          batches=batches, generation=generation, cf_scores=cf_scores, fluency=fluency, log_samples=log_samples,
                          sequential=sequential)
        if dry_run:
            resolved = [resolve(c) for c in cfgs]
            for note in dict.fromkeys(n for r in resolved for n in r.notes):
                err.print(note, markup=False, highlight=False, soft_wrap=True)
            show_plans([plan(r, results, cache_dir, force) for r in resolved], json_)
            return
        if json_:
            raise ValueError("--json is for --dry-run; a sweep's rows are in the store (bench report --results)")
        run_cells = get_executor(executor)
        opts = ExecutorOptions(address=address, gpus_per_cell=gpus_per_cell, cpus_per_cell=cpus_per_cell)
        res = run_cells(cfgs, results, cache_dir=cache_dir, force=force, console=err, options=opts)
    except StoreWriteError as e:  # a finished cell's row is lost; the next cells would lose theirs too
        fail(str(e), 1)
    except (UserError, ValueError, StoreError, ExecutorUnavailable) as e:
        fail(str(e), 2)
    except KeyboardInterrupt:
        fail("interrupted; finished cells are stored, rerun the same command to resume", 130)
    n = {s: sum(r.status == s for r in res) for s in ("ok", "skipped", "failed", "error")}
    title = (f"sweep {model} / {task}: {len(res)} cells — {n['ok']} ran ok, {n['skipped']} already stored, "
             f"{n['failed'] + n['error']} failed   (store: {results / 'runs.jsonl'})")
    out.print(summary(res, escape(title)))
    raise typer.Exit(exit_code(res))
