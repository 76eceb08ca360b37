"""The run loop: one config -> model, task, editor -> prepare, edit, evaluate -> one stored row.

This is the single place where a benchmark run happens; `bench run` and `bench sweep` both call
`execute`. See docs/design.md "Data flow of one run".
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import platform
import random
import re
import subprocess
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import editors
import tasks
from bench.core.config import RunConfig, stable_hash
from bench.core.machine import cpu_env, cpu_model
from bench.core.measure import measure, per_device_fields
from bench.evaluation.eval_extra import ExtraOptions, combine_all, evaluate_all
from bench.evaluation.samples import sample_lines, write_samples
from bench.models import (
    DEVICE_MAP_STRATEGIES,
    DTYPES,
    KIND_NAMES,
    MODEL_ALIASES,
    EditableModel,
    LoadContext,
    ModelLoadError,
    alias_typo,
    load_model,
    model_identity,
)
from bench.runner.depth import model_depth
from bench.runner.download import DownloadError, full_data
from bench.runner.sequential import edit_in_sequence
from bench.store import ResultStore, ensure_cache
from editors.base import (
    HPARAMS_DIR,
    BadValue,
    EditorContext,
    hparams_from,
    model_defaults,
    model_defaults_path,
    seq2seq_refusal,
)
from tasks.base import DataError, Task
from tasks.files import FileTask
from tasks.sources import check_source, is_hub_spec


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
    if alias is not None and alias.seq2seq and not editor_cls.edits_seq2seq:
        raise UserError(seq2seq_refusal(cfg.editor, cfg.model))
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
        more = " or --set source=full for the full data" if _full_would_help(task, "eval") else ""
        raise UserError(f"--edits {cfg.n_edits} is more than the {pool} evaluation requests of task "
                        f"'{cfg.task}'{' (--data ' + cfg.data + ')' if cfg.data else ''}; "
                        f"choose --edits {pool} or fewer, or a larger evaluation pool (--data FILE{more})")
    n_batches = batch_count(cfg, pool)
    check_sequential(cfg, n_batches, pool)
    check_train_size(cfg, editor_cls, hparams, task)
    check_placement(cfg, task_cls)
    device = resolve_device(cfg.device)
    config = {
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
    config_hash, task_key = _content_hashes(config, model_is_folder=model_id is not None and Path(cfg.model).is_dir())
    notes = [n for n in [defaults_note(cfg.editor, cfg.model)] if n] + data_notes
    return Resolved(cfg, task, editor_cls, hparams, device, config, config_hash, task_key, notes)


SEED_LIMIT = 2**32  # seeds are 0 .. 2**32 - 1: what numpy's legacy seeding takes, well inside torch.manual_seed's range


def check_seed(seed: int) -> None:
    """UserError for a --seed outside 0 .. 2**32 - 1 (torch.manual_seed overflows past 2**64, and rows should compare)."""
    if not 0 <= seed < SEED_LIMIT:
        raise UserError(f"--seed {seed} is out of range; choose 0 to {SEED_LIMIT - 1}")


def check_depth(model: str, hparams: Any, given: dict[str, str], depth: int | None = None) -> None:
    """UserError when a given `last_n` or MEMIT block index exceeds the model's blocks (found before loading if it can be).

    `given` maps the keys the user gave to where ("--set value", "value in <file>"): only those are
    checked, so an editor's default `last_n` (MALMEN's 6) edits every block of a smaller model, as it
    always has. `depth`: the model's blocks when known (else bench/runner/depth.py finds them without loading).
    """
    checked = [k for k in ("last_n", "layers") if k in given]
    if not checked:
        return
    depth = depth if depth is not None else model_depth(model)
    if depth is None:  # a hub id not downloaded yet: the editor clamps (last_n) or refuses (blocks) after loading
        return
    last_n = getattr(hparams, "last_n", None) if "last_n" in checked else None
    if isinstance(last_n, int) and last_n > depth:
        raise UserError(f"bad {given['last_n']}: last_n={last_n} is more than the {depth} blocks of model '{model}'; "
                        f"choose 1 to {depth}")
    blocks = getattr(hparams, "layers", None) if "layers" in checked else None
    if isinstance(blocks, list) and (out := [b for b in blocks if isinstance(b, int) and b >= depth]):
        raise UserError(f"bad {given['layers']}: layers={','.join(map(str, blocks))} names block(s) {out} but model "
                        f"'{model}' has blocks 0 to {depth - 1}")


def batch_count(cfg: RunConfig, pool: int) -> int:
    """The number of disjoint batches `--batches` asks for (`all`: every full batch of the pool); UserError if too many."""
    b = cfg.batches
    if isinstance(b, str):
        if b.strip().lower() == "all":
            return max(1, pool // cfg.n_edits)
        if not b.strip().isdigit():
            raise UserError(f"--batches takes a positive number or 'all', got '{b}'")
        b = int(b)
    if b < 1:
        raise UserError(f"--batches takes a positive number or 'all', got {b}")
    if b * cfg.n_edits > pool:
        raise UserError(f"--batches {b} of --edits {cfg.n_edits} need {b * cfg.n_edits} evaluation requests, but task "
                        f"'{cfg.task}' has {pool}; choose --batches {pool // cfg.n_edits} or fewer (or --batches all)")
    return b


def check_sequential(cfg: RunConfig, n_batches: int, pool: int) -> None:
    """UserError for a --sequential T the pool cannot fill, or one combined with --batches."""
    t = cfg.sequential
    if t < 0:
        raise UserError(f"--sequential takes the number of successive batches (0: off), got {t}")
    if t and n_batches != 1:
        raise UserError("--sequential and --batches do not combine: --batches edits each batch from the unedited "
                        "model, --sequential keeps every batch's edit; choose one")
    if t * cfg.n_edits > pool:
        raise UserError(f"--sequential {t} of --edits {cfg.n_edits} needs {t * cfg.n_edits} evaluation requests, but "
                        f"task '{cfg.task}' has {pool}; choose --sequential {pool // cfg.n_edits} or fewer")


def check_placement(cfg: RunConfig, task_cls: type[Task]) -> None:
    """UserError, before any model loads, for an unknown --dtype or a --device-map the model cannot take."""
    if cfg.dtype not in DTYPES:
        raise UserError(f"unknown --dtype '{cfg.dtype}'; choices: {', '.join(DTYPES)}")
    dm = cfg.device_map
    if dm is None:
        return
    if dm not in DEVICE_MAP_STRATEGIES and dm != "cpu" and not re.fullmatch(r"cuda(:\d+)?", dm):
        raise UserError(f"unknown --device-map '{dm}'; choose {', '.join(DEVICE_MAP_STRATEGIES)} or a device "
                        "(cpu, cuda, cuda:N)")
    if cfg.model in MODEL_ALIASES:  # their loaders read a cache entry; they fit on one device anyway
        raise UserError(f"--device-map is for models loaded by from_pretrained (Hugging Face ids and folders); "
                        f"built-in model '{cfg.model}' fits on one device: use --device instead")
    if task_cls.kind != "lm":
        raise UserError(f"--device-map is for language models; task '{cfg.task}' needs a classifier (use --device)")


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


def _full_would_help(task: Task, role: str) -> bool:
    """Whether `role` ("train" or "eval") came from the shipped subset of a task that has full files."""
    return bool(getattr(task, "full_files", ())) and task.data_info.get(f"{role}_source") == "shipped"


def check_train_size(cfg: RunConfig, editor_cls: type[editors.Editor], hparams: Any, task: Task) -> None:
    """UserError, before any model loads, when a hypernetwork would meta-train on more edits per step than it has.

    Without this, meta-training quietly shrinks the step to the training requests there are
    (editors/meta.py), which is not the run asked for (e.g. 512 edits per step from the shipped 400).
    """
    if not editor_cls.meta_trains:
        return
    n_train = len(task.train_split())
    if n_train == 0:  # _run_phases says why (every training request overlapped the evaluation data)
        return
    m = getattr(hparams, "train_edits", None) or cfg.n_edits
    # schedule=select holds out min(n_val, N // 4) training requests for validation (editors/meta.py)
    held = min(getattr(hparams, "n_val", 0), n_train // 4) if getattr(hparams, "schedule", "") == "select" else 0
    usable = n_train - held
    if m <= usable:
        return
    src = task.data_info.get("train_source")
    what = {"shipped": "the shipped subset", "full": "the full data", "user": "--train-data",
            "hf": "--train-data"}.get(src or "", f"task '{cfg.task}'")
    if held:
        what += f", less {held} held out for validation"
    why = "train_edits unset, so --edits" if getattr(hparams, "train_edits", None) is None else "--set train_edits"
    more = " or --set source=full for the full data" if _full_would_help(task, "train") else ""
    raise UserError(f"editor '{cfg.editor}' would meta-train with {m} edits per step ({why}), but task '{cfg.task}' "
                    f"has {usable} training requests ({what}); give more training data (--train-data FILE{more}) "
                    f"or fewer edits per step (--set train_edits={usable})")


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
        if k.endswith("_path") and data_info.get(f"{role}_source") in ("user", "hf"):
            continue  # FileTask: eval_path / train_path of a user file or dataset (hf: its revision identifies it)
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
    """Loaded models keyed by (name, content identity, device, task kind, dtype, device map): a sweep loads each once."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str | None, str, str, str, str | None], EditableModel] = {}

    def get(self, res: Resolved, results_dir: Path, progress: Any) -> EditableModel:
        key = (res.cfg.model, res.config.get("model_id"), str(res.device), res.task.kind, res.cfg.dtype,
               res.cfg.device_map)
        if key not in self._models:
            ctx = LoadContext(res.cfg.model, results_dir, str(res.device), res.task.kind, res.cfg.seed, progress,
                              dtype=res.cfg.dtype, device_map=res.cfg.device_map)
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
    write: bool = True,
) -> tuple[dict[str, Any], bool]:
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
                    models: ModelCache | None, log: Any, write: bool = True) -> tuple[dict[str, Any], bool]:
    """The check -> run -> store part of `execute`, under the config's lock (store: only when `write`)."""
    append = store.append if write else (lambda _row: None)
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
        if (digest := em.info.get("weights_sha256")) is not None:  # built-in models (bench/models/pinned.py)
            row["model_sha256"] = digest
            if em.info.get("weights_reference") is False:
                log(f"note: built-in model '{cfg.model}' has weights sha256 {digest[:16]}..., not the reference "
                    "one: its numbers will not match published rows (docs/reproducibility.md)")
        phases = _run_phases(res, em, cache, progress, log)
        samples = phases.pop("samples", None)
        if samples is not None:  # --log-samples: beside the store, named by the run
            path = store.dir / "samples" / f"{row['run_id']}.jsonl"
            write_samples(path, samples)
            phases["samples_path"] = str(path)
        row.update(phases)
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
    devices = em.devices  # where the weights are: a device map may spread them over several GPUs
    with measure(devices) as prep:
        editor.prepare(train)
    opts = ExtraOptions(generation=cfg.generation, cf_scores=cfg.cf_scores, fluency=cfg.fluency)
    if cfg.sequential:
        seq = edit_in_sequence(editor, em, res.task.sample_batches(cfg.n_edits, cfg.sequential, cfg.seed), opts,
                               devices, lambda: set_seed(cfg.seed), cfg.log_samples)
        out = _phase_fields(res, editor, em, prep, seq.summary, seq.peak_measure, seq.first_info,
                            seq.samples if cfg.log_samples else None)
        out["times"]["pre_eval_s"] = out.pop("pre_eval_s")
        out["sequence"] = seq.steps
        return out
    batches = res.task.sample_batches(cfg.n_edits, res.config.get("batches", 1), cfg.seed)
    done, samples = [], []
    for b, requests in enumerate(batches):  # each batch is edited from the unedited model
        set_seed(cfg.seed)
        with measure(devices, interval_s=0.002) as ed:
            edit = editor.edit(requests)
            edit.check_finite()
        with measure(devices) as ev:
            pre, pre_x = evaluate_all(em, requests, opts)
            with edit.applied(em.model):
                post, post_x = evaluate_all(em, requests, opts)
        metrics = combine_all(pre, post, pre_x, post_x)
        done.append({"metrics": metrics, "edit_s": ed.seconds, "eval_s": ev.seconds,
                     "peak_mem_edit_bytes": ed.peak_bytes, "mean_residual": edit.mean_residual,
                     "edit_info": edit.info, "measure": ed})
        if cfg.log_samples:
            samples += sample_lines(b, requests, pre, post, pre_x, post_x)
    peak = max(done, key=lambda d: d["peak_mem_edit_bytes"] or 0)["measure"]
    return _phase_fields(res, editor, em, prep, _batch_summary(done), peak, done[0]["edit_info"],
                         samples if cfg.log_samples else None)


def _phase_fields(res: Resolved, editor: editors.Editor, em: EditableModel, prep: Any, summary: dict[str, Any],
                  peak: Any, edit_info: dict[str, Any], samples: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The row fields of the prepare/edit/evaluate phases, from the edit protocol's summary (one batch, --batches
    or --sequential); `samples` (--log-samples) are written by the caller, which knows the run id."""
    out = dict(summary)
    out.update({
        "times": {"prepare_s": prep.seconds, "edit_s": out.pop("edit_s"), "eval_s": out.pop("eval_s")},
        "peak_mem_prepare_bytes": prep.peak_bytes,
        "mem_kind": peak.mem_kind,
        **per_device_fields(prep, peak),
        "n_skipped_records": res.task.n_skipped,
        "info": {"prepare": editor.prepare_info(), "edit": edit_info, "model": em.info, "data": res.task.data_info},
    })
    if samples is not None:
        out["samples"] = samples
    return out


def _batch_summary(done: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch: its numbers as before. Several: the mean over batches, their std and each batch's numbers."""
    first = done[0]
    if len(done) == 1:
        return {"metrics": first["metrics"], "edit_s": first["edit_s"], "eval_s": first["eval_s"],
                "peak_mem_edit_bytes": first["peak_mem_edit_bytes"], "mean_residual": first["mean_residual"]}
    keys = list(first["metrics"])
    cols = {k: torch.tensor([d["metrics"][k] for d in done], dtype=torch.float64) for k in keys}
    peaks = [d["peak_mem_edit_bytes"] for d in done if d["peak_mem_edit_bytes"] is not None]
    res = [d["mean_residual"] for d in done if d["mean_residual"] is not None]
    return {
        "metrics": {k: float(v.mean()) for k, v in cols.items()},
        "metrics_std": {k: float(v.std(unbiased=True)) for k, v in cols.items()},
        "batches": [{k: d[k] for k in ("metrics", "edit_s", "eval_s", "peak_mem_edit_bytes", "mean_residual")}
                    for d in done],
        "edit_s": sum(d["edit_s"] for d in done) / len(done),  # per batch
        "eval_s": sum(d["eval_s"] for d in done) / len(done),
        "peak_mem_edit_bytes": max(peaks) if peaks else None,
        "mean_residual": sum(res) / len(res) if res else None,
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
        return plan(resolve(cfg, cache_dir if cache_dir is not None else results), results, cache_dir, force)
    row, _ = execute(cfg, results, force=force, log=log, cache_dir=cache_dir)
    return row
