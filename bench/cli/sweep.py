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

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from bench.cli.options import (
    BatchesOpt,
    CacheDirOpt,
    CfScoresOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    FluencyOpt,
    GenerationOpt,
    LogSamplesOpt,
    ModelOpt,
    SequentialOpt,
    SkipBadOpt,
    TaskOpt,
    TrainDataOpt,
)
from bench.core import config
from bench.executors.sweep import CellResult, exit_code, grid, parse_list, prepare_source
from bench.store import StoreError, StoreWriteError


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


def sweep(
    editors: Annotated[str, typer.Option(help="comma-separated editor names, e.g. malmen,mend,memit,ft")],
    model: ModelOpt = config.DEFAULT_MODEL,
    task: TaskOpt = config.DEFAULT_TASK,
    edits: Annotated[str, typer.Option(help="comma-separated numbers of edits, e.g. 16,64,256,1024")] = "16,64",
    seeds: Annotated[str, typer.Option(help="comma-separated seeds, e.g. 0,1,2")] = "0",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
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
    cache_dir: CacheDirOpt = None,
    data: DataOpt = None,
    train_data: TrainDataOpt = None,
    skip_bad: SkipBadOpt = False,
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
    from bench.core.console import err, fail, out, show_plans
    from bench.executors import ExecutorOptions, ExecutorUnavailable, get_executor
    from bench.runner.run import UserError, plan, resolve

    try:
        cfgs = grid(parse_list(editors, "editors"), parse_list(edits, "edits", int), parse_list(seeds, "seeds", int),
                    model=model, task=task, device=device, overrides=config.parse_sets(set_),
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
