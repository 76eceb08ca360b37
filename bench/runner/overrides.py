"""`--set key=value`: which keys go to the task config, which to the editor's hyperparameters.

The one place that splits overrides; the runner (`resolve`), the sweep (`editor.key=value`), the
threshold files of `bench check` and the tuning tools all use it. Imports nothing heavy: it takes the
task and editor classes (or, for the sweep, looks the names up lazily).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

V = TypeVar("V")

# Task-config fields that are not a choice of the run's variant: the data files are identified by content
# (`source`, shipped or full, is not even stored: the runner records the files it chose), and skipping bad
# records is recorded in the row.
TASK_IO_FIELDS = ("data", "train_data", "skip_bad", "source")


def task_keys(task_cls: type) -> list[str]:
    """The `--set` keys of a task: the fields of its `config_cls`, in declaration order."""
    return [f.name for f in dataclasses.fields(task_cls.config_cls)]


def editor_keys(editor_cls: type) -> list[str]:
    """The `--set` keys of an editor: the fields of its `hparams_cls`, in declaration order."""
    return [f.name for f in dataclasses.fields(editor_cls.hparams_cls)]


def split_overrides(task_cls: type, editor_cls: type,
                    overrides: Mapping[str, V]) -> tuple[dict[str, V], dict[str, V], list[str]]:
    """(task overrides, editor overrides, unknown keys): a key that is a task-config field goes to the task,
    every other key to the editor; `unknown` (sorted) are the editor keys that are not hyperparameters."""
    tkeys, ekeys = set(task_keys(task_cls)), set(editor_keys(editor_cls))
    task_over = {k: v for k, v in overrides.items() if k in tkeys}
    editor_over = {k: v for k, v in overrides.items() if k not in tkeys}
    return task_over, editor_over, sorted(k for k in editor_over if k not in ekeys)


def per_editor(overrides: Mapping[str, str], editors: Sequence[str]) -> dict[str, dict[str, str]]:
    """A sweep's per-editor `--set` dicts from plain keys (every editor) and "editor.key" keys (that editor only);
    ValueError for "name.key" where name is not one of `editors`."""
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


def check_plain_sets(overrides: Mapping[str, Any], editors: Sequence[str], task: str) -> None:
    """ValueError for a plain `--set key=value` that only some of the sweep's editors have, naming the `editor.key` form."""
    import tasks
    from editors import EDITORS

    if task not in tasks.TASKS or any(e not in EDITORS for e in editors):
        return  # the unknown name is reported by `resolve`
    for k, v in overrides.items():
        if "." in k:
            continue
        having = [e for e in editors if not split_overrides(tasks.TASKS[task], EDITORS[e], {k: v})[2]]
        if having and len(having) < len(editors):
            lacking = [e for e in editors if e not in having]
            forms = " ".join(f"--set {e}.{k}={v}" for e in having)
            raise ValueError(f"--set {k}={v}: only {', '.join(having)} of the sweep's editors have '{k}' "
                             f"({', '.join(lacking)} do{'es' if len(lacking) == 1 else ''} not); give it as {forms}, "
                             "which applies to that editor's cells only")
