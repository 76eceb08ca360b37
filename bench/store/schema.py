"""The row schema of the result store: the fields every reader uses and their JSON types.

A stored line that breaks it (`row_problem` says how) is skipped by every reader with one warning
(bench/store/__init__.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

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
}
REQUIRED = ("config", "config_hash", "run_id", "status", "editor", "model", "task", "n_edits", "seed")
OK_REQUIRED = ("metrics", "times")


def _at(row: dict[str, Any], path: str) -> Iterator[tuple[str, Any]]:
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


def row_problem(row: dict[str, Any]) -> str:
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
