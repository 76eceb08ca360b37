"""`bench keys`: check the options, sample the edit requests as `bench run` does, load the model and
measure the key geometry of its edited layers (bench/diagnostics/geometry.py)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from bench.core import config
from bench.core.console import stdout_to_stderr
from bench.diagnostics import geometry
from bench.diagnostics.geometry import LayerGeometry


def run_key_geometry(model: str, task: str, edits: int, seed: int, layers: str, blocks: str | None,
                     last_n: int | None, lam: str, sets: list[str] | None, device: str, results: Path,
                     progress: Any = None, quiet_stdout: bool = False) -> list[LayerGeometry]:
    """Key geometry of `edits` requests of `task` (sampled with `seed`) on `model`, per edited layer and λ.

    `blocks` and `lam` are the comma-separated option strings, `sets` the task's `--set KEY=VALUE`
    items. Bad input, an unusable `results` folder and a model that cannot be loaded raise `UserError`
    (before any computation); `quiet_stdout` sends whatever loading and measuring print to stderr.
    """
    import tasks
    from bench.models import LoadContext, ModelLoadError, load_model
    from bench.runner.depth import loaded_depth, model_depth
    from bench.runner.run import UserError, check_seed, choose, require_kind, resolve_device
    from bench.store import StoreError, ensure_dir
    from editors.base import hparams_from

    try:
        lams = [float(x) for x in lam.split(",") if x.strip()]
        block_ids = [int(x) for x in blocks.split(",")] if blocks else None
    except ValueError as e:
        raise UserError(f"bad --lam/--blocks value: {e}") from e
    if not lams or any(not (math.isfinite(x) and x > 0) for x in lams):
        raise UserError(f"--lam needs finite positive values (λ = 0 is singular for n < d keys); got {lam}")
    if edits < 1:
        raise UserError(f"--edits must be at least 1, got {edits}")
    if last_n is not None and last_n < 1:
        raise UserError(f"--last-n must be at least 1, got {last_n}")
    if layers not in ("second_fc", "first_fc"):
        raise UserError(f"--layers {layers}: choose second_fc or first_fc")

    def check_last_n(depth: int | None) -> None:  # a --last-n the user gave, against the model's blocks
        if last_n is not None and block_ids is None and depth is not None and last_n > depth:
            raise UserError(f"--last-n {last_n} is more than the {depth} blocks of model '{model}'; "
                            f"choose 1 to {depth}")

    try:
        ensure_dir(results)  # the model cache: a bad folder fails before the model is loaded or trained
    except StoreError as e:
        raise UserError(str(e)) from e
    try:
        check_seed(seed)
        depth = model_depth(model) if last_n is not None else None  # known before loading: aliases, folders, cached ids
        check_last_n(depth)
        task_cls = choose("task", task, tasks.TASKS)
        parsed, valid = config.parse_sets(sets), {f.name for f in dataclasses.fields(task_cls.config_cls)}
        if unknown := sorted(set(parsed) - valid):
            raise UserError(f"unknown --set key(s) {unknown} for task '{task}'; valid: {sorted(valid)}")
        t = task_cls(hparams_from(task_cls.config_cls, parsed, {}))
        requests = t.sample(edits, seed)
        dev = resolve_device(device)
        with stdout_to_stderr(quiet_stdout):
            em = load_model(LoadContext(model, results, str(dev), t.kind, seed, progress))
        require_kind(em, t, model, task)
        if last_n is not None and depth is None:
            check_last_n(loaded_depth(em))
        modules = em.module_names(which=layers, blocks=block_ids, last_n=6 if last_n is None else last_n)
    except UserError:
        raise
    except (ValueError, TypeError, ModelLoadError) as e:
        raise UserError(str(e)) from e
    with stdout_to_stderr(quiet_stdout):
        return geometry.key_geometry(em, requests, modules, lams)  # looked up at call time (tests replace it)
