import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbn.functional import producer_statistic_gradients, statistic_shifts, weight_rows
from oracle import produce

PRODUCERS = {
    "conv2d_grouped_strided": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (3, 4, 9, 8)),
    "conv2d_circular": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", bias=False), (2, 2, 5, 5)),
    "conv1d_replicate_same": (lambda: nn.Conv1d(3, 4, 4, padding="same", padding_mode="replicate"), (2, 3, 9)),
    "conv3d_dilated": (lambda: nn.Conv3d(2, 4, 3, padding=(1, 0, 2), dilation=(1, 2, 1)), (2, 2, 4, 7, 6)),
    "depthwise": (lambda: nn.Conv2d(3, 3, 3, groups=3), (2, 3, 6, 6)),
    # The mean patches of grouped and large-batch convolutions come from a dilated depthwise
    # convolution of the batch sum: strides, dilations and kernels that differ per axis, 1-D and 3-D.
    "depthwise_5x3_strided_dilated": (lambda: nn.Conv2d(4, 4, (5, 3), stride=(2, 1), padding=(2, 1), dilation=(1, 2), groups=4),
                                      (2, 4, 9, 8)),
    "conv1d_depthwise_strided": (lambda: nn.Conv1d(4, 4, 5, stride=2, padding=2, groups=4), (2, 4, 11)),
    # Wider rows, strides and dilations per axis: the phase planes of cbn::depthwise_variance_gradients.
    "depthwise_wide_rows": (lambda: nn.Conv2d(3, 3, 3, padding=1, groups=3), (2, 3, 5, 12)),
    "depthwise_wide_rows_strided_dilated": (
        lambda: nn.Conv2d(2, 2, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1), groups=2), (2, 2, 6, 19)),
    "conv3d_batch8_strided": (lambda: nn.Conv3d(2, 3, (3, 2, 3), stride=(1, 2, 2), padding=(1, 0, 1), dilation=(2, 1, 1)),
                              (8, 2, 5, 6, 7)),
    "linear": (lambda: nn.Linear(5, 4), (7, 5)),
}


@pytest.mark.parametrize("name", list(PRODUCERS))
def test_closed_form_equals_dense_jacobian(name):
    make, shape = PRODUCERS[name]
    _assert_dense_jacobian(make().double(), torch.randn(shape, dtype=torch.float64) + 1, producer_statistic_gradients)


@pytest.mark.parametrize("batch", [2, 8])  # the one-convolution form and the split form
def test_compiled_closed_form_equals_dense_jacobian(batch):
    # In a compiled graph on CPU the convolution operands go channels-last (the layout inductor
    # gives convolutions); the gradients must not move.
    compiled = torch.compile(producer_statistic_gradients, backend="aot_eager", fullgraph=True)
    _assert_dense_jacobian(nn.Conv2d(3, 4, 3, padding=1).double(), torch.randn(batch, 3, 6, 5, dtype=torch.float64) + 1,
                           compiled)


def test_compiled_layout_is_channels_last_where_inductor_keeps_convolutions_so():
    import torch._inductor.config as inductor_config

    from cbn.functional.statistic_gradients import _in_compiled_convolution_layout

    x, y = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
    moved_x, moved_y = _in_compiled_convolution_layout(x, y)
    assert moved_x.is_contiguous(memory_format=torch.channels_last) and not moved_x.is_contiguous()
    assert moved_y.is_contiguous(memory_format=torch.channels_last) and not moved_y.is_contiguous()
    assert torch.equal(moved_x, x) and torch.equal(moved_y, y)
    volumes = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 4, 4, 4, 4)
    assert all(a is b for a, b in zip(_in_compiled_convolution_layout(*volumes), volumes))
    with inductor_config.patch(layout_optimization=False):  # (pytest's monkeypatch cannot restore a config entry)
        assert all(a is b for a, b in zip(_in_compiled_convolution_layout(x, y), (x, y)))


def _assert_dense_jacobian(producer, x, statistic_gradients):
    y = producer(x).detach()
    dims = [0, *range(2, y.dim())]
    gradients = statistic_gradients(producer, x, y, y.mean(dims))

    def stats(weight):
        out = produce(producer, x, weight, producer.bias)
        return torch.stack([out.mean(dims), out.var(dims, unbiased=False)])

    jacobian = torch.autograd.functional.jacobian(stats, producer.weight.detach()).flatten(3)
    channels, groups = y.shape[1], gradients.mean.shape[0]
    assert gradients.mean.shape[1] == gradients.var.shape[1] == 1
    for c in range(channels):
        others = [d for d in range(channels) if d != c]
        assert jacobian[:, c, others].abs().max() < 1e-12  # sparsity: only row c matters
        torch.testing.assert_close(gradients.mean[c // (channels // groups), 0], jacobian[0, c, c], rtol=0, atol=1e-12)
        torch.testing.assert_close(gradients.var[c, 0], jacobian[1, c, c], rtol=0, atol=1e-12)


TRANSPOSED = {
    # (producer, input shape, forward's output_size, the output_padding that size implies)
    "transpose1d_one_group": (lambda: nn.ConvTranspose1d(3, 5, 4, stride=3, padding=1, output_padding=2), (2, 3, 6),
                              None, (2,)),
    "transpose2d_stride_pad_outpad_dilation_groups": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, dilation=2, groups=2),
        (3, 4, 5, 4), None, (1, 1)),
    "transpose2d_batch8_no_bias": (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, bias=False),
                                   (8, 2, 4, 4), None, (0, 0)),
    "transpose2d_depthwise": (lambda: nn.ConvTranspose2d(3, 3, 3, stride=2, groups=3), (2, 3, 4, 4), None, (0, 0)),
    "transpose2d_output_size": (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2), (2, 2, 4, 4), (10, 9), (1, 0)),
    "transpose3d": (lambda: nn.ConvTranspose3d(2, 4, (2, 3, 2), stride=(2, 1, 2), padding=(0, 1, 1), dilation=(1, 2, 1)),
                    (2, 2, 3, 4, 3), None, (0, 0, 0)),
}


@pytest.mark.parametrize("name", list(TRANSPOSED))
def test_transposed_closed_form_equals_dense_jacobian(name):
    make, shape, output_size, output_padding = TRANSPOSED[name]
    producer = make().double()
    x = torch.randn(shape, dtype=torch.float64) + 1
    y = producer(x, output_size=output_size).detach()
    dims = [0, *range(2, y.dim())]
    gradients = producer_statistic_gradients(producer, x, y, y.mean(dims))
    conv_transpose = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}[x.dim()]

    def stats(weight):
        out = conv_transpose(x, weight, producer.bias, producer.stride, producer.padding, output_padding,
                             producer.groups, producer.dilation)
        return torch.stack([out.mean(dims), out.var(dims, unbiased=False)])

    torch.testing.assert_close(stats(producer.weight.detach())[0], y.mean(dims), rtol=0, atol=1e-12)
    # (2, C_out, C_in, C_out / groups, *kernel): the weight is stored input channels first.
    jacobian = torch.autograd.functional.jacobian(stats, producer.weight.detach())
    channels, groups = y.shape[1], producer.groups
    in_per_group, out_per_group = x.shape[1] // groups, channels // groups
    assert gradients.mean.shape == (groups, 1, in_per_group * producer.weight[0, 0].numel())
    assert gradients.var.shape == (channels, 1, in_per_group * producer.weight[0, 0].numel())
    for c in range(channels):
        group, j = divmod(c, out_per_group)
        block = (slice(None), c, slice(group * in_per_group, (group + 1) * in_per_group), j)
        row = jacobian[block].flatten(1)  # (C_in / groups, *kernel) flattened, the row layout
        others = jacobian[:, c].clone()
        others[block[:1] + block[2:]] = 0
        assert others.abs().max() < 1e-12  # sparsity: channel c depends on its row only
        torch.testing.assert_close(gradients.mean[group, 0], row[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(gradients.var[c, 0], row[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.Conv2d(3, 4, 3, groups=1, bias=True), (2, 3, 6, 6)),
        (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, bias=True),
         (2, 4, 4, 4)),
    ],
    ids=["conv2d", "conv_transpose2d_groups"],
)
def test_mean_compensation_is_exact_for_own_weights(make, shape):
    # mu is linear in W: moving it with the Taylor step equals recomputing it.
    producer = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    y = producer(x).detach()
    gradients = producer_statistic_gradients(producer, x, y, y.mean((0, 2, 3)))
    before = statistic_shifts(gradients, weight_rows(producer, producer.weight), producer.bias)
    with torch.no_grad():
        producer.weight.add_(torch.randn_like(producer.weight))
        producer.bias.add_(torch.randn_like(producer.bias))
    after = statistic_shifts(gradients, weight_rows(producer, producer.weight), producer.bias)
    recomputed = producer(x).mean((0, 2, 3))
    torch.testing.assert_close(y.mean((0, 2, 3)) + after[0][0] - before[0][0], recomputed, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernels", [True, False])
def test_statistic_shifts_of_layers_refuses_windows_of_different_sizes(kernels):
    import cbn.kernels
    from cbn.functional.statistic_gradients import statistic_shifts_of_layers

    def window(entries):
        return [torch.randn(1, 6)] * entries, [torch.randn(3, 6)] * entries, torch.randn(3, 6), None

    with cbn.kernels.use_kernels(kernels), torch.no_grad():
        with pytest.raises(ValueError, match=r"same number of slots; got slot counts \[2, 3\]"):
            statistic_shifts_of_layers([window(2), window(3)])
        mean, var = statistic_shifts_of_layers([window(2), window(2)])
    assert mean.shape == var.shape == (2, 6)  # the two layers' 3 channels side by side
