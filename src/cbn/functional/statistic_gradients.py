"""Closed-form gradients of a channel's batch statistics with respect to its producer's weights.

Write the producing layer as ``y[i, c] = W[c] . u[i] + b[c]``, with ``u[i]`` the input patch (the
im2col column) of output position ``i`` for a convolution, or the input row for a linear layer.
Over the ``m`` positions of a batch, with ``mu[c] = mean_i y[i, c]`` and
``var[c] = mean_i (y[i, c] - mu[c])^2``::

    d mu[c]  / d W[c] = mean_i u[i]                            the mean input patch
    d var[c] / d W[c] = (2/m) sum_i (y[i, c] - mu[c]) u[i]     a weight gradient for dy = 2 (y - mu) / m
    d mu[c]  / d b[c] = 1,      d var[c] / d b[c] = 0

Row ``c`` of ``W`` is the only one channel ``c`` depends on, so these rows are the whole Jacobian.
The mean patch does not depend on ``c`` within a group of a grouped convolution: it is stored once
per group. Both come from ``aten.convolution_backward`` asking for the weight gradient only, so no
``autograd.grad`` call and no retained graph is involved.

A transposed convolution (``nn.ConvTranspose1d/2d/3d``) is such a layer too, with ``u[i]`` the
input values that reach output position ``i``; only its weight is stored the other way round,
``(C_in, C_out / groups, *kernel)``. Its row ``c`` (group ``g``, index ``j`` in the group) is
``W[g * C_in/groups : (g + 1) * C_in/groups, j]``, gathered by :func:`weight_rows`: gradients and
weights meet in that layout, in :func:`producer_statistic_gradients` and :func:`statistic_shifts`.

The variance form is the second-moment form of the paper re-centred: with ``nu = var + mu^2``,
``d nu / d W = d var / d W + 2 mu d mu / d W`` and ``d nu / d b = 2 mu``, and a Taylor step of
``(mu, nu)`` is the same as a step of ``(mu, var)`` minus ``(delta mu)^2`` (see ``window.py``).
Centring keeps float32 accurate when ``|mu| >> std``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
PRODUCER_TYPES = (*_CONVOLUTIONS, *_TRANSPOSED, nn.Linear)
# From this batch size on, a separate batch-summed convolution for the mean patch is cheaper than
# an extra output channel in the variance's weight-gradient convolution (measured on CPU).
_SPLIT_BATCH = 8


@dataclass(frozen=True)
class ConvolutionCall:
    """One functional convolution as a producer: what ``F.conv1d/2d/3d`` was called with.

    Stands in for a convolution module whose ``forward`` is not the stock one (it pads its input,
    or transforms its weight, before calling ``F.convNd``): the statistic gradients of its output
    are those of this call, with ``weight`` the effective weight and the call's own input, so the
    Taylor step is exact in the weight the convolution really used. Zero padding only (the
    functional form has no padding mode); ``padding`` may be ``"same"`` or ``"valid"``.
    """

    weight: Tensor
    bias: Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    # A transposed convolution (its weight stored ``(C_in, C_out / groups, *kernel)``), with the
    # output padding of the call.
    transposed: bool = False
    output_padding: tuple[int, ...] = ()
    padding_mode = "zeros"

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def _reversed_padding_repeated_twice(self) -> list[int]:
        # padding="same" as F.convNd applies it: the odd extra element goes to the end.
        pads = []
        for d, k in zip(reversed(self.dilation), reversed(self.weight.shape[2:])):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads


@dataclass(frozen=True)
class LinearCall:
    """One linear map ``y = u W^T + b`` as a producer (an ``nn.Linear`` call or ``F.linear``)."""

    weight: Tensor
    bias: Tensor | None


def is_transposed(producer) -> bool:
    """Whether ``producer`` (a module or a call) is a transposed convolution."""
    return isinstance(producer, _TRANSPOSED) or (isinstance(producer, ConvolutionCall) and producer.transposed)


def is_linear(producer) -> bool:
    """Whether ``producer`` (a module or a call) is a linear map."""
    return isinstance(producer, (nn.Linear, LinearCall))


class StatisticGradients(NamedTuple):
    """Gradients of ``k`` entries, in the window's layout.

    ``mean``: ``(groups, k, fan_in)``, one mean patch per group. ``var``: ``(C, k, fan_in)``.
    """

    mean: Tensor
    var: Tensor


def gradient_slots(window: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """A window's gradients as its ``k`` slots, one tensor per entry: the slices ``(rows,
    fan_in)`` of a ``(rows, k, fan_in)`` window (views), or the slots as given. The form in which
    :mod:`cbn.layers.window_state` keeps them and the C++ kernels read them."""
    return tuple(window.unbind(1)) if isinstance(window, Tensor) else tuple(window)


def gradient_window(slots: Tensor | Sequence[Tensor]) -> Tensor:
    """The ``k`` slots ``(rows, fan_in)`` stacked as a window ``(rows, k, fan_in)`` (a copy), or a
    window as given: the layout of :class:`StatisticGradients` and the Python forms."""
    return slots if isinstance(slots, Tensor) else torch.stack(tuple(slots), 1)


def producer_groups(producer: nn.Module) -> int:
    """Number of weight groups whose output channels share one mean patch."""
    return producer.groups if isinstance(producer, (*_CONVOLUTIONS, *_TRANSPOSED, ConvolutionCall)) else 1


def weight_rows(producer: nn.Module, weight: Tensor) -> Tensor:
    """The producer's weight as rows: row ``c`` holds every weight output channel ``c`` depends on.

    For a convolution or a linear layer, ``W`` reshaped to ``(C, fan_in)`` (a view). A transposed
    convolution stores ``W`` as ``(C_in, C_out / groups, *kernel)``, and output channel
    ``c = g * C_out/groups + j`` reads ``W[g * C_in/groups : (g + 1) * C_in/groups, j]``::

        rows = W.reshape(groups, C_in/groups, C_out/groups, K).transpose(1, 2).reshape(C_out, -1)

    (a copy), with ``K`` the number of kernel elements: each row is ``(C_in/groups, *kernel)``
    flattened.

    Args:
        producer: the layer whose weight (layout, groups) ``weight`` has.
        weight: its weight, or any tensor of a weight's layout with another number of output
            channels, e.g. a weight gradient for ``C + 1`` output channels.

    Returns:
        ``(C, fan_in)``, where ``fan_in = weight.numel() / C``.
    """
    if is_transposed(producer):
        groups = producer.groups
        in_per_group, out_per_group = weight.shape[0] // groups, weight.shape[1]
        grouped = weight.reshape(groups, in_per_group, out_per_group, -1)
        return grouped.transpose(1, 2).reshape(groups * out_per_group, -1)
    return weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)


def shift_weight(producer: nn.Module, weight: Tensor) -> Tensor:
    """What :func:`statistic_shifts` takes as the producer's weight: the weight itself, which is
    its rows up to a reshape, or the rows of a transposed convolution (a copy)."""
    return weight_rows(producer, weight) if is_transposed(producer) else weight


def _padded_input(producer: nn.Conv1d | nn.Conv2d | nn.Conv3d | ConvolutionCall, x: Tensor) -> tuple[Tensor, list[int]]:
    """The input padded the way the convolution pads it, and the padding left to pass on."""
    spatial_dims = x.dim() - 2
    if producer.padding_mode == "zeros" and not isinstance(producer.padding, str):
        return x, list(producer.padding)
    if producer.padding_mode == "zeros" and producer.padding == "valid":
        return x, [0] * spatial_dims
    # Non-zero padding modes and padding="same" (possibly asymmetric) pad explicitly, as nn.Conv does.
    mode = "constant" if producer.padding_mode == "zeros" else producer.padding_mode
    return F.pad(x, producer._reversed_padding_repeated_twice, mode=mode), [0] * spatial_dims


def _convolution_weight_gradient(
    producer: nn.Module | ConvolutionCall,
    grad_output: Tensor,
    x: Tensor,
    weight_shape: list[int],
    padding: list[int],
    groups: int,
    output_padding: list[int] | None = None,
) -> Tensor:
    """Weight gradient of the convolution of ``x``; transposed when ``output_padding`` is given."""
    _, weight_grad, _ = torch.ops.aten.convolution_backward(
        grad_output,
        x,
        _weight_placeholder(weight_shape, x),
        None,
        producer.stride,
        padding,
        producer.dilation,
        output_padding is not None,
        output_padding if output_padding is not None else [0] * (x.dim() - 2),
        groups,
        [False, True, False],
    )
    return weight_grad


def _in_compiled_convolution_layout(x: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` and ``output`` in the layout a compiled graph gives its convolutions' activations.

    On CPU, inductor's layout optimization (on by default) always stores convolution inputs and
    outputs channels-last, but hands an extern ``convolution_backward`` its operands in the
    strides they were traced with (contiguous), so that every statistic-gradient convolution
    would read transposed copies of its input and output (compiled ResNet-20 at batch 32: 1.81x
    compiled BatchNorm with the traced layout, 1.44x with this one; the former ``benchmarks.compiled_step``
    with and without ``--traced-layout``). Elsewhere (CUDA, whose layout choice is a heuristic of
    the whole graph, or the optimization turned off) the traced layout is kept, and for 5-D
    inputs too, where ``channels_last_3d`` operands showed no consistent gain.
    """
    if x.dim() != 4 or not _inductor_keeps_convolutions_channels_last(x.device.type):
        return x, output
    return x.contiguous(memory_format=torch.channels_last), output.contiguous(memory_format=torch.channels_last)


@torch.compiler.assume_constant_result
def _inductor_keeps_convolutions_channels_last(device_type: str) -> bool:
    """Inductor's own rule for the layout of a graph's convolutions, where it is not a heuristic
    (read when tracing: the checks of ``torch.backends.mkldnn`` cannot be traced)."""
    import torch._inductor.config as inductor_config

    if not inductor_config.layout_optimization:
        return False
    if inductor_config.force_layout_optimization:
        return True
    return device_type == "cpu" and torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()


# Per-thread scratch tensors of the per-step path (a layer may run in several threads, e.g.
# under nn.DataParallel): the gradient buffers of _centred_and_uniform.
_SCRATCH = threading.local()
# Largest gradient buffer kept between calls: 1 Mi values (4 MiB in float32).
_SCRATCH_NUMEL = 1 << 20


def _weight_placeholder(shape: list[int], like: Tensor) -> Tensor:
    """What ``convolution_backward`` reads of the weight when it computes only the weight's
    gradient: its shape and memory format (that of ``like``, the convolution's input, so that no
    backend copies it into another). Uninitialized memory that nothing reads: the allocation
    touches no page of it (an expanded scalar would be copied into a contiguous weight, a
    weight-sized write per call)."""
    layout = torch.contiguous_format
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(like.dim())
    if channels_last is not None and not like.is_contiguous() and like.is_contiguous(memory_format=channels_last):
        layout = channels_last
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=layout)


def _scales_activations(samples: int, fan_in: int) -> bool:
    """Where the factor ``2 / m`` of a statistic gradient is applied: to the gradient fed to the
    weight-gradient convolution when a channel has fewer samples than weight values
    (``m < fan_in``, small batches on wide layers), else to the weight-sized result. The
    gradient is linear in it; whichever tensor is smaller takes the extra pass."""
    return samples < fan_in


def _centred_and_uniform(output: Tensor, channel_mean: Tensor, scale: float = 1.0) -> Tensor:
    """``scale [y - mu | 1/2]``: the variance's gradient and the uniform extra output channel,
    ``m / 2`` times what they are unless ``scale`` is ``2 / m`` (:func:`_scales_activations`).

    Outside a compiled graph, a small result is a per-thread scratch buffer of its shape, valid
    until the next call for that shape, whose uniform channel was written once, when it was made
    (small batches, where the saved operations count; ``scale`` is a function of the shape); a
    large one is allocated each call, so that no activation-sized memory is held between steps.
    """
    channels = output.shape[1]
    if torch.compiler.is_compiling():  # a graph takes no ``out=`` into a slice
        uniform = output.new_full((output.shape[0], 1, *output.shape[2:]), 0.5 * scale)
        centred = output - channel_mean
        return torch.cat((centred if scale == 1.0 else centred.mul_(scale), uniform), dim=1)
    shape = (output.shape[0], channels + 1, *output.shape[2:])
    key = (shape, output.dtype, output.device, scale)
    buffers = _SCRATCH.__dict__.setdefault("grad_outputs", {})
    grad_output = buffers.get(key)
    if grad_output is None:
        with torch.inference_mode(False):  # kept between calls: never an inference tensor
            grad_output = output.new_empty(shape)
            grad_output.narrow(1, channels, 1).fill_(0.5 * scale)
        if grad_output.numel() <= _SCRATCH_NUMEL:
            if len(buffers) > 16:
                buffers.clear()
            buffers[key] = grad_output
    centred = grad_output.narrow(1, 0, channels)
    torch.sub(output, channel_mean, out=centred)
    if scale != 1.0:
        centred.mul_(scale)
    return grad_output


def _effective_output_padding(
    producer: nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d, x: Tensor, output: Tensor
) -> list[int]:
    """The ``output_padding`` that gave ``output`` its size from ``x``.

    ``L_out = (L_in - 1) stride - 2 padding + dilation (kernel - 1) + 1 + output_padding`` per
    spatial dimension. It is read from the sizes rather than from the module because
    ``forward(x, output_size=...)`` chooses it per call.
    """
    if isinstance(producer, ConvolutionCall):
        return list(producer.output_padding)
    sizes = zip(output.shape[2:], x.shape[2:], producer.kernel_size)
    settings = zip(producer.stride, producer.padding, producer.dilation)
    return [out - ((size - 1) * s - 2 * p + d * (k - 1) + 1) for (out, size, k), (s, p, d) in zip(sizes, settings)]


def _transposed_statistic_gradients(
    producer: nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d,
    x: Tensor,
    output: Tensor,
    channel_mean: Tensor,
) -> StatisticGradients:
    """:func:`producer_statistic_gradients` of a transposed convolution, in :func:`weight_rows` layout.

    The same two weight-gradient convolutions as for a convolution (``dy = 2 (y - mu) / m`` and the
    uniform ``dy = 1 / m``), run transposed; the padding is implicit (always zeros).
    """
    channels = output.shape[1]
    samples = output.numel() // channels
    groups = producer.groups
    in_channels, kernel_shape = x.shape[1], list(producer.kernel_size)
    output_padding = _effective_output_padding(producer, x, output)
    padding = list(producer.padding)
    if groups == 1 and output.shape[0] < _SPLIT_BATCH:
        # As for a convolution: an extra output channel with gradient 1/m gives the mean patch.
        grad_output = _centred_and_uniform(output, channel_mean)
        weight_grad = _convolution_weight_gradient(
            producer, grad_output, x, [in_channels, channels + 1, *kernel_shape], padding, 1, output_padding
        ).mul_(2.0 / samples)
        both = weight_rows(producer, weight_grad).unsqueeze(1)
        return StatisticGradients(both[channels:], both[:channels])
    var_grad = _convolution_weight_gradient(
        producer, output - channel_mean, x, [in_channels, channels // groups, *kernel_shape], padding, groups,
        output_padding,
    ).mul_(2.0 / samples)
    # The uniform gradient is the same for every sample, so the batch sum of the input can be
    # convolved once instead.
    batch_sum = x.sum(0, keepdim=True)
    uniform = output.new_full((1, groups, *output.shape[2:]), 1.0 / samples)
    mean_grad = _convolution_weight_gradient(
        producer, uniform, batch_sum, [in_channels, 1, *kernel_shape], padding, groups, output_padding
    )
    # (C_in, 1, *kernel) is the groups' patches one after the other: already (groups, fan_in) rows.
    return StatisticGradients(mean_grad.reshape(groups, 1, -1), weight_rows(producer, var_grad).unsqueeze(1))


def producer_statistic_gradients(
    producer: nn.Module | ConvolutionCall, producer_input: Tensor, output: Tensor, mean: Tensor
) -> StatisticGradients:
    """Gradients of the per-channel mean and variance of ``output`` w.r.t. the producer's weight rows.

    Args:
        producer: the ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or ``nn.Linear`` that
            computed ``output``, or the :class:`ConvolutionCall` a custom module made.
        producer_input: its input, in the statistics dtype (float32 or wider).
        output: its output ``(N, C, *)`` (``(N, C)`` for a linear layer), same dtype.
        mean: per-channel mean of ``output``, shape ``(C,)``.

    Returns:
        :class:`StatisticGradients` of one entry: ``mean`` of shape ``(groups, 1, fan_in)`` and
        ``var`` of shape ``(C, 1, fan_in)``, where ``fan_in = weight.numel() / C``, both in the
        layout of :func:`weight_rows`.

    Example::

        >>> conv = nn.Conv2d(3, 8, 3, padding=1)
        >>> x = torch.randn(2, 3, 5, 5)
        >>> y = conv(x).detach()
        >>> grads = producer_statistic_gradients(conv, x, y, y.mean((0, 2, 3)))
        >>> grads.mean.shape, grads.var.shape
        (torch.Size([1, 1, 27]), torch.Size([8, 1, 27]))
    """
    channels = output.shape[1]
    samples = output.numel() // channels
    channel_mean = mean.view(1, channels, *([1] * (output.dim() - 2)))
    if is_linear(producer):
        centred = output - channel_mean
        mean_grad = producer_input.mean(0, keepdim=True)
        var_grad = centred.t().mm(producer_input).mul_(2.0 / samples)
        return StatisticGradients(mean_grad.unsqueeze(0), var_grad.unsqueeze(1))
    if torch.compiler.is_compiling():
        producer_input, output = _in_compiled_convolution_layout(producer_input, output)
    if is_transposed(producer):
        return _transposed_statistic_gradients(producer, producer_input, output, channel_mean)

    groups = producer.groups
    kernel_shape = list(producer.weight.shape[1:])
    padded, padding = _padded_input(producer, producer_input)
    if groups == 1 and output.shape[0] < _SPLIT_BATCH:
        # One weight-gradient convolution gives both: an extra output channel whose gradient is the
        # uniform 1/m yields the mean patch next to the C variance rows.
        # (The C++ kernel cbn::convolution_statistic_gradients does the same, bit for bit, except
        # for 2-D host producers: small ones in direct loops, the others' mean patch from window
        # sums beside C rows; equal to rounding.)
        scale_first = _scales_activations(samples, producer.weight[0].numel())
        grad_output = _centred_and_uniform(output, channel_mean, 2.0 / samples if scale_first else 1.0)
        both = _convolution_weight_gradient(producer, grad_output, padded, [channels + 1, *kernel_shape], padding, 1)
        if not scale_first:
            both = both.mul_(2.0 / samples)
        both = both.reshape(channels + 1, 1, -1)
        return StatisticGradients(both.narrow(0, channels, 1), both.narrow(0, 0, channels))
    if _takes_depthwise_kernel(groups, kernel_shape, padded, output):
        # Centred inline, without the output-sized temporary (cbn::depthwise_variance_gradients).
        var_grad = torch.ops.cbn.depthwise_variance_gradients(padded, output, mean, kernel_shape[1:],
                                                              list(producer.stride), padding, list(producer.dilation))
    else:
        var_grad = _convolution_weight_gradient(
            producer, output - channel_mean, padded, [channels, *kernel_shape], padding, groups
        ).mul_(2.0 / samples)
    mean_grad = _mean_patches(producer, padded, padding, list(output.shape[2:]), kernel_shape[1:], samples)
    return StatisticGradients(mean_grad.reshape(groups, 1, -1), var_grad.reshape(channels, 1, -1))


_KERNEL_DTYPES = (torch.float32, torch.float64)


def _in_grouped_kernels(padded: Tensor) -> bool:
    """Whether ``padded`` is an input the grouped-convolution kernels take
    (``csrc/grouped_statistic_gradients.cpp``): 2-D, float or double, on the CPU, kernels active."""
    return kernels.active() and padded.dim() == 4 and padded.device.type == "cpu" and padded.dtype in _KERNEL_DTYPES


def _takes_depthwise_kernel(groups: int, kernel_shape: list[int], padded: Tensor, output: Tensor) -> bool:
    """Whether the variance gradients of a grouped producer go through
    ``cbn::depthwise_variance_gradients``: a 2-D depthwise convolution (one input channel per
    output channel) of float CPU tensors, with the kernels active (faster than ATen's weight
    gradient of ``y - mu`` on every EfficientNet-B0 layer, 5x5 planes included)."""
    return (_in_grouped_kernels(padded) and kernel_shape[0] == 1 and groups == output.shape[1] == padded.shape[1]
            and output.dtype == padded.dtype)


def _mean_patches(producer, padded: Tensor, padding: list[int], output_size: list[int], kernel_size: list[int],
                  samples: int) -> Tensor:
    """The mean input patch of a convolution, per input channel: ``(C_in, *kernel_size)``, the
    values at kernel offset ``o`` averaged over the ``m`` output positions ``p``::

        patch[c, o] = (1/m) sum_n sum_p x_padded[n, c, p * stride + o * dilation]

    Padding is applied per sample with the same index map, so it commutes with the batch sum; the
    sum over ``p`` at every offset is one depthwise convolution of the batch sum with a kernel of
    ``1/m`` the size of the output, dilated by the stride (a forward convolution: on CPU, oneDNN's
    weight gradient of a depthwise convolution, the other way to get it, is several times slower
    for 5x5 kernels). Grouped weights read it as ``(groups, C_in/groups * kernel)`` rows. Where
    :mod:`cbn.kernels` is active, 2-D float inputs on the CPU take ``cbn::mean_patches``: the same
    sums, separable (rows, then columns), equal to rounding.
    """
    if _in_grouped_kernels(padded):
        # The window sums, separable, in C++ (cbn::mean_patches): k_h passes over the input rows.
        return torch.ops.cbn.mean_patches(padded, kernel_size, list(producer.stride), padding,
                                          list(producer.dilation), output_size, samples)
    batch_sum = padded.sum(0, keepdim=True)
    in_channels, spatial = batch_sum.shape[1], len(output_size)
    uniform = batch_sum.new_full((in_channels, 1, *output_size), 1.0 / samples)
    sums = torch.convolution(batch_sum, uniform, None, [1] * spatial, padding, list(producer.stride), False,
                             [0] * spatial, in_channels)
    # Offsets o * dilation, o < kernel size: every dilation-th value of the first ones.
    offsets = tuple(slice(0, (k - 1) * d + 1, d) for k, d in zip(kernel_size, producer.dilation))
    return sums[(0, slice(None), *offsets)]


def producer_statistic_gradients_of_layers(operands: list[tuple]) -> list[StatisticGradients]:
    """:func:`producer_statistic_gradients` of many layers, one ``(producer, producer_input,
    output, mean)`` per layer.

    Where :mod:`cbn.kernels` is active, the convolutions that take the one-convolution form
    (``groups == 1``, batch below ``_SPLIT_BATCH``, zero padding) go through the C++ kernel
    ``cbn::convolution_statistic_gradients`` in one call (the same ATen kernels, bit for bit, except
    for 2-D host producers: small ones summed in direct loops, the others' mean patch taken from
    window sums beside a weight gradient of C rows; equal to float rounding); the others, and all
    of them without the kernels, through the Python function.
    """
    gradients: list[StatisticGradients | None] = [None] * len(operands)
    one_call = [i for i, (producer, _, output, _) in enumerate(operands) if _in_one_convolution(producer, output)]
    if one_call and kernels.active():
        settings: list[int] = []
        for i in one_call:
            producer, producer_input = operands[i][:2]
            _, padding = _padded_input(producer, producer_input)
            settings += [*producer.stride, *padding, *producer.dilation]
        inputs, outputs, means, weights = zip(*((x, y, mean, producer.weight) for producer, x, y, mean in
                                                (operands[i] for i in one_call)))
        mean_grads, var_grads = torch.ops.cbn.convolution_statistic_gradients(inputs, outputs, means, weights, settings)
        for i, mean_grad, var_grad in zip(one_call, mean_grads, var_grads):
            gradients[i] = StatisticGradients(mean_grad, var_grad)
    return [found if found is not None else producer_statistic_gradients(*operand)
            for found, operand in zip(gradients, operands)]


def _in_one_convolution(producer, output: Tensor) -> bool:
    """Whether :func:`producer_statistic_gradients` takes the one-convolution form, with zero
    padding that the convolution applies itself (no explicit ``F.pad``)."""
    return (
        isinstance(producer, (*_CONVOLUTIONS, ConvolutionCall))
        and not is_transposed(producer)
        and producer.groups == 1
        and output.shape[0] < _SPLIT_BATCH
        and producer.padding_mode == "zeros"
        and (not isinstance(producer.padding, str) or producer.padding == "valid")
    )


def statistic_shifts(
    gradients: StatisticGradients, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """First-order terms ``(d mu/dW . W + b, d var/dW . W)`` per channel, for ``k`` entries at once.

    Args:
        gradients: ``mean`` of shape ``(groups, k, fan_in)`` and ``var`` of shape ``(C, k, fan_in)``
            (the window's layout: one batched product per statistic).
        weight: the producer's weight rows ``(C, fan_in)``, ``weight_rows(producer, producer.weight)``.
            The weight of a convolution or linear layer is its rows up to a reshape and may be
            passed as is; a transposed convolution's may not.
        bias: the producer's bias, or ``None``.

    Returns:
        Two ``(k, C)`` tensors. The Taylor step from weights ``W_old`` to ``W_new`` is
        ``shift(W_new) - shift(W_old)``, which is why no weight snapshot is kept. Call it under
        ``torch.no_grad()``: the terms are constants of the step.
    """
    channels = weight.shape[0]
    groups = gradients.mean.shape[0]
    # Rows from weight_rows arrive 2-D: no second reshape on the per-step path.
    rows = weight if weight.dim() == 2 else weight.reshape(channels, -1)
    if rows.dtype != gradients.var.dtype:
        rows = rows.to(gradients.var.dtype)
    # Element-wise products and sums: batched small matmuls are several times slower on CPU.
    if groups == 1:
        mean_shift = torch.mm(gradients.mean[0], rows.t())
    else:
        grouped_rows = rows.view(groups, 1, channels // groups, -1)
        mean_shift = (gradients.mean.unsqueeze(2) * grouped_rows).sum(-1).transpose(0, 1).flatten(1)
    var_shift = (gradients.var * rows.unsqueeze(1)).sum(-1).t()
    if bias is not None:
        mean_shift = mean_shift + bias
    return mean_shift, var_shift


def statistic_shifts_of_layers(
    operands: list[tuple[Sequence[Tensor], Sequence[Tensor], Tensor, Tensor | None]],
) -> tuple[Tensor, Tensor]:
    """:func:`statistic_shifts` of many layers with windows of the same size: ``operands`` holds one
    ``(mean gradient slots, variance gradient slots, weight, bias)`` per layer, the ``k`` slots of a
    window as its entries' tensors (``(groups, fan_in)`` and ``(C, fan_in)``, see
    :mod:`cbn.layers.window_state`) and the weight as :func:`shift_weight` gives it.

    Runs the C++ kernel ``cbn::statistic_shifts_many`` where :mod:`cbn.kernels` is active (no
    Python frame per layer; the variance terms summed in one pass, equal to float rounding),
    else the Python loop on the stacked slots. Both the window's terms and a new entry's go
    through it, so that a Taylor step at unchanged weights cancels exactly in either mode.

    Returns:
        The first-order terms of the mean and of the variance, ``(k, C_1 + C_2 + ...)`` each: the
        layers' channels side by side, in the order of ``operands``.
    """
    entries = {len(operand[1]) for operand in operands}
    if len(entries) != 1:
        raise ValueError("statistic_shifts_of_layers: one or more windows, all with the same number of slots; "
                         f"got slot counts {sorted(entries)}")
    if kernels.active():
        mean_slots = [slot for operand in operands for slot in operand[0]]
        var_slots = [slot for operand in operands for slot in operand[1]]
        return torch.ops.cbn.statistic_shifts_many.default(mean_slots, var_slots, entries.pop(),
                                                           [operand[2] for operand in operands],
                                                           [operand[3] for operand in operands])
    shifts = [statistic_shifts(StatisticGradients(gradient_window(mean), gradient_window(var)), weight, bias)
              for mean, var, weight, bias in operands]
    return torch.cat([mean for mean, _ in shifts], dim=1), torch.cat([var for _, var in shifts], dim=1)
