"""The hyper-network g_θ: identity at init, running statistics, sharing by shape, λ > 0, checkpoints."""

from __future__ import annotations

import torch

from editors.checkpoint import load_checkpoint, save_checkpoint
from editors.hypernet import HyperNet, RunningNorm

DIMS = {"a": (12, 4), "b": (12, 4), "c": (4, 12)}


def net(rank: int = 5) -> HyperNet:
    torch.manual_seed(0)
    return HyperNet(DIMS, rank=rank, n_blocks=2, lr_init=1e-6, lam_init=2.0)


def test_identity_at_initialisation_after_normalisation():
    g = net()
    u, v = torch.randn(9, 12), torch.randn(9, 4)
    pu, pv = g("a", u, v)
    assert torch.equal(pu, u) and torch.equal(pv, v)  # no statistics yet: identity normalisation
    g.observe("a", u, v)
    pu, pv = g("a", u, v)
    norm = g.nets["12x4"].norm(torch.cat([u, v], -1))
    assert torch.allclose(torch.cat([pu, pv], -1), norm)
    assert torch.allclose(norm.mean(0), torch.zeros(16), atol=1e-6)
    assert torch.allclose(norm.std(0), torch.ones(16), atol=1e-5)


def test_running_statistics_equal_full_batch_statistics_and_move_only_on_observe():
    x = torch.randn(100, 7, dtype=torch.float64) * 3 + 1
    rn = RunningNorm(7)
    for part in x.split([1, 30, 2, 67]):
        rn.observe(part)
    assert torch.allclose(rn.mean, x.mean(0)) and torch.allclose(rn.std(), x.std(0))
    before = {k: v.clone() for k, v in rn.state_dict().items()}
    rn.train()
    rn(torch.randn(5, 7, dtype=torch.float64))  # forward (even in training mode) never updates
    assert all(torch.equal(before[k], v) for k, v in rn.state_dict().items())


def test_one_network_per_shape_with_per_layer_scale_and_shift():
    g = net()
    assert set(g.nets) == {"12x4", "4x12"}
    assert g.where["a"] == ("12x4", 0) and g.where["b"] == ("12x4", 1) and g.where["c"] == ("4x12", 0)
    assert g.nets["12x4"].blocks[0].scale.shape == (2, 16)
    with torch.no_grad():  # make the blocks non-trivial
        for p in g.parameters():
            p.add_(0.1 * torch.randn_like(p))
    u, v = torch.randn(3, 12), torch.randn(3, 4)
    ya, yb = torch.cat(g("a", u, v), -1), torch.cat(g("b", u, v), -1)
    assert not torch.allclose(ya, yb)  # same weights, different per-layer scale/shift
    with torch.no_grad():  # a shift of layer b's last block moves b's output and leaves a's alone
        g.nets["12x4"].blocks[1].shift[1] += 1.0
    assert torch.equal(torch.cat(g("a", u, v), -1), ya)
    assert torch.allclose(torch.cat(g("b", u, v), -1), yb + 1.0)


def test_lambda_is_positive_and_eta_starts_at_init():
    g = net()
    assert torch.allclose(g.lr, torch.full((3,), 1e-6))
    assert abs(float(g.lam("c").detach()) - 2.0) < 1e-6
    with torch.no_grad():
        g.log_lam.fill_(-50.0)
    assert all(float(g.lam(n).detach()) > 0 for n in DIMS)


def test_blocks_learn_from_identity_init():
    """The zero-initialised factor receives a gradient at initialisation (the block is not frozen)."""
    g = net()
    u, v = torch.randn(20, 12), torch.randn(20, 4)
    pu, pv = g("a", u, v)
    (pu.sum() + pv.pow(2).sum()).backward()
    assert float(g.nets["12x4"].blocks[0].up.grad.abs().sum()) > 0


def test_checkpoint_round_trip(tmp_path):
    g = net()
    g.observe("a", torch.randn(10, 12), torch.randn(10, 4))
    with torch.no_grad():
        g.lr.fill_(3e-4)
    save_checkpoint(tmp_path / "ck", g.state_dict(), {"best_step": 7})
    state, side = load_checkpoint(tmp_path / "ck")
    h = net()
    h.load_state_dict(state)
    assert side["best_step"] == 7
    assert all(torch.equal(a, b) for a, b in zip(g.state_dict().values(), h.state_dict().values(), strict=True))
    assert load_checkpoint(tmp_path / "missing") is None
