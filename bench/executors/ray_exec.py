"""`bench sweep --executor ray`: the grid's cells as Ray tasks, the driver the only writer of the store.

- **Resolution where the cells run**: one Ray task with a cell's resources resolves every config
  (names, `--set` keys, data, device, content identity of the model) and returns the config hashes,
  so the hashes are those the workers will compute (a driver without a GPU or without the model in its
  Hugging Face cache still names the cells right). Bad input stops the sweep before any cell runs.
- **Resumption as today**: cells whose hash is stored `ok` in `runs.jsonl` are not submitted; after a
  kill, rerunning the same command runs only the cells without a row.
- **Prepare before reuse**: cells that share a prepared artifact (a meta-trained hyper-network, MEMIT's
  statistics) form a group; its first cell runs first and computes the artifact into the shared cache,
  the others are submitted once it is done and reuse it. Groups run in parallel.
- **One writer**: a worker runs `bench.runner.run.execute(..., write=False)` and returns its row (ok or
  failed); the driver appends it under the config's lock, after checking that no `ok` twin was
  stored meanwhile (so two sweeps of the same grid store each cell once). A worker that dies (killed,
  out of memory) stores nothing: the cell is reported failed and runs again on the next invocation.
- **Caches**: the results and cache folders are passed as absolute paths; on a multi-node cluster
  they must be a shared file system mounted at the same path on every node (docs/scaling.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from bench.core.config import RunConfig, stable_hash
from bench.core.machine import PINNED_ENV
from bench.executors.sweep import CellResult, cell_name, describe, sweep_progress
from bench.store import ResultStore, ensure_dir


@dataclass(frozen=True)
class ResolvedCell:
    """What the driver needs to know about a cell before it runs."""

    config_hash: str
    group: str  # cells with the same group share their prepared artifact (hyper-network / statistics)


def prepare_group(config: dict[str, Any], config_hash: str, editor_cls: type) -> str:
    """The key of the artifact a cell's `prepare` makes: its config without what the artifact does not depend on.

    Hyper-network editors meta-train per seed and per edits per step (`train_edits`, by default the
    cell's m), so the number of edits enters through `train_edits`; statistics (MEMIT) depend on
    neither the number of edits nor the seed. An editor without `prepare` (ft) shares nothing: every
    cell is its own group.
    """
    import editors

    if editor_cls.prepare is editors.Editor.prepare:
        return config_hash
    rest = {k: v for k, v in config.items() if k not in ("n_edits", "seed")}
    if editor_cls.meta_trains:
        rest["seed"] = config["seed"]
        rest["train_edits"] = config["hparams"].get("train_edits") or config["n_edits"]
    return stable_hash(rest)


def resolve_cells(cfgs: Sequence[RunConfig], cache_dir: str) -> dict[str, Any]:
    """Ray task: the hashes and groups of `cfgs` as a worker resolves them, or the first bad input as `error`."""
    from bench.runner.run import UserError, resolve

    cells, notes = [], []
    for cfg in cfgs:
        try:
            res = resolve(cfg, cache_dir)
        except UserError as e:
            return {"error": str(e)}
        cells.append(ResolvedCell(res.config_hash, prepare_group(res.config, res.config_hash, res.editor_cls)))
        notes.extend(n for n in res.notes if n not in notes)
    return {"cells": cells, "notes": notes}


def run_cell(cfg: RunConfig, results_dir: str, cache_dir: str | None, force: bool) -> dict[str, Any]:
    """Ray task: run one cell through `bench.runner.run.execute` without storing it; the row goes back to the driver."""
    from bench.runner.run import RunFailed, UserError, execute

    t0 = time.perf_counter()
    try:
        row, skipped = execute(cfg, results_dir, force=force, cache_dir=cache_dir, write=False)
        out = {"status": "skipped" if skipped else "ok", "row": row, "error": None}
    except RunFailed as e:
        out = {"status": "failed", "row": e.row, "error": e.row.get("error", "run failed")}
    except UserError as e:  # e.g. a model that does not fit the task: nothing stored, as in a local sweep
        out = {"status": "error", "row": None, "error": str(e)}
    out["seconds"] = time.perf_counter() - t0
    return out


def store_row(store: ResultStore, row: dict[str, Any], force: bool) -> bool:
    """Append a worker's row unless an `ok` twin was stored meanwhile (without `force`); True if appended."""
    with store.lock(row["config_hash"]):
        if not force and row.get("status") == "ok" and store.find_ok(row["config_hash"]) is not None:
            return False
        store.append(row)
        return True


def worker_env() -> dict[str, str]:
    """The driver's pinned kernel switches (bench/core/machine.py), so every node runs the code paths the driver chose."""
    return {k: os.environ[k] for k in PINNED_ENV if k in os.environ}


def run_ray_sweep(
    cfgs: Sequence[RunConfig],
    results_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    force: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
    address: str | None = None,
    gpus_per_cell: float = 0.0,
    cpus_per_cell: float = 1.0,
) -> list[CellResult]:
    """Run the grid's cells as Ray tasks; the results come back in grid order, as from `run_sweep`.

    Connects to the cluster at `address` (None: the one `ray.init` finds or starts; a Ray already
    initialised in this process is used as it is and left running).
    """
    import ray

    from bench.runner.run import UserError

    if gpus_per_cell < 0 or cpus_per_cell <= 0:
        raise ValueError("--gpus-per-cell must be >= 0 and --cpus-per-cell > 0")
    console = console or Console(stderr=True)
    results = Path(results_dir).resolve()  # workers may run elsewhere: absolute paths on the shared file system
    cache = Path(cache_dir).resolve() if cache_dir is not None else None
    store = ResultStore(results)
    store.ensure_writable()
    if cache is not None:
        ensure_dir(cache, "--cache-dir")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    try:
        opts: dict[str, Any] = {"num_cpus": cpus_per_cell, "num_gpus": gpus_per_cell, "max_retries": 0}
        if env := worker_env():
            opts["runtime_env"] = {"env_vars": env}
        found = ray.get(ray.remote(resolve_cells).options(**opts).remote(list(cfgs), str(cache or results)))
        if "error" in found:
            raise UserError(found["error"])
        for note in found["notes"]:
            console.print(note, markup=False, highlight=False, soft_wrap=True)
        cells: list[ResolvedCell] = found["cells"]
        return _schedule(ray, list(cfgs), cells, store, results, cache, force, console, show_progress, opts)
    finally:
        if started_here:
            ray.shutdown()


def _schedule(ray: Any, cfgs: list[RunConfig], cells: list[ResolvedCell], store: ResultStore, results: Path,
              cache: Path | None, force: bool, console: Console, show_progress: bool,
              opts: dict[str, Any]) -> list[CellResult]:
    """Submit each group's first cell, then the rest of a group once its first is done; store rows as they come."""
    stored = {} if force else {r["config_hash"]: r for r in store.rows() if r.get("status") == "ok"}
    out: list[CellResult | None] = [None] * len(cfgs)
    groups: dict[str, list[int]] = {}
    for i, cell in enumerate(cells):
        if cell.config_hash in stored:
            out[i] = CellResult(cfgs[i], "skipped", stored[cell.config_hash])
        else:
            groups.setdefault(cell.group, []).append(i)
    task = ray.remote(run_cell).options(**opts)
    cache_arg = None if cache is None else str(cache)
    pending: dict[Any, int] = {}

    def submit(i: int) -> None:
        pending[task.remote(cfgs[i], str(results), cache_arg, force)] = i

    for members in groups.values():
        submit(members[0])
    n_run = sum(len(m) for m in groups.values())
    t0 = time.perf_counter()
    with sweep_progress(console, show_progress) as prog:
        bar = prog.add_task("sweep (ray)", total=len(cfgs), status="", eta_s=None)
        for r in out:
            if r is not None:
                prog.console.print(describe(r), highlight=False)
                prog.update(bar, advance=1)
        done = 0
        while pending:
            prog.update(bar, status=f"{len(pending)} running")
            [ref], _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ref)
            res = _collect(ray, ref, cfgs[i], store, force)
            out[i] = res
            done += 1
            members = groups[cells[i].group]
            if members[0] == i:  # the group's artifact now exists (or failed: each cell then tries itself)
                for j in members[1:]:
                    submit(j)
            prog.console.print(describe(res), highlight=False)
            if res.row is not None and res.row.get("config_hash") != cells[i].config_hash:
                prog.console.print(f"[yellow]! {escape(cell_name(cfgs[i]))}: its config changed since the sweep "
                                   f"started (hash {cells[i].config_hash} -> {res.row['config_hash']})[/]")
            left = n_run - done
            prog.update(bar, advance=1, eta_s=(time.perf_counter() - t0) / done * left)
        prog.update(bar, status="")
    return [r for r in out if r is not None]


def _collect(ray: Any, ref: Any, cfg: RunConfig, store: ResultStore, force: bool) -> CellResult:
    """The finished task's CellResult, its row stored by the driver; a dead worker is a failed, unstored cell."""
    try:
        got = ray.get(ref)
    except ray.exceptions.RayError as e:  # the worker died or the task raised: nothing to store
        return CellResult(cfg, "failed", None, f"ray task failed: {str(e).strip().splitlines()[-1][:300]}")
    res = CellResult(cfg, got["status"], got["row"], got["error"], got["seconds"])
    if res.status in ("ok", "failed") and res.row is not None and not store_row(store, res.row, force):
        res = CellResult(cfg, "skipped", store.find_ok(res.row["config_hash"]), None, res.seconds)
    return res
