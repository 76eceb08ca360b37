"""Caching (key, value-gradient) tuples: positions, exactness against autograd, micro-batching, classifiers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from editors.caching import cache_tuples
from tests.hyper_util import cls_requests, lm_requests, random_bert, random_gpt2


@pytest.fixture(scope="module")
def gpt2():
    return random_gpt2(n_layer=2)


@pytest.fixture(scope="module")
def bert():
    return random_bert()


def weight_grads(em, loss_fn, modules):
    """∇W of a loss in (out, in) layout, by ordinary back-propagation into the parameters."""
    em.model.zero_grad(set_to_none=True)
    loss_fn().backward()
    out = {n: (em.module(n).weight.grad.T if em.spec.conv1d else em.module(n).weight.grad).clone() for n in modules}
    em.model.zero_grad(set_to_none=True)
    return out


def lm_loss(em, reqs):
    batch = em.encode([r.prompt for r in reqs], [r.target for r in reqs])
    logits = em.logits(batch)
    return F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("which", ["second_fc", "first_fc"])
def test_all_tokens_tuples_reconstruct_the_weight_gradient(gpt2, which):
    """With every token cached, Σ_j ∇v_j u_jᵀ is exactly ∇W of the summed NLL (Conv1D layout handled)."""
    reqs = lm_requests(5)
    modules = gpt2.module_names(which=which)
    t = cache_tuples(gpt2, [r.prompt for r in reqs], [r.target for r in reqs], modules, cache="all", micro_batch=2)
    ref = weight_grads(gpt2, lambda: lm_loss(gpt2, reqs), modules)
    for n in modules:
        assert torch.allclose(t.grads[n].T @ t.keys[n], ref[n], rtol=1e-9, atol=1e-12)


def test_answer_tokens_only_by_default(gpt2):
    reqs = lm_requests(6)
    prompts, targets = [r.prompt for r in reqs], [r.target for r in reqs]
    modules = gpt2.module_names()
    batch = gpt2.encode(prompts, targets)
    n_answer = int((batch.labels != -100).sum())
    t = cache_tuples(gpt2, prompts, targets, modules)
    t_all = cache_tuples(gpt2, prompts, targets, modules, cache="all")
    assert t.n == n_answer < t_all.n == int(batch.attention_mask.sum())
    # the answer-position keys are exactly the module inputs there
    seen = {}

    def grab(_m, inputs, _o):
        seen["u"] = inputs[0].detach()

    h = gpt2.module(modules[0]).register_forward_hook(grab)
    with torch.no_grad():
        gpt2.logits(batch)
    h.remove()
    assert torch.equal(t.keys[modules[0]], seen["u"][batch.labels != -100])


def test_micro_batching_does_not_change_the_tuples(gpt2):
    reqs = lm_requests(7)
    args = (gpt2, [r.prompt for r in reqs], [r.target for r in reqs], gpt2.module_names())
    a, b = cache_tuples(*args, micro_batch=7), cache_tuples(*args, micro_batch=3)
    for n in a.keys:
        assert torch.allclose(a.keys[n], b.keys[n]) and torch.allclose(a.grads[n], b.grads[n], atol=1e-12)


def test_frozen_lm_still_gives_value_gradients(gpt2):
    reqs = lm_requests(3)
    args = (gpt2, [r.prompt for r in reqs], [r.target for r in reqs], gpt2.module_names())
    ref = cache_tuples(*args)
    for p in gpt2.model.parameters():
        p.requires_grad_(False)
    try:
        frozen = cache_tuples(*args)
    finally:
        for p in gpt2.model.parameters():
            p.requires_grad_(True)
    for n in ref.grads:
        assert torch.allclose(ref.grads[n], frozen.grads[n])


def test_classifier_caches_the_cls_position_with_the_label_loss(bert):
    reqs = cls_requests(5)
    prompts, targets = [r.prompt for r in reqs], [r.target for r in reqs]
    modules = bert.module_names(last_n=2)
    t = cache_tuples(bert, prompts, targets, modules)
    assert t.n == 5  # one tuple per claim: position 0
    t_all = cache_tuples(bert, prompts, targets, modules, cache="all", micro_batch=2)
    enc = bert.encode_text(prompts)
    assert t_all.n == int(enc["attention_mask"].sum())

    def loss():
        return F.cross_entropy(bert.logits(enc), bert.label_ids(targets), reduction="sum")

    ref = weight_grads(bert, loss, modules)
    for n in modules:
        assert torch.allclose(t_all.grads[n].T @ t_all.keys[n], ref[n], rtol=1e-9, atol=1e-12)
