"""The two-stage meta-gradient (Algorithm 2) equals end-to-end autograd (Figure 1), in float64."""

from __future__ import annotations

import random

import pytest
import torch

from editors import meta
from editors.hypernet import HyperNet
from editors.meta import MetaBatch, Options, cache_for, meta_backward
from tests.hyper_util import lm_requests, random_gpt2

N_REQ = 7  # with micro_batch 3 and chunk 5: neither divides the number of prompts or tuples


@pytest.fixture(scope="module")
def em():
    return random_gpt2(n_layer=3, n_embd=16, n_inner=32)


def make_net(em, modules, seed: int = 1) -> HyperNet:
    """A hyper-network with every parameter randomised (init would zero half the gradients)."""
    torch.manual_seed(seed)
    net = HyperNet({n: em.layer_dims(n) for n in modules}, rank=6, n_blocks=2, lr_init=0.5, lam_init=0.3).double()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name == "lr":
                p.copy_(torch.linspace(0.3, 0.8, p.numel()))
            elif name == "log_lam":
                p.copy_(torch.linspace(-2.0, 0.5, p.numel()))
            else:
                p.add_(0.3 * torch.randn_like(p))
    return net


def grads(em, net, batch, opt, how: str) -> dict[str, torch.Tensor]:
    modules = list(net.layers)
    tuples = cache_for(em, batch, modules, opt)
    net.zero_grad(set_to_none=True)
    meta_backward(em, net, tuples, batch, opt, how)
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def rel_errors(a: dict, b: dict) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {k: float((a[k] - b[k]).norm() / b[k].norm()) for k in a}


def setup(em, shift="normal", reg="ridge", cache="answer", which="second_fc"):
    modules = em.module_names(which=which)
    net = make_net(em, modules)
    batch = MetaBatch.from_requests(lm_requests(N_REQ), random.Random(0))
    tuples = cache_for(em, batch, modules, Options(cache=cache))
    for n in modules:  # non-trivial normalisation statistics, frozen afterwards
        net.observe(n, tuples.keys[n], tuples.grads[n])
    return net, batch, tuples


@pytest.mark.parametrize("shift,reg,cache,which", [
    ("normal", "ridge", "answer", "second_fc"),
    ("normal", "ridge", "all", "first_fc"),
    ("normal", "none", "all", "second_fc"),  # n > d here, so U Uᵀ is invertible without λ
    ("sum", "ridge", "answer", "second_fc"),
])
def test_two_stage_equals_naive(em, shift, reg, cache, which):
    net, batch, tuples = setup(em, shift, reg, cache, which)
    assert tuples.n % 5 != 0
    if reg == "none":
        assert tuples.n > tuples.keys[net.layers[0]].shape[1]
    opt = Options(shift=shift, reg=reg, cache=cache, micro_batch=3, chunk=5)
    naive = grads(em, net, batch, opt, "naive")
    two = grads(em, net, batch, opt, "two_stage")
    expected = {n for n, _ in net.named_parameters()}
    if shift == "sum" or reg == "none":
        expected.discard("log_lam")  # λ does not enter the shift
    assert set(two) == expected
    for k, g in naive.items():
        assert float(g.norm()) > 0, f"zero gradient for {k}: the test would not see an error there"
    errs = rel_errors(two, naive)
    assert max(errs.values()) < 1e-6, errs


def test_two_stage_independent_of_batching(em):
    net, batch, _ = setup(em)
    ref = grads(em, net, batch, Options(micro_batch=N_REQ, chunk=10_000), "two_stage")
    for mb, ch in ((1, 1), (2, 3), (4, 7)):
        errs = rel_errors(grads(em, net, batch, Options(micro_batch=mb, chunk=ch), "two_stage"), ref)
        assert max(errs.values()) < 1e-10, (mb, ch, errs)


def _mutant_no_solve(rs, grad_shift, shift):
    grad_d = (rs.keys @ grad_shift.double().T).to(grad_shift.dtype)  # forgets (UUᵀ + λI)⁻¹
    return grad_d, ORIG(rs, grad_shift, shift)[1]


def _mutant_lambda_sign(rs, grad_shift, shift):
    grad_d, dlam = ORIG(rs, grad_shift, shift)
    return grad_d, -dlam


def _mutant_lambda_missing(rs, grad_shift, shift):
    grad_d, dlam = ORIG(rs, grad_shift, shift)
    return grad_d, 0.0 * dlam


def _mutant_m_transposed_grad(rs, grad_shift, shift):
    grad_d, dlam = ORIG(rs, grad_shift, shift)
    return grad_d * 1.01, dlam  # ∇D off by 1%


ORIG = meta.ridge_backward


@pytest.mark.parametrize("mutant,hit", [
    (_mutant_no_solve, "blocks"), (_mutant_lambda_sign, "log_lam"),
    (_mutant_lambda_missing, "log_lam"), (_mutant_m_transposed_grad, "blocks"),
])
def test_equivalence_check_catches_wrong_gradients(em, monkeypatch, mutant, hit):
    """The comparison above is sharp: a wrong M, ∇D or λ term breaks it by far more than 1e-6."""
    net, batch, _ = setup(em)
    opt = Options(micro_batch=3, chunk=5)
    naive = grads(em, net, batch, opt, "naive")
    monkeypatch.setattr(meta, "ridge_backward", mutant)
    errs = rel_errors(grads(em, net, batch, opt, "two_stage"), naive)
    assert max(e for k, e in errs.items() if hit in k) > 1e-3, errs


def test_chunk_that_drops_the_tail_is_caught(em, monkeypatch):
    """Losing the last partial chunk of tuples in stage 2 (a classic bug) breaks the equivalence."""
    net, batch, _ = setup(em)
    opt = Options(micro_batch=3, chunk=5)
    naive = grads(em, net, batch, opt, "naive")
    real_forward = type(net).forward

    def forward_dropping_tail(self, name, keys, grads_):
        pk, pg = real_forward(self, name, keys, grads_)
        if torch.is_grad_enabled() and keys.shape[0] < opt.chunk:  # stage 2's partial tail chunk
            return pk * 0, pg * 0
        return pk, pg

    monkeypatch.setattr(type(net), "forward", forward_dropping_tail)
    errs = rel_errors(grads(em, net, batch, opt, "two_stage"), naive)
    assert max(errs.values()) > 1e-3, errs
