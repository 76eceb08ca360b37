"""`bench sweep`, `bench report` and `bench check` on a store built from real fine-tuning runs of the tiny model.

The store: ft on tiny-gpt2 / synthetic, edits 4 and 8, seeds 0 and 1 (epochs=1 to keep it fast), built
by a sweep that is interrupted after two cells and restarted; plus one run of another variant
(epochs=2) and one failed cell. Models load from the repo's shared `results/` cache (`--cache-dir`).
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import bench.runner.model_cache
import bench.runner.run
from bench.cli import app
from bench.core.config import RunConfig
from bench.executors.sweep import exit_code, grid, parse_list, run_sweep
from bench.results.thresholds import ThresholdError, evaluate, load_thresholds
from bench.results.variants import matches_set, variant_diff, variant_label
from bench.runner.run import execute, resolve
from bench.store import ResultStore

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "results"
BASE = {"model": "tiny-gpt2", "task": "synthetic", "device": "cpu", "overrides": {"epochs": "1"}}
EDITS, SEEDS = [4, 8], [0, 1]
runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def rows(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "runs.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_gpt2):
    """Build the store (interrupted + resumed sweep, one more variant, one failed cell); record what happened."""
    d = tmp_path_factory.mktemp("store")
    cfgs = grid(["ft"], EDITS, SEEDS, **BASE)
    calls: list[RunConfig] = []

    def interrupted(cfg, *a, **k):  # Ctrl-C arrives when the third cell starts
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(cfg)
        return execute(cfg, *a, **k)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfgs, d, cache_dir=CACHE, run=interrupted, show_progress=False)
    after_interrupt = rows(d)

    executed: list[tuple[RunConfig, bool]] = []

    def recording(cfg, *a, **k):
        row, skipped = execute(cfg, *a, **k)
        executed.append((cfg, skipped))
        return row, skipped

    loads: list[str] = []
    real_load = bench.runner.model_cache.load_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench.runner.model_cache, "load_model", lambda ctx: loads.append(ctx.name) or real_load(ctx))
        resumed = run_sweep(cfgs, d, cache_dir=CACHE, run=recording, show_progress=False)
    after_resume = rows(d)
    again = run_sweep(cfgs, d, cache_dir=CACHE, show_progress=False)
    execute(RunConfig(n_edits=4, seed=0, editor="ft", **{**BASE, "overrides": {"epochs": "2"}}), d, cache_dir=CACHE)
    # --edits beyond the evaluation pool is bad input now (resolve, exit 2): a cell fails at run time instead
    import tasks.base

    real_sample = tasks.base.Task.sample

    def sample(self, n, seed):
        if n == 5:
            raise ValueError(f"cannot sample {n} edits (injected failure)")
        return real_sample(self, n, seed)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks.base.Task, "sample", sample)
        failing = cli("sweep", "--editors", "ft", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "4,5",
                      "--seeds", "0", "--set", "epochs=1", "--device", "cpu", "--results", str(d),
                      "--cache-dir", str(CACHE))
    return {"dir": d, "after_interrupt": after_interrupt, "resumed": resumed, "executed": executed, "loads": loads,
            "after_resume": after_resume, "again": again, "failing": failing}


def ft_rows(d: Path, epochs: int = 1) -> list[dict]:
    return [r for r in rows(d) if r["status"] == "ok" and r["config"]["hparams"]["epochs"] == epochs]


# ---------------------------------------------------------------- sweep


def test_interrupted_sweep_resumes_without_rerunning_or_duplicating(built):
    first = built["after_interrupt"]
    assert [(r["seed"], r["n_edits"]) for r in first] == [(0, 4), (0, 8)]  # order: editor, seed, edits
    # the restart ran only the two missing cells and returned the stored rows of the others
    assert [(c.seed, c.n_edits, s) for c, s in built["executed"]] == [(0, 4, True), (0, 8, True), (1, 4, False),
                                                                        (1, 8, False)]
    assert [r.status for r in built["resumed"]] == ["skipped", "skipped", "ok", "ok"]
    assert built["loads"] == ["tiny-gpt2"]  # one model load for the whole grid
    resumed_rows = built["after_resume"]
    assert len(resumed_rows) == 4
    assert [r["run_id"] for r in resumed_rows[:2]] == [r["run_id"] for r in first]
    assert len({r["config_hash"] for r in resumed_rows}) == 4
    assert all(r["status"] == "ok" for r in resumed_rows)
    # a third pass runs nothing
    assert [r.status for r in built["again"]] == ["skipped"] * 4
    assert exit_code(built["again"]) == 0


def test_failed_cell_is_stored_and_counted_in_exit_code(built):
    res = built["failing"]
    assert res.exit_code == 1, res.output
    failed = [r for r in rows(built["dir"]) if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["n_edits"] == 5
    assert "cannot sample 5" in failed[0]["error"]
    assert "skipped" in res.output and "failed" in res.output


def test_sweep_rejects_bad_input_before_running(tmp_path):
    r = cli("sweep", "--editors", "ft,nope", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "4",
            "--results", str(tmp_path))
    assert r.exit_code == 2 and "unknown editor 'nope'" in r.output
    assert not (tmp_path / "runs.jsonl").exists()
    r = cli("sweep", "--editors", "ft", "--edits", "4,x", "--results", str(tmp_path))
    assert r.exit_code == 2 and "--edits" in r.output
    with pytest.raises(ValueError, match="twice"):
        parse_list("4,4", "edits", int)


def test_grid_order_is_editor_seed_edits_and_editor_specific_sets():
    cfgs = grid(["b", "a"], [16, 4], [1, 0], {"lr": "1", "a.steps": "5", "a.lr": "2"}, model="m", task="t")
    assert [(c.editor, c.seed, c.n_edits) for c in cfgs] == [
        ("b", 1, 16), ("b", 1, 4), ("b", 0, 16), ("b", 0, 4), ("a", 1, 16), ("a", 1, 4), ("a", 0, 16), ("a", 0, 4)]
    assert {c.editor: c.overrides for c in cfgs} == {"b": {"lr": "1"}, "a": {"lr": "2", "steps": "5"}}
    with pytest.raises(ValueError, match="'c' is not one of the sweep's editors"):
        grid(["a"], [4], [0], {"c.lr": "1"})


def test_set_selects_what_that_set_would_run_now():
    def config(**over):
        return resolve(RunConfig(editor="ft", model="tiny-gpt2", task="synthetic", n_edits=4, overrides=over)).config

    dflt, one = config(), config(epochs="1")
    assert matches_set(dflt, {}) and not matches_set(one, {})
    assert matches_set(one, {"epochs": 1}) and matches_set(one, {"epochs": "1"})
    assert matches_set(dflt, {"epochs": dflt["hparams"]["epochs"]})  # a default value names the default variant
    assert not matches_set(dflt, {"epochs": 1}) and not matches_set(one, {"epochs": 1, "lr": 1.0})


def test_rows_stored_before_a_task_field_existed_are_not_todays_default():
    def config(**over):
        return resolve(RunConfig(editor="ft", model="tiny-gpt2", task="synthetic", n_edits=4, overrides=over)).config

    neighbours = config(locality="neighbours")
    assert variant_label("ft", variant_diff(neighbours)) == "ft (locality=neighbours)"
    old = config()
    del old["task_config"]["locality"]  # as stored before the synthetic task had unrelated probes
    assert variant_diff(old) == {"locality": None}
    assert not matches_set(old, {}) and matches_set(config(), {})


# ---------------------------------------------------------------- report


@pytest.fixture(scope="module")
def report(built, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    r = cli("report", "--results", str(built["dir"]), "--out", str(out))
    assert r.exit_code == 0, r.output
    return out


def test_report_tables_hold_exactly_the_stored_numbers_aggregated_over_seeds(built, report):
    import pandas as pd

    comp = pd.read_csv(report / "tables" / "comparison.csv")
    md = (report / "index.md").read_text()
    default = comp[comp["variant"] == "ft (epochs=1)"]
    assert sorted(default["n_edits"]) == EDITS  # the failed m=5 cell is not aggregated
    for m in EDITS:
        stored = [r for r in ft_rows(built["dir"]) if r["n_edits"] == m]
        assert sorted(r["seed"] for r in stored) == SEEDS
        line = default[default["n_edits"] == m].iloc[0]
        assert line["n_runs"] == 2 and str(line["seeds"]) == "0,1"
        for k in ("es", "gs", "ls", "ls_agree"):
            vals = [r["metrics"][k] for r in stored]
            assert line[f"metrics.{k}:mean"] == pytest.approx(statistics.fmean(vals), rel=1e-12, abs=1e-15)
            assert line[f"metrics.{k}:std"] == pytest.approx(statistics.stdev(vals), rel=1e-12, abs=1e-15)
        edit_s = [r["times"]["edit_s"] for r in stored]
        assert line["times.edit_s:mean"] == pytest.approx(statistics.fmean(edit_s), rel=1e-12)
        es = [100 * r["metrics"]["es"] for r in stored]
        assert f"| ft (epochs=1) | {statistics.fmean(es):.1f} ± {statistics.stdev(es):.1f} |" in md
    # a run differing in an hparam is its own line, never mixed into the seeds of the other
    other = comp[comp["variant"] == "ft (epochs=2)"]
    assert len(other) == 1 and other.iloc[0]["n_runs"] == 1
    assert other.iloc[0]["metrics.es:mean"] == ft_rows(built["dir"], epochs=2)[0]["metrics"]["es"]


def test_report_outputs_are_complete_and_self_contained(built, report):
    import pandas as pd

    figs = sorted(p.name for p in (report / "figures").glob("*.png"))
    # ft has no residual; the LM rows carry generation-based success, hence its figure
    assert figs == ["cost_tiny-gpt2_synthetic.png", "generation_tiny-gpt2_synthetic.png",
                    "scaling_tiny-gpt2_synthetic.png"]
    html = (report / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "src='figures/" not in html
    md = (report / "index.md").read_text()
    for text in ("LS | locality success, gold", "LS agree", "seeds 0,1", "tiny-gpt2 / synthetic, m = 4",
                 "## Failed runs", "cannot sample 5"):
        assert text in md, text
    runs = pd.read_csv(report / "runs.csv")
    assert sorted(runs["run_id"]) == sorted(r["run_id"] for r in rows(built["dir"]))
    assert {"metrics.es", "times.edit_s", "config.hparams.epochs", "variant", "status"} <= set(runs.columns)


def test_report_on_empty_store_fails_clearly(tmp_path):
    r = cli("report", "--results", str(tmp_path), "--out", str(tmp_path / "out"))
    assert r.exit_code == 2 and "no runs stored" in r.output


# ---------------------------------------------------------------- check


def newest_default(d: Path, m: int) -> dict:
    return [r for r in ft_rows(d) if r["n_edits"] == m][-1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "thresholds.toml"
    p.write_text(text)
    return p


def threshold(m: int, es_min: float, extra: str = "") -> str:
    return (f'[[threshold]]\ntask = "synthetic"\nmodel = "tiny-gpt2"\neditor = "ft"\nedits = {m}\n'
            f'set = {{ epochs = 1 }}\nmin = {{ es = {es_min!r} }}\n{extra}\n')


def test_check_fails_above_and_passes_below_the_measured_value(built, tmp_path):
    d = built["dir"]
    es = newest_default(d, 4)["metrics"]["es"]
    # es is a fraction and bounds outside [0, 1] are refused: near an end, the bound 0.01 away is a max
    def bound(op: str, v: float) -> str:
        return threshold(4, v) if op == "min" else threshold(4, 0.0).replace("min = { es = 0.0 }", f"max = {{ es = {v!r} }}")

    above = write(tmp_path, bound("min", es + 0.01) if es <= 0.99 else bound("max", es - 0.01))
    r = cli("check", "--thresholds", str(above), "--results", str(d))
    assert r.exit_code == 1 and "FAIL" in r.output
    below = write(tmp_path, bound("min", es - 0.01) if es >= 0.01 else bound("max", es + 0.01))
    r = cli("check", "--thresholds", str(below), "--results", str(d))
    assert r.exit_code == 0 and "FAIL" not in r.output and "pass" in r.output
    # the measured value is the newest row of the selected variant (not the newer epochs=2 run)
    (o,) = evaluate(*load_thresholds(below), rows(d))
    assert o.measured == es and o.margin == pytest.approx(0.01)


def test_check_fails_without_a_matching_row(built, tmp_path):
    d = built["dir"]
    for text in (threshold(16, 0.0),  # no run with 16 edits
                 threshold(4, 0.0).replace("set = { epochs = 1 }\n", ""),  # the default variant was never run
                 threshold(4, 0.0).replace('"tiny-gpt2"', '"gpt2"')):
        r = cli("check", "--thresholds", str(write(tmp_path, text)), "--results", str(d))
        assert r.exit_code == 1 and "no matching ok row" in r.output, text


def test_check_ratio_of_two_variants_measured_side_by_side(built, tmp_path):
    d = built["dir"]
    num = ft_rows(d, epochs=2)[0]
    den = [r for r in ft_rows(d) if r["n_edits"] == 4 and r["seed"] == num["seed"]][-1]
    ratio = num["times"]["edit_s"] / den["times"]["edit_s"]
    text = ('[[ratio]]\ntask = "synthetic"\nmodel = "tiny-gpt2"\nedits = 4\nquantity = "edit_s"\n'
            'numerator = { editor = "ft", set = { epochs = 2 } }\ndenominator = { editor = "ft", set = { epochs = 1 } }\n')
    (o,) = evaluate(*load_thresholds(write(tmp_path, text + f"max = {ratio * 1.01!r}\n")), rows(d))
    assert o.passed and o.measured == pytest.approx(ratio, rel=1e-12)
    r = cli("check", "--thresholds", str(write(tmp_path, text + f"max = {ratio * 0.99!r}\n")), "--results", str(d))
    assert r.exit_code == 1 and "FAIL" in r.output


def test_check_rejects_malformed_thresholds(tmp_path):
    bad = {
        "min = { es = 0.5 }\n": "missing 'task'",
        threshold(4, 0.5).replace("es =", "speed ="): "unknown quantity 'speed'",
        threshold(4, 0.5).replace("edits = 4", 'edits = "4"'): "'edits' has the wrong type",
        "schema = 1\n": "nothing would be checked",
        "[[threshold]\n": "not valid TOML",
    }
    for text, msg in bad.items():
        p = write(tmp_path, text if text.startswith(("schema", "[[")) else f"[[threshold]]\n{text}")
        with pytest.raises(ThresholdError, match=msg):
            load_thresholds(p)
    r = cli("check", "--thresholds", str(tmp_path / "missing.toml"), "--results", str(tmp_path))
    assert r.exit_code == 2 and "no such thresholds file" in r.output


def test_repo_thresholds_file_parses():
    ths, ratios = load_thresholds(REPO / "thresholds.toml")
    assert ths or ratios


# ---------------------------------------------------------------- a real kill


@pytest.mark.slow
def test_sweep_killed_by_sigkill_resumes(tmp_path, tiny_gpt2):
    """SIGKILL a `bench sweep` process after its first stored row; the rerun completes the grid exactly once."""
    args = [sys.executable, "-c", "from bench.cli import app; app()", "sweep", "--editors", "ft", "--model",
            "tiny-gpt2", "--task", "synthetic", "--edits", "4", "--seeds", "0,1,2", "--set", "epochs=1",
            "--device", "cpu", "--results", str(tmp_path), "--cache-dir", str(CACHE)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    store = ResultStore(tmp_path)
    deadline = time.monotonic() + 300
    while len(list(store.rows())) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = rows(tmp_path)
    assert 1 <= len(before) < 3, "the kill should land mid-sweep"
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    after = rows(tmp_path)
    assert sorted(r["seed"] for r in after) == [0, 1, 2]
    assert [r["run_id"] for r in after[: len(before)]] == [r["run_id"] for r in before]


def test_ablation_names_follow_the_paper_and_shared_settings_are_the_baseline():
    from bench.results.report import ablation_name, common_settings

    diffs = [{"rank": 32}, {"rank": 32, "shift": "sum"}, {"rank": 32, "reg": "none", "cache": "all"}]
    assert common_settings(diffs) == {"rank": 32}
    assert common_settings([{"rank": 32}, {}]) == {}
    assert ablation_name({}) == "MALMEN"
    assert ablation_name({"shift": "sum"}) == "Sum param. shifts (shift=sum)"
    assert ablation_name({"cache": "all", "reg": "none"}) == "Cache all tokens + No regularization (cache=all, reg=none)"
