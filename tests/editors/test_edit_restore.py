"""Edit.applied adds the shift and restores the weights bit-exactly."""

import pytest
import torch

from editors.base import Edit


def test_applied_changes_then_restores_bit_exactly():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    # Values for which (w + d) - d != w in float32, so restoring by subtraction would fail.
    with torch.no_grad():
        net[0].weight.fill_(0.1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    delta = torch.full((8, 8), 1e8 / 3)
    edit = Edit(deltas={"0.weight": delta})
    x = torch.randn(4, 8)
    y0 = net(x)
    with edit.applied(net):
        assert not torch.equal(net[0].weight, before["0.weight"])
        assert torch.allclose(net[0].weight, before["0.weight"] + delta)
        assert not torch.allclose(net(x), y0)
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]), n
    assert torch.equal(net(x), y0)


def test_applied_restores_after_an_exception():
    net = torch.nn.Linear(3, 3)
    before = net.weight.detach().clone()
    with pytest.raises(RuntimeError), Edit({"weight": torch.ones(3, 3)}).applied(net):
        raise RuntimeError("boom")
    assert torch.equal(net.weight, before)


def test_unknown_parameter_is_rejected_before_touching_weights():
    net = torch.nn.Linear(3, 3)
    before = net.weight.detach().clone()
    with pytest.raises(KeyError), Edit({"nope.weight": torch.ones(3, 3)}).applied(net):
        pass
    assert torch.equal(net.weight, before)


def test_non_finite_deltas_are_detected():
    with pytest.raises(FloatingPointError):
        Edit({"w": torch.tensor([1.0, float("nan")])}).check_finite()
