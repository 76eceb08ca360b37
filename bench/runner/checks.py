"""Input checks that need no model: names, kinds, seed, depth, batches, --sequential, placement, training size.

Each raises `UserError` with the whole message; `resolve` (bench/runner/resolve.py) calls them before
any model loads, and `require_kind` once the model is loaded.
"""

from __future__ import annotations

import re
from typing import Any

import torch

import editors
from bench.core.config import RunConfig
from bench.models import DEVICE_MAP_STRATEGIES, DTYPES, KIND_NAMES, MODEL_ALIASES, EditableModel, alias_typo
from bench.runner.depth import model_depth
from bench.runner.errors import UserError
from editors.base import seq2seq_refusal
from tasks.base import Task


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
    more = " or --set source=full for the full data" if full_would_help(task, "train") else ""
    raise UserError(f"editor '{cfg.editor}' would meta-train with {m} edits per step ({why}), but task '{cfg.task}' "
                    f"has {usable} training requests ({what}); give more training data (--train-data FILE{more}) "
                    f"or fewer edits per step (--set train_edits={usable})")


def full_would_help(task: Task, role: str) -> bool:
    """Whether `role` ("train" or "eval") came from the shipped subset of a task that has full files."""
    return bool(getattr(task, "full_files", ())) and task.data_info.get(f"{role}_source") == "shipped"


def require_kind(em: EditableModel, task: Task, model_name: str, task_name: str) -> None:
    """UserError unless the model's kind (causal LM or classifier) is the one the task needs."""
    if task.kind != em.kind:
        raise UserError(f"model '{model_name}' is a {KIND_NAMES[em.kind]}, but task '{task_name}' needs a "
                        f"{KIND_NAMES[task.kind]}")
