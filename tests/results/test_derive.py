"""`bench derive`: thresholds computed from campaign rows by the rule in bench/results/derive.py."""

from __future__ import annotations

import math
import statistics

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.core.config import RunConfig
from bench.results.derive import derive, success_bound, to_toml
from bench.results.thresholds import evaluate, load_thresholds
from bench.runner.run import resolve
from bench.store import ResultStore


def fake_row(editor: str, m: int, seed: int, threads: int, es: float, gs: float, ls: float, pre: float = 0.0,
             residual: float | None = None, edit_s: float = 1.0) -> dict:
    cfg = resolve(RunConfig(editor=editor, model="tiny-gpt2", task="synthetic", n_edits=m, seed=seed, device="cpu"))
    return {"run_id": f"{editor}{m}{seed}{threads}", "status": "ok", "config": cfg.config,
            "config_hash": cfg.config_hash, "editor": editor, "model": "tiny-gpt2", "task": "synthetic",
            "n_edits": m, "seed": seed, "env": {"threads": threads}, "mean_residual": residual,
            "times": {"edit_s": edit_s},
            "metrics": {"es": es, "gs": gs, "ls": ls, "pre_es": pre, "pre_gs": pre, "pre_ls": 1.0}}


def test_success_bound_follows_the_stated_rule():
    vals = [0.93, 0.95, 0.90]
    mu, sd = statistics.fmean(vals), statistics.stdev(vals)
    sigma = max(sd, math.sqrt(mu * (1 - mu) / 64), 1 / 64)
    bound, got_sigma = success_bound(vals, 64)
    assert got_sigma == pytest.approx(sigma)
    assert bound == math.floor((mu - 3 * sigma) * 100) / 100
    # runs that all agree still get the binomial / one-probe floor, never their own value
    assert success_bound([1.0, 1.0, 1.0], 64)[0] == math.floor((1 - 3 / 64) * 100) / 100


def test_derived_file_gates_the_campaign_it_came_from_and_fails_a_no_op(tmp_path):
    rows = [fake_row("malmen", 64, s, t, es=0.92 + 0.01 * s, gs=0.88, ls=0.97, residual=0.006 + 0.001 * s)
            for s in (0, 1, 2) for t in (1, 2)]
    store = ResultStore(tmp_path / "campaign")
    for r in rows:
        store.append(r)
    out = tmp_path / "thresholds.toml"
    r = CliRunner().invoke(app, ["derive", "--results", str(tmp_path / "campaign"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    ths, _ = load_thresholds(out)
    assert len(ths) == 1 and {b.quantity for b in ths[0].bounds} == {"es", "gs", "ls", "mean_residual"}
    assert all(o.passed for o in evaluate(ths, [], rows))
    no_op = fake_row("malmen", 64, 0, 2, es=0.0, gs=0.0, ls=1.0, residual=0.006)
    assert {o.quantity for o in evaluate(ths, [], [no_op]) if not o.passed} == {"es", "gs"}
    summed = fake_row("malmen", 64, 0, 2, es=0.95, gs=0.9, ls=1.0, residual=2.7)  # the sum of shifts
    assert {o.quantity for o in evaluate(ths, [], [summed]) if not o.passed} == {"mean_residual"}


def test_derive_refuses_a_bound_an_editor_that_does_nothing_would_pass():
    rows = [fake_row("ft", 32, s, 1, es=0.2, gs=0.2, ls=1.0, pre=0.15) for s in (0, 1, 2)]
    with pytest.raises(ValueError, match="does nothing would pass"):
        derive(rows)
    assert derive(rows[:2]) == []  # fewer than 3 runs: no bound
    assert "schema = 1" in to_toml([])


def test_derive_can_leave_out_an_ungateable_cell_with_the_reason(tmp_path):
    store = ResultStore(tmp_path / "store")
    for s in (0, 1, 2):
        store.append(fake_row("ft", 32, s, 1, es=0.2, gs=0.2, ls=1.0, pre=0.15))  # no better than doing nothing
        store.append(fake_row("malmen", 64, s, 1, es=0.95, gs=0.9, ls=0.97))
    left: list[str] = []
    cells = derive(list(store.rows()), left_out=left)
    assert [(c.editor, c.n_edits) for c in cells] == [("malmen", 64)]
    assert len(left) == 1 and "ft m=32 es" in left[0] and "does nothing would pass" in left[0]
    out = tmp_path / "t.toml"
    r = CliRunner().invoke(app, ["derive", "--results", str(tmp_path / "store"), "--out", str(out),
                                 "--leave-out-ungateable"])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert "# Not gated: synthetic / tiny-gpt2: ft m=32 es" in text and 'editor = "ft"' not in text
    ths, _ = load_thresholds(out)
    assert all(o.passed for o in evaluate(ths, [], list(store.rows())))
    r = CliRunner().invoke(app, ["derive", "--results", str(tmp_path / "store"), "--out", str(out)])
    assert r.exit_code == 1 and "does nothing would pass" in r.output  # the default still refuses


def test_time_ratio_is_derived_from_side_by_side_pairs(tmp_path):
    rows = [fake_row("ft", m, s, t, es=1.0, gs=1.0, ls=0.9, edit_s=(4.0 + 0.1 * s) * m / 32)
            for m in (32, 128) for s in (0, 1, 2) for t in (1, 2)]
    store = ResultStore(tmp_path)
    for r in rows:
        store.append(r)
    out = tmp_path / "t.toml"
    assert CliRunner().invoke(app, ["derive", "--results", str(tmp_path), "--out", str(out)]).exit_code == 0
    ths, ratios = load_thresholds(out)
    assert len(ths) == 2 and len(ratios) == 1
    assert ratios[0].bounds[0].limit == 8.0  # 2 x the largest ratio (4.0), rounded up to 0.5
    assert all(o.passed for o in evaluate(ths, ratios, rows))
    slow = fake_row("ft", 128, 0, 1, es=1.0, gs=1.0, ls=0.9, edit_s=1.0 * 4 * 9)  # 9x the m=32 time
    assert not all(o.passed for o in evaluate([], ratios, [rows[0], slow]))
