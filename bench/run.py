"""The run loop: one config -> model, task, editor -> prepare, edit, evaluate -> one stored row.

This is the single place where a benchmark run happens; `bench run` and `bench sweep` both call
`execute`. See DESIGN.md "Data flow of one run".
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import platform
import random
import subprocess
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import editors
import tasks
from bench.config import RunConfig, stable_hash
from bench.machine import cpu_env, cpu_model
from bench.measure import measure
from bench.metrics import combine, evaluate
from bench.models import (
    KIND_NAMES,
    MODEL_ALIASES,
    EditableModel,
    LoadContext,
    ModelLoadError,
    alias_typo,
    load_model,
    model_identity,
)
from bench.store import ResultStore, ensure_dir
from editors.base import HPARAMS_DIR, EditorContext, hparams_from, model_defaults, model_defaults_path
from tasks.base import DataError, Task


class UserError(Exception):
    """Bad input from the user (unknown name, bad option, bad data); the CLI exits 2 without a traceback."""


class RunFailed(Exception):
    """The run itself failed; its row was stored with status 'failed'."""

    def __init__(self, row: dict[str, Any]):
        self.row = row
        super().__init__(row.get("error", "run failed"))


def set_seed(seed: int) -> None:
    """Seed every generator the run touches."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UserError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return torch.device(device)


def choose(kind: str, name: str, registry: dict[str, Any]) -> Any:
    """The registry entry `name`, or a UserError listing the choices."""
    if name not in registry:
        raise UserError(f"unknown {kind} '{name}'; choices: {', '.join(sorted(registry))}")
    return registry[name]


@dataclass
class Resolved:
    """A RunConfig with everything derived from it: task, editor class, hparams, full config and hash."""

    cfg: RunConfig
    task: Task
    editor_cls: type[editors.Editor]
    hparams: Any
    device: torch.device
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    task_key: str = ""  # identifies task and data (by content) in hyper-network checkpoint keys
    notes: list[str] = field(default_factory=list)  # things worth a log line that are not errors


TASK_KIND_NAMES = {"lm": "causal-LM", "cls": "classification"}


def check_fit(cfg: RunConfig, task_cls: type[Task], editor_cls: type[editors.Editor]) -> None:
    """UserError, before any model loads, when editor, model alias and task do not go together."""
    kind = task_cls.kind
    if kind not in editor_cls.supported_kinds:
        able = sorted(n for n, c in editors.EDITORS.items() if kind in c.supported_kinds)
        supported = " or ".join(KIND_NAMES[k] for k in sorted(editor_cls.supported_kinds))
        raise UserError(f"editor '{cfg.editor}' edits {supported} models only, but task '{cfg.task}' is a "
                        f"{TASK_KIND_NAMES[kind]} task; editors that can: {', '.join(able)}")
    alias = MODEL_ALIASES.get(cfg.model)
    if alias is not None and alias.kind != kind:
        fits = sorted(n for n, a in MODEL_ALIASES.items() if a.kind == kind)
        raise UserError(f"model '{cfg.model}' is a {KIND_NAMES[alias.kind]}, but task '{cfg.task}' needs a "
                        f"{KIND_NAMES[kind]}; built-in models that fit: {', '.join(fits)}")
    if alias is None and (typo := alias_typo(cfg.model)) is not None:
        raise UserError(f"unknown model '{cfg.model}' (not a built-in alias, a folder or a cached hub id); "
                        f"did you mean '{typo}'?")


def defaults_note(editor: str, model: str) -> str | None:
    """A note when `editors/hparams/<editor>/<model>.json` is missing: the editor's own defaults apply."""
    path = model_defaults_path(editor, model)
    if path.exists():
        return None
    shown = path.relative_to(HPARAMS_DIR.parent.parent).as_posix()
    return (f"note: no {shown}; editor '{editor}' uses its default hyperparameters (the paper's) "
            f"for model '{model}'")


def resolve(cfg: RunConfig) -> Resolved:
    """Validate names and `--set` keys, build task and hparams, and compute the config hash.

    Everything that can be checked without the model is checked here, so bad input fails in
    seconds: names, `--set` keys and values, editor/model/task kinds, the data and `--edits`.
    """
    task_cls = choose("task", cfg.task, tasks.TASKS)
    editor_cls = choose("editor", cfg.editor, editors.EDITORS)
    if cfg.n_edits < 1:
        raise UserError("--edits must be at least 1")
    check_fit(cfg, task_cls, editor_cls)
    task_fields = {f.name: f for f in dataclasses.fields(task_cls.config_cls)}
    hp_fields = {f.name for f in dataclasses.fields(editor_cls.hparams_cls)}
    task_over = {k: v for k, v in cfg.overrides.items() if k in task_fields}
    ed_over = {k: v for k, v in cfg.overrides.items() if k not in task_fields}
    unknown = sorted(k for k in ed_over if k not in hp_fields)
    if unknown:
        raise UserError(
            f"unknown --set key(s) {unknown} for editor '{cfg.editor}' / task '{cfg.task}'; valid: "
            f"editor {sorted(hp_fields)}, task {sorted(k for k in task_fields if k not in ('data', 'train_data'))}"
        )
    try:
        task_kwargs: dict[str, Any] = {"data": cfg.data, "train_data": cfg.train_data, "skip_bad": cfg.skip_bad}
        task_cfg = hparams_from(task_cls.config_cls, task_over, task_kwargs)
        hparams = hparams_from(editor_cls.hparams_cls, ed_over, model_defaults(cfg.editor, cfg.model))
    except (ValueError, TypeError) as e:
        raise UserError(f"bad --set value {e}") from None
    try:
        task = task_cls(task_cfg)
        pool = len(task.eval_split())  # reads and validates the data now, before any model is loaded
    except DataError as e:
        raise UserError(f"bad data: {e}") from None
    if cfg.n_edits > pool:
        raise UserError(f"--edits {cfg.n_edits} is more than the {pool} evaluation requests of task "
                        f"'{cfg.task}'{' (--data ' + cfg.data + ')' if cfg.data else ''}; "
                        f"choose --edits {pool} or fewer")
    device = resolve_device(cfg.device)
    config = {
        "editor": cfg.editor,
        "model": cfg.model,
        "task": cfg.task,
        "n_edits": cfg.n_edits,
        "seed": cfg.seed,
        "device": device.type,
        "hparams": dataclasses.asdict(hparams),
        "task_config": dataclasses.asdict(task_cfg),
        "data": dict(task.data_info),
    }
    model_id = model_identity(cfg.model)  # before the "already stored?" check: overwritten weights rerun
    if model_id is not None:  # aliases: none, so the hashes of their rows are unchanged
        config["model_id"] = model_id
    config_hash, task_key = _content_hashes(config, model_is_folder=model_id is not None and Path(cfg.model).is_dir())
    notes = [n for n in [defaults_note(cfg.editor, cfg.model)] if n]
    return Resolved(cfg, task, editor_cls, hparams, device, config, config_hash, task_key, notes)


def plan(res: Resolved, results_dir: str | Path, cache_dir: str | Path | None = None,
         force: bool = False) -> dict[str, Any]:
    """What `execute` would do for `res`, found without loading a model: `bench run --dry-run`.

    The stored `ok` twin (skip) and the model's cache folder are known now; the keys of hyper-network
    checkpoints and MEMIT statistics include the loaded model's key and layer shapes, so whether those
    are reused is decided after the model loads.
    """
    results_dir = Path(results_dir)
    cache = Path(cache_dir) if cache_dir is not None else results_dir
    old = None if force else ResultStore(results_dir).find_ok(res.config_hash)
    cfg = res.cfg
    return {
        "editor": cfg.editor, "model": cfg.model, "task": cfg.task, "n_edits": cfg.n_edits, "seed": cfg.seed,
        "device": res.device.type,
        "config_hash": res.config_hash,
        "hparams": res.config["hparams"],
        "task_config": {k: v for k, v in res.config["task_config"].items() if v is not None},
        "stored_ok_run": old["run_id"] if old else None,
        "action": "skip" if old else "run",
        "model_cache": model_cache_plan(cfg.model, res, cache),
        "prepare": ("nothing to prepare" if res.editor_cls.prepare is editors.Editor.prepare else
                    "checkpoint/statistics reused or computed: decided after the model loads (their key "
                    "needs the loaded model)"),
        "notes": list(res.notes),
    }


def model_cache_plan(model: str, res: Resolved, cache: Path) -> dict[str, Any]:
    """Where the model comes from and whether it is cached, without loading it."""
    alias = MODEL_ALIASES.get(model)
    if alias is not None:
        try:
            folder = alias.folder(cache)
        except ModelLoadError as e:  # its package is not installed
            return {"source": "alias", "folder": None, "cached": False, "note": str(e)}
        cached = folder.is_dir()
        return {"source": "alias", "folder": str(folder), "cached": cached,
                "note": "cached" if cached else f"not cached: {alias.first_use} on first use (minutes)"}
    model_id = res.config.get("model_id")
    extra = ("; the FEVER classifier fine-tuned from it: decided after the model loads"
             if res.task.kind == "cls" else "")
    if Path(model).is_dir():
        return {"source": "folder", "folder": model, "cached": True, "note": f"local folder ({model_id}){extra}"}
    if model_id is not None:
        return {"source": "hub", "folder": None, "cached": True, "note": f"in the Hugging Face cache{extra}"}
    return {"source": "hub", "folder": None, "cached": False,
            "note": f"not in the Hugging Face cache: downloaded on load (needs network){extra}"}


def _content_hashes(config: dict[str, Any], model_is_folder: bool) -> tuple[str, str]:
    """(config hash, task key): data files and model folders enter by content, not by their path.

    The paths stay in the recorded config as provenance. The task key (hyper-network checkpoints)
    of the shipped data is the one it always was.
    """
    task_cfg = {k: v for k, v in config["task_config"].items() if k not in ("data", "train_data")}
    data = _content_only(config["data"])
    hashed = {**config, "task_config": task_cfg, "data": data}
    if model_is_folder:  # known by `model_id` alone
        del hashed["model"]
    task_key = stable_hash([{**config["task_config"], "data": None, "train_data": None}, data])
    return stable_hash(hashed), f"{config['task']}:{task_key}"


def _content_only(data_info: dict[str, Any]) -> dict[str, Any]:
    """`data_info` without the paths of user files (their sha256 stays); shipped files keep their fixed names."""
    out = {}
    for k, v in data_info.items():
        role = k.removesuffix("_path")
        if k.endswith("_path") and data_info.get(f"{role}_source") == "user":
            continue  # FileTask: eval_path / train_path of a user file
        if k in ("data", "train_data") and isinstance(v, dict):  # FEVER: a user file's facts
            v = {kk: vv for kk, vv in v.items() if kk != "file"}
        out[k] = v
    return out


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware the run used."""
    import transformers

    commit, dirty = _git_state()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": f"{device.type}: {dev}",
        "threads": torch.get_num_threads(),
        "cpu": cpu_env(),  # model, instruction sets, dispatched kernels, math libraries, pinning variables
        "git_commit": commit,
        "git_dirty": dirty,  # True: the code that ran had uncommitted changes on top of git_commit
    }


def _git_state() -> tuple[str | None, bool | None]:
    """HEAD commit of the checkout holding this code and whether tracked files differ from it."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD") or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


class ModelCache:
    """Loaded models keyed by (name, content identity, device, task kind), so a sweep loads each model once."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str | None, str, str], EditableModel] = {}

    def get(self, res: Resolved, results_dir: Path, progress: Any) -> EditableModel:
        key = (res.cfg.model, res.config.get("model_id"), str(res.device), res.task.kind)
        if key not in self._models:
            ctx = LoadContext(res.cfg.model, results_dir, str(res.device), res.task.kind, res.cfg.seed, progress)
            try:
                self._models[key] = load_model(ctx)
            except ModelLoadError as e:
                raise UserError(str(e)) from None
        return self._models[key]


def require_kind(em: EditableModel, task: Task, model_name: str, task_name: str) -> None:
    """UserError unless the model's kind (causal LM or classifier) is the one the task needs."""
    if task.kind != em.kind:
        raise UserError(f"model '{model_name}' is a {KIND_NAMES[em.kind]}, but task '{task_name}' needs a "
                        f"{KIND_NAMES[task.kind]}")


def execute(
    cfg: RunConfig,
    results_dir: str | Path = "results",
    *,
    force: bool = False,
    progress: Any = None,
    models: ModelCache | None = None,
    log: Any = print,
    cache_dir: str | Path | None = None,
) -> tuple[dict[str, Any], bool]:
    """Run one config and store its row; returns (row, skipped). A stored `ok` twin is returned unless `force`.

    Models, checkpoints and statistics are cached under `cache_dir` (default: `results_dir`).
    """
    results_dir = Path(results_dir)
    cache = Path(cache_dir) if cache_dir is not None else results_dir
    store = ResultStore(results_dir)
    res = resolve(cfg)
    for note in res.notes:
        log(note)
    store.ensure_writable()  # a bad --results or --cache-dir fails now, not after the run
    if cache != results_dir:
        ensure_dir(cache, "--cache-dir")
    with store.lock(res.config_hash, log):  # of two identical runs, the second waits, then finds the row
        return _execute_locked(cfg, res, store, cache, force, progress, models, log)


def _execute_locked(cfg: RunConfig, res: Resolved, store: ResultStore, cache: Path, force: bool, progress: Any,
                    models: ModelCache | None, log: Any) -> tuple[dict[str, Any], bool]:
    """The check -> run -> store part of `execute`, under the config's lock."""
    if not force and (old := store.find_ok(res.config_hash)) is not None:
        return old, True
    models = models or ModelCache()
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    row: dict[str, Any] = {
        "run_id": uuid.uuid4().hex,
        "started_at": started,
        "config": res.config,
        "config_hash": res.config_hash,
        "editor": cfg.editor,
        "model": cfg.model,
        "task": cfg.task,
        "n_edits": cfg.n_edits,
        "seed": cfg.seed,
        "env": environment(res.device),
    }
    try:  # a load that fails (out of memory, unreadable weights) is a failed run too: stored, not a traceback
        em = models.get(res, cache, progress)
        require_kind(em, res.task, cfg.model, cfg.task)
        row.update(_run_phases(res, em, cache, progress, log))
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
        store.append(row)
        raise RunFailed(row) from e
    store.append(row)
    return row, False


def _run_phases(res: Resolved, em: EditableModel, cache: Path, progress: Any, log: Any) -> dict[str, Any]:
    cfg = res.cfg
    try:  # the model's context is known only now; beyond it the position embedding fails with an IndexError
        res.task.check_lengths(em.tokenizer, em.max_length, getattr(em.model.config, "max_position_embeddings", None))
    except DataError as e:
        raise UserError(f"bad data: {e}") from None
    ctx = EditorContext(
        results_dir=cache,
        seed=cfg.seed,
        task_name=cfg.task,
        task_key=res.task_key,
        model_key=em.key or cfg.model,
        n_edits=cfg.n_edits,
        progress=progress,
        log=log,
    )
    editor = res.editor_cls(em, res.hparams, ctx)
    if res.editor_cls.meta_trains and (note := res.task.data_info.get("train_note")):
        log(f"note: {note} (recorded in the row as config.data.train_note)")
    set_seed(cfg.seed)
    train = res.task.train_split()
    if res.editor_cls.meta_trains and not train:
        dropped = res.task.data_info.get("train_overlap_dropped")
        why = (f": all {dropped} of its training requests share a prompt with the evaluation data and were dropped"
               if dropped else "")
        raise UserError(f"editor '{cfg.editor}' meta-trains, but task '{cfg.task}' has no training requests{why}; "
                        "give --train-data FILE with requests that are not in --data")
    with measure(res.device) as prep:
        editor.prepare(train)
    requests = res.task.sample(cfg.n_edits, cfg.seed)
    set_seed(cfg.seed)
    with measure(res.device, interval_s=0.002) as ed:
        edit = editor.edit(requests)
        edit.check_finite()
    with measure(res.device) as ev:
        pre = evaluate(em, requests)
        with edit.applied(em.model):
            post = evaluate(em, requests)
    return {
        "metrics": combine(pre, post),
        "times": {"prepare_s": prep.seconds, "edit_s": ed.seconds, "eval_s": ev.seconds},
        "peak_mem_prepare_bytes": prep.peak_bytes,
        "peak_mem_edit_bytes": ed.peak_bytes,
        "mem_kind": ed.mem_kind,
        "mean_residual": edit.mean_residual,
        "n_skipped_records": res.task.n_skipped,
        "info": {"prepare": editor.prepare_info(), "edit": edit.info, "model": em.info,
                 "data": res.task.data_info},
    }


def run_one(cfg: RunConfig | None = None, results: str | Path = "results", *, cache_dir: str | Path | None = None,
            force: bool = False, dry_run: bool = False, log: Any = print, **fields: Any) -> dict[str, Any]:
    """Run one config as `bench run` does and return its stored row (or, with `dry_run`, its plan).

    Give a `RunConfig` or its fields (`run_one(editor="ft", model="tiny-gpt2", task="synthetic",
    n_edits=16)`). A stored `ok` twin is returned without running unless `force`. Raises UserError for
    bad input (before any model loads) and RunFailed when the run failed (its row is stored).
    """
    if fields:
        cfg = dataclasses.replace(cfg or RunConfig(), **fields)
    cfg = cfg or RunConfig()
    if dry_run:
        return plan(resolve(cfg), results, cache_dir, force)
    row, _ = execute(cfg, results, force=force, log=log, cache_dir=cache_dir)
    return row
