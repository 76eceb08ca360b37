"""Bad input that used to get through: wrong-typed stored rows, derive/check arguments and bounds, duplicate
and oversized data, FIFOs, broken statistics sidecars, a cache subfolder that is a file, Ctrl-C, a full disk
while reporting, and control characters in names. Each is a one-line error (or a documented skip) before any
work, and no stored result is lost. No model is needed except a random 2-layer GPT-2 for the statistics."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from bench.store import ResultStore, parse_row
from tests.store import test_reliability_store as store_tests
from tests.store.test_reliability_store import PHASES, REPO, RUN, SWEEP, cli, good_rows, one_line_error
from tests.tasks.test_tasks_data import write_jsonl, zsre_rec

fake_runs = store_tests.fake_runs  # the fixture: `execute` with a stand-in model and fixed phase results

# ---------------------------------------------------------------- 1. rows of the wrong types are skipped

WRONG = [("metrics", "es", {"a": 1}), ("metrics", "es", "0.9"), ("metrics", "gs", True), ("times", "edit_s", "3"),
         (None, "n_edits", True), (None, "seed", 1.5), (None, "config", []), (None, "mean_residual", "x"),
         ("env", "threads", "2"), (None, "status", 1)]


def wrong_rows(good: dict) -> list[bytes]:
    out = []
    for parent, key, value in WRONG:
        row = json.loads(json.dumps(good))
        (row[parent] if parent else row)[key] = value
        row["run_id"] = f"bad-{len(out)}"
        out.append(json.dumps(row).encode())
    return out


@pytest.mark.parametrize("k", range(len(WRONG)))
def test_a_wrong_typed_field_makes_a_line_no_row_and_says_which(tmp_path, fake_runs, k):
    good = good_rows(tmp_path, seeds=(0,))[0]
    row, why = parse_row(wrong_rows(good)[k])
    parent, key, _ = WRONG[k]
    assert row is None and (f"{parent}.{key}" if parent else key) in why, why
    assert parse_row(json.dumps(good).encode())[0] == good


def test_report_check_and_derive_skip_wrong_typed_rows_with_a_warning(tmp_path, fake_runs):
    rows = good_rows(tmp_path, seeds=(0, 1, 2))
    store = ResultStore(tmp_path)
    clean = store.path.read_bytes()
    store.path.write_bytes(clean + b"\n".join(wrong_rows(rows[0])) + b"\n")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert list(store.rows()) == rows
    assert len(w) == len(WRONG) and all("is not a row (" in str(x.message) for x in w)
    out = tmp_path / "report"
    r = cli("report", "--results", str(tmp_path), "--out", str(out))
    assert r.exit_code == 0 and "3 ok runs" in r.output, (r.output, r.exception)
    assert "bad-" not in (out / "runs.csv").read_text()
    th = tmp_path / "th.toml"
    th.write_text('[[threshold]]\ntask = "synthetic"\nmodel = "tiny-gpt2"\neditor = "ft"\nedits = 4\n'
                  "min = { es = 0.5 }\nmax = { edit_s = 10 }\n")
    r = cli("check", "--thresholds", str(th), "--results", str(tmp_path))
    assert r.exit_code == 0, (r.output, r.exception)
    r = cli("derive", "--results", str(tmp_path))  # reads the 3 good rows: m = 4 probes are too few to gate
    assert r.exit_code == 1 and "an editor that does nothing would pass" in r.output, (r.output, r.exception)
    assert isinstance(r.exception, SystemExit), repr(r.exception)


def test_a_null_metric_is_a_row_but_derive_leaves_it_out(tmp_path, fake_runs):
    rows = good_rows(tmp_path, seeds=(0, 1, 2))
    odd = json.loads(json.dumps(rows[0]))
    odd["metrics"]["es"], odd["run_id"] = None, "null-es"
    store = ResultStore(tmp_path)
    store.append(odd)
    assert [r["run_id"] for r in store.rows()][-1] == "null-es"
    r = cli("derive", "--results", str(tmp_path), "--min-runs", "4")
    assert r.exit_code == 1 and "no cell has 4 or more ok runs" in r.output, (r.output, r.exception)


# ---------------------------------------------------------------- 2. derive / check arguments and bounds


def test_derive_with_a_missing_header_or_results_folder_is_bad_input(tmp_path, fake_runs):
    good_rows(tmp_path, seeds=(0, 1, 2))
    one_line_error(cli("derive", "--results", str(tmp_path), "--header", str(tmp_path / "head.txt")),
                   "--header", "head.txt")
    one_line_error(cli("derive", "--results", str(tmp_path / "nope")), "--results", "nope", "no such folder")
    one_line_error(cli("derive", "--results", str(tmp_path), "--results", str(tmp_path / "runs.jsonl")),
                   "not a folder")


def test_check_with_a_missing_results_folder_is_bad_input(tmp_path):
    th = tmp_path / "th.toml"
    th.write_text('[[threshold]]\ntask = "synthetic"\nmodel = "tiny-gpt2"\neditor = "ft"\nedits = 4\n'
                  "min = { es = 0.5 }\n")
    one_line_error(cli("check", "--thresholds", str(th), "--results", str(tmp_path / "nope")), "nope",
                   "no such folder")


def test_deeply_nested_thresholds_file_is_bad_input(tmp_path):
    th = tmp_path / "th.toml"
    th.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    one_line_error(cli("check", "--thresholds", str(th), "--results", str(tmp_path)), "th.toml", "nested too deeply")


@pytest.mark.parametrize("bound, needles", [
    ("min = { es = 90 }", ("min.es = 90", "[0, 1]", "percentage")),
    ("max = { ls = 100 }", ("max.ls = 100", "[0, 1]")),
    ("min = { ls_agree = -0.1 }", ("min.ls_agree = -0.1", "[0, 1]")),
    ("max = { edit_s = -1 }", ("max.edit_s = -1", "seconds >= 0")),
    ("max = { peak_mem_edit_bytes = -5 }", ("peak_mem_edit_bytes", "bytes >= 0")),
])
def test_a_bound_outside_the_range_of_its_quantity_is_refused(tmp_path, bound, needles):
    th = tmp_path / "th.toml"
    th.write_text(f'[[threshold]]\ntask = "synthetic"\nmodel = "tiny-gpt2"\neditor = "ft"\nedits = 4\n{bound}\n')
    one_line_error(cli("check", "--thresholds", str(th), "--results", str(tmp_path)), "threshold #1", *needles)


def test_a_negative_ratio_bound_is_refused_and_the_shipped_thresholds_still_load(tmp_path):
    from bench.results.thresholds import load_thresholds

    th = tmp_path / "th.toml"
    th.write_text('[[ratio]]\ntask = "synthetic"\nmodel = "tiny-gpt2"\nedits = 4\nquantity = "edit_s"\n'
                  'numerator = { editor = "ft" }\ndenominator = { editor = "memit" }\nmax = -2\n')
    one_line_error(cli("check", "--thresholds", str(th), "--results", str(tmp_path)), "ratio #1", "max = -2")
    ths, _ = load_thresholds(REPO / "thresholds.toml")
    assert ths


# ---------------------------------------------------------------- 3. data: duplicates, huge prompts, FIFOs


def test_duplicate_edit_requests_in_user_data_are_refused_naming_count_and_first(tmp_path):
    from tasks.base import DataError
    from tasks.zsre import Zsre, ZsreConfig

    f = write_jsonl(tmp_path / "z.jsonl", [zsre_rec(0)] * 5 + [zsre_rec(1)])
    with pytest.raises(DataError) as ei:
        Zsre(ZsreConfig(data=str(f)))
    e = ei.value
    assert (e.path, e.index) == (str(f), 1) and "4 duplicate" in e.problem and "record 0" in e.problem
    task = Zsre(ZsreConfig(data=str(f), skip_bad=True))  # --skip-bad: the repeats are dropped and counted
    assert [r.subject for r in task.eval_split()] == ["Entity0", "Entity1"]
    assert task.n_skipped == 4 and task.data_info["eval_duplicates"] == 4
    r = cli(*RUN, "--task", "zsre", "--data", str(f), "--edits", "2", "--results", str(tmp_path / "res"))
    one_line_error(r, "bad data", str(f), "record 1", "4 duplicate")


def test_shipped_data_has_no_duplicate_edit_requests():
    from tasks import TASKS

    for name in ("zsre", "counterfact"):
        task = TASKS[name]()
        assert "eval_duplicates" not in task.data_info and task.n_skipped >= 0


class CountingTokenizer:
    """One token per character; fails the test if asked to tokenise more than `most` characters."""

    most = 10_000

    def __call__(self, text, add_special_tokens: bool = True):
        assert len(text) <= self.most, f"tokenised a text of {len(text)} characters"
        return {"input_ids": [0] * (len(text) + add_special_tokens)}


@pytest.mark.parametrize("field, named", [("src", "src"), ("rephrase", "rephrase"), ("answers", "answers[0]")])
def test_a_huge_prompt_or_answer_is_refused_before_it_is_tokenised(tmp_path, field, named):
    from tasks.base import CHARS_PER_POSITION, DataError
    from tasks.zsre import Zsre, ZsreConfig

    recs = [zsre_rec(i) for i in range(4)]
    huge = "x" * 2_000_000
    recs[2][field] = [huge] if field == "answers" else huge
    f = write_jsonl(tmp_path / "z.jsonl", recs)
    with pytest.raises(DataError) as ei:
        Zsre(ZsreConfig(data=str(f))).check_lengths(CountingTokenizer(), max_length=128, positions=128)
    e = ei.value
    assert (e.index, e.field_name) == (2, named) and "2,000,000 characters" in e.problem and "128 positions" in e.problem
    assert f"{CHARS_PER_POSITION * 128:,}" in e.problem
    task = Zsre(ZsreConfig(data=str(f), skip_bad=True))
    task.check_lengths(CountingTokenizer(), max_length=128, positions=128)
    assert task.data_info["eval_too_long"] == 1 and len(task.eval_split()) == 3


def fifo(tmp_path: Path) -> Path:
    p = tmp_path / "data.jsonl"
    os.mkfifo(p)
    return p


@pytest.fixture
def no_hang():
    """Fail instead of hanging when something opens a FIFO."""
    def boom(*_):
        raise TimeoutError("hung on a FIFO")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_a_fifo_as_data_is_refused_without_opening_it(tmp_path, no_hang):
    p = fifo(tmp_path)
    one_line_error(cli(*RUN, "--task", "zsre", "--data", str(p), "--results", str(tmp_path / "r")), str(p),
                   "not a regular file")
    one_line_error(cli(*RUN, "--task", "zsre", "--train-data", str(p), "--results", str(tmp_path / "r")), str(p),
                   "not a regular file")
    one_line_error(cli(*RUN, "--task", "zsre", "--data", "/dev/null", "--results", str(tmp_path / "r")), "/dev/null",
                   "not a regular file")


# ---------------------------------------------------------------- 4. caches


def test_stats_entry_with_a_list_for_a_sidecar_and_no_manifest_is_rebuilt(tmp_path):
    import torch

    from bench.core.cachefs import MANIFEST, CacheWarning
    from editors.stats import SIDECAR, Corpus, layer_second_moments, stats_entry
    from tests.hyper_util import random_gpt2

    em = random_gpt2(n_layer=2)
    layer = em.module_names("second_fc", blocks=[0])[0]
    corpus = Corpus("unit", tuple(f"the capital of {w} is Paris" for w in ("Bob", "Ann", "Eve", "Tom")))
    first = layer_second_moments(em, [layer], corpus, 4, tmp_path, batch_size=2)[layer]
    entry = stats_entry(tmp_path, em.key, layer, "unit", 4)
    for bad in ("[1, 2]", '{"n_tokens": "many"}'):
        (entry / MANIFEST).unlink(missing_ok=True)  # an entry from before manifests: only parsed, not hashed
        (entry / SIDECAR).write_text(bad)
        with pytest.warns(CacheWarning, match="is broken"):
            again = layer_second_moments(em, [layer], corpus, 4, tmp_path, batch_size=2)[layer]
        assert not again.reused and torch.allclose(again.mom2, first.mom2)
    assert layer_second_moments(em, [layer], corpus, 4, tmp_path, batch_size=2)[layer].reused


@pytest.mark.parametrize("sub", ["models", "checkpoints", "stats"])
def test_a_cache_subfolder_that_is_a_file_is_bad_input_before_the_run(tmp_path, fake_runs, sub):
    (tmp_path / sub).write_text("not a folder")
    one_line_error(cli(*RUN, "--results", str(tmp_path)), str(tmp_path / sub), "not a folder")
    one_line_error(cli(*SWEEP, "--results", str(tmp_path)), str(tmp_path / sub), "not a folder")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / sub).write_text("")
    one_line_error(cli(*RUN, "--results", str(tmp_path / "r"), "--cache-dir", str(cache)), "--cache-dir",
                   str(cache / sub))
    assert fake_runs.calls == [] and not (tmp_path / "runs.jsonl").exists()


# ---------------------------------------------------------------- 5. signals, full disks, control characters


SIGINT_SCRIPT = """
import json, sys, time, types
import bench.runner.model_cache, bench.runner.phases, bench.runner.provenance
def phases(*a, **k):
    print("PHASE", file=sys.stderr, flush=True)
    time.sleep(60)
    return json.loads(sys.argv[1])
bench.runner.phases.run_phases = phases
bench.runner.model_cache.ModelCache.get = lambda self, res, *a, **k: types.SimpleNamespace(kind=res.task.kind, key="fake", info={})
bench.runner.provenance.environment = lambda device: {"threads": 1}
from bench.cli import app
app(sys.argv[2:])
"""


@pytest.mark.parametrize("cmd", [RUN, SWEEP])
def test_ctrl_c_exits_130_and_keeps_the_stored_rows(tmp_path, fake_runs, cmd):
    before = good_rows(tmp_path, seeds=(7,))
    p = subprocess.Popen([sys.executable, "-c", SIGINT_SCRIPT, json.dumps(PHASES), *cmd, "--results", str(tmp_path)],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    while "PHASE" not in seen:
        line = p.stderr.readline()
        assert line, seen
        seen += line
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    assert p.wait(timeout=60) == 130, seen + rest
    assert "Traceback" not in rest and "interrupted" in rest, rest
    assert list(ResultStore(tmp_path).rows()) == before


def test_a_keyboard_interrupt_inside_a_cell_exits_130(tmp_path, fake_runs, monkeypatch):
    import bench.runner.phases

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.runner.phases, "run_phases", interrupted)
    one_line_error(cli(*SWEEP, "--results", str(tmp_path)), "interrupted", code=130)
    one_line_error(cli(*RUN, "--results", str(tmp_path)), "interrupted", code=130)


def test_a_full_disk_while_reporting_is_one_line_and_the_store_is_untouched(tmp_path, fake_runs, monkeypatch):
    good_rows(tmp_path)
    before = ResultStore(tmp_path).path.read_bytes()

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "report"
    one_line_error(cli("report", "--results", str(tmp_path), "--out", str(out)), "--out", str(out),
                   "No space left on device", "store is unchanged", code=1)
    assert ResultStore(tmp_path).path.read_bytes() == before


def test_control_characters_in_names_are_escaped_in_errors(tmp_path):
    r = cli(*RUN, "--editor", "a\x1b[31mRED", "--results", str(tmp_path))
    one_line_error(r, "unknown editor 'a\\x1b[31mRED'")
    assert "\x1b" not in r.output
    r = cli(*SWEEP, "--editors", "ft,b\x07\x9b2J", "--results", str(tmp_path))
    one_line_error(r, "b\\x07\\x9b2J")
    assert "\x07" not in r.output and "\x9b" not in r.output
    r = cli("check", "--thresholds", str(tmp_path / "t\x1b]0;x\x07.toml"), "--results", str(tmp_path))
    one_line_error(r, "t\\x1b]0;x\\x07.toml")
    r = cli(*RUN, "--model", "line1\nline2", "--results", str(tmp_path))
    assert r.exit_code == 2 and "line1\\nline2" in r.output, r.output
