"""MALMEN / MEND editors end to end: edits in the right layout, ablation flags, classifiers, meta-training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from bench.evaluation.metrics import evaluate
from editors import EDITORS
from editors.base import EditorContext, hparams_from, model_defaults
from editors.malmen import MalmenEditor, MalmenHParams
from editors.mend import MendEditor, MendHParams
from tests.hyper_util import cls_requests, lm_requests, random_bert, random_gpt2


@pytest.fixture(scope="module")
def gpt2():
    return random_gpt2(n_layer=2, dtype=torch.float32)


def test_registered_and_paper_defaults():
    assert EDITORS["malmen"] is MalmenEditor and EDITORS["mend"] is MendEditor
    hp = MalmenHParams()
    assert (hp.rank, hp.n_blocks, hp.edit_lr, hp.meta_lr, hp.loc_coef, hp.max_grad_norm) == (1920, 2, 1e-6, 1e-5, 1.0, 1.0)
    assert (hp.shift, hp.reg, hp.cache, hp.layers, hp.last_n) == ("normal", "ridge", "answer", "second_fc", 6)
    assert MendHParams().shift == "sum"
    with pytest.raises(ValueError):
        MendHParams(shift="normal")
    with pytest.raises(ValueError, match="shift"):
        MalmenHParams(shift="mean")
    assert hparams_from(MalmenHParams, {"shift": "sum", "reg": "none", "cache": "all"}).reg == "none"


def test_per_model_overrides_document_why():
    import json

    for editor in ("malmen", "mend"):
        for path in (Path(__file__).parents[2] / "editors" / "hparams" / editor).glob("*.json"):
            raw = json.loads(path.read_text())
            assert raw.get("_why"), f"{path} lacks a _why"
            cls = MalmenHParams if editor == "malmen" else MendHParams
            cls(**model_defaults(editor, path.stem))  # every key is a valid field


@pytest.mark.parametrize("editor_cls,flags", [
    (MalmenEditor, {}), (MalmenEditor, {"layers": "first_fc"}), (MalmenEditor, {"cache": "all"}),
    (MalmenEditor, {"shift": "sum"}), (MendEditor, {}),
])
def test_edit_returns_parameter_layout_deltas_and_residual(gpt2, editor_cls, flags):
    hp = dataclasses.replace(editor_cls.hparams_cls(rank=8), **flags)
    ed = editor_cls(gpt2, hp, EditorContext(seed=0))
    edit = ed.edit(lm_requests(5))
    which = "c_fc" if flags.get("layers") == "first_fc" else "c_proj"
    params = dict(gpt2.model.named_parameters())
    assert sorted(edit.deltas) == sorted(f"transformer.h.{i}.mlp.{which}.weight" for i in range(2))
    for n, d in edit.deltas.items():
        assert d.shape == params[n].shape and torch.isfinite(d).all() and float(d.abs().sum()) > 0
    assert edit.mean_residual is not None and edit.mean_residual >= 0
    assert set(edit.info["residual_per_layer"]) == set(ed.modules)


def test_no_regularisation_ablation_runs_and_reports_fallbacks(gpt2):
    hp = MalmenHParams(rank=8, reg="none")
    with pytest.warns(RuntimeWarning, match="least squares"):  # 5 requests: fewer keys than d
        edit = MalmenEditor(gpt2, hp).edit(lm_requests(5))
    assert edit.info["solve_fallbacks"] == 2 and "lambda" not in edit.info
    assert all(torch.isfinite(d).all() for d in edit.deltas.values())


@pytest.mark.filterwarnings("ignore::editors.solvers.SolverFallbackWarning")
def test_sum_of_shifts_residual_exceeds_normal_equation_residual(gpt2):
    """Same g_θ, same tuples: the normal equation reproduces the d_j far better than their sum."""
    reqs = lm_requests(10)
    hp = MalmenHParams(rank=8, lam_init=1e-9)
    r_norm = MalmenEditor(gpt2, hp).edit(reqs).mean_residual
    r_sum = MalmenEditor(gpt2, dataclasses.replace(hp, shift="sum")).edit(reqs).mean_residual
    assert r_sum > 10 * r_norm


def test_classifier_edit():
    em = random_bert(dtype=torch.float32)
    ed = MalmenEditor(em, MalmenHParams(rank=8, last_n=2))
    edit = ed.edit(cls_requests(4))
    assert edit.info["n_tuples"] == 4 and len(edit.deltas) == 2


@pytest.fixture(scope="module")
def tiny(request):
    """The shared tiny-gpt2 fixture when tests/conftest.py provides it, else the same model loaded here."""
    try:
        return request.getfixturevalue("tiny_gpt2")
    except pytest.FixtureLookupError:
        from bench.models import LoadContext, load_model

        return load_model(LoadContext("tiny-gpt2", Path(__file__).parents[2] / "results"))


@pytest.mark.slow
def test_meta_training_on_tiny_gpt2_makes_an_editor_and_reuses_its_checkpoint(tiny, tmp_path):
    """Brief meta-training turns a do-nothing g_θ (η₀ = 1e-6) into an editor; a 2nd prepare reuses it."""
    from tasks.synthetic import SyntheticTask

    task = SyntheticTask()
    train, test = task.train_split(), task.sample(32, 0)
    hp = MalmenHParams(rank=128, meta_lr=1e-3, train_edits=32, schedule="select", steps=40, val_every=40, n_val=32)
    ctx = EditorContext(results_dir=tmp_path, seed=0, model_key=tiny.key, task_key="synthetic", log=lambda s: None)
    ed = MalmenEditor(tiny, hp, ctx)
    untrained = ed.edit(test)
    ed.prepare(train)
    assert ed.prepare_info()["reused"] is False and (tmp_path / "checkpoints").exists()
    edit = ed.edit(test)
    pre = evaluate(tiny, test).metrics["es"]
    with untrained.applied(tiny.model):
        es_untrained = evaluate(tiny, test).metrics["es"]
    with edit.applied(tiny.model):
        es = evaluate(tiny, test).metrics["es"]
    assert es_untrained == pre  # η = 1e-6: the untrained editor changes nothing
    assert es >= pre + 0.2, (pre, es)
    again = MalmenEditor(tiny, hp, ctx)
    again.prepare(train)
    assert again.prepare_info()["reused"] is True
    for n, d in again.edit(test).deltas.items():
        assert torch.allclose(d, edit.deltas[n])


@pytest.mark.parametrize("val_batches, expected", [(0, 16), (1, 8)])
def test_validation_edits_every_full_batch_of_the_held_out_pool(tiny, tmp_path, val_batches, expected):
    """n_val = 20 held out, 8 edits per step: two full validation batches (16 requests), or the first one."""
    import json

    from tasks.synthetic import SyntheticTask

    hp = MalmenHParams(rank=8, train_edits=8, schedule="select", steps=1, val_every=1, n_val=20, val_batches=val_batches,
                       meta_threads=1)
    ctx = EditorContext(results_dir=tmp_path, seed=0, model_key=tiny.key, task_key="synthetic", log=lambda s: None)
    ed = MalmenEditor(tiny, hp, ctx)
    threads = torch.get_num_threads()
    ed.prepare(SyntheticTask().train_split()[:200])
    assert torch.get_num_threads() == threads  # meta_threads pins training only, then restores the setting
    meta = json.loads((Path(ed.prepare_info()["checkpoint"]) / "meta.json").read_text())
    assert meta["n_val_requests"] == expected
