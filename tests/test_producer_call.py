"""Producers whose forward is not the stock one: exact against the dense-Jacobian oracle, or named.

A convolution subclass that pads inside ``forward`` (EfficientNet's and timm's "same" padding) or
standardizes its weight (timm's ``StdConv2d``) computes ``F.conv2d`` on another input or with
another weight than its hooks see. The layer observes that call and compensates in the effective
weight; the oracle differentiates what the module really computes.
"""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

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


# ----------------------------------------------------------------------------- pairing read per call
# Each case: the recipe a user runs, the dense-Jacobian oracle of what the producer really
# computes as reference, float64, every output and gradient compared at every step.

def _train_against_oracles(model, norms_and_oracles, batches, lr=0.2):
    """Train ``model`` (SGD with momentum) and check each norm's output (captured by a hook) and
    every gradient against its oracle. ``norms_and_oracles``: ``(norm, oracle, pool_from)``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for step, x in enumerate(batches):
        captured = {}
        handles = [norm.register_forward_hook(lambda m, args, out, key=i: captured.setdefault(key, []).append(
            (args[0].detach(), out))) for i, (norm, _, _) in enumerate(norms_and_oracles)]
        out = model(x)
        for handle in handles:
            handle.remove()
        projection = torch.randn_like(out)
        (out * projection).sum().backward()
        for i, (norm, oracle, pool_from) in enumerate(norms_and_oracles):
            for produced, normalized in captured[i]:
                gamma = norm.weight.detach().clone()
                beta = norm.bias.detach().clone()
                expected, _, _ = oracle.take(produced, gamma, beta, pool=step >= pool_from)
                torch.testing.assert_close(normalized.detach(), expected, rtol=0, atol=1e-9)
        optimizer.step()
        optimizer.zero_grad()


class _RecordedOracle:
    """An oracle fed with the producer's input, found by a forward pre-hook on the producer."""

    def __init__(self, producer, window, **kwargs):
        self.oracle = DenseJacobianCBN(producer, window=window, compensate=True, differentiable=True, **kwargs)
        self.inputs = []
        producer.register_forward_pre_hook(lambda module, args: self.inputs.append(args[0].detach()))

    def take(self, produced, gamma, beta, pool):
        return self.oracle(self.inputs.pop(0), gamma, beta, pool=pool)


def _batches(count, shape=(2, 3, 6, 6), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 0.5 for _ in range(count)]


def test_layers_built_directly_are_compensated_exactly_without_convert_model():
    # torchvision, timm and MONAI build models with norm_layer=...: no converter ever runs.
    torch.manual_seed(0)
    conv1, conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, stride=2)
    norm1, norm2 = cbn.CrossIterationBatchNorm2d(4, window=3), cbn.CrossIterationBatchNorm2d(5, window=3)
    model = nn.Sequential(conv1, norm1, nn.ReLU(), conv2, norm2).double()
    oracles = [(norm1, _RecordedOracle(conv1, 3), 0), (norm2, _RecordedOracle(conv2, 3), 0)]
    _train_against_oracles(model, oracles, _batches(6))
    assert all(row.compensated for row in cbn.pairing_report(model))


def test_torchvision_resnet_built_with_a_norm_layer_pairs_every_norm():
    from functools import partial

    from torchvision.models import resnet18

    model = resnet18(num_classes=4, norm_layer=partial(cbn.CrossIterationBatchNorm2d, window=3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        model(torch.randn(2, 3, 32, 32)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    rows = cbn.pairing_report(model)
    assert len(rows) == 20 and all(row.compensated for row in rows), cbn.format_pairing_report(rows)


class Detectron2StyleConv2d(nn.Conv2d):
    """detectron2's layers.Conv2d layout: the norm and the activation run inside the conv's forward."""

    def __init__(self, *args, norm=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm, self.activation = norm, activation

    def forward(self, x):
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        return self.activation(x) if self.activation is not None else x


def test_a_norm_inside_the_convolutions_forward_is_compensated_exactly():
    torch.manual_seed(1)
    stem = Detectron2StyleConv2d(3, 4, 3, padding=1, bias=False, norm=cbn.CrossIterationBatchNorm2d(4, window=3),
                                 activation=nn.ReLU())
    head = Detectron2StyleConv2d(4, 6, 1, norm=cbn.CrossIterationBatchNorm2d(6, window=3))
    model = nn.Sequential(stem, head).double()
    oracles = [(stem.norm, _RecordedOracle(stem, 3), 0), (head.norm, _RecordedOracle(head, 3), 0)]
    _train_against_oracles(model, oracles, _batches(5))
    assert all(row.compensated for row in cbn.pairing_report(model))


def test_pruning_added_after_pairing_is_compensated_in_the_pruned_weight():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3).double()
    norm = cbn.CrossIterationBatchNorm2d(4, window=3, dtype=torch.float64)
    model = nn.Sequential(conv, norm)
    oracle = _RecordedOracle(conv, 3)
    _train_against_oracles(model, [(norm, oracle, 0)], _batches(2))
    torch.nn.utils.prune.l1_unstructured(conv, "weight", amount=0.5)
    # From here the convolution uses weight_orig * weight_mask: the oracle's weight, too. The
    # window's entries were taken at the unpruned weights; the Taylor step moves them to the
    # pruned ones (its parameter is still weight_orig, the same leaf).
    oracle.oracle.effective = lambda module: (module.weight_orig * module.weight_mask, module.bias)
    _train_against_oracles(model, [(norm, oracle, 0)], _batches(3, seed=1))
    assert cbn.pairing_report(model)[0].compensated


def test_two_norms_fed_by_one_convolution_are_each_compensated():
    torch.manual_seed(3)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.a, self.b = cbn.CrossIterationBatchNorm2d(4, window=3), cbn.CrossIterationBatchNorm2d(4, window=3)

        def forward(self, x):
            y = self.conv(x)
            return self.a(y) * self.b(y)

    model = TwoHeads().double()
    shared = _RecordedOracle(model.conv, 3)
    twin = DenseJacobianCBN(model.conv, window=3, compensate=True, differentiable=True)

    class Second:  # the second norm sees the same producer input as the first
        def take(self, produced, gamma, beta, pool):
            return twin(shared_input[0], gamma, beta, pool=pool)

    shared_input = []
    model.conv.register_forward_pre_hook(lambda module, args: shared_input.__setitem__(slice(None), [args[0].detach()]))
    _train_against_oracles(model, [(model.a, shared, 0), (model.b, Second(), 0)], _batches(5))
    rows = cbn.pairing_report(model)
    assert [row.producer for row in rows] == ["conv", "conv"] and all(row.compensated for row in rows)


def test_one_norm_on_two_convolutions_moves_each_call_by_its_own_producer():
    # One norm applied to the outputs of two convolutions before one backward: two call
    # positions, each a window compensated with its own producer (one oracle per call).
    torch.manual_seed(4)
    first, second = nn.Conv2d(3, 4, 3).double(), nn.Conv2d(3, 4, 3, bias=False).double()
    norm = cbn.CrossIterationBatchNorm2d(4, window=3, dtype=torch.float64)

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second, self.norm = first, second, norm

        def forward(self, x):
            return self.norm(self.first(x)) - self.norm(self.second(x))

    model = Both()
    oracles = {0: _RecordedOracle(first, 3), 1: _RecordedOracle(second, 3)}

    class ByCall:
        calls = 0

        def take(self, produced, gamma, beta, pool):
            oracle = oracles[ByCall.calls % 2]
            ByCall.calls += 1
            return oracle.take(produced, gamma, beta, pool)

    _train_against_oracles(model, [(norm, ByCall(), 0)], _batches(5))
    assert len(norm.window_state.positions) == 2


def _two_views(use_reentrant, differentiable, steps=4):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(5)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.BatchNorm2d(8))
    plain = cbn.convert_model(base, window=3, differentiable_compensation=differentiable)
    checkpointed = copy.deepcopy(plain)

    def run(model, wrap):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        generator = torch.Generator().manual_seed(9)
        gradients = []
        for _ in range(steps):
            views = [torch.randn(2, 3, 6, 6, generator=generator) for _ in range(2)]
            loss = sum(wrap(model, v).square().mean() for v in views)
            loss.backward()
            gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
            optimizer.step()
            optimizer.zero_grad()
        return gradients

    expected = run(plain, lambda m, v: m(v))
    actual = run(checkpointed, lambda m, v: checkpoint(m, v.requires_grad_(use_reentrant), use_reentrant=use_reentrant))
    return expected, actual


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_two_views_before_one_backward_gives_the_plain_gradients(use_reentrant):
    # Two views of a batch through one checkpointed model, summed, one backward (SSL, siamese
    # calls): each recompute replays its own forward and fills its entry's gradients. Exact
    # with the paper's rule.
    expected, actual = _two_views(use_reentrant, differentiable=False)
    for step_expected, step_actual in zip(expected, actual):
        for name in step_expected:
            torch.testing.assert_close(step_actual[name], step_expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_two_views_differentiable_leaves_out_only_the_pending_entries_term(use_reentrant):
    # Known limit (docs/reliability.md): under differentiable compensation, the second view's
    # gradient through the first view's entry (same step, its statistic gradients known only at
    # its recompute, which comes later in backward) is left out. It only reaches the producers'
    # weights and biases: every other gradient of the first step is exact, theirs differ.
    expected, actual = _two_views(use_reentrant, differentiable=True, steps=1)
    for name in expected[0]:
        if name in ("0.weight", "3.weight"):
            assert not torch.allclose(actual[0][name], expected[0][name], rtol=0, atol=1e-6), name
        elif name in ("0.bias", "3.bias"):
            continue  # the term is a per-channel sum that a following norm cancels: ~0 both ways
        else:
            torch.testing.assert_close(actual[0][name], expected[0][name], rtol=0, atol=1e-6, msg=name)
