"""The C++ kernels give the Python implementation's results (bit for bit, except the rounding of
the fused normalization and of the variance terms of the Taylor products), and fall back cleanly.

The rest of the suite runs with the kernels active (the default where they build), so the
float64 dense-Jacobian oracle and gradcheck tests check the C++ path; the tests here tie the
Python path to it exactly.
"""

import threading
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import cbn
import cbn.kernels
from cbn.functional import PastStatistics, StatisticGradients, cross_iteration_batch_norm, pool_past, statistic_shifts
from cbn.functional.statistic_gradients import (
    ConvolutionCall,
    producer_statistic_gradients,
    producer_statistic_gradients_of_layers,
    statistic_shifts_of_layers,
    weight_rows,
)


def test_kernels_build_in_the_test_environment():
    # `make test` bootstraps a compiler-equipped environment: the kernels must be in use there,
    # or the rest of the suite would check only the Python implementation.
    assert cbn.kernels.available()


def _both(function):
    """``function()`` with the C++ kernels, then with the Python implementation."""
    with cbn.kernels.use_kernels(True):
        fast = function()
    with cbn.kernels.use_kernels(False):
        python = function()
    return fast, python


def _assert_identical(fast, python):
    assert len(fast) == len(python)
    for a, b in zip(fast, python):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b), float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none", "frozen weight"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "3d"])
def test_pooled_normalization_equals_python(dtype, affine, layout):
    # Contiguous inputs take the fused kernel (statistics summed in double in two passes, the
    # backward in two passes), which agrees with the Python form's BatchNorm kernels to float
    # rounding; channels-last takes the same ATen kernels as Python, bit for bit.
    channels = 6
    mean, var = torch.randn(3, channels, dtype=dtype), torch.rand(3, channels, dtype=dtype) + 0.1
    past = pool_past(mean, var, torch.tensor([[1.0], [1.0], [0.0]], dtype=dtype))
    shape = (2, channels, 3, 4, 5) if layout == "3d" else (3, channels, 5, 7)
    x = torch.randn(shape, dtype=dtype) * 3 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = (torch.rand(channels, dtype=dtype) + 0.5).requires_grad_(affine in ("both", "weight"))
    bias = torch.randn(channels, dtype=dtype, requires_grad=True)
    weight = weight if affine in ("both", "weight", "frozen weight") else None
    bias = bias if affine in ("both", "bias") else None
    projection = torch.randn(shape, dtype=dtype)
    leaves = [t for t in (x, weight, bias) if t is not None and t.requires_grad]

    def run():
        out, stats = cross_iteration_batch_norm(x, past, weight, bias, 1e-5, dtype)
        return (out, *stats, *torch.autograd.grad((out * projection).sum(), leaves))

    fast, python = _both(run)
    if layout == "channels_last":
        _assert_identical(fast, python)
        return
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(fast, python):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


def test_pooled_normalization_of_half_input_equals_python():
    # Under AMP the layer normalizes a half-precision input with float32 statistics.
    past = pool_past(torch.randn(2, 4), torch.rand(2, 4) + 0.1, torch.ones(2, 1))
    x = (torch.randn(2, 4, 6, 6) * 2).half().requires_grad_()

    def run():
        out, stats = cross_iteration_batch_norm(x, past, None, None, 1e-5, torch.float32)
        return (out, *stats, *torch.autograd.grad(out.float().square().sum(), [x]))

    _assert_identical(*_both(run))


def test_pooled_normalization_has_no_double_backward():
    past = pool_past(torch.randn(2, 3), torch.rand(2, 3) + 0.1, torch.ones(2, 1))
    x = torch.randn(2, 3, 4, requires_grad=True)
    for enabled in (True, False):
        with cbn.kernels.use_kernels(enabled):
            out, _ = cross_iteration_batch_norm(x, past, None, None, 1e-5)
            with pytest.raises(RuntimeError, match="not differentiable|double backward|once_differentiable"):
                (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
                grad.sum().backward()


@pytest.mark.parametrize("producer", [
    nn.Conv2d(4, 6, 3), nn.Conv2d(4, 6, 3, groups=2, bias=False), nn.ConvTranspose2d(4, 6, 3, groups=2),
    nn.Linear(5, 3), nn.Conv2d(64, 8, 3),
], ids=["conv", "grouped", "transposed", "linear", "wide"])
def test_statistic_shifts_of_layers_equal_python(producer):
    # Both terms are dot products of fan_in values (the mean terms plus the bias), summed by the
    # kernel and by ATen in different orders: each within the float bound gamma_m (sum |a b| + |bias|)
    # of the float64 sum (gamma_m = m u / (1 - m u), m = fan_in + 1, u = 2^-24).
    channels = producer.weight.shape[1] * producer.groups if isinstance(producer, nn.ConvTranspose2d) else producer.weight.shape[0]
    rows = weight_rows(producer, producer.weight.detach())
    groups = getattr(producer, "groups", 1)
    gradients = StatisticGradients(torch.randn(groups, 3, rows.shape[1]), torch.randn(channels, 3, rows.shape[1]))
    weight = rows if isinstance(producer, nn.ConvTranspose2d) else producer.weight.detach()
    bias = producer.bias.detach() if producer.bias is not None else None
    # A window's slots: views of a window (strided rows) and tensors of their own (as the window
    # keeps them); a float64 weight against float32 gradients takes the conversion path too.
    own = ([slot.clone() for slot in gradients.mean.unbind(1)], [slot.clone() for slot in gradients.var.unbind(1)])
    operands = [(gradients.mean.unbind(1), gradients.var.unbind(1), weight, bias), (*own, weight.double(), None)]
    with torch.no_grad():
        both = _both(lambda: statistic_shifts_of_layers(operands))
        reference = [statistic_shifts(gradients, *operand[2:]) for operand in operands]
    # (k, C + C): the two layers' terms side by side, as lists per layer
    fast, python = ([terms.split(channels, dim=1) for terms in found] for found in both)
    _assert_identical(python[0], [mean for mean, _ in reference])
    _assert_identical(python[1], [var for _, var in reference])
    m_u = (rows.shape[1] + 1) * 2.0**-24
    gamma = m_u / (1 - m_u)
    patches = gradients.mean.double().repeat_interleave(channels // groups, dim=0)  # (C, k, fan_in): each channel's group
    for terms, gradient in ((0, patches), (1, gradients.var.double())):
        for (_, _, _, layer_bias), fast_terms, reference_terms in zip(operands, fast[terms], [r[terms] for r in reference]):
            offset = torch.zeros(channels, dtype=torch.float64)
            if terms == 0 and layer_bias is not None:  # the bias enters the mean terms only
                offset = layer_bias.double()
            exact = (gradient * rows.double().unsqueeze(1)).sum(-1).t() + offset
            bound = gamma * ((gradient.abs() * rows.double().abs().unsqueeze(1)).sum(-1).t() + offset.abs())
            for computed in (fast_terms, reference_terms):
                assert computed.dtype == reference_terms.dtype and computed.shape == reference_terms.shape
                assert ((computed.double() - exact).abs() <= bound).all()


def test_statistic_shifts_do_not_depend_on_the_thread_count():
    gradients = StatisticGradients(torch.randn(1, 3, 4608), torch.randn(512, 3, 4608))
    operands = [(gradients.mean.unbind(1), gradients.var.unbind(1), torch.randn(512, 4608), None)]
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            with torch.no_grad():
                results.append(statistic_shifts_of_layers(operands))
    finally:
        torch.set_num_threads(threads)
    (mean_1, var_1), (mean_2, var_2) = results
    assert torch.equal(mean_1, mean_2) and torch.equal(var_1, var_2)


@pytest.mark.parametrize("channels,fan_in,groups", [(7, 37, 1), (12, 203, 1), (6, 25, 6)])
@pytest.mark.parametrize("entries", [3, 6])
def test_statistic_shifts_of_an_entry_alone_equal_its_shifts_in_a_window_bit_for_bit(channels, fan_in, groups, entries):
    # A new entry's shifts are taken alone (one entry per call) and its shifts in later windows
    # with the other entries (several per call): the same numbers bit for bit, so that a Taylor step
    # at unchanged weights moves a stored entry by exactly zero. Lengths with every tail of the
    # four-vector dot product in float (blocks of 32, then of 8, then single values: 37 = 32 + 5,
    # 203 = 6 x 32 + 8 + 3, 25 = 3 x 8 + 1); 6 entries: the kernel reads four rows side by side,
    # then two.
    assert cbn.kernels.available()
    torch.manual_seed(0)
    mean_grad, var_grad = torch.randn(groups, entries, fan_in), torch.randn(channels, entries, fan_in)
    weight, bias = torch.randn(channels, fan_in), torch.randn(channels)
    window_means, window_vars = torch.ops.cbn.statistic_shifts_many(mean_grad.unbind(1), var_grad.unbind(1), entries,
                                                                    [weight], [bias])
    for t in range(entries):
        mean, var = torch.ops.cbn.statistic_shifts_many([mean_grad[:, t].contiguous()], [var_grad[:, t].contiguous()],
                                                        1, [weight], [bias])
        assert torch.equal(mean[0], window_means[t]) and torch.equal(var[0], window_vars[t])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels,fan_in,groups", [(20, 4621, 1), (33, 203, 1), (7, 37, 7), (12, 1100, 3)])
@pytest.mark.parametrize("entries", [3, 6])
def test_statistic_shifts_mean_terms_equal_the_variance_terms_dot_products_bit_for_bit(channels, fan_in, groups,
                                                                                       entries, dtype):
    # The kernel takes the variance terms one channel at a time (simd::dots) and the mean terms for
    # a block of up to 16 channels at once over chunks of the shared mean patches
    # (simd::dots_shared): with every channel's variance rows equal to its group's mean patches,
    # the two terms are the same dot products, and must be equal bit for bit. Lengths with several
    # chunks and every tail (4621 = 4 x 1024 + 16 x 32 + 8 + 5 floats), blocks of 16 with a rest
    # (20, 33 channels), groups of one channel and of four.
    assert cbn.kernels.available()
    torch.manual_seed(0)
    mean_grad = torch.randn(groups, entries, fan_in, dtype=dtype)
    var_grad = mean_grad.repeat_interleave(channels // groups, dim=0)
    weight = torch.randn(channels, fan_in, dtype=dtype)
    means, variances = torch.ops.cbn.statistic_shifts_many(mean_grad.unbind(1), var_grad.unbind(1), entries,
                                                           [weight], [None])
    assert torch.equal(means, variances)
    exact = (var_grad.double() * weight.double().unsqueeze(1)).sum(-1).t()
    assert (means.double() - exact).abs().max() < 1e-3 * exact.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("summary", ["differentiable", "paper", "naive"])
def test_window_summary_equals_python_bit_for_bit(dtype, summary):
    # cbn::window_summary runs the Python forms' float operations in their order (scalar, no FMA):
    # the same summaries and coefficients bit for bit, where entries are missing in some channels
    # and the clamp acts in others.
    from cbn.functional.differentiable_compensation import compensation_coefficients
    from cbn.functional.window import MEAN_SHIFT, SAMPLES, VAR, VAR_SHIFT, pool_windows

    torch.manual_seed(0)
    sizes = [5, 3, 8]
    stats = torch.randn(3, 5, sum(sizes), dtype=dtype)
    stats[:, VAR] = stats[:, VAR].abs()
    stats[:, SAMPLES] = 18.0
    stats.mul_((torch.rand(3, 1, sum(sizes)) >= 0.3).to(dtype))  # invalid entries: every row zero
    stats[1, :, :4] = 0.0  # a slot empty in the first layer's channels
    mean_now = stats[:, MEAN_SHIFT] + 0.5 * torch.randn(3, sum(sizes), dtype=dtype)
    var_now = stats[:, VAR_SHIFT] + 2.0 * torch.randn(3, sum(sizes), dtype=dtype)

    def summaries():
        if summary == "differentiable":
            terms = compensation_coefficients(stats, mean_now, var_now, sizes)
            return [t for layer in terms for t in (*layer.past[:-1], layer.coefficients)]
        shifts = (mean_now, var_now) if summary == "paper" else (None, None)
        return [t for past in pool_windows(stats, *shifts, sizes) for t in past[:-1]]

    fast, python = _both(summaries)
    _assert_identical(fast, python)
    if summary != "naive":  # the clamp acted somewhere, and some entries are missing
        moved_var = stats[:, VAR] + (var_now - stats[:, VAR_SHIFT]) - (mean_now - stats[:, MEAN_SHIFT]) ** 2
        assert ((moved_var < 0) & (stats[:, SAMPLES] > 0)).any() and (stats[:, SAMPLES] == 0).any()


def test_statistic_gradients_of_layers_equal_python_bit_for_bit():
    convolution = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    call = ConvolutionCall(torch.randn(4, 3, 3), None, (1,), "valid", (1,), 1)
    cases = [
        (convolution, torch.randn(2, 3, 9, 8)),
        (nn.Conv1d(3, 4, 3, padding=1), torch.randn(1, 3, 11)),
        (nn.Conv3d(2, 3, 2, stride=2), torch.randn(3, 2, 4, 6, 4)),
        (call, torch.randn(2, 3, 10)),
        # Not in the one-convolution form: the Python function in both modes (the grouped one's and
        # batch 8's mean patches from cbn::mean_patches where the kernels are active: below).
        (nn.Conv2d(4, 6, 3, groups=2), torch.randn(2, 4, 6, 6)),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), torch.randn(2, 3, 6, 6)),
        (nn.Conv2d(3, 4, 3), torch.randn(8, 3, 6, 6)),
    ]
    operands = []
    with torch.no_grad():
        for producer, x in cases:
            if isinstance(producer, ConvolutionCall):
                y = torch.nn.functional.conv1d(x, producer.weight, None, producer.stride, producer.padding)
            else:
                y = producer(x)
            mean = y.mean([0, *range(2, y.dim())])
            operands.append((producer, x, y, mean))
        fast, python = _both(lambda: producer_statistic_gradients_of_layers(operands))
        with cbn.kernels.use_kernels(False):
            reference = [producer_statistic_gradients(*operand) for operand in operands]
    # The grouped one, batch 8 (two weight-gradient convolutions) and, in the kernels' one call, the
    # 2-D one (beside a weight gradient of C rows, not C + 1).
    with_mean_patches = (0, 4, 6)
    for found in (fast, python):
        for index, (gradients, expected) in enumerate(zip(found, reference)):
            if found is fast and index in with_mean_patches:
                # Their mean patches are cbn::mean_patches' sums (the test below and the exact-sums
                # test of the one call): the variance rows only.
                _assert_identical(gradients[1:], expected[1:])
                continue
            _assert_identical(gradients, expected)


@pytest.mark.parametrize("producer,shape,form", [
    (lambda: nn.Conv2d(16, 8, 3, padding=1), (2, 16, 9, 7), "channel vectors"),
    (lambda: nn.Conv2d(32, 64, 3, padding=1), (2, 32, 40, 40), "channel vectors"),
    # (the channel vectors' bounds: 64 channels on a 14x14 plane, a stride-2 layer of 64, Cout > 2 Cin)
    (lambda: nn.Conv2d(64, 64, 3, padding=1), (2, 64, 14, 14), "ATen"),
    (lambda: nn.Conv2d(64, 128, 3, stride=2, padding=1), (1, 64, 14, 14), "ATen"),
    (lambda: nn.Conv2d(16, 48, 3, padding=1), (1, 16, 8, 8), "ATen"),
    (lambda: nn.Conv2d(8, 16, 3, stride=2, bias=False), (1, 8, 9, 9), "channel vectors"),
    (lambda: nn.Conv2d(8, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (3, 8, 10, 7), "channel vectors"),
    (lambda: nn.Conv2d(3, 6, 3, padding=1), (2, 3, 8, 8), "shifted rows"),
    (lambda: nn.Conv2d(5, 4, (5, 3), padding=(2, 0)), (3, 5, 9, 7), "shifted rows"),
    (lambda: nn.Conv2d(1, 7, (1, 3)), (1, 1, 4, 11), "shifted rows"),
    # (beyond the kernel's scratch buffer)
    (lambda: nn.Conv2d(3, 32, 3, padding=1), (2, 3, 160, 160), "shifted rows"),
    (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 9, 9), "ATen"),
    (lambda: nn.Conv2d(16, 4, 1), (2, 16, 5, 5), "ATen"),
    (lambda: nn.Conv2d(72, 4, 3, padding=1), (1, 72, 4, 4), "ATen"),
], ids=["3x3", "3x3_32_to_64", "aten_64_channels_14px", "aten_64_channels_stride2", "aten_out_over_twice_in",
        "3x3_stride2", "3x2_strided_dilated", "rows_3x3", "rows_5x3_valid_rows", "rows_1x3", "rows_large_planes",
        "aten_stride2", "aten_1x1", "aten_72_channels"])
def test_convolution_statistic_gradients_equal_the_exact_sums(producer, shape, form):
    # cbn::convolution_statistic_gradients on float32 2-D producers: the direct loops (at most 64 input
    # channels and several taps; any stride with input channels in eights, else stride 1) and ATen's
    # weight gradient, within
    # (n + 3) u sum |terms| of the float64 sums (n = N H_out W_out products per value, 3 roundings
    # of the centred and scaled output), the variance rows (2/m) sum (y - mu) u and the mean patch.
    # Which loop ran shows in the ATen operations it dispatched: none for the direct ones.
    torch.manual_seed(0)
    producer = producer()
    x = torch.randn(shape) * 2 + 1
    with torch.no_grad():
        y = producer(x)
    mean = y.mean((0, 2, 3))
    channels, samples = y.shape[1], y.numel() // y.shape[1]
    assert cbn.kernels.active()
    settings = [*producer.stride, *producer.padding, *producer.dilation]
    with torch.autograd.profiler.profile() as profile:
        (mean_grad,), (var_grad,) = torch.ops.cbn.convolution_statistic_gradients([x], [y], [mean], [producer.weight],
                                                                                   settings)
    weight_gradients = sum(event.name == "aten::convolution_backward" for event in profile.function_events)
    assert weight_gradients == (1 if form == "ATen" else 0)
    (listed,) = producer_statistic_gradients_of_layers([(producer, x, y, mean)])
    assert torch.equal(listed.mean, mean_grad) and torch.equal(listed.var, var_grad)

    def weight_gradient(values, grad_output):
        return torch.nn.grad.conv2d_weight(values, [grad_output.shape[1], *producer.weight.shape[1:]], grad_output,
                                           producer.stride, producer.padding, producer.dilation) / samples

    centred = 2 * (y.double() - mean.double().view(1, -1, 1, 1))
    exact = weight_gradient(x.double(), centred).reshape(channels, 1, -1)
    magnitude = weight_gradient(x.double().abs(), centred.abs()).reshape(channels, 1, -1)
    uniform = torch.ones_like(y[:, :1], dtype=torch.float64)
    exact_patch = weight_gradient(x.double(), uniform).reshape(1, 1, -1)
    patch_magnitude = weight_gradient(x.double().abs(), uniform).reshape(1, 1, -1)
    bound = (samples + 3) * 2.0**-24
    assert var_grad.shape == exact.shape and mean_grad.shape == exact_patch.shape
    assert ((var_grad.double() - exact).abs() <= bound * magnitude).all()
    assert ((mean_grad.double() - exact_patch).abs() <= bound * patch_magnitude).all()
    assert exact.abs().max() > 0.1 and exact_patch.abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("producer,shape", [
    (lambda: nn.Conv2d(4, 4, (5, 3), stride=(2, 1), padding=(2, 1), dilation=(1, 2), groups=4), (3, 4, 11, 9)),
    (lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6), (2, 6, 16, 16)),
    (lambda: nn.Conv2d(4, 6, 3, groups=2), (1, 4, 7, 5)),
], ids=["depthwise_5x3_strided_dilated", "depthwise_stride2", "grouped"])
def test_mean_patches_kernel_equals_the_exact_window_sums(producer, shape, dtype):
    # cbn::mean_patches (separable window sums) and the convolution of the Python form, both within
    # the textbook bound (n + 1) u sum |x| / m of the float64 window sums, n = N H_out W_out terms.
    from cbn.functional.statistic_gradients import _mean_patches

    torch.manual_seed(0)
    producer = producer().to(dtype)
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    output_size = list(producer(x).shape[2:])
    kernel_size = list(producer.weight.shape[2:])
    padding = list(producer.padding)
    samples = shape[0] * output_size[0] * output_size[1]

    def patches(values):
        return _mean_patches(producer, values, padding, output_size, kernel_size, samples)

    assert cbn.kernels.active()
    fast = patches(x)
    assert torch.equal(fast, torch.ops.cbn.mean_patches(x, kernel_size, list(producer.stride), padding,
                                                        list(producer.dilation), output_size, samples))
    with cbn.kernels.use_kernels(False):
        python = patches(x)
        exact, magnitude = patches(x.double()), patches(x.double().abs())
    unit = 2.0**-24 if dtype == torch.float32 else 2.0**-53
    bound = (samples + 1) * unit * magnitude
    for found in (fast, python):
        assert found.dtype == dtype and found.shape == (shape[1], *kernel_size)
        assert ((found.double() - exact).abs() <= bound).all()
    assert exact.abs().max() > 0.1  # (padding, strides and dilation leave values in every patch)


def _train(model, steps=6, memory_format=torch.contiguous_format):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    for _ in range(steps):
        loss = model(torch.randn(2, 3, 10, 10).contiguous(memory_format=memory_format)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_training_agrees_with_and_without_kernels():
    # Identical but for the rounding of the Taylor products' variance terms (see above).
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
            nn.ConvTranspose2d(8, 4, 3, groups=2), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(6),
        )
        return cbn.convert_model(model, window=3, burnin=1)

    fast, python = _both(lambda: _train(build()).state_dict())
    assert fast.keys() == python.keys()
    for key in fast:
        torch.testing.assert_close(fast[key], python[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("compensate", [False, True], ids=["naive", "compensated"])
def test_recorded_state_equals_python(compensate):
    # Window entries, counters and running statistics written by the C++ record against the
    # Python one, through windows 1, 2 and 3, a cumulative average, a layer without running
    # statistics, burn-in and a batch that is not finite. Naive CBN has no Taylor products:
    # every buffer must be identical, bit for bit.
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3), cbn.CrossIterationBatchNorm2d(8, window=3, momentum=None, compensate=compensate),
            nn.ReLU(),
            nn.Conv2d(8, 4, 3), cbn.CrossIterationBatchNorm2d(4, window=1), nn.ReLU(),
            nn.Conv2d(4, 6, 3), cbn.CrossIterationBatchNorm2d(6, window=2, burnin=2, compensate=compensate),
            nn.Conv2d(6, 5, 1), cbn.CrossIterationBatchNorm2d(5, window=3, track_running_stats=False,
                                                               compensate=compensate),
        )
        return cbn.convert_model(model)

    def run():
        # Channels-last inputs keep the normalization on the ATen form, identical in both modes,
        # so that any difference would come from the record.
        model = _train(build(), steps=5, memory_format=torch.channels_last)
        bad = torch.randn(2, 3, 10, 10)
        bad[1, 0, 2, 2] = float("nan")
        model(bad.contiguous(memory_format=torch.channels_last))
        _train(model, steps=2, memory_format=torch.channels_last)
        state = model.state_dict()  # and the windows, which it does not hold
        for name, saved in cbn.window_state_dict(model).items():
            for index, position in enumerate(saved["positions"]):
                for key in ("stats", "mean_grad", "var_grad"):
                    if position[key] is not None:
                        state[f"{name}.window.{index}.{key}"] = position[key]
        return state

    fast, python = _both(run)
    assert fast.keys() == python.keys()
    for key in fast:
        if compensate:
            torch.testing.assert_close(fast[key], python[key], rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert torch.equal(fast[key], python[key]), key
    assert fast["1.num_batches_tracked"] == 8 and "1.window.0.stats" in fast


def test_record_kernel_checks_every_argument_before_writing():
    # A bad argument of the second layer raises before the first layer's buffers are touched.
    window = torch.zeros(2, 5, 3)
    running_mean, running_var, tracked = torch.zeros(3), torch.ones(3), torch.zeros((), dtype=torch.long)
    stats = [torch.rand(3), torch.rand(4)]
    with pytest.raises(RuntimeError, match="expected a contiguous CPU tensor of 4"):
        torch.ops.cbn.write_entries(
            stats, stats, None, None, [10, 10], [window, None], [0, 0],
            [running_mean, torch.zeros(4)], [running_var, torch.ones(5)], [tracked, torch.zeros((), dtype=torch.long)],
            [0.1, 0.1], stats, stats, [None, None],
        )
    assert not window.any() and not running_mean.any() and tracked == 0 and (running_var == 1).all()


def test_a_failed_build_warns_once_and_uses_python(monkeypatch):
    def fail(verbose):
        raise OSError("no C++ compiler")

    monkeypatch.setattr(cbn.kernels, "_loaded", None)
    monkeypatch.setattr(cbn.kernels, "_compile", fail)
    with pytest.warns(RuntimeWarning, match="could not be built .*no C\\+\\+ compiler.*Python implementation"):
        assert not cbn.kernels.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cbn.kernels.available()
        past = PastStatistics(torch.zeros(3), torch.ones(3), torch.ones(3))
        out, _ = cross_iteration_batch_norm(torch.randn(2, 3, 4), past, None, None, 1e-5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("entries", [3, 20])
def test_window_weight_gradient_equals_the_exact_sum(groups, dtype, entries):
    # One pass over the window (C++) and the ATen products (Python) against the float64 sum
    # sum_t a[c, t] G_mu[group(c), t] + b[c, t] G_var[c, t], within gamma_n sum |terms| (n = 2k).
    # 20 entries: more than the kernel sums in registers at once (16), so a second block adds to the row.
    from cbn.functional.differentiable_compensation import window_weight_gradient

    generator = torch.Generator().manual_seed(0)
    channels, fan_in = 6, 37
    mean_grad = torch.randn(groups, entries, fan_in, generator=generator, dtype=dtype)
    var_grad = torch.randn(channels, entries, fan_in, generator=generator, dtype=dtype)
    a = torch.randn(channels, entries, generator=generator, dtype=dtype)
    b = torch.randn(channels, entries, generator=generator, dtype=dtype)
    a[:, 1] = b[:, 1] = 0  # an empty slot: skipped by the kernel, zero in the sum
    a[:, -2] = b[:, -2] = 0
    patches = mean_grad.double().repeat_interleave(channels // groups, dim=0)
    mean_terms, var_terms = a.double().unsqueeze(2) * patches, b.double().unsqueeze(2) * var_grad.double()
    exact = (mean_terms + var_terms).sum(1)
    unit = 2.0**-24 if dtype == torch.float32 else 2.0**-53
    bound = 2 * entries * unit / (1 - 2 * entries * unit) * (mean_terms.abs() + var_terms.abs()).sum(1)
    fast, python = _both(lambda: window_weight_gradient(a, mean_grad, b, var_grad))
    for out in (fast, python):
        assert out.dtype == dtype and out.shape == (channels, fan_in)
        assert ((out.double() - exact).abs() <= bound).all()



def test_weight_fingerprint_equals_the_probed_dot_and_sees_any_single_change():
    from cbn.producer_call import PROBE_LANES, _probe, _probe_parts

    assert cbn.kernels.active()  # (loads them when this test runs alone)
    torch.manual_seed(0)
    # Several blocks of the lane probe, the last one partial.
    weight, bias = torch.randn(96, 16, 3, 3), torch.randn(96)
    parts = _probe_parts(weight.dtype, weight.device)
    lanes, blocks = parts
    fast = torch.ops.cbn.weight_fingerprint([weight, bias], *parts)
    # The oracle: float64 dot products with the whole probe, built from its definition.
    probes = [_probe(t.numel(), t.dtype, t.device) for t in (weight, bias)]
    positions = torch.arange(weight.numel())
    assert torch.equal(probes[0], lanes[positions % PROBE_LANES] + blocks[positions // PROBE_LANES])
    exact = sum(float(t.double().flatten() @ p.double()) for t, p in zip((weight, bias), probes))
    magnitude = sum(float(t.double().abs().flatten() @ p.double()) for t, p in zip((weight, bias), probes))
    assert abs(fast - exact) <= weight.numel() * 2.0**-24 * magnitude
    # The same values in another layout, the same number; any single value changed, another one.
    other_layout = weight.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    assert torch.ops.cbn.weight_fingerprint([other_layout.contiguous(), bias], *parts) == fast
    for index in (0, 77, PROBE_LANES, PROBE_LANES + 1, weight.numel() - 1):
        changed = weight.clone()
        changed.view(-1)[index] += 1e-3
        assert torch.ops.cbn.weight_fingerprint([changed, bias], *parts) != fast
    # Two values exchanged in one block (where the block probe alone would weigh them alike) and one
    # block apart in the same lane (where the lane probe alone would).
    for distance in (1, PROBE_LANES):
        swapped = weight.clone().view(-1)
        swapped[[5, 5 + distance]] = swapped[[5 + distance, 5]]
        assert torch.ops.cbn.weight_fingerprint([swapped.view_as(weight), bias], *parts) != fast
    # The ATen path (a non-contiguous tensor) computes the same dot product.
    strided = torch.randn(96, 16 * 9 * 2)[:, ::2]
    probe = _probe(strided.numel(), strided.dtype, strided.device).double()
    slow = torch.ops.cbn.weight_fingerprint([strided], *parts)
    assert abs(slow - float(strided.double().flatten() @ probe)) <= (
        strided.numel() * 2.0**-24 * float(strided.double().abs().flatten() @ probe))


def _producers():
    """Plain convolution producers of every kind the kernel takes, with their inputs."""
    torch.manual_seed(0)
    frozen_bias = nn.Conv2d(3, 8, 3)
    frozen_bias.bias.requires_grad_(False)
    return [
        (nn.Conv2d(3, 8, 3, padding=1), torch.randn(2, 3, 7, 7)),
        (nn.Conv2d(3, 8, 3, stride=2, bias=False), torch.randn(2, 3, 7, 7)),
        (frozen_bias, torch.randn(2, 3, 7, 7)),
        (nn.Conv2d(8, 8, 3, groups=8, padding=2, dilation=2), torch.randn(1, 8, 6, 6)),
        (nn.ConvTranspose2d(4, 8, 3, stride=2, output_padding=1, groups=2), torch.randn(2, 4, 5, 5)),
        (nn.Conv1d(3, 8, 3, dilation=2), torch.randn(2, 3, 9)),
        (nn.Conv3d(3, 8, 3), torch.randn(2, 3, 5, 5, 5)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_convolution_producer_reads_what_python_reads_with_the_fingerprint(case):
    from cbn.producer_call import _convolution_in_kernel, find_producer_call, producer_fingerprint

    assert cbn.kernels.active()
    conv, x = _producers()[case]
    output = conv(x.requires_grad_())
    with cbn.kernels.use_kernels(False):
        python = find_producer_call(output, 8)
    # What a call without autograd record compares it with (the kernels active): the same number.
    fingerprint = producer_fingerprint(python.computation)
    fast = _convolution_in_kernel(output, 8, None)
    # A known producer's computation is reused only while weight, bias and settings are the same.
    again = _convolution_in_kernel(output, 8, fast.known)
    assert again.computation is fast.computation and again.signature is fast.signature
    for found in (fast, again):
        assert found.input is python.input and found.output is python.output
        assert found.signature == python.signature and found.trainable and not found.input_deferred
        assert len(found.parameters) == len(python.parameters)
        assert all(a is b for a, b in zip(found.parameters, python.parameters))
        assert found.computation.weight is python.computation.weight and found.computation.bias is python.computation.bias
        assert found.computation == python.computation  # stride, padding, dilation, groups, transposed, ...
        assert found.fingerprint == fingerprint
    other = nn.Conv2d(3, 8, 3)  # another weight: read anew
    not_same = _convolution_in_kernel(other(torch.randn(2, 3, 7, 7, requires_grad=True)), 8, fast.known)
    assert not_same.computation is not fast.computation and not_same.computation.weight is other.weight


def test_convolution_producer_leaves_every_other_case_to_python():
    from cbn.producer_call import _convolution_in_kernel, find_producer_call

    conv = nn.Conv2d(3, 8, 3)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    output = conv(x)
    frozen = nn.Conv2d(3, 8, 3).requires_grad_(False)
    double = nn.Conv2d(3, 8, 3).double()
    cases = {
        "an activation between": torch.relu(conv(x)),
        "a view between": conv(x).flatten(2).view(2, 8, 4, 4),
        "other channels": output,  # asked for 7 channels below
        "a frozen weight": frozen(x),
        "float64": double(x.double()),
        "a computed weight": F.conv2d(x, conv.weight * 2),
    }
    for name, value in cases.items():
        assert _convolution_in_kernel(value, 7 if name == "other channels" else 8, None) is None, name
    # Under a saved-tensor hook (what non-reentrant checkpointing installs) Python reads the record.
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        hooked = conv(x)
        assert _convolution_in_kernel(hooked, 8, None) is None
    assert _convolution_in_kernel(hooked, 8, None) is None  # its saved tensors carry the hooks
    assert find_producer_call(hooked, 8).computation.weight is conv.weight


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("only_center", [False, True])
def test_attached_past_in_cpp_equals_the_python_function_and_records_its_backward(with_bias, only_center):
    # cbn::attach_past (no Python in backward) against _AttachedPast with the same kernel inside:
    # the same producer gradients bit for bit, grouped mean patches, a float32 producer with
    # float64 window terms; a second backward of the same graph gives the same gradients.
    from cbn.functional.differentiable_compensation import _AttachedPast, CompensationTerms, WindowGradients

    assert cbn.kernels.available()
    generator = torch.Generator().manual_seed(0)
    channels, entries, fan_in, groups = 6, 3, 10, 2

    def draw(*shape, dtype=torch.float64):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    coefficients, center, share = draw(channels, 3, entries), draw(channels), draw(channels).abs()
    mean_grad, var_grad = draw(groups, entries, fan_in), draw(channels, entries, fan_in)
    inv_entries = torch.tensor(0.25, dtype=torch.float64)
    weight = draw(channels, 5, 2, dtype=torch.float32).requires_grad_()
    bias = draw(channels, dtype=torch.float32).requires_grad_() if with_bias else None
    grad_center, grad_share = draw(channels), draw(channels)
    results = []
    for form in ("cpp", "python"):
        gradients = WindowGradients(mean_grad, var_grad)
        if form == "cpp":
            outputs = torch.ops.cbn.attach_past(weight, bias, center, share, inv_entries, coefficients,
                                                gradients.mean_slots, gradients.var_slots)
        else:
            outputs = _AttachedPast.apply(weight, bias, center, share, inv_entries,
                                          CompensationTerms(None, coefficients, gradients))
        assert torch.equal(outputs[0], center) and torch.equal(outputs[1], share)
        used = outputs[:1] if only_center else outputs
        leaves = [weight] + ([bias] if with_bias else [])
        results.append(torch.autograd.grad(used, leaves, [grad_center, grad_share][:len(used)], retain_graph=True))
        again = torch.autograd.grad(used, leaves, [grad_center, grad_share][:len(used)])
        assert all(torch.equal(a, b) for a, b in zip(again, results[-1]))
    for cpp, python in zip(*results):
        assert cpp.dtype == torch.float32 and torch.equal(cpp, python)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("producer_bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_normalization_with_the_attachment_equals_the_summary_node_then_the_normalization(affine, producer_bias,
                                                                                           layout):
    # cbn::pooled_normalization given the summary's attachment (one autograd node) against
    # cbn::attach_past followed by it (two): the same output and gradients bit for bit, for the
    # input, the norm's affine parameters and the producer's weight and bias, with the optional
    # tensors absent in every combination (the gradients' order must not depend on them); a
    # second backward of the same graph gives the same gradients.
    from cbn.functional.differentiable_compensation import WindowGradients

    assert cbn.kernels.available()
    generator = torch.Generator().manual_seed(0)
    channels, entries, fan_in = 6, 3, 12

    def draw(*shape):
        return torch.randn(*shape, generator=generator)

    x = draw(2, channels, 5, 5).contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                                           torch.contiguous_format).requires_grad_()
    gamma, beta = (draw(channels).requires_grad_(), draw(channels).requires_grad_()) if affine else (None, None)
    weight = draw(channels, fan_in).requires_grad_()
    bias = draw(channels).requires_grad_() if producer_bias else None
    center, share = draw(channels), draw(channels).abs()
    inv_entries, delta_weight = torch.full((channels,), 0.25), torch.full((channels,), 3 / 16)
    coefficients = draw(channels, 3, entries)
    mean_grad, var_grad = draw(1, entries, fan_in), draw(channels, entries, fan_in)
    grad_output = draw(*x.shape)
    leaves = [t for t in (x, gamma, beta, weight, bias) if t is not None]
    results = []
    for form in ("one node", "two nodes"):
        gradients = WindowGradients(mean_grad, var_grad)
        if form == "one node":
            output = torch.ops.cbn.pooled_normalization(x, gamma, beta, center, inv_entries, share, delta_weight, 1e-5,
                                                        torch.float32, gradients.mean_slots, gradients.var_slots,
                                                        weight, bias, coefficients)[0]
        else:
            summary = torch.ops.cbn.attach_past(weight, bias, center, share, inv_entries, coefficients,
                                                gradients.mean_slots, gradients.var_slots)
            output = torch.ops.cbn.pooled_normalization(x, gamma, beta, summary[0], inv_entries, summary[1],
                                                        delta_weight, 1e-5, torch.float32, [], [])[0]
        results.append((output, *torch.autograd.grad(output, leaves, grad_output, retain_graph=True)))
        again = torch.autograd.grad(output, leaves, grad_output)
        assert all(torch.equal(a, b) for a, b in zip(again, results[-1][1:]))
    for one, two in zip(*results):
        assert torch.equal(one, two)
    assert all(gradient.abs().max() > 0 for gradient in results[0][1:])


def test_the_fused_loops_run_the_copy_the_cpu_supports():
    # cpu_simd.h: AVX2 and FMA where the CPU has them (as ATen's own kernels choose), else the
    # build's baseline.
    import platform

    assert cbn.kernels.active()
    capability = torch.backends.cpu.get_cpu_capability()
    expected = "avx2" if platform.machine() == "x86_64" and capability in ("AVX2", "AVX512") else "baseline"
    assert cbn.kernels.instruction_set() in (expected, "build")


def test_the_baseline_copy_of_the_fused_loops_passes_the_same_oracles():
    # Every CPU without AVX2 runs the baseline copy: the oracle tests of the fused kernels, run
    # again in a process that takes it (CBN_KERNELS_SIMD=baseline).
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, CBN_KERNELS_SIMD="baseline")
    root = Path(__file__).resolve().parents[1]
    taken = subprocess.run([sys.executable, "-c", "import cbn.kernels, torch; assert cbn.kernels.available(); "
                            "print(torch.ops.cbn.instruction_set())"], env=env, capture_output=True, text=True,
                           cwd=root, timeout=600)
    assert taken.returncode == 0 and taken.stdout.split()[-1] in ("baseline", "build"), taken.stdout + taken.stderr
    selected = "pooled_normalization_equals_python or statistic_shifts or window_weight_gradient " \
               "or depthwise_variance_gradients " \
               "or weight_fingerprint or attached_past"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           __file__, "-k", selected], env=env, capture_output=True, text=True, cwd=root,
                          timeout=600)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("producer,shape", [
    (lambda: nn.Conv2d(4, 4, (5, 3), stride=(2, 1), padding=(2, 1), dilation=(1, 2), groups=4), (3, 4, 11, 12)),
    (lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6), (2, 6, 16, 17)),
    (lambda: nn.Conv2d(5, 5, 3, padding=1, groups=5, bias=False), (1, 5, 12, 21)),
    (lambda: nn.Conv2d(3, 3, 5, padding=2, groups=3), (2, 3, 5, 5)),
    (lambda: nn.Conv2d(4, 4, 3, stride=3, padding=2, dilation=2, groups=4), (2, 4, 13, 11)),
], ids=["5x3_strided_dilated", "stride2", "stride1_wide_rows", "short_rows_5x5", "stride3_dilated"])
def test_depthwise_variance_gradients_equal_the_exact_weight_gradient(producer, shape, dtype):
    # cbn::depthwise_variance_gradients (one dot product per kernel offset, over phase planes) and
    # the Python form (a weight-gradient convolution of y - mu), both within
    # (n + 1) u (2/m) sum |y - mu| |x| of the float64 weight gradient, n = N H_out W_out terms per weight.
    torch.manual_seed(0)
    producer = producer().to(dtype)
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    with torch.no_grad():
        y = producer(x)
    mean = y.mean((0, 2, 3))
    channels, samples = y.shape[1], y.numel() // y.shape[1]

    def weight_gradient(values, grad_output):
        return torch.nn.grad.conv2d_weight(values, list(producer.weight.shape), grad_output, producer.stride,
                                           producer.padding, producer.dilation, producer.groups) * (2.0 / samples)

    centred = (y.double() - mean.double().view(1, -1, 1, 1))
    exact = weight_gradient(x.double(), centred).reshape(channels, 1, -1)
    magnitude = weight_gradient(x.double().abs(), centred.abs()).reshape(channels, 1, -1)
    assert cbn.kernels.active()
    fast = producer_statistic_gradients(producer, x, y, mean).var
    assert torch.equal(fast.reshape(channels, *producer.weight.shape[2:]), torch.ops.cbn.depthwise_variance_gradients(
        x, y, mean, list(producer.kernel_size), list(producer.stride), list(producer.padding), list(producer.dilation)))
    with cbn.kernels.use_kernels(False):
        python = producer_statistic_gradients(producer, x, y, mean).var
    unit = 2.0**-24 if dtype == torch.float32 else 2.0**-53
    bound = (samples + 1) * unit * magnitude
    for found in (fast, python):
        assert found.dtype == dtype and found.shape == exact.shape
        assert ((found.double() - exact).abs() <= bound).all()
    assert exact.abs().max() > 0.1


def test_convolution_statistic_gradients_in_two_threads_at_once_equal_their_serial_results():
    # The direct loops keep their operands, and ATen's form its centred output, in a per-thread
    # scratch buffer: threads computing different layers at the same time must each get their
    # serial results, bit for bit.
    torch.manual_seed(0)
    cases = []
    # the channel-vector loop, the shifted-row loop, ATen's form (64 channels on a 14x14 plane)
    for in_channels, size in ((16, 12), (3, 9), (64, 14)):
        conv = nn.Conv2d(in_channels, 8 if in_channels < 64 else 64, 3, padding=1)
        x = torch.randn(2, in_channels, size, size)
        with torch.no_grad():
            y = conv(x)
        cases.append([(conv, x, y, y.mean((0, 2, 3)))])
    serial = [producer_statistic_gradients_of_layers(operands) for operands in cases]
    found, errors = [[] for _ in cases], []

    def run(index):
        try:
            for _ in range(200):
                found[index].append(producer_statistic_gradients_of_layers(cases[index]))
        except Exception as error:  # reported below, in the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for expected, results in zip(serial, found):
        assert len(results) == 200
        for (gradients,) in results:
            assert torch.equal(gradients.mean, expected[0].mean) and torch.equal(gradients.var, expected[0].var)
