"""Producers whose forward is not the stock one: exact against the dense-Jacobian oracle, or named.

A convolution subclass that pads inside ``forward`` (EfficientNet's and timm's "same" padding) or
standardizes its weight (timm's ``StdConv2d``) computes ``F.conv2d`` on another input or with
another weight than its hooks see. The layer observes that call and compensates in the effective
weight; the oracle differentiates what the module really computes.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cbn
from oracle import DenseJacobianCBN


def _same_pads(size, kernel, stride, dilation):
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SamePaddingConv2d(nn.Conv2d):
    """TensorFlow "SAME" padding computed from the input size in forward (possibly asymmetric)."""

    def forward(self, x):
        top, bottom = _same_pads(x.shape[2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = _same_pads(x.shape[3], self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, [left, right, top, bottom])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StandardizedConv2d(nn.Conv2d):
    """Weight standardization: each filter to zero mean and unit variance before the convolution."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-6), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class ActivatedConv2d(nn.Conv2d):
    """Returns something other than a convolution's output: cannot be compensated."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


# The oracle's own description of each producer (no library code).
def _apply_same(producer, x, weight, bias):
    pads = [*_same_pads(x.shape[3], 3, 2, 1), *_same_pads(x.shape[2], 3, 2, 1)]
    return F.conv2d(F.pad(x, pads), weight, bias, 2)


def _standardized(producer):
    w = producer.weight
    centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
    return centred / torch.sqrt(centred.square().mean(dim=(1, 2, 3), keepdim=True) + 1e-6), producer.bias


def _apply_padded1(producer, x, weight, bias):
    return F.conv2d(x, weight, bias, 1, 1)


CASES = {
    "same_padding_subclass": (lambda: SamePaddingConv2d(3, 4, 3, stride=2, bias=True), dict(apply=_apply_same),
                              (2, 3, 8, 7)),
    "weight_standardized": (lambda: StandardizedConv2d(3, 4, 3, padding=1, bias=True),
                            dict(effective=_standardized, apply=_apply_padded1), (2, 3, 6, 6)),
    "weight_norm_parametrization": (
        lambda: nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3, padding=1, bias=True)),
        dict(apply=_apply_padded1), (2, 3, 6, 6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_custom_producers_match_dense_jacobian_oracle(case):
    torch.manual_seed(0)
    make_producer, description, input_shape = CASES[case]
    producer = make_producer().double()
    # The paper's rule here; the default (differentiable) on these producers: the test of the
    # same name in tests/functional/test_differentiable_compensation.py.
    norm = cbn.CrossIterationBatchNorm2d(4, window=4, differentiable_compensation=False, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # paired: no warning
        model = cbn.convert_model(nn.Sequential(producer, norm))
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        oracle = DenseJacobianCBN(producer, window=4, compensate=True, **description)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        params = list(model.parameters())
        for _ in range(6):
            x = (torch.randn(input_shape, dtype=torch.float64) * 2 + 0.5).requires_grad_()
            out = model(x)
            projection = torch.randn_like(out)
            (out * projection).sum().backward()
            grads = [p.grad.clone() for p in params] + [x.grad.clone()]
            gamma = norm.weight.detach().clone().requires_grad_()
            beta = norm.bias.detach().clone().requires_grad_()
            x_oracle = x.detach().clone().requires_grad_()
            expected, _, _ = oracle(x_oracle, gamma, beta)
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
            producer_params = list(producer.parameters())
            expected_grads = torch.autograd.grad((expected * projection).sum(), producer_params + [gamma, beta, x_oracle])
            for got, want in zip(grads[: len(producer_params)] + grads[-3:], expected_grads):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
            optimizer.step()
            optimizer.zero_grad()
    (row,) = cbn.pairing_report(model)
    assert row.compensated and row.producer == "0"


def test_compensation_in_the_raw_weight_would_be_caught():
    # The standardized case must be able to fail: an oracle that steps in the raw parameter
    # (what the layer did before it observed the call) disagrees after a few steps.
    torch.manual_seed(0)
    producer = StandardizedConv2d(3, 4, 3, padding=1, bias=True).double()
    norm = cbn.CrossIterationBatchNorm2d(4, window=4, differentiable_compensation=False, dtype=torch.float64)
    model = cbn.convert_model(nn.Sequential(producer, norm))
    raw = DenseJacobianCBN(producer, window=4, compensate=True,
                           apply=lambda p, x, w, b: _apply_padded1(p, x, _standardized(_Weight(w))[0], b))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    worst = 0.0
    for _ in range(5):
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        out = model(x)
        expected, _, _ = raw(x, norm.weight.detach(), norm.bias.detach())
        worst = max(worst, (out - expected).abs().max().item())
        out.square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert worst > 1e-6


class _Weight:
    def __init__(self, weight):
        self.weight, self.bias = weight, None


def test_forward_that_is_not_one_convolution_is_named_and_falls_back(recwarn):
    model = cbn.convert_model(nn.Sequential(ActivatedConv2d(3, 4, 3), nn.BatchNorm2d(4)), window=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        model(torch.randn(2, 3, 6, 6)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    (row,) = cbn.pairing_report(model)
    assert not row.compensated and row.reason.startswith("input is the result of tanh")
    messages = [str(w.message) for w in recwarn if "result of tanh" in str(w.message)]
    assert len(messages) == 1  # once, not per step


def test_capture_is_left_when_the_forward_raises_and_hooks_are_removed_on_revert():
    conv = SamePaddingConv2d(3, 4, 3)
    model = cbn.convert_model(nn.Sequential(conv, nn.BatchNorm2d(4)))
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5, 6, 6))  # wrong channel count inside F.conv2d
    assert not torch.overrides._get_current_function_mode_stack()
    model = cbn.revert_model(model)
    assert not conv._forward_pre_hooks and not conv._forward_hooks


class _NormOfAView(nn.Module):
    """``norm(view(producer(x)))``: LeViT's ``bn(linear(x).flatten(0, 1))`` and its relatives."""

    def __init__(self, producer: nn.Module, norm: nn.Module, view) -> None:
        super().__init__()
        self.producer, self.norm, self.view = producer, norm, view

    def forward(self, x):
        return self.norm(self.view(self.producer(x)))


VIEW_CASES = {
    # LeViT: a linear layer over tokens (B, N, C), normalized as (B * N, C) rows.
    "linear-tokens": (lambda: nn.Linear(5, 6), lambda y: y.flatten(0, 1), (3, 4, 5)),
    # A convolution's (N, C, H, W) output normalized as (N, C, H * W).
    "conv-flattened": (lambda: nn.Conv2d(3, 6, 3), lambda y: y.flatten(2), (2, 3, 6, 6)),
}


@pytest.mark.parametrize("case", list(VIEW_CASES))
def test_a_norm_of_a_view_that_keeps_the_channels_matches_the_oracle(case):
    make_producer, view, input_shape = VIEW_CASES[case]
    producer = make_producer().double()
    norm = nn.BatchNorm1d(6, dtype=torch.float64)
    model = cbn.convert_model(_NormOfAView(producer, norm, view), window=3)
    norm = model.norm
    oracle = DenseJacobianCBN(producer, window=3, compensate=True,
                              apply=lambda module, x, w, b: view(module._conv_forward(x, w, b)
                                                                 if isinstance(module, nn.Conv2d) else F.linear(x, w, b)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    for _ in range(5):
        x = torch.randn(input_shape, dtype=torch.float64) * 2 + 0.5
        out = model(x)
        projection = torch.randn_like(out)
        (out * projection).sum().backward()
        expected, _, _ = oracle(x, norm.weight.detach(), norm.bias.detach())
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
        optimizer.step()
        optimizer.zero_grad()
    (row,) = cbn.pairing_report(model)
    assert row.compensated and row.producer == "producer"


def test_a_view_that_moves_the_channel_axis_is_not_a_producer_output():
    producer = nn.Conv2d(3, 4, 3)
    # (N, C, H, W) -> (N, H, C, W): dim 1 of the view is H = 4, not the channels.
    model = cbn.convert_model(_NormOfAView(producer, nn.BatchNorm2d(4), lambda y: y.transpose(1, 2)), window=3)
    with pytest.warns(UserWarning, match="uncompensated"):
        model(torch.randn(2, 3, 6, 6)).sum().backward()
    (row,) = cbn.pairing_report(model)
    assert not row.compensated
    assert row.reason.startswith("input is the result of transpose")
