"""The extended evaluation in `bench run` rows: generation-based success, CounterFact scores, --log-samples, --batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.core.config import RunConfig
from bench.runner.run import UserError, resolve, run_one

REPO = Path(__file__).parents[2]
TINY = dict(model="tiny-gpt2", task="synthetic", seed=0)


def test_batches_4_store_each_batch_and_their_mean_and_meta_train_once(tiny_gpt2, tmp_path, monkeypatch):
    """`--batches 4` at m = 16: four disjoint batches, the stored mean is theirs, meta-training ran once."""
    from editors.malmen import MalmenEditor

    calls = []
    prepare = MalmenEditor.prepare
    monkeypatch.setattr(MalmenEditor, "prepare", lambda self, train: calls.append(1) or prepare(self, train))
    row = run_one(editor="malmen", n_edits=16, batches=4, log_samples=True, results=tmp_path,
                  cache_dir=REPO / "results", **TINY)
    assert len(calls) == 1
    assert row["config"]["batches"] == 4 and len(row["batches"]) == 4
    for k in ("es", "gs", "ls", "ls_agree", "es_gen", "pre_es"):
        per = [b["metrics"][k] for b in row["batches"]]
        assert row["metrics"][k] == pytest.approx(sum(per) / 4), k
        assert k in row["metrics_std"]
    assert row["metrics"]["es"] >= row["metrics"]["pre_es"] + 0.5  # the editor edits every batch
    lines = [json.loads(x) for x in Path(row["samples_path"]).read_text().splitlines()]
    prompts = [{x["prompt"] for x in lines if x["probe"] == "es" and x["batch"] == b} for b in range(4)]
    assert all(len(p) == 16 for p in prompts)
    assert len(set().union(*prompts)) == 64  # disjoint batches


def test_generation_metrics_and_samples_in_the_row(tiny_gpt2, tmp_path):
    """es_gen / gs_gen / ls_gen with their pre values; one sample line per probe with both continuations."""
    row = run_one(editor="ft", n_edits=16, log_samples=True, results=tmp_path, cache_dir=REPO / "results", **TINY)
    m = row["metrics"]
    assert {"es_gen", "gs_gen", "ls_gen", "pre_es_gen", "pre_gs_gen", "pre_ls_gen"} <= set(m)
    assert m["pre_es_gen"] <= 0.1 and m["es_gen"] >= m["pre_es_gen"] + 0.5, m  # a no-op editor fails here
    assert "batches" not in row and "batches" not in row["config"]  # one batch: the row as before
    path = Path(row["samples_path"])
    assert path.parent == tmp_path / "samples" and path.stem == row["run_id"]
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    n_reph = sum(1 for x in lines if x["probe"] == "gs")
    assert len(lines) == 16 + n_reph + 16 and n_reph > 0
    es = [x for x in lines if x["probe"] == "es"]
    assert sum(x["post_gen_ok"] for x in es) / 16 == pytest.approx(m["es_gen"])
    assert sum(x["post_hit"] for x in es) / 16 == pytest.approx(m["es"])
    assert all(isinstance(x["pre_gen"], str) and isinstance(x["post_gen"], str) for x in lines)


def test_extra_metrics_can_be_switched_off_and_enter_the_hash_only_then(tiny_gpt2, tmp_path):
    base = resolve(RunConfig(editor="ft", n_edits=16, **TINY))
    off = resolve(RunConfig(editor="ft", n_edits=16, generation=False, cf_scores=False, **TINY))
    assert "eval" not in base.config and off.config["eval"] == {"generation": False, "cf_scores": False}
    assert base.config_hash != off.config_hash
    row = run_one(editor="ft", n_edits=16, generation=False, results=tmp_path, cache_dir=REPO / "results", **TINY)
    assert not any(k.endswith("_gen") for k in row["metrics"])
    assert "samples_path" not in row


def test_batches_all_and_too_many_batches_are_decided_before_loading():
    pool = len(resolve(RunConfig(editor="ft", n_edits=16, **TINY)).task.eval_split())
    assert resolve(RunConfig(editor="ft", n_edits=16, batches="all", **TINY)).config["batches"] == pool // 16
    with pytest.raises(UserError, match="--batches"):
        resolve(RunConfig(editor="ft", n_edits=16, batches=pool, **TINY))
    with pytest.raises(UserError, match="positive number or 'all'"):
        resolve(RunConfig(editor="ft", n_edits=16, batches="some", **TINY))


def test_cli_batches_and_log_samples(tiny_gpt2, tmp_path):
    from typer.testing import CliRunner

    from bench.cli import app

    r = CliRunner().invoke(app, ["run", "--editor", "ft", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "8",
                                 "--batches", "2", "--log-samples", "--no-cf-scores", "--json", "--results", str(tmp_path),
                                 "--cache-dir", str(REPO / "results")])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output.strip().splitlines()[-1])
    assert len(row["batches"]) == 2 and Path(row["samples_path"]).is_file()
    assert row["config"]["eval"] == {"cf_scores": False}


def test_counterfact_rows_carry_rome_scores(smollm2, tmp_path):
    """On real CounterFact records the row has ROME's scores; fine-tuning moves the Efficacy Score up."""
    row = run_one(editor="ft", model="smollm2-135m", task="counterfact", n_edits=4, seed=0, results=tmp_path,
                  cache_dir=REPO / "results")
    m = row["metrics"]
    for k in ("cf_es", "cf_em", "cf_ps", "cf_pm", "cf_ns", "cf_nm", "cf_score"):
        assert k in m and f"pre_{k}" in m, k
    assert m["cf_es"] >= m["pre_cf_es"] + 0.5 and m["cf_em"] > m["pre_cf_em"], m
    assert 0.0 <= m["cf_ns"] <= 1.0
