"""Lifelong editing (`--sequential T`): the curve, retention of batch 1, exact restoration, the row."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.core.config import RunConfig
from bench.evaluation.eval_extra import ExtraOptions
from bench.evaluation.metrics import evaluate
from bench.runner.phases import set_seed
from bench.runner.run import UserError, resolve, run_one
from bench.runner.sequential import edit_in_sequence
from editors.base import EditorContext, add_delta_, hparams_from, model_defaults
from editors.finetune import FineTune

REPO = Path(__file__).parents[2]
TINY = dict(model="tiny-gpt2", task="synthetic", seed=0)
OFF = ExtraOptions(generation=False, cf_scores=False)


def _ft(em, results):
    hp = hparams_from(FineTune.hparams_cls, {}, model_defaults("ft", "tiny-gpt2"))
    return FineTune(em, hp, EditorContext(results_dir=results, seed=0))


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, snap) -> bool:
    return all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


def test_batch_one_is_measured_after_the_last_batch_and_the_model_is_restored(tiny_gpt2, synthetic_task, results_cache):
    """The curve's last `first_batch` ES is batch 1's ES on the model carrying all T edits (replayed by hand)."""
    em = tiny_gpt2
    batches = synthetic_task.sample_batches(8, 3, 0)
    before = _snapshot(em.model)
    out = edit_in_sequence(_ft(em, results_cache), em, batches, OFF, torch.device("cpu"), lambda: set_seed(0))
    assert _same(em.model, before)  # restored bit-exactly
    assert [s["n_edited"] for s in out.steps] == [8, 16, 24]
    first = out.steps[0]
    assert first["first_batch"]["es"] == pytest.approx(first["metrics"]["es"])  # after batch 1: only batch 1
    assert first["metrics"]["es"] >= first["pre"]["es"] + 0.5  # the editor edits (a no-op fails here)
    # replay: each batch edited on the model carrying the earlier ones, then batch 1 evaluated
    params = dict(em.model.named_parameters())
    ed = _ft(em, results_cache)
    try:
        for b in batches:
            set_seed(0)
            for n, d in ed.edit(b).deltas.items():
                add_delta_(params[n], d)
        after_all = evaluate(em, batches[0]).metrics
        everything = evaluate(em, [r for b in batches for r in b]).metrics
    finally:
        with torch.no_grad():
            for n, w in before.items():
                params[n].copy_(w)
    assert out.steps[-1]["first_batch"]["es"] == pytest.approx(after_all["es"])
    assert out.steps[-1]["first_batch"]["gs"] == pytest.approx(after_all["gs"])
    for k in ("es", "gs", "ls"):
        assert out.summary["metrics"][k] == pytest.approx(everything[k]) == pytest.approx(out.steps[-1]["metrics"][k])


def test_a_failing_batch_still_restores_the_model(tiny_gpt2, synthetic_task, results_cache):
    em = tiny_gpt2
    ed = _ft(em, results_cache)
    calls = []
    edit = ed.edit

    def second_fails(requests):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return edit(requests)

    ed.edit = second_fails
    before = _snapshot(em.model)
    with pytest.raises(RuntimeError, match="boom"):
        edit_in_sequence(ed, em, synthetic_task.sample_batches(4, 3, 0), OFF, torch.device("cpu"), lambda: None)
    assert _same(em.model, before)


def test_sequential_row_stores_the_curve_and_alphaedit_remembers(tiny_gpt2, tmp_path, monkeypatch):
    from editors.alphaedit import AlphaEdit

    seen = []
    remember = AlphaEdit.remember
    monkeypatch.setattr(AlphaEdit, "remember", lambda self, reqs: seen.append(len(reqs)) or remember(self, reqs))
    row = run_one(editor="alphaedit", n_edits=8, sequential=2, generation=False, log_samples=True, results=tmp_path,
                  cache_dir=REPO / "results", **TINY)
    assert seen == [8, 8]
    assert row["config"]["sequential"] == 2 and len(row["sequence"]) == 2
    assert [s["step"] for s in row["sequence"]] == [1, 2]
    assert row["metrics"]["es"] == pytest.approx(row["sequence"][-1]["metrics"]["es"])
    assert row["metrics"]["es"] >= row["metrics"]["pre_es"] + 0.5
    assert {"edit_s", "eval_s", "peak_mem_edit_bytes", "mean_residual"} <= set(row["sequence"][0])
    assert row["times"]["pre_eval_s"] > 0
    assert row["info"]["prepare"]["null_dims"]
    lines = Path(row["samples_path"]).read_text().splitlines()
    assert len([x for x in lines if '"probe": "es"' in x]) == 16
    # the report gives lifelong rows their own section; check selects them only with `sequential`
    from bench.results.report import write_report
    from bench.results.thresholds import Selector

    rep = write_report(tmp_path, tmp_path / "report")
    assert any("sequential_tiny-gpt2_synthetic_8_2" in f for f in rep["figures"])
    text = (tmp_path / "report" / "index.md").read_text()
    assert "## Lifelong editing" in text and "No ok one-batch runs" in text
    assert Selector("synthetic", "tiny-gpt2", "alphaedit", 8, sequential=2).matches(row)
    assert not Selector("synthetic", "tiny-gpt2", "alphaedit", 8).matches(row)


def test_sequential_enters_the_hash_and_bad_combinations_fail_fast():
    base = resolve(RunConfig(editor="ft", n_edits=8, **TINY))
    seq = resolve(RunConfig(editor="ft", n_edits=8, sequential=3, **TINY))
    assert "sequential" not in base.config and seq.config["sequential"] == 3
    assert base.config_hash != seq.config_hash
    with pytest.raises(UserError, match="do not combine"):
        resolve(RunConfig(editor="ft", n_edits=8, sequential=2, batches=2, **TINY))
    pool = len(base.task.eval_split())
    with pytest.raises(UserError, match="--sequential"):
        resolve(RunConfig(editor="ft", n_edits=8, sequential=pool // 8 + 1, **TINY))
