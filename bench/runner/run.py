"""The run loop: one config -> model, task, editor -> prepare, edit, evaluate -> one stored row.

This is the single place where a benchmark run happens; `bench run` and `bench sweep` both call
`execute`. The steps live beside it: input checks (`checks`), `resolve`, the dry-run `plan`,
hashing and environment (`provenance`), the `ModelCache` (`model_cache`) and the phases on the
loaded model (`phases`). See docs/design.md "Data flow of one run".
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import traceback
import uuid
from pathlib import Path
from typing import Any

import torch

import editors
from bench.core.config import RunConfig
from bench.evaluation.samples import write_samples
from bench.runner import phases, provenance
from bench.runner.checks import check_depth, check_seed, choose, require_kind, resolve_device
from bench.runner.errors import RunFailed, UserError
from bench.runner.model_cache import ModelCache
from bench.runner.plan import plan
from bench.runner.resolve import Resolved, resolve
from bench.store import ResultStore, ensure_cache
from bench.store.schema import Row

__all__ = ["ModelCache", "Resolved", "RunFailed", "UserError", "check_depth", "check_seed", "choose", "execute",
           "plan", "require_kind", "resolve", "resolve_device", "run_one"]


def execute(
    cfg: RunConfig,
    results_dir: str | Path = "results",
    *,
    force: bool = False,
    progress: Any = None,
    models: ModelCache | None = None,
    log: Any = print,
    cache_dir: str | Path | None = None,
    write: bool = True,
) -> tuple[Row, bool]:
    """Run one config and store its row; returns (row, skipped). A stored `ok` twin is returned unless `force`.


    Models, checkpoints and statistics are cached under `cache_dir` (default: `results_dir`). With
    `write=False` the row (ok or failed) is returned but not stored: a Ray worker hands it to the
    driver, the only writer of `runs.jsonl` (bench/executors/ray_exec.py).
    """
    results_dir = Path(results_dir)
    cache = Path(cache_dir) if cache_dir is not None else results_dir
    store = ResultStore(results_dir)
    res = resolve(cfg, cache, progress)  # downloads of full task data go to the cache, with a bar
    for note in res.notes:
        log(note)
    store.ensure_writable()  # a bad --results or --cache-dir fails now, not after the run
    ensure_cache(cache, "--cache-dir" if cache != results_dir else "--results")
    with store.lock(res.config_hash, log):  # of two identical runs, the second waits, then finds the row
        return _execute_locked(cfg, res, store, cache, force, progress, models, log, write)


def _execute_locked(cfg: RunConfig, res: Resolved, store: ResultStore, cache: Path, force: bool, progress: Any,
                    models: ModelCache | None, log: Any, write: bool = True) -> tuple[Row, bool]:
    """The check -> run -> store part of `execute`, under the config's lock (store: only when `write`)."""
    append = store.append if write else (lambda _row: None)
    if not force and (old := store.find_ok(res.config_hash)) is not None:
        return old, True
    models = models or ModelCache()
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    row: Row = {
        "run_id": uuid.uuid4().hex,
        "started_at": started,
        "config": res.config,
        "config_hash": res.config_hash,
        "editor": cfg.editor,
        "model": cfg.model,
        "task": cfg.task,
        "n_edits": cfg.n_edits,
        "seed": cfg.seed,
        "env": provenance.environment(res.device),
    }
    try:  # a load that fails (out of memory, unreadable weights) is a failed run too: stored, not a traceback
        em = models.get(res, cache, progress)
        require_kind(em, res.task, cfg.model, cfg.task)
        if (digest := em.info.get("weights_sha256")) is not None:  # built-in models (bench/models/pinned.py)
            row["model_sha256"] = digest
            if em.info.get("weights_reference") is False:
                log(f"note: built-in model '{cfg.model}' has weights sha256 {digest[:16]}..., not the reference "
                    "one: its numbers will not match published rows (docs/reproducibility.md)")
        fields = phases.run_phases(res, em, cache, progress, log)
        samples = fields.pop("samples", None)
        if samples is not None:  # --log-samples: beside the store, named by the run
            path = store.dir / "samples" / f"{row['run_id']}.jsonl"
            write_samples(path, samples)
            fields["samples_path"] = str(path)
        row.update(fields)  # type: ignore[typeddict-item]
        row["status"] = "ok"
    except editors.base.UnsupportedTask as e:
        raise UserError(str(e)) from None
    except UserError:  # bad input found before anything ran: nothing to store
        raise
    except Exception as e:  # the run failed: store why, keep everything else
        oom = isinstance(e, torch.OutOfMemoryError)
        row["status"] = "failed"
        row["error"] = ("CUDA out of memory: " if oom else "") + f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=8)
        append(row)
        raise RunFailed(row) from e
    append(row)
    return row, False


def run_one(cfg: RunConfig | None = None, results: str | Path = "results", *, cache_dir: str | Path | None = None,
            force: bool = False, dry_run: bool = False, log: Any = print, **fields: Any) -> Row | dict[str, Any]:
    """Run one config as `bench run` does and return its stored row (or, with `dry_run`, its plan).


    Give a `RunConfig` or its fields (`run_one(editor="ft", model="tiny-gpt2", task="synthetic",
    n_edits=16)`). A stored `ok` twin is returned without running unless `force`. Raises UserError for
    bad input (before any model loads) and RunFailed when the run failed (its row is stored).
    """
    if fields:
        cfg = dataclasses.replace(cfg or RunConfig(), **fields)
    cfg = cfg or RunConfig()
    if dry_run:
        return plan(resolve(cfg, cache_dir if cache_dir is not None else results), results, cache_dir, force)
    row, _ = execute(cfg, results, force=force, log=log, cache_dir=cache_dir)
    return row
