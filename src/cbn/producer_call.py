"""Pairing: the operation that produced the tensor a norm receives, read from autograd's record.

A norm's producer is a property of each call, not of the module tree (``docs/method.md``): the
tensor a Cross-Iteration BatchNorm layer receives in a training forward carries, in its
``grad_fn``, autograd's record of the operation that computed it. For a convolution (any
dimension, transposed or not) that is ``ConvolutionBackward0``, holding the input and the weight
the convolution really used and its stride, padding, dilation, groups and output padding; for a
linear map ``AddmmBackward0`` / ``MmBackward0``, holding the input rows and the transposed weight.
Reshapes that keep the batch and channel axes show as ``ViewBackward0`` nodes above them. The
weight and bias parameters are the ``AccumulateGrad`` leaves among the node's inputs.

:func:`find_producer_call` reads that record at each training forward, so pairing needs no
hooks, no module identity and no global state: a layer built directly (``norm_layer=``), called
inside a convolution's own ``forward`` (detectron2), sharded (FSDP2), pruned, parametrized,
standardized, reloaded or copied finds its producer the same way. Where the record is not a
producer's (an activation or an in-place op between them, a sum of branches) it says so in
words; where there is no record (``no_grad``, reentrant activation checkpointing, a frozen
producer fed by an input that needs no gradient) it says that.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import kernels
from .functional.statistic_gradients import ConvolutionCall, LinearCall

_VIEWS = frozenset(("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"))
_CASTS = frozenset(("ToCopyBackward0",))  # autocast's low-precision copy of a parameter
_DEFERRED_WEIGHT = ("its producer's weight is computed by an operation inside activation checkpointing "
                    "(use_reentrant=False), whose value cannot be read before the recompute")
_RESHARDED = ("its producer's weight was freed before the norm ran (FSDP resharded the producer's unit after "
              "its forward): put the convolution and its norm in one fully_shard unit")
NO_RECORD = ("no autograd record of the producer in this forward (no_grad, reentrant activation "
             "checkpointing, or a frozen producer whose input needs no gradient)")


class ProducerCall(NamedTuple):
    """The producer of one call of a norm, as autograd recorded it.

    Attributes:
        computation: a :class:`~cbn.functional.statistic_gradients.ConvolutionCall` or
            :class:`~cbn.functional.statistic_gradients.LinearCall` with the weight the operation
            used (the parameter itself where the weight is a leaf, else the effective weight
            autograd saved, which carries the gradient to what built it) and the bias parameter,
            ``None`` when there is none or it is frozen (a constant: it cancels in the Taylor step).
        input: the producer's input as the operation saw it (already padded by a non-zero
            padding mode; ``(M, fan_in)`` rows for a linear map).
        output: the producer's output in its own layout: the norm's input seen through the
            views between them (``(M, C)`` rows for a linear map).
        parameters: the leaf tensors (weight, bias) the operation read, for reports and copies.
        signature: what stored entries need unchanged to be moved by this producer: the kind,
            the weight's shape and groups, how the bias enters, and the leaf weight's identity.
        trainable: whether the weight or the bias receives gradients (a frozen producer's
            entries never move).
    """

    computation: ConvolutionCall | LinearCall
    input: Tensor | None
    output: Tensor
    parameters: tuple[Tensor, ...]
    signature: tuple
    trainable: bool
    # The input could not be read in this forward without running a recompute (activation
    # checkpointing, ``use_reentrant=False``): the replay in backward provides it.
    input_deferred: bool = False
    # producer_fingerprint(computation), where the C++ kernel took it while pairing (else None).
    fingerprint: float | None = None
    # What a later call of the same producer reuses when the kernel reads it (``known`` of
    # find_producer_call): its settings as the kernel gives them, the computation and signature.
    known: tuple | None = None


def _op_name(node) -> str:
    name = type(node).__name__
    for suffix in ("Backward0", "Backward1", "Backward"):
        if name.endswith(suffix):
            return name[: -len(suffix)].lower() or name
    return name


def _leaf(node) -> Tensor | None:
    """The parameter behind ``node`` when it is its ``AccumulateGrad`` (through an autocast copy)."""
    while node is not None and type(node).__name__ in _CASTS:
        node = node.next_functions[0][0]
    if node is not None and type(node).__name__ == "AccumulateGrad":
        return node.variable
    return None


def _bias(node, present: bool) -> tuple[Tensor | None, str] | str:
    """``(bias tensor or None, how it enters)`` of a producer node's bias input, or a refusal."""
    if not present:
        return None, "none"
    if node is None:
        return None, "frozen"  # no gradient: a constant, which the Taylor step cancels
    leaf = _leaf(node)
    if leaf is None:
        return (f"its bias is computed by {_op_name(node)}, whose value autograd does not record: "
                "the Taylor step cannot follow it")
    return leaf, "parameter"


def _weight(node, saved: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """``(weight to use, leaf parameter or None)`` for a producer node's weight input."""
    leaf = _leaf(node)
    if leaf is not None:
        return leaf, leaf
    if node is None and saved is not None and saved.is_leaf:
        return saved, saved  # a frozen parameter, saved as itself
    return saved, None


def _convolution(node, output: Tensor, num_features: int, deferred: bool) -> ProducerCall | str:
    next_functions = node.next_functions
    transposed = bool(node._saved_transposed)
    weight, leaf = _weight(next_functions[1][0], None if deferred else node._saved_weight)
    if weight is None:
        return _DEFERRED_WEIGHT
    if weight.numel() and weight.untyped_storage().nbytes() == 0:
        return _RESHARDED
    channels = weight.shape[1] * node._saved_groups if transposed else weight.shape[0]
    if channels != num_features or output.shape[1] != num_features:
        return f"its producer, a convolution, has {channels} output channels, not {num_features}"
    bias = _bias(next_functions[2][0], node._saved_bias_sym_sizes_opt is not None)
    if isinstance(bias, str):
        return bias
    (bias, bias_kind) = bias
    groups = int(node._saved_groups)
    call = ConvolutionCall(
        weight, bias, tuple(node._saved_stride), tuple(node._saved_padding), tuple(node._saved_dilation),
        groups, transposed, tuple(node._saved_output_padding),
    )
    trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
    producer_input = node._saved_input if weight.requires_grad and not deferred else None
    signature = ("transposed" if transposed else "convolution", tuple(weight.shape), groups, bias_kind,
                 id(leaf) if leaf is not None else None)
    return ProducerCall(call, producer_input, output, tuple(t for t in (leaf, bias) if t is not None), signature,
                        trainable, deferred and weight.requires_grad)


def _linear(node, output: Tensor, num_features: int, deferred: bool) -> ProducerCall | str:
    name = type(node).__name__
    next_functions = node.next_functions
    if name == "AddmmBackward0":
        if node._saved_alpha != 1 or node._saved_beta != 1:
            return "its producer is an addmm with scaling factors, not a linear layer"
        bias_node, weight_node = next_functions[0][0], next_functions[2][0]
        rows_name, bias_present = "_saved_mat1", True
    else:
        bias_node, weight_node = None, next_functions[1][0]
        rows_name, bias_present = "_saved_self", False
    transposed_weight = weight_node
    if transposed_weight is None or type(transposed_weight).__name__ != "TBackward0":
        if transposed_weight is not None:
            return "its producer is a matrix product whose right operand is not a transposed weight"
        weight = None  # a frozen weight: nothing to compensate, its value is not needed
        leaf = None
    else:
        weight, leaf = _weight(transposed_weight.next_functions[0][0], None)
        if weight is None:
            return "its producer is a matrix product whose weight is computed by an operation"
    if weight is not None and weight.numel() and weight.untyped_storage().nbytes() == 0:
        return _RESHARDED
    if output.dim() != 2 or output.shape[1] != num_features:
        return f"its producer, a linear layer, gives {tuple(output.shape)}, not (N, {num_features}) rows"
    bias = _bias(bias_node, bias_present)
    if isinstance(bias, str):
        return bias
    (bias, bias_kind) = bias
    if weight is None:
        return ProducerCall(LinearCall(output.new_zeros(0), bias), None, output, (), ("linear", None, 1, bias_kind,
                            None), bias is not None and bias.requires_grad)
    producer_input = None if deferred else getattr(node, rows_name)
    signature = ("linear", tuple(weight.shape), 1, bias_kind, id(leaf))
    return ProducerCall(LinearCall(weight, bias), producer_input, output, tuple(t for t in (leaf, bias) if t is not None),
                        signature, True, deferred)


def find_producer_call(input: Tensor, num_features: int, known: tuple | None = None) -> ProducerCall | str:
    """The producer of ``input`` as autograd recorded it, or why there is none.

    Args:
        input: the tensor a norm received, ``(N, C, *)`` (or ``(M, C)`` rows after a linear map).
        num_features: the norm's ``C``.
        known: :attr:`ProducerCall.known` of the caller's previous call: its computation and
            signature are reused when this call's producer is the same (one object fewer per call).

    Returns:
        A :class:`ProducerCall`, or a sentence saying why ``input`` is not a producer's output
        (for :func:`cbn.pairing_report`).

    Example::

        >>> conv = nn.Conv2d(3, 8, 3)
        >>> call = find_producer_call(conv(torch.randn(2, 3, 8, 8)), 8)
        >>> call.computation.weight is conv.weight
        True
    """
    if kernels.active():
        found = _convolution_in_kernel(input, num_features, known)
        if found is not None:
            return found
    node = input.grad_fn
    if node is None:
        return NO_RECORD
    output = input
    first_shape = None
    while type(node).__name__ in _VIEWS:
        first_shape = node._saved_self_sym_sizes
        node = node.next_functions[0][0]
        if node is None:
            return NO_RECORD
    name = type(node).__name__
    if first_shape is not None:
        # A view keeps each channel's values when the batch and channel axes survive it (the
        # producer's output is contiguous: a view of it exists).
        linear = name in ("AddmmBackward0", "MmBackward0")
        kept = (input.dim() == 2 and input.shape[1] == first_shape[-1] and len(first_shape) >= 2) if linear else (
            tuple(input.shape[:2]) == tuple(first_shape[:2]))
        if not (kept and input.is_contiguous()):
            return "input is a reshape of a producer's output that mixes channels"
        output = input if linear else input.view(first_shape)
    deferred = reading_would_recompute()
    if name == "ConvolutionBackward0":
        return _convolution(node, output, num_features, deferred)
    if name in ("AddmmBackward0", "MmBackward0"):
        return _linear(node, output, num_features, deferred)
    if name.startswith("CompiledFunction"):
        return ("input comes out of a torch.compile graph, which hides its producer from autograd's record: "
                "compensation needs the norms and their producers in eager mode")
    if name == "CatBackward0":
        return "input is a concatenation of several tensors (each block would need its own producer)"
    return (f"input is the result of {_op_name(node)}, not of a convolution or linear layer "
            "(e.g. an activation, an in-place op or a sum between them)")


_BIAS_KINDS = ("none", "frozen", "parameter")


def _convolution_in_kernel(input: Tensor, num_features: int, known: tuple | None) -> ProducerCall | None:
    """The plain case of :func:`find_producer_call` (a convolution whose weight is a trainable
    leaf, no view, no checkpointing, float32 host tensors) with its fingerprint, read in one call of
    ``cbn::convolution_producer``; ``None`` for every other case, which the Python reading takes."""
    weight, bias, producer_input, settings, fingerprint = torch.ops.cbn.convolution_producer.default(
        input, num_features, *_probe_parts(torch.float32, _CPU))
    if weight is None:
        return None
    if known is not None and known[0] == settings and known[1].weight is weight and known[1].bias is bias:
        _, call, signature = known
    else:
        transposed, groups, bias_kind = bool(settings[0]), settings[1], _BIAS_KINDS[settings[2]]
        dims = (len(settings) - 3) // 4
        stride, padding, dilation, output_padding = (tuple(settings[3 + i * dims: 3 + (i + 1) * dims])
                                                     for i in range(4))
        call = ConvolutionCall(weight, bias, stride, padding, dilation, groups, transposed, output_padding)
        signature = ("transposed" if transposed else "convolution", tuple(weight.shape), groups, bias_kind,
                     id(weight))
        known = (settings, call, signature)
    return ProducerCall(call, producer_input, input, (weight,) if bias is None else (weight, bias), signature, True,
                        False, fingerprint, known)


_CPU = torch.device("cpu")


def reading_would_recompute() -> bool:
    """Whether reading a saved tensor now would run a recompute: in the forward of a
    non-reentrant activation checkpoint, whose unpack hook recomputes the region when called
    outside backward."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return (hooks is not None and getattr(hooks[0], "__module__", "") == "torch.utils.checkpoint"
            and torch._C._current_graph_task_id() == -1)


def producer_fingerprint(computation: ConvolutionCall | LinearCall) -> float:
    """A number that changes when a producer's weight or bias changes: the dot product of their
    values (in memory order) with a fixed pseudo-random probe (exact equality for unchanged values,
    in any layout), read back once per call; in one call of the C++ kernel ``cbn::weight_fingerprint``
    where :mod:`cbn.kernels` is active (its sum in another order: it is compared only with itself).

    The probe is ``lanes[j % 1024] + blocks[(j // 1024) % 16384]`` (:data:`PROBE_LANES`,
    :data:`PROBE_BLOCKS`): the kernel keeps the 1024 lane values in the cache beside the weights and
    reads one block value per 1024 weights, and two positions meet the same pair of probe values
    only ``1024 x 16384`` values apart, so any single change, and any exchange of two values closer
    than that, changes the number."""
    tensors = [t for t in (computation.weight, computation.bias) if t is not None and t.numel()]
    if kernels.active() and tensors:  # (a number: nothing for autograd to record)
        return torch.ops.cbn.weight_fingerprint(tensors, *_probe_parts(tensors[0].dtype, tensors[0].device))
    with torch.no_grad():
        total = None
        for tensor in tensors:
            flat = tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1)
            product = torch.dot(flat, _probe(flat.numel(), flat.dtype, flat.device))
            total = product if total is None else total + product.to(total.dtype)
    return 0.0 if total is None else float(total)


PROBE_LANES = 1024  # values of the lane probe, repeated for every block of 1024 positions
PROBE_BLOCKS = 16384  # values of the block probe, one per block: the pair repeats every 2**24 positions
_PARTS: dict[tuple, tuple[Tensor, Tensor]] = {}
_PROBES: dict[tuple, Tensor] = {}


def _probe_parts(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """The lane and block probes, values in ``[0.25, 0.75)`` (their sums never zero: every value
    counts)."""
    key = (dtype, device)
    parts = _PARTS.get(key)
    if parts is None:
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode(False):
            values = torch.rand(PROBE_LANES + PROBE_BLOCKS, generator=generator, dtype=torch.float64).add_(0.25)
            parts = _PARTS[key] = tuple(part.to(dtype=dtype, device=device)
                                        for part in values.split((PROBE_LANES, PROBE_BLOCKS)))
    return parts


def _probe(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The probe of ``numel`` values: ``lanes[j % 1024] + blocks[(j // 1024) % 16384]``, summed in
    ``dtype``."""
    key = (numel, dtype, device)
    probe = _PROBES.get(key)
    if probe is None:
        if len(_PROBES) > 512:
            _PROBES.clear()
        lanes, blocks = _probe_parts(dtype, device)
        with torch.inference_mode(False):
            block_index = torch.arange(numel, device=device).div_(PROBE_LANES, rounding_mode="floor") % PROBE_BLOCKS
            probe = _PROBES[key] = lanes.repeat(-(-numel // PROBE_LANES))[:numel] + blocks[block_index]
    return probe
