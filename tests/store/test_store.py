"""Result store: locked appends, corrupt-line tolerance, lookup of ok rows."""

import json
import multiprocessing as mp

import pytest

from bench.core.config import parse_sets, stable_hash
from bench.store import ResultStore


def row(config_hash: str, status: str = "ok", **extra) -> dict:
    """A minimal row with the fields every reader relies on (others are skipped as not rows)."""
    ok = {"metrics": {}, "times": {}} if status == "ok" else {}
    return {"config": {}, "config_hash": config_hash, "status": status, "run_id": config_hash, "editor": "ft",
            "model": "m", "task": "t", "n_edits": 1, "seed": 0, **ok, **extra}


def _writer(path: str, k: int) -> None:
    store = ResultStore(path)
    for i in range(50):
        store.append({"config_hash": f"h{k}-{i}", "status": "ok", "pad": "x" * 5000})


def test_concurrent_appends_never_interleave(tmp_path):
    procs = [mp.get_context("fork").Process(target=_writer, args=(str(tmp_path), k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 200
    assert len({json.loads(line)["config_hash"] for line in lines}) == 200


@pytest.mark.filterwarnings("ignore:.*not valid JSON")
def test_partial_last_line_is_isolated_and_skipped(tmp_path):
    store = ResultStore(tmp_path)
    store.append(row("a"))
    with open(store.path, "a") as f:  # a writer killed mid-line
        f.write('{"config_hash": "b", "sta')
    store.append(row("c"))
    rows = list(store.rows())
    assert [r["config_hash"] for r in rows] == ["a", "c"]
    assert store.path.read_text().startswith('{"config": {}, "config_hash": "a"')


def test_find_ok_ignores_failed_rows_and_returns_newest(tmp_path):
    store = ResultStore(tmp_path)
    store.append(row("h", "failed", run_id="1"))
    assert store.find_ok("h") is None
    store.append(row("h", run_id="2"))
    store.append(row("h", run_id="3"))
    assert store.find_ok("h")["run_id"] == "3"


def test_stable_hash_ignores_key_order_and_parse_sets():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert parse_sets(["lr=1e-3", "shift = sum"]) == {"lr": "1e-3", "shift": "sum"}


def test_the_row_type_and_the_runtime_schema_name_the_same_fields():
    from typing import get_type_hints, is_typeddict

    from bench.store.schema import OK_REQUIRED, REQUIRED, ROW_SCHEMA, Row

    def paths(td: type, prefix: str = "") -> dict[str, type]:
        out = {}
        for k, t in get_type_hints(td).items():
            out[prefix + k] = t
            if is_typeddict(t):
                out.update(paths(t, f"{prefix}{k}."))
        return out

    typed = paths(Row)
    for path in typed:  # every field of Row, and of its typed parts, is checked (or marked "any")
        parent, _, _ = path.rpartition(".")
        assert path in ROW_SCHEMA or (parent and f"{parent}.*" in ROW_SCHEMA), path
    for path in ROW_SCHEMA:  # every schema path names a field of Row (below an untyped field: anything)
        t: type = Row
        for part in path.split("."):
            if not is_typeddict(t) or part == "*":
                break
            hints = get_type_hints(t)
            assert part in hints, path
            t = hints[part]
    assert set(REQUIRED) | set(OK_REQUIRED) <= set(typed)
