"""End-to-end targets on tiny-gpt2 / synthetic at m = 64, through `bench run` as a user runs it, and
the regression gate (thresholds.toml) failing editors that are broken on purpose.

The checkpoints land in the repo's model cache (`results/checkpoints`), so the CI smoke sweep that
follows the tests reuses MALMEN's instead of meta-training it again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bench.cli import app
from bench.results.thresholds import Threshold, evaluate, load_thresholds
from tests.prebuild import wait_for

REPO = Path(__file__).parents[2]


def gate(editor: str, edits: int = 64) -> list[Threshold]:
    """The default-variant thresholds of `editor` at `edits` in the committed thresholds.toml."""
    ths, _ = load_thresholds(REPO / "thresholds.toml")
    found = [t for t in ths if t.sel.editor == editor and t.sel.n_edits == edits and not t.sel.set]
    assert found, f"thresholds.toml has no {editor} m={edits} entry"
    return found


def run_64(tmp_path: Path, *sets: str, editor: str = "malmen", edits: int = 64) -> dict:
    """`bench run --editor malmen --model tiny-gpt2 --task synthetic --edits 64 --seed 0 --json [--set ...]`."""
    args = ["run", "--editor", editor, "--model", "tiny-gpt2", "--task", "synthetic", "--edits", str(edits),
            "--seed", "0", "--json", "--results", str(tmp_path), "--cache-dir", str(REPO / "results")]
    for s in sets:
        args += ["--set", s]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.output.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.prebuilt("tiny-gpt2/malmen-64-sum", wait=False)  # waited for after MALMEN's own run, below
def test_malmen_64_edits_generalise_and_stay_local_and_beat_the_sum_of_shifts(tiny_gpt2, tmp_path):
    """ES >= 0.9, GS >= 0.7, LS within 0.05 of pre-LS; the sum of shifts leaves >= 10x the residual.

    Measured with the pinned kernels of CI (meta-training on one thread): ES 0.938, GS 0.948, LS 1.000
    vs 1.000 (docs/reproducibility.md).
    """
    row = run_64(tmp_path / "malmen")
    m = row["metrics"]
    assert m["pre_es"] <= 0.1 and m["pre_gs"] <= 0.1, m
    assert m["es"] >= 0.9 and m["gs"] >= 0.7, m
    assert m["pre_ls"] - m["ls"] <= 0.05, m
    wait_for("tiny-gpt2/malmen-64-sum")  # meta-trained by the worker of tests/prebuild.py meanwhile
    summed = run_64(tmp_path / "sum", "shift=sum")
    assert summed["config"]["hparams"]["shift"] == "sum"
    assert summed["mean_residual"] >= 10 * row["mean_residual"], (summed["mean_residual"], row["mean_residual"])
    # MALMEN's gate holds for MALMEN and fails for the sum of shifts, measured under MALMEN's bounds.
    th = gate("malmen")
    as_malmen = {**summed, "config": row["config"], "editor": "malmen"}
    assert all(o.passed for o in evaluate(th, [], [row])), evaluate(th, [], [row])
    assert not all(o.passed for o in evaluate(th, [], [as_malmen]))


@pytest.mark.slow
@pytest.mark.prebuilt("tiny-gpt2/mend-8")
def test_mend_edits_8_facts(tiny_gpt2, tmp_path):
    """MEND (every token cached, summed shifts) edits at m = 8; its checkpoint serves the CI cells.

    Measured (seed 0, pinned kernels): ES 0.000 -> 0.875, but LS 1.000 -> 0.375 (docs/malmen.md): MEND
    as the official code runs it is not local on this model at m = 8, so only the edit is asserted.
    """
    row = run_64(tmp_path / "mend", editor="mend", edits=8)
    m = row["metrics"]
    assert row["config"]["hparams"]["cache"] == "all" and row["info"]["prepare"]["train_edits_shared"] is True
    assert m["es"] >= m["pre_es"] + 0.5, m


def zeroed(edit_fn):
    """An editor's `edit` whose every delta is replaced by zeros: it runs, and changes nothing."""
    def edit(self, requests):
        e = edit_fn(self, requests)
        return dataclasses.replace(e, deltas={k: torch.zeros_like(v) for k, v in e.deltas.items()})
    return edit


@pytest.mark.slow
@pytest.mark.parametrize("editor", ["ft", "memit", "malmen"])
def test_the_gate_fails_an_editor_whose_deltas_are_zero(editor, tiny_gpt2, tmp_path, monkeypatch):
    """Each gated cell at m = 64 fails thresholds.toml when the editor's deltas are zeroed, and passes
    for the real editor measured in the same way (MALMEN reuses the checkpoint of the test above)."""
    import editors
    from bench.core.config import RunConfig
    from bench.runner.run import execute

    cfg = RunConfig(editor=editor, model="tiny-gpt2", task="synthetic", n_edits=64, seed=0, device="cpu")
    real, _ = execute(cfg, tmp_path / "real", cache_dir=REPO / "results", log=lambda *_: None)
    monkeypatch.setattr(editors.EDITORS[editor], "edit", zeroed(editors.EDITORS[editor].edit))
    broken, _ = execute(cfg, tmp_path / "broken", cache_dir=REPO / "results", log=lambda *_: None)
    assert broken["metrics"]["es"] == broken["metrics"]["pre_es"]  # the broken editor really changed nothing
    th = gate(editor)
    assert all(o.passed for o in evaluate(th, [], [real])), [o for o in evaluate(th, [], [real]) if not o.passed]
    failed = [o.quantity for o in evaluate(th, [], [broken]) if not o.passed]
    assert "es" in failed and "gs" in failed, failed
