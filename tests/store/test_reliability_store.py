"""Reliability of the result store: no lost or half rows, usable folders checked first, one run per config
at a time, damaged lines skipped, user text printed literally. No model is needed: `execute` runs with a
stand-in model (`ModelCache.get`) and fixed phase results (`_run_phases`)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import bench.runner.model_cache
import bench.runner.phases
import bench.runner.provenance
from bench.cli import app
from bench.core.config import RunConfig
from bench.executors.sweep import grid, run_sweep
from bench.runner.run import execute
from bench.store import ResultStore, StoreWriteError

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
METRICS = ("es", "gs", "ls", "ls_agree", "es_seq", "gs_seq", "ls_seq",
           "pre_es", "pre_gs", "pre_ls", "pre_es_seq", "pre_gs_seq", "pre_ls_seq")
PHASES = {"metrics": {k: (0.0 if k.startswith("pre_") else 1.0) for k in METRICS},
          "times": {"prepare_s": 0.0, "edit_s": 0.01, "eval_s": 0.0}, "peak_mem_prepare_bytes": 1,
          "peak_mem_edit_bytes": 1, "mem_kind": "rss", "mean_residual": None, "n_skipped_records": 0,
          "info": {"prepare": {}, "edit": {}, "model": {}, "data": {}}}
BASE = {"editor": "ft", "model": "tiny-gpt2", "task": "synthetic", "device": "cpu"}
RUN = ["run", "--editor", "ft", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "4", "--device", "cpu"]
SWEEP = ["sweep", "--editors", "ft", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "4,8",
         "--device", "cpu"]


@pytest.fixture
def fake_runs(monkeypatch):
    """`execute` without a model; returns the list of config hashes whose phases ran (and a settable delay)."""
    calls: list[str] = []
    state = SimpleNamespace(calls=calls, delay=0.0, log_line=None)

    def phases(res, em, cache, progress, log):
        calls.append(res.config_hash)
        if state.log_line:
            log(state.log_line)
        time.sleep(state.delay)
        return copy.deepcopy(PHASES)

    monkeypatch.setattr(bench.runner.phases, "run_phases", phases)
    monkeypatch.setattr(bench.runner.model_cache.ModelCache, "get",
                        lambda self, res, *a, **k: SimpleNamespace(kind=res.task.kind, key="fake", info={}))
    monkeypatch.setattr(bench.runner.provenance, "environment", lambda device: {"threads": 1})
    return state


def cli(*args: str):
    return runner.invoke(app, list(args))


def one_line_error(r, *needles: str, code: int = 2) -> None:
    """Exit `code`, a one-line `error:` naming every needle literally, and no traceback."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.output
    for n in needles:
        assert n in lines[0], (n, r.output)
    assert "Traceback" not in r.output


def good_rows(d: Path, seeds=(0, 1), m: int = 4) -> list[dict]:
    """The stored rows of real configs (ft on tiny-gpt2 / synthetic) run by `execute` with fake phases."""
    ids = [execute(RunConfig(n_edits=m, seed=s, **BASE), d, log=lambda s: None)[0]["run_id"] for s in seeds]
    return [r for r in ResultStore(d).rows() if r["run_id"] in ids]


# ---------------------------------------------------------------- 1. rows are written whole or the command fails


def test_append_writes_every_byte_when_the_os_writes_a_few_at_a_time(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    row = {"config": {}, "config_hash": "h", "status": "failed", "run_id": "r", "editor": "ft", "model": "m",
           "task": "t", "n_edits": 1, "seed": 0, "pad": "x" * 300}
    store.append(row)
    store.append(row)
    monkeypatch.undo()
    assert list(store.rows()) == [row, row]


FSIZE_SCRIPT = """
import json, sys, types
import bench.runner.model_cache, bench.runner.phases, bench.runner.provenance
bench.runner.phases.run_phases = lambda *a, **k: json.loads(sys.argv[1])
bench.runner.model_cache.ModelCache.get = lambda self, res, *a, **k: types.SimpleNamespace(kind=res.task.kind, key="fake", info={})
bench.runner.provenance.environment = lambda device: {"pad": "x" * 4000}
from bench.cli import app
app(sys.argv[2:])
"""


def test_run_whose_row_hits_the_file_size_limit_exits_1_and_the_store_stays_clean(tmp_path, fake_runs):
    first = good_rows(tmp_path, seeds=(0,))[0]
    limit = ResultStore(tmp_path).path.stat().st_size + 100  # the next row is written only in part

    def limited() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then returns short / fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = [*RUN, "--seed", "1", "--results", str(tmp_path)]
    p = subprocess.run([sys.executable, "-c", FSIZE_SCRIPT, json.dumps(PHASES), *args], capture_output=True,
                       text=True, timeout=120, preexec_fn=limited, cwd=REPO)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    error = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and str(tmp_path / "runs.jsonl") in error[0], p.stderr[-3000:]
    store = ResultStore(tmp_path)
    assert store.path.stat().st_size <= limit
    assert list(store.rows()) == [first]
    second = good_rows(tmp_path, seeds=(1,))[0]  # no limit now: the next row lands whole on its own line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(store.rows()) == [first, second]


@pytest.mark.filterwarnings("ignore:.* line 2 is not valid JSON")
def test_next_append_after_a_partial_line_starts_on_a_fresh_line(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    row = {"config": {}, "config_hash": "a", "status": "failed", "run_id": "1", "editor": "ft", "model": "m",
           "task": "t", "n_edits": 1, "seed": 0}
    store.append(row)
    real_write = os.write
    calls = []

    def disk_full(fd, data):
        calls.append(1)
        if len(calls) == 1:
            return real_write(fd, bytes(data[:10]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(StoreWriteError, match=str(store.path)):
        store.append({**row, "run_id": "2"})
    monkeypatch.undo()
    with open(store.path, "ab") as f:  # a writer killed mid-line (no chance to clean up)
        f.write(b'{"config_hash": "b", "sta')
    store.append({**row, "run_id": "3"})
    assert [r["run_id"] for r in store.rows()] == ["1", "3"]
    assert store.path.read_bytes().endswith(b"\n")


def test_sweep_stops_with_exit_1_when_a_row_cannot_be_stored(tmp_path, fake_runs, monkeypatch):
    real_write = os.write

    def full_disk(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("runs.jsonl"):
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    one_line_error(cli(*SWEEP, "--results", str(tmp_path)), str(tmp_path / "runs.jsonl"), "No space left", code=1)
    assert len(fake_runs.calls) == 1  # the later cells would have lost their rows too


# ---------------------------------------------------------------- 1. folders are checked before anything runs


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (root ignores permission bits; /sys refuses it too)."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    d = Path("/sys/kernel")
    try:
        os.close(os.open(d / "editbench-probe", os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError:
        return d
    os.unlink(d / "editbench-probe")
    pytest.skip("no folder that refuses writes to root here")


@pytest.fixture(params=["a file", "below a file", "unwritable"])
def bad_dir(request, tmp_path) -> Path:
    f = tmp_path / "file"
    f.write_text("not a folder")
    return {"a file": f, "below a file": f / "sub", "unwritable": unwritable_dir(tmp_path)}[request.param]


def test_run_with_an_unusable_results_folder_fails_before_running(tmp_path, bad_dir, fake_runs):
    one_line_error(cli(*RUN, "--results", str(bad_dir)), str(bad_dir))
    one_line_error(cli(*RUN, "--results", str(tmp_path / "ok"), "--cache-dir", str(bad_dir)), str(bad_dir))
    assert fake_runs.calls == []


def test_sweep_with_an_unusable_results_folder_fails_before_the_first_cell(tmp_path, bad_dir, fake_runs):
    one_line_error(cli(*SWEEP, "--results", str(bad_dir)), str(bad_dir))
    one_line_error(cli(*SWEEP, "--results", str(tmp_path / "ok"), "--cache-dir", str(bad_dir)), str(bad_dir))
    assert fake_runs.calls == []
    ran = []
    with pytest.raises(Exception, match=str(bad_dir)):
        run_sweep(grid(["ft"], [4], [0], model="tiny-gpt2", task="synthetic", device="cpu"), bad_dir,
                  show_progress=False, run=lambda *a, **k: ran.append(1))
    assert ran == []


def test_report_with_an_unusable_out_folder_fails_before_rendering(tmp_path, bad_dir, fake_runs, monkeypatch):
    import bench.results.report.document

    good_rows(tmp_path / "store")
    monkeypatch.setattr(bench.results.report.document, "figures", lambda *a: pytest.fail("rendered before checking --out"))
    one_line_error(cli("report", "--results", str(tmp_path / "store"), "--out", str(bad_dir)), str(bad_dir))


def test_report_and_check_with_an_unreadable_store_fail_clearly(tmp_path):
    (tmp_path / "runs.jsonl").mkdir()  # the store path exists but cannot be read as a file
    one_line_error(cli("report", "--results", str(tmp_path), "--out", str(tmp_path / "out")),
                   str(tmp_path / "runs.jsonl"))
    th = tmp_path / "th.toml"
    th.write_text('[[threshold]]\ntask = "synthetic"\nmodel = "tiny-gpt2"\neditor = "ft"\nedits = 4\n'
                  "min = { es = 0.5 }\n")
    one_line_error(cli("check", "--thresholds", str(th), "--results", str(tmp_path)), str(tmp_path / "runs.jsonl"))
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(cli("report", "--results", str(f), "--out", str(tmp_path / "out")), str(f))


def test_keys_with_an_unusable_cache_folder_fails_before_loading_the_model(bad_dir, monkeypatch):
    import bench.models

    monkeypatch.setattr(bench.models, "load_model", lambda ctx: pytest.fail("model loaded before the check"))
    one_line_error(cli("keys", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "4", "--device", "cpu",
                       "--results", str(bad_dir)), str(bad_dir))


def test_derive_to_an_unwritable_out_file_fails_clearly(tmp_path, bad_dir, fake_runs):
    good_rows(tmp_path / "campaign", seeds=(0, 1, 2), m=64)  # 64 probes: a bound derive accepts
    out = bad_dir / "thresholds.toml"
    one_line_error(cli("derive", "--results", str(tmp_path / "campaign"), "--out", str(out)), str(out))


# ---------------------------------------------------------------- 1. one run of a config at a time


def test_two_identical_runs_at_once_compute_and_store_once(tmp_path, fake_runs):
    fake_runs.delay = 0.5
    cfg = RunConfig(n_edits=4, seed=0, **BASE)
    logs: list[str] = []
    out: list[tuple[dict, bool]] = []
    threads = [threading.Thread(target=lambda: out.append(execute(cfg, tmp_path, log=logs.append)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_runs.calls) == 1
    assert sorted(skipped for _, skipped in out) == [False, True]
    assert out[0][0]["run_id"] == out[1][0]["run_id"]
    assert len(list(ResultStore(tmp_path).rows())) == 1
    assert any("waiting" in s for s in logs), logs
    assert (tmp_path / "locks").is_dir()


def test_two_identical_sweeps_at_once_run_each_cell_once(tmp_path, fake_runs):
    fake_runs.delay = 0.3
    cfgs = grid(["ft"], [4, 8], [0], model="tiny-gpt2", task="synthetic", device="cpu")
    results: list[list] = []
    threads = [threading.Thread(target=lambda: results.append(run_sweep(cfgs, tmp_path, show_progress=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(fake_runs.calls) == sorted({r.row["config_hash"] for rs in results for r in rs})
    assert len(fake_runs.calls) == 2
    assert len(list(ResultStore(tmp_path).rows())) == 2


# ---------------------------------------------------------------- 3. damaged lines are skipped, one warning each


BAD_LINES = [b"null", b"123", b"[1, 2]", b'"text"', b"{}", b'{"config_hash": "x", "status": "ok"}',
             b'{"config": {}, "status": "ok"}', b'{"config_hash": "\xff", "config": {}}', b'{"config_hash": "tru']


def damage(store: ResultStore) -> list[int]:
    """Append the bad lines between two good ones; returns their line numbers."""
    good = store.path.read_bytes().splitlines()
    lines = [good[0], *BAD_LINES, *good[1:]]
    store.path.write_bytes(b"\n".join(lines) + b"\n")
    return list(range(2, 2 + len(BAD_LINES)))


def test_rows_skip_every_damaged_line_with_one_warning_naming_file_and_line(tmp_path, fake_runs):
    rows = good_rows(tmp_path)
    store = ResultStore(tmp_path)
    bad = damage(store)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert list(store.rows()) == rows
    assert len(w) == len(bad), [str(x.message) for x in w]
    for x, n in zip(w, bad, strict=True):
        assert f"{store.path}: line {n} " in str(x.message)


def test_one_bad_byte_loses_only_its_line(tmp_path, fake_runs):
    rows = good_rows(tmp_path, seeds=(0, 1, 2))
    store = ResultStore(tmp_path)
    lines = store.path.read_bytes().splitlines()
    lines[1] = lines[1].replace(b'"ft"', b'"f\xe9t"', 1)  # a Latin-1 byte in the middle of line 2
    store.path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.warns(UserWarning, match="line 2 is not valid UTF-8"):
        assert list(store.rows()) == [rows[0], rows[2]]


@pytest.mark.filterwarnings("ignore:.* line \\d+ ")
def test_run_sweep_report_check_and_derive_work_on_a_damaged_store(tmp_path, fake_runs):
    rows = good_rows(tmp_path)
    damage(ResultStore(tmp_path))
    r = cli(*RUN, "--seed", "0", "--results", str(tmp_path))
    assert r.exit_code == 0 and "skipped" in r.output, r.output
    r = cli(*RUN, "--seed", "2", "--results", str(tmp_path))
    assert r.exit_code == 0, r.output
    r = cli(*SWEEP, "--seeds", "0,1", "--results", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert len(fake_runs.calls) == 2 + 1 + 2  # the m=8 cells ran, the m=4 ones were skipped
    r = cli("report", "--results", str(tmp_path), "--out", str(tmp_path / "report"))
    assert r.exit_code == 0, (r.output, r.exception)
    assert rows[0]["run_id"][:8] in (tmp_path / "report" / "runs.csv").read_text()
    th = tmp_path / "th.toml"
    th.write_text('[[threshold]]\ntask = "synthetic"\nmodel = "tiny-gpt2"\neditor = "ft"\nedits = 4\n'
                  "min = { es = 0.5 }\n")
    r = cli("check", "--thresholds", str(th), "--results", str(tmp_path))
    assert r.exit_code == 0, (r.output, r.exception)
    r = cli("derive", "--results", str(tmp_path), "--min-runs", "9")
    assert r.exit_code == 1 and "no cell has 9 or more ok runs" in r.output, (r.output, r.exception)


# ---------------------------------------------------------------- 6. user text is printed literally


def test_markup_in_editor_and_data_names_is_printed_literally(tmp_path):
    one_line_error(cli(*RUN, "--editor", "[/b]", "--results", str(tmp_path)), "unknown editor '[/b]'")
    one_line_error(cli(*RUN, "--task", "zsre", "--data", "run[red]2.json", "--results", str(tmp_path)),
                   "run[red]2.json")
    one_line_error(cli(*SWEEP, "--editors", "ft,[/b]", "--results", str(tmp_path)), "'[/b]'")


def test_markup_in_a_model_name_is_printed_literally_by_run_and_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_error(cli(*RUN, "--model", "foo[/x]", "--results", str(tmp_path)), "foo[/x]")
    r = cli(*SWEEP, "--model", "foo[/x]", "--results", str(tmp_path))
    assert r.exit_code == 2, (r.output, r.exception)  # both cells failed on the model, nothing stored
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.output.count("model 'foo[/x]'") >= 2, r.output


def test_log_lines_and_paths_are_printed_literally(tmp_path, fake_runs):
    fake_runs.log_line = "[meta] step 1 [/b] done"
    d = tmp_path / "res[red]ults"
    r = cli(*RUN, "--results", str(d))
    assert r.exit_code == 0 and "[meta] step 1 [/b] done" in r.output, (r.output, r.exception)
    r = cli(*SWEEP, "--results", str(d), "--force")
    assert r.exit_code == 0 and r.output.count("[meta] step 1 [/b] done") == 2, (r.output, r.exception)
    one_line_error(cli("check", "--thresholds", str(tmp_path / "th[red]s.toml"), "--results", str(d)),
                   "th[red]s.toml")
    one_line_error(cli("derive", "--results", str(tmp_path / "x[/b]")), "x[/b]")  # no such folder: bad input
    r = cli("report", "--results", str(d), "--out", str(tmp_path / "out[/b]"))
    assert r.exit_code == 0 and "out[/b]" in r.output.replace("\n", ""), (r.output, r.exception)
