"""Batch Renorm against a hand-written float64 oracle of Ioffe (2017) and against nn.BatchNorm."""

import math

import pytest
import torch
from torch import nn

from cbn.functional.batch_renorm import batch_renorm, renorm_limits
from cbn.layers.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, convert_batchrenorm


def oracle(x, running_mean, running_var, gamma, beta, eps, momentum, rmax, dmax):
    """Per-channel loops over plain Python floats: the paper's algorithm 1, literally."""
    c = x.shape[1]
    values = x.transpose(0, 1).reshape(c, -1).tolist()
    out = torch.empty_like(x)
    new_mean, new_var = [], []
    for ch in range(c):
        v = values[ch]
        m = len(v)
        mu_b = sum(v) / m
        var_b = sum((a - mu_b) ** 2 for a in v) / m
        sigma_b = math.sqrt(var_b + eps)
        sigma = math.sqrt(running_var[ch] + eps)
        r = min(max(sigma_b / sigma, 1 / rmax), rmax)
        d = min(max((mu_b - running_mean[ch]) / sigma, -dmax), dmax)
        out[:, ch] = gamma[ch] * ((x[:, ch] - mu_b) / sigma_b * r + d) + beta[ch]
        new_mean.append(running_mean[ch] + momentum * (mu_b - running_mean[ch]))
        new_var.append(running_var[ch] + momentum * (var_b * m / (m - 1) - running_var[ch]))
    return out, new_mean, new_var


@pytest.mark.parametrize("rmax,dmax", [(1.0, 0.0), (1.5, 0.3), (3.0, 5.0)])
def test_functional_matches_oracle_and_clips(rmax, dmax):
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64) * 2 + 0.7
    rm = torch.tensor([0.1, -0.5, 2.0], dtype=torch.float64)
    rv = torch.tensor([0.5, 4.0, 1.0], dtype=torch.float64)
    gamma = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)
    beta = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    expected, em, ev = oracle(x, rm.tolist(), rv.tolist(), gamma.tolist(), beta.tolist(), 1e-5, 0.1, rmax, dmax)
    got = batch_renorm(x, rm, rv, gamma, beta, True, 0.1, 1e-5, rmax, dmax)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rm, torch.tensor(em, dtype=torch.float64))
    torch.testing.assert_close(rv, torch.tensor(ev, dtype=torch.float64))


def test_r_and_d_carry_no_gradient():
    """d out / d x must be that of BN scaled by r (r, d constants), checked with autograd.grad on an oracle."""
    x = (torch.randn(6, 2, 3, dtype=torch.float64) * 3 + 1).requires_grad_()
    rm = torch.tensor([0.0, 0.2], dtype=torch.float64)
    rv = torch.tensor([1.0, 1.0], dtype=torch.float64)
    w = torch.randn(6, 2, 3, dtype=torch.float64)
    (batch_renorm(x, rm.clone(), rv.clone(), None, None, True, 0.1, 1e-5, 3.0, 5.0) * w).sum().backward()
    # Oracle: BN gradient times the (constant) r per channel.
    x2 = x.detach().clone().requires_grad_()
    bn_out = torch.nn.functional.batch_norm(x2, None, None, None, None, True, 0.0, 1e-5)
    (bn_out * w).sum().backward()
    sigma_b = torch.sqrt(x.detach().var((0, 2), unbiased=False) + 1e-5)
    r = (sigma_b / torch.sqrt(rv + 1e-5)).clamp(1 / 3, 3)
    torch.testing.assert_close(x.grad, x2.grad * r.view(1, 2, 1))


def test_ramp():
    assert renorm_limits(0, 3, 5, 10, 40, 20) == (1.0, 0.0)
    assert renorm_limits(9, 3, 5, 10, 40, 20) == (1.0, 0.0)
    r, d = renorm_limits(30, 3, 5, 10, 40, 20)
    assert r == pytest.approx(1 + 2 * 20 / 40) and d == pytest.approx(5 * 20 / 20)
    assert renorm_limits(10_000, 3, 5, 10, 40, 20) == (3.0, 5.0)


@pytest.mark.parametrize("cls,shape", [(BatchRenorm1d, (8, 4)), (BatchRenorm1d, (8, 4, 5)),
                                       (BatchRenorm2d, (4, 4, 3, 3)), (BatchRenorm3d, (2, 4, 2, 3, 3))])
def test_equals_batchnorm_during_warmup_and_in_eval(cls, shape):
    torch.manual_seed(1)
    brn = cls(4, warmup_steps=3, rmax_ramp_steps=5, dmax_ramp_steps=5).double()
    bn = {BatchRenorm1d: nn.BatchNorm1d, BatchRenorm2d: nn.BatchNorm2d, BatchRenorm3d: nn.BatchNorm3d}[cls](4).double()
    with torch.no_grad():
        for m in (brn, bn):
            m.weight.copy_(torch.linspace(0.5, 2, 4))
            m.bias.copy_(torch.linspace(-1, 1, 4))
    for step in range(3):
        x = torch.randn(*shape, dtype=torch.float64) * 3 + 2
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = brn(xa), bn(xb)
        torch.testing.assert_close(ya, yb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad)
        torch.testing.assert_close(brn.weight.grad, bn.weight.grad)
        torch.testing.assert_close(brn.running_var, bn.running_var)
    assert int(brn.num_batches_tracked) == 3
    assert brn.current_limits == (1.0, 0.0)
    # step 3 is the ramps' start (limits still (1, 0)); from step 4 on the output differs from BN
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 2
    torch.testing.assert_close(brn(x), bn(x))
    assert brn.current_limits[0] > 1.0
    assert not torch.allclose(brn(x), bn(x))
    brn.eval(), bn.eval()
    torch.testing.assert_close(brn(x), bn(x))


def test_module_uses_ramped_limits_and_matches_oracle():
    layer = BatchRenorm2d(3, warmup_steps=1, rmax_ramp_steps=2, dmax_ramp_steps=4).double()
    layer(torch.randn(4, 3, 2, 2, dtype=torch.float64))  # step 0: warm-up
    for step in (1, 2, 3):
        rmax, dmax = renorm_limits(step, 3.0, 5.0, 1, 2, 4)
        assert layer.current_limits == (rmax, dmax)
        x = torch.randn(4, 3, 2, 2, dtype=torch.float64) * 4 + 3
        expected, _, _ = oracle(x, layer.running_mean.tolist(), layer.running_var.tolist(),
                                layer.weight.tolist(), layer.bias.tolist(), layer.eps, 0.1, rmax, dmax)
        torch.testing.assert_close(layer(x), expected)


def test_convert_shares_state_and_keeps_other_modules():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2), nn.BatchNorm1d(2))
    weight = model[1].weight
    converted = convert_batchrenorm(model, warmup_steps=7)
    assert isinstance(converted[1], BatchRenorm2d) and isinstance(converted[5], BatchRenorm1d)
    assert converted[1].weight is weight and converted[1].warmup_steps == 7
    assert isinstance(converted[0], nn.Conv2d)
    assert BatchRenorm2d.convert(nn.BatchNorm2d(3)).__class__ is BatchRenorm2d


def test_wrong_rank_raises():
    with pytest.raises(ValueError):
        BatchRenorm2d(3)(torch.randn(4, 3))
