"""AlphaEdit: the null-space projection, the update against the official form, preserved keys, remembered batches."""

from __future__ import annotations

import pytest
import torch

from bench.evaluation.metrics import evaluate
from editors.alphaedit import AlphaEdit, AlphaEditHparams, null_space_projector, projected_update
from editors.base import EditorContext, model_defaults
from editors.stats import LayerStats


def _psd(d: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k0 = torch.randn(rank, d, generator=g, dtype=torch.float64)
    return k0.T @ k0 / rank


def test_projector_is_idempotent_symmetric_and_spans_the_small_eigenvalues():
    c = _psd(32, 20, 0)  # 12 zero eigenvalues
    p = null_space_projector(c, 1e-8)
    assert torch.allclose(p @ p, p, atol=1e-12) and torch.allclose(p, p.T, atol=1e-12)
    assert round(float(p.trace())) == 12
    assert float((p @ c).abs().max()) < 1e-10  # C's range is projected out
    assert round(float(null_space_projector(c, float("inf")).trace())) == 32


def test_update_equals_the_official_non_symmetric_solve():
    """ΔW from the SPD system equals the AlphaEdit code's solve(P (KᵀK + K_p) + λI, P Kᵀ R), transposed."""
    g = torch.Generator().manual_seed(1)
    d_in, d_out, m = 24, 10, 5
    p = null_space_projector(_psd(d_in, 15, 2), 1e-8)
    k = torch.randn(m, d_in, generator=g, dtype=torch.float64)
    r = torch.randn(m, d_out, generator=g, dtype=torch.float64)
    kept = _psd(d_in, 7, 3)
    for lam in (10.0, 0.5):
        ours = projected_update(k, r, p, kept, lam)
        official = torch.linalg.solve(p @ (k.T @ k + kept) + lam * torch.eye(d_in, dtype=torch.float64), p @ k.T @ r)
        assert torch.allclose(ours, official.T, rtol=1e-9, atol=1e-11), lam
    # and a wrong variant (no projection on the left) differs: the test can fail
    wrong = torch.linalg.solve(k.T @ k + kept + 10 * torch.eye(d_in, dtype=torch.float64), k.T @ r).T
    assert not torch.allclose(projected_update(k, r, p, kept, 10.0), wrong, atol=1e-3)


def _layer_inputs(em, layers, prompts):
    """All token positions' inputs of each layer for `prompts` (the preserved keys), float64."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    hooks = [em.module(n).register_forward_pre_hook(lambda _m, a, n=n: got[n].append(a[0].detach()))
             for n in layers]
    enc = em.tokenizer(prompts, return_tensors="pt", padding=True)
    try:
        with torch.no_grad():
            logits = em.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    finally:
        for h in hooks:
            h.remove()
    mask = enc.attention_mask.bool()
    return {n: torch.cat(v)[mask].double() for n, v in got.items()}, logits[mask]


def test_edit_leaves_the_preserved_keys_outputs_unchanged_and_still_edits(tiny_gpt2, synthetic_task, results_cache):
    """With C built from the preserved prompts' keys, their logits stay put (1e-5) while the edits land."""
    em = tiny_gpt2
    hp = AlphaEditHparams(**{**model_defaults("alphaedit", "tiny-gpt2"), "nullspace_threshold": 1e-7})
    ed = AlphaEdit(em, hp, EditorContext(results_dir=results_cache, seed=0))
    ed.prepare([])
    reqs = synthetic_task.sample(16, 0)
    preserved = [r.locality_prompt for r in synthetic_task.sample(64, 1)][:24]
    keys, before = _layer_inputs(em, ed.layer_names(), preserved)
    for name, k0 in keys.items():  # preserved knowledge = exactly these keys (rank < d_in)
        ed._stats[name] = LayerStats(k0.T @ k0 / len(k0), len(k0), False, ed._stats[name].path)
    ed._proj = {n: null_space_projector(s.mom2, hp.nullspace_threshold) for n, s in ed._stats.items()}
    assert all(0 < float(p.trace()) < p.shape[0] for p in ed._proj.values())
    edit = ed.edit(reqs)
    pre = evaluate(em, reqs)
    with edit.applied(em.model):
        _, after = _layer_inputs(em, ed.layer_names(), preserved)
        post = evaluate(em, reqs)
    rel = float((after - before).norm() / before.norm())
    assert rel <= 1e-5, rel
    assert post.metrics["es"] >= pre.metrics["es"] + 0.5, (pre.metrics, post.metrics)  # a no-op fails here


def test_remember_accumulates_the_kept_batches_keys(tiny_gpt2, synthetic_task, results_cache):
    hp = AlphaEditHparams(**model_defaults("alphaedit", "tiny-gpt2"))
    ed = AlphaEdit(tiny_gpt2, hp, EditorContext(results_dir=results_cache, seed=0))
    ed.prepare([])
    a, b = synthetic_task.sample_batches(4, 2, 0)
    ed.remember(a)
    ed.remember(b)
    layers = ed.layer_names()
    from editors.memit import block_name

    for layer in layers:
        ka = ed.keys_and_hidden(a, layer, block_name(tiny_gpt2, layers[-1]))[0].double()
        kb = ed.keys_and_hidden(b, layer, block_name(tiny_gpt2, layers[-1]))[0].double()
        assert torch.allclose(ed._kept[layer], ka.T @ ka + kb.T @ kb, rtol=1e-10, atol=1e-10)
    assert set(ed.prepare_info()["null_dims"]) == set(layers)


@pytest.mark.parametrize("model", ["gpt2-xl", "EleutherAI/gpt-j-6b", "meta-llama/Meta-Llama-3-8B"])
def test_published_hparams_files_parse(model):
    hp = AlphaEditHparams(**model_defaults("alphaedit", model))
    assert hp.nullspace_threshold == 2e-2 and hp.L2 == 10 and hp.layers
