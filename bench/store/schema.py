"""The row of the result store: its fields as a type (`Row`) and, beside it, their runtime check.

`Row` is what the runner builds and every reader (store, report, check, derive) gets. `ROW_SCHEMA`
checks each stored line at runtime: a line that breaks it (`row_problem` says how) is skipped by every
reader with one warning (bench/store/__init__.py). Every field of `Row` (and of its nested typed
parts) has a schema entry and every schema entry names a field of `Row` (tests/store/test_store.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypedDict


class Times(TypedDict, total=False):
    """Seconds of the phases; edit and eval are per batch with --batches or --sequential."""

    prepare_s: float
    edit_s: float
    eval_s: float
    pre_eval_s: float  # --sequential: the one evaluation of the unedited model


class Env(TypedDict, total=False):
    """Versions and hardware the run used (bench/runner/provenance.py)."""

    python: str
    torch: str
    transformers: str
    device: str
    threads: int | None
    cpu: dict[str, Any]
    git_commit: str | None
    git_dirty: bool | None


class RecordedConfig(TypedDict, total=False):
    """The resolved config as recorded and hashed (bench/runner/resolve.py); the optional keys only when not
    the default, so older rows keep their hashes."""

    editor: str
    model: str
    task: str
    n_edits: int
    seed: int
    device: str
    hparams: dict[str, Any]
    task_config: dict[str, Any]
    data: dict[str, Any] | None
    model_id: str
    dtype: str
    device_map: str
    batches: int
    sequential: int
    eval: dict[str, bool]


class Row(TypedDict, total=False):
    """One stored run. REQUIRED keys are in every row, OK_REQUIRED also in every `ok` one."""

    run_id: str
    started_at: str
    config: RecordedConfig
    config_hash: str
    editor: str
    model: str
    task: str
    n_edits: int
    seed: int
    env: Env
    status: str  # "ok" or "failed"
    error: str
    traceback: str
    model_sha256: str
    metrics: dict[str, float | None]
    metrics_std: dict[str, float | None] | None
    batches: list[dict[str, Any]] | None
    sequence: list[dict[str, Any]] | None
    times: Times
    peak_mem_prepare_bytes: int | None
    peak_mem_edit_bytes: int | None
    peak_mem_per_device: dict[str, Any]
    mem_kind: str
    mean_residual: float | None
    n_skipped_records: int
    info: dict[str, Any]
    samples_path: str

JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array",
              dict: "object"}


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# The row schema: every field that run, sweep, report, check and derive read, as a dotted path (`*`: each value
# of an object or item of an array) -> (what it must be, test). A path is checked only where its parent exists.
# REQUIRED paths must be present in every row, OK_REQUIRED also in an `ok` row; the rest only when present.
KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "int?": ("an integer or null", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool))),
    "num": ("a number", _num),
    "num?": ("a number or null", lambda v: v is None or _num(v)),
    "obj": ("an object", lambda v: isinstance(v, dict)),
    "obj?": ("an object or null", lambda v: v is None or isinstance(v, dict)),
    "list?": ("an array or null", lambda v: v is None or isinstance(v, list)),
    "any": ("anything", lambda v: True),  # a field of Row that no reader checks
}
ROW_SCHEMA: dict[str, str] = {
    "config": "obj", "config_hash": "str", "run_id": "str", "status": "str", "editor": "str", "model": "str",
    "task": "str", "n_edits": "int", "seed": "int",  # REQUIRED
    "metrics": "obj", "times": "obj",  # OK_REQUIRED
    "config.data": "obj?", "config.device": "str", "config.sequential": "int", "started_at": "str", "error": "str",
    "env": "obj", "env.threads": "int?", "info": "obj", "info.prepare": "obj?", "mem_kind": "str", "n_skipped_records": "int",
    "metrics.*": "num?", "metrics_std": "obj?", "metrics_std.*": "num?", "times.*": "num",
    "peak_mem_prepare_bytes": "num?", "peak_mem_edit_bytes": "num?", "mean_residual": "num?",
    "batches": "list?", "batches.*": "obj", "batches.*.metrics": "obj", "batches.*.metrics.*": "num?",
    "sequence": "list?", "sequence.*": "obj", "sequence.*.metrics": "obj", "sequence.*.metrics.*": "num?",
    "sequence.*.n_edited": "int", "sequence.*.first_batch": "obj",
    "traceback": "any", "model_sha256": "any", "peak_mem_per_device": "any", "samples_path": "any",
    "config.editor": "any", "config.model": "any", "config.task": "any", "config.n_edits": "any", "config.seed": "any",
    "config.hparams": "any", "config.task_config": "any", "config.model_id": "any", "config.dtype": "any",
    "config.device_map": "any", "config.batches": "any", "config.eval": "any",
    "env.python": "any", "env.torch": "any", "env.transformers": "any", "env.device": "any", "env.cpu": "any",
    "env.git_commit": "any", "env.git_dirty": "any",
}
REQUIRED = ("config", "config_hash", "run_id", "status", "editor", "model", "task", "n_edits", "seed")
OK_REQUIRED = ("metrics", "times")


def _at(row: Row | dict[str, Any], path: str) -> Iterator[tuple[str, Any]]:
    """(concrete path, value) for every value at a dotted schema path that exists in `row`."""
    found: list[tuple[str, Any]] = [("", row)]
    for part in path.split("."):
        nxt = []
        for where, v in found:
            if part == "*":
                items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
                nxt += [(f"{where}.{k}" if where else str(k), x) for k, x in items]
            elif isinstance(v, dict) and part in v:
                nxt.append((f"{where}.{part}" if where else part, v[part]))
        found = nxt
    return iter(found)


def row_problem(row: Row | dict[str, Any]) -> str:
    """"" for a row every reader can use, else what is wrong with it (the first field that breaks ROW_SCHEMA)."""
    need = REQUIRED + (OK_REQUIRED if row.get("status") == "ok" else ())
    if missing := [k for k in need if k not in row]:
        return f"is not a row (missing: {', '.join(missing)})"
    for path, kind in ROW_SCHEMA.items():
        what, test = KINDS[kind]
        for where, v in _at(row, path):
            if not test(v):
                got = JSON_TYPES.get(type(v), type(v).__name__)
                return f"is not a row ({where} must be {what}, got {got} {v!r:.30})"
    return ""
