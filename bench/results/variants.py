"""Variants of a stored run: what in its config differs from the editor's and task's defaults.

Reports group runs by `variant_key` (the config without seed and number of edits), label them by
`variant_diff` (e.g. "malmen (shift=sum)"), and `bench check` selects rows by the same diff, so an
ablation or a different data file is never mixed with the default configuration.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from bench.core.config import canonical_json, stable_hash
from bench.runner.overrides import TASK_IO_FIELDS  # task-config fields that are not a choice of the variant


def _plain(obj: Any) -> Any:
    """JSON round trip, so tuples from dataclasses compare equal to lists read from the store."""
    return json.loads(canonical_json(obj))


def editor_defaults(editor: str, model: str) -> dict[str, Any] | None:
    """The hparams a run of `editor` on `model` gets without `--set` (paper defaults + per-model file)."""
    import editors
    from editors.base import hparams_from, model_defaults

    cls = editors.EDITORS.get(editor)
    if cls is None:
        return None
    try:
        return _plain(dataclasses.asdict(hparams_from(cls.hparams_cls, {}, model_defaults(editor, model))))
    except (TypeError, ValueError, KeyError):
        return None


def task_defaults(task: str) -> dict[str, Any] | None:
    """The task config a run gets without `--set`, minus the data-file fields."""
    import tasks

    cls = tasks.TASKS.get(task)
    if cls is None:
        return None
    d = _plain(dataclasses.asdict(cls.config_cls()))
    return {k: v for k, v in d.items() if k not in TASK_IO_FIELDS}


def variant_diff(config: dict[str, Any]) -> dict[str, Any]:
    """The hparams and task-config values of a stored config that differ from the defaults.

    Keys are `--set` names; a task field the stored config lacks (added since) is reported as None.
    When the editor or task is no longer registered the defaults are unknown;
    then the whole hparams dict is returned under the key "hparams#" + its hash, so it still separates.
    """
    out: dict[str, Any] = {}
    hp = _plain(config.get("hparams", {}))
    dflt = editor_defaults(config["editor"], config["model"])
    if dflt is None:
        out["hparams#"] = stable_hash(hp, 8)
    else:
        out.update({k: v for k, v in hp.items() if dflt.get(k, object()) != v})
        # A hyperparameter added since the row was stored: the row ran without it (e.g. MALMEN rows from
        # before `block` and `loss_norm`), so it is not today's default configuration either.
        out.update({k: None for k in dflt if k not in hp})
    tc = {k: v for k, v in _plain(config.get("task_config", {})).items() if k not in TASK_IO_FIELDS}
    tdflt = task_defaults(config["task"])
    if tdflt is None:
        out["task_config#"] = stable_hash(tc, 8)
    else:
        out.update({k: v for k, v in tc.items() if tdflt.get(k, object()) != v})
        # A field added to the task since the row was stored: the row ran without it, so it is not
        # the default configuration of today (e.g. synthetic rows from before `locality` existed).
        out.update({k: None for k in tdflt if k not in tc})
    return out


def fmt_value(v: Any) -> str:
    """A `--set`-style rendering of one value."""
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def variant_label(editor: str, diff: dict[str, Any]) -> str:
    """"editor" or "editor (k=v, ...)" with keys sorted."""
    if not diff:
        return editor
    return f"{editor} ({', '.join(f'{k}={fmt_value(diff[k])}' for k in sorted(diff))})"


def data_id(config: dict[str, Any]) -> str:
    """Short identity of the data a run used: the evaluation file's sha256 prefix, else a hash of its description."""
    data = config.get("data") or {}
    shas = [str(data[k])[:8] for k in sorted(data) if k.endswith("sha256") and data[k]]
    return "+".join(shas) if shas else stable_hash(data, 8)


def without(config: dict[str, Any], *keys: str) -> dict[str, Any]:
    """A shallow copy of `config` without `keys`."""
    return {k: v for k, v in config.items() if k not in keys}


def variant_key(config: dict[str, Any]) -> str:
    """Hash of everything but seed and number of edits: rows with the same key are one curve."""
    return stable_hash(without(config, "seed", "n_edits"))


def cell_key(config: dict[str, Any]) -> str:
    """Hash of everything but the seed: rows with the same key are seeds of one measurement."""
    return stable_hash(without(config, "seed"))


def matches_set(config: dict[str, Any], want: dict[str, Any]) -> bool:
    """Whether the run is what `--set want` gives now: its variant diff equals `want` minus default values."""
    diff = variant_diff(config)
    dflt = {**(editor_defaults(config["editor"], config["model"]) or {}), **(task_defaults(config["task"]) or {})}
    want = {k: v for k, v in want.items() if not (k in dflt and _same(dflt[k], v))}
    return diff.keys() == want.keys() and all(_same(diff[k], want[k]) for k in diff)


def _same(stored: Any, wanted: Any) -> bool:
    """Equal as values, as numbers (so "1e-6" matches 1e-06) or as `--set` text."""
    if stored == wanted or fmt_value(stored) == fmt_value(wanted):
        return True
    try:
        return not isinstance(stored, bool) and float(stored) == float(wanted)
    except (TypeError, ValueError):
        return False
