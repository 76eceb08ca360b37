"""`resolve`: a RunConfig -> `Resolved` (task, editor class, hparams, device, recorded config and its hash).

Everything that can be checked without the model is checked here (with bench/runner/checks.py), so bad
input fails in seconds. See docs/design.md "Data flow of one run".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import editors
import tasks
from bench.core.config import RunConfig
from bench.models import model_identity
from bench.runner.checks import (
    batch_count,
    check_depth,
    check_fit,
    check_placement,
    check_seed,
    check_sequential,
    check_train_size,
    choose,
    full_would_help,
    resolve_device,
)
from bench.runner.download import DownloadError, full_data
from bench.runner.errors import UserError
from bench.runner.overrides import editor_keys, split_overrides, task_keys
from bench.runner.provenance import content_hashes
from bench.store.schema import RecordedConfig
from editors.base import HPARAMS_DIR, BadValue, hparams_from, model_defaults, model_defaults_path
from tasks.base import DataError, Task
from tasks.files import FileTask
from tasks.sources import check_source, is_hub_spec


@dataclass
class Resolved:
    """A RunConfig with everything derived from it: task, editor class, hparams, full config and hash."""


    cfg: RunConfig
    task: Task
    editor_cls: type[editors.Editor]
    hparams: Any
    device: torch.device
    config: RecordedConfig = field(default_factory=RecordedConfig)
    config_hash: str = ""
    task_key: str = ""  # identifies task and data (by content) in hyper-network checkpoint keys
    notes: list[str] = field(default_factory=list)  # things worth a log line that are not errors


def defaults_note(editor: str, model: str) -> str | None:
    """A note when `editors/hparams/<editor>/<model>.json` is missing: the editor's own defaults apply."""
    path = model_defaults_path(editor, model)
    if path.exists():
        return None
    shown = path.relative_to(HPARAMS_DIR.parent.parent).as_posix()
    return (f"note: no {shown}; editor '{editor}' uses its default hyperparameters (the paper's) "
            f"for model '{model}'")


def resolve(cfg: RunConfig, cache_dir: str | Path | None = None, progress: Any = None) -> Resolved:
    """Validate names and `--set` keys, build task and hparams, and compute the config hash.


    Everything that can be checked without the model is checked here, so bad input fails in
    seconds: names, `--set` keys and values, editor/model/task kinds, the data, `--edits` against
    the evaluation pool and a hypernetwork's edits per meta-training step against its training
    requests. The full task data (`source=full|auto`) is fetched into `cache_dir` (default
    `results`; bench/runner/download.py) with `progress` drawing its bar.
    """
    task_cls = choose("task", cfg.task, tasks.TASKS)
    editor_cls = choose("editor", cfg.editor, editors.EDITORS)
    if cfg.n_edits < 1:
        raise UserError("--edits must be at least 1")
    check_fit(cfg, task_cls, editor_cls)
    task_over, ed_over, unknown = split_overrides(task_cls, editor_cls, cfg.overrides)
    if unknown:
        raise UserError(
            f"unknown --set key(s) {unknown} for editor '{cfg.editor}' / task '{cfg.task}'; valid: "
            f"editor {sorted(editor_keys(editor_cls))}, "
            f"task {sorted(k for k in task_keys(task_cls) if k not in ('data', 'train_data'))}"
        )
    check_seed(cfg.seed)
    file_defaults = model_defaults(cfg.editor, cfg.model)
    defaults_file = model_defaults_path(cfg.editor, cfg.model).relative_to(HPARAMS_DIR.parent.parent).as_posix()
    try:
        task_kwargs: dict[str, Any] = {"data": cfg.data, "train_data": cfg.train_data, "skip_bad": cfg.skip_bad}
        task_cfg = hparams_from(task_cls.config_cls, task_over, task_kwargs)
        hparams = hparams_from(editor_cls.hparams_cls, ed_over, file_defaults, defaults_file)
    except BadValue as e:  # already the whole line: "bad --set value: lr=nan is not a finite number > 0"
        raise UserError(str(e)) from None
    except (ValueError, TypeError) as e:
        raise UserError(f"bad --set value {e}") from None
    check_depth(cfg.model, hparams, {**{k: f"value in {defaults_file}" for k in file_defaults},
                                     **{k: "--set value" for k in ed_over}})
    data_notes: list[str] = []
    try:
        task = _build_task(cfg, task_cls, task_cfg, Path(cache_dir) if cache_dir is not None else Path("results"),
                           progress, data_notes)
        pool = len(task.eval_split())  # reads and validates the data now, before any model is loaded
    except DataError as e:
        raise UserError(f"bad data: {e}") from None
    if cfg.n_edits > pool:
        more = " or --set source=full for the full data" if full_would_help(task, "eval") else ""
        raise UserError(f"--edits {cfg.n_edits} is more than the {pool} evaluation requests of task "
                        f"'{cfg.task}'{' (--data ' + cfg.data + ')' if cfg.data else ''}; "
                        f"choose --edits {pool} or fewer, or a larger evaluation pool (--data FILE{more})")
    n_batches = batch_count(cfg, pool)
    check_sequential(cfg, n_batches, pool)
    check_train_size(cfg, editor_cls, hparams, task)
    check_placement(cfg, task_cls)
    device = resolve_device(cfg.device)
    config: RecordedConfig = {
        "editor": cfg.editor,
        "model": cfg.model,
        "task": cfg.task,
        "n_edits": cfg.n_edits,
        "seed": cfg.seed,
        "device": device.type,
        "hparams": dataclasses.asdict(hparams),
        "task_config": _recorded_task_config(task_cfg),
        "data": dict(task.data_info),
    }
    model_id = model_identity(cfg.model)  # before the "already stored?" check: overwritten weights rerun
    if model_id is not None:  # aliases: none, so the hashes of their rows are unchanged
        config["model_id"] = model_id
    if cfg.dtype != "float32":  # recorded only when not the default, so earlier rows keep their hashes
        config["dtype"] = cfg.dtype
    if cfg.device_map is not None:
        config["device_map"] = cfg.device_map
    if n_batches != 1:  # like dtype: only when not the default, so one-batch rows keep their hashes
        config["batches"] = n_batches
    if cfg.sequential:  # likewise: rows without --sequential keep their hashes
        config["sequential"] = cfg.sequential
    eval_opts: dict[str, bool] = {k: False for k in ("generation", "cf_scores") if not getattr(cfg, k)}
    if cfg.fluency:  # off by default, so recorded only when on
        eval_opts["fluency"] = True
    if eval_opts:
        config["eval"] = eval_opts
    config_hash, task_key = content_hashes(config, model_is_folder=model_id is not None and Path(cfg.model).is_dir())
    notes = [n for n in [defaults_note(cfg.editor, cfg.model)] if n] + data_notes
    return Resolved(cfg, task, editor_cls, hparams, device, config, config_hash, task_key, notes)


def _build_task(cfg: RunConfig, task_cls: type[Task], task_cfg: Any, cache: Path, progress: Any,
                notes: list[str]) -> Task:
    """The task on the data `cfg` asks for: user files, `hf:` datasets, the full files (fetched now) or the shipped ones.


    The decision is made here, in `bench`, because fetching needs the cache (bench/core/cachefs.py) and
    `tasks` must not import `bench`; the task only receives the local copies (`downloaded=`).
    """
    file_task = issubclass(task_cls, FileTask)
    for flag, value in (("--data", cfg.data), ("--train-data", cfg.train_data)):
        if is_hub_spec(value) and not file_task:
            able = ", ".join(sorted(n for n, c in tasks.TASKS.items() if issubclass(c, FileTask)))
            raise UserError(f"{flag} {value}: Hugging Face datasets are read for the tasks {able}; "
                            f"task '{cfg.task}' takes a file")
    source = getattr(task_cfg, "source", None)
    if source is None:  # a task without full downloads
        return task_cls(task_cfg)
    try:
        check_source(source)
    except ValueError as e:
        raise UserError(f"bad --set value {e}") from None
    roles = {role for role, given in (("eval", cfg.data), ("train", cfg.train_data)) if not given}
    needed = [rf for rf in task_cls.full_files if rf.role == "both" or rf.role in roles] if roles else []
    try:
        got = full_data(needed, source, cache, progress)
    except DownloadError as e:
        raise UserError(str(e)) from None
    notes.extend(got.notes)
    if got.files is None:
        task = task_cls(task_cfg)  # the shipped subset
        if got.why_not is not None:
            notes.append(f"note: task '{cfg.task}': the full data cannot be fetched ({got.why_not}); using the shipped "
                         f"subset: {len(task.train_split())} training / {len(task.eval_split())} evaluation "
                         "requests (--set source=full requires the full data, source=shipped skips this check)")
        return task
    task = task_cls(task_cfg, downloaded=got.files)
    # Said every time: with `auto`, whether the run meta-trains on 400 or 160,000 requests depends on the cache.
    notes.append(f"note: task '{cfg.task}' uses the full data ({', '.join(sorted(got.files))}): "
                 f"{len(task.train_split())} training / {len(task.eval_split())} evaluation requests "
                 "(--set source=shipped for the shipped subset)")
    return task


def _recorded_task_config(task_cfg: Any) -> dict[str, Any]:
    """The task config as the row records and hashes it, without `source`.


    The source actually used is in `config.data` (`eval_source` / `train_source`: shipped, full, user
    or hf, with the files' sha256), so `auto` and an explicit choice of the same data share a hash,
    and rows on the shipped data keep the hash they had before `source` existed.
    """
    out = dataclasses.asdict(task_cfg)
    out.pop("source", None)
    return out
