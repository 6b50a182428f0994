import copy
import io
import warnings

import pytest
import torch
from torch import nn

import cbn
from oracle import DenseJacobianCBN, train_beside_oracle

CASES = {
    "conv2d_stride_pad_dilation_groups_bias": (
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=True),
        cbn.CrossIterationBatchNorm2d, (3, 4, 9, 9)),
    "conv2d_reflect_same": (
        lambda: nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect", bias=False),
        cbn.CrossIterationBatchNorm2d, (2, 3, 6, 6)),
    "conv1d": (lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1), cbn.CrossIterationBatchNorm1d, (4, 3, 11)),
    "conv3d": (lambda: nn.Conv3d(2, 3, (2, 3, 3), padding=(0, 1, 1), bias=False),
               cbn.CrossIterationBatchNorm3d, (2, 2, 4, 5, 5)),
    "depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=True), cbn.CrossIterationBatchNorm2d,
                  (2, 4, 6, 6)),
    "linear": (lambda: nn.Linear(6, 5), cbn.CrossIterationBatchNorm1d, (4, 6)),
    # Transposed convolutions store their weight (C_in, C_out / groups, *kernel): C_in != C_out
    # and groups > 1 make a wrong row layout visible.
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(3, 5, 3, stride=2, padding=1), cbn.CrossIterationBatchNorm1d,
                         (4, 3, 6)),
    "conv_transpose2d_stride_pad_outpad_dilation_groups_bias": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, dilation=2, groups=2, bias=True),
        cbn.CrossIterationBatchNorm2d, (3, 4, 5, 5)),
    "conv_transpose3d": (
        lambda: nn.ConvTranspose3d(2, 3, (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1), bias=False),
        cbn.CrossIterationBatchNorm3d, (2, 2, 3, 4, 4)),
}


def _out_channels(producer):
    return producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels


@pytest.mark.parametrize("compensate, differentiable", [(True, False), (True, True), (False, False)],
                         ids=["cbn", "cbn-diff", "naive"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_dense_jacobian_oracle(case, compensate, differentiable):
    check_against_oracle(case, compensate, differentiable)


def check_against_oracle(case, compensate, differentiable, device="cpu"):
    """Seven training steps of producer + norm beside the float64 dense-Jacobian oracle: output and
    every gradient equal at every step (``device``: where both run)."""
    make_producer, norm_class, input_shape = CASES[case]
    producer = make_producer().double().to(device)
    norm = norm_class(_out_channels(producer), window=4, compensate=compensate,
                      differentiable_compensation=differentiable, dtype=torch.float64, device=device)
    oracle = DenseJacobianCBN(producer, window=4, compensate=compensate, differentiable=differentiable)
    train_beside_oracle(producer, norm, oracle, input_shape, steps=7)


def test_compensation_differs_from_naive_when_weights_move():
    # The oracle test above must be able to tell the two apart: make sure it would.
    outputs = {}
    for compensate in (True, False):
        torch.manual_seed(1)
        model = cbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), window=3,
                                  compensate=compensate)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):
            out = model(torch.randn(2, 3, 6, 6))
            out.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        outputs[compensate] = out.detach()
    assert (outputs[True] - outputs[False]).abs().max() > 1e-3


def _train_steps(model, batches, optimizer):
    outputs = []
    for x in batches:
        out = model(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        outputs.append(out.detach())
    return outputs


@pytest.mark.parametrize("setting", [dict(window=1), dict(window=4, burnin=5)], ids=["window1", "burnin"])
def test_window_one_and_burnin_equal_batchnorm(setting):
    # float64, so that the comparison sees the maths and not float32 summation order.
    torch.manual_seed(2)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).double()
    model = cbn.convert_model(copy.deepcopy(reference), **setting)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        x = torch.randn(3, 3, 7, 7, dtype=torch.float64) * 3 + 1
        x_ref = x.clone().requires_grad_()
        x_cbn = x.clone().requires_grad_()
        out_ref, out = reference(x_ref), model(x_cbn)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-9)
        weights = torch.randn_like(out)
        (out_ref * weights).sum().backward()
        (out * weights).sum().backward()
        torch.testing.assert_close(x_cbn.grad, x_ref.grad, rtol=0, atol=1e-9)
        for p, p_ref in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=1e-9)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(model[1], name), getattr(reference[1], name), rtol=0, atol=1e-9)
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
    if setting.get("burnin"):
        # Iteration 6 is past burn-in: the layer now pools, so it must leave BatchNorm.
        x = torch.randn(3, 3, 7, 7, dtype=torch.float64)
        assert (model(x) - reference(x)).abs().max() > 1e-4


def test_momentum_none_is_cumulative_average_like_batchnorm():
    reference = nn.BatchNorm2d(3, momentum=None)
    layer = cbn.CrossIterationBatchNorm2d(3, momentum=None, window=1)
    warnings.simplefilter("ignore")  # a standalone layer warns that it has no producer
    for _ in range(4):
        x = torch.randn(4, 3, 5, 5) * 2
        reference(x), layer(x)
    torch.testing.assert_close(layer.running_mean, reference.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.running_var, reference.running_var, rtol=0, atol=1e-6)


def test_running_stats_are_ema_of_pooled_estimate_unbiased_over_pooled_samples():
    layer = cbn.CrossIterationBatchNorm1d(3, window=3, momentum=0.5)  # no producer: plain averaging
    batches = [torch.randn(4, 3) * (i + 1) + i for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x in batches:
            layer(x)
    expected_mean, expected_var = torch.zeros(3), torch.ones(3)
    for i in range(3):
        pooled = torch.cat(batches[max(0, i - 2): i + 1])
        # Equal-size batches: the pooled estimate is the statistic of their concatenation.
        expected_mean = 0.5 * expected_mean + 0.5 * pooled.mean(0)
        expected_var = 0.5 * expected_var + 0.5 * pooled.var(0, unbiased=True)
    torch.testing.assert_close(layer.running_mean, expected_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.running_var, expected_var, rtol=1e-6, atol=1e-6)


def test_eval_mode_equals_batchnorm_with_running_stats():
    layer = cbn.CrossIterationBatchNorm2d(3)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.weight.uniform_(0.5, 2)
        layer.bias.uniform_(-1, 1)
    reference = nn.BatchNorm2d(3)
    reference.load_state_dict(layer.state_dict(), strict=False)
    layer.eval(), reference.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)


def test_batchnorm_state_dict_loads_strictly():
    reference = nn.BatchNorm2d(5)
    reference(torch.randn(4, 5, 3, 3))
    layer = cbn.CrossIterationBatchNorm2d(5)
    layer.load_state_dict(reference.state_dict())
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    assert int(layer.num_batches_tracked) == 1


def test_constructor_mirrors_batchnorm_and_repr():
    layer = cbn.CrossIterationBatchNorm3d(7, eps=1e-3, momentum=0.2, affine=False, track_running_stats=False,
                                          window=2, burnin=3, compensate=False, dtype=torch.float64)
    assert layer.weight is None and layer.running_mean is None
    assert "window=2, burnin=3, compensate=False" in repr(layer)
    assert layer.window_state.positions[0].stats.dtype == torch.float64
    with pytest.raises(ValueError, match="window"):
        cbn.CrossIterationBatchNorm2d(3, window=0)
    layer = cbn.CrossIterationBatchNorm2d(3).half()
    assert layer.window_state.positions[0].stats.dtype == torch.float32 and layer.weight.dtype == torch.float16


def _paired_conv_model(**kwargs):
    return cbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), **kwargs)


def test_resume_through_state_dict_is_exact():
    torch.manual_seed(3)
    batches = [torch.randn(2, 3, 6, 6) for _ in range(8)]
    model = _paired_conv_model(window=4, burnin=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train_steps(model, batches[:3], optimizer)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "windows": cbn.window_state_dict(model),
                "optim": optimizer.state_dict()}, buffer)
    uninterrupted = _train_steps(model, batches[3:], optimizer)

    torch.manual_seed(99)
    resumed = _paired_conv_model(window=4, burnin=2)
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    buffer.seek(0)
    state = torch.load(buffer)
    resumed.load_state_dict(state["model"])
    cbn.load_window_state_dict(resumed, state["windows"])
    resumed_optimizer.load_state_dict(state["optim"])
    for a, b in zip(_train_steps(resumed, batches[3:], resumed_optimizer), uninterrupted):
        assert torch.equal(a, b)


def test_a_state_saved_before_the_first_forward_loads_into_a_trained_model_as_into_a_fresh_one():
    # Loading weights empties the window (its entries were taken at other weights) and restores
    # the iteration count: what the model did before the load leaves no trace.
    torch.manual_seed(4)
    fresh = _paired_conv_model(window=3, burnin=1)
    state = copy.deepcopy(fresh.state_dict())
    trained = copy.deepcopy(fresh)
    _train_steps(trained, [torch.randn(2, 3, 6, 6) for _ in range(4)], torch.optim.SGD(trained.parameters(), lr=0.1))
    batches = [torch.randn(2, 3, 6, 6) for _ in range(4)]
    runs = []
    for model in (trained, fresh):
        model.load_state_dict(state)
        runs.append(_train_steps(model, batches, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_wrong_rank_and_channels_raise_and_leave_state_untouched():
    model = _paired_conv_model()
    model(torch.randn(2, 3, 5, 5))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"expected 4D \(N, C, H, W\)"):
        model[1](torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="4 channels|got an input with 3"):
        model[1](torch.randn(2, 3, 5, 5))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match=r"\(N, C\) or 3D"):
        cbn.CrossIterationBatchNorm1d(3)(torch.randn(2, 3, 4, 4))


def test_one_value_per_channel_needs_past_entries_then_trains_at_batch_one():
    model = cbn.convert_model(nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)), window=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model(torch.randn(1, 5))
    assert not model[1].window_state.positions[0].stats[:, 4].any()  # no sample stored
    _train_steps(model, [torch.randn(2, 5)], optimizer)
    before = model[0].weight.detach().clone()
    outputs = _train_steps(model, [torch.randn(1, 5) for _ in range(4)], optimizer)
    assert all(torch.isfinite(o).all() for o in outputs)
    assert not torch.equal(model[0].weight, before)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nn.BatchNorm1d(3)(torch.randn(1, 3))  # what BatchNorm does at batch size 1


def test_non_finite_batch_never_enters_the_window_nor_running_stats():
    model = _paired_conv_model(window=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _train_steps(model, [torch.randn(2, 3, 5, 5) for _ in range(2)], optimizer)
    norm = model[1]
    running = norm.running_mean.clone(), norm.running_var.clone()
    bad = torch.randn(2, 3, 5, 5)
    bad[0, 0, 0, 0] = float("nan")
    model(bad)
    assert torch.equal(norm.running_mean, running[0]) and torch.equal(norm.running_var, running[1])
    slot = (norm.window_state.positions[0].next_slot - 1) % 2
    assert not norm.window_state.positions[0].stats[slot].any()  # stored as an empty slot, samples = 0
    for name, buffer in norm.state_dict().items():
        assert torch.isfinite(buffer.float()).all(), name
    out = model(torch.randn(2, 3, 5, 5))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("compiled", [False], ids=["eager"])
@pytest.mark.parametrize("row", ["mean", "var"])
def test_non_finite_statistic_gradient_with_finite_statistics_is_never_stored(monkeypatch, row, compiled):
    # The entry's first-order terms are products with every gradient value: a NaN in the mean
    # patch or in one variance row marks the entry invalid although its statistics are finite,
    # in the batched eager record and in the record of a compiled graph (aot_eager, fullgraph).
    from cbn.layers import window_record as window_step

    model = _paired_conv_model(window=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _train_steps(model, [torch.randn(2, 3, 5, 5) for _ in range(2)], optimizer)
    norm = model[1]
    running = norm.running_mean.clone(), norm.running_var.clone()
    slot = norm.window_state.positions[0].next_slot

    def poison(gradients):
        getattr(gradients, row)[-1, 0, 3] = float("nan")
        return gradients

    if compiled:  # the record of a compiled graph computes its layer's gradients itself
        real = window_step.producer_statistic_gradients
        monkeypatch.setattr(window_step, "producer_statistic_gradients", lambda *args: poison(real(*args)))
        run = torch.compile(model, backend="aot_eager", fullgraph=True)
    else:  # the batched record computes all layers' at once (C++ kernel or Python)
        real_of_layers = window_step.producer_statistic_gradients_of_layers
        monkeypatch.setattr(window_step, "producer_statistic_gradients_of_layers",
                            lambda operands: [poison(g) for g in real_of_layers(operands)])
        run = model
    out = run(torch.randn(2, 3, 5, 5))
    assert torch.isfinite(out).all()
    assert norm.window_state.positions[0].next_slot == (slot + 1) % 2  # the step was recorded, in this slot
    assert not norm.window_state.positions[0].stats[slot].any()
    assert torch.equal(norm.running_mean, running[0]) and torch.equal(norm.running_var, running[1])
    for name, buffer in norm.state_dict().items():
        assert torch.isfinite(buffer.float()).all(), name


def test_changing_batch_and_spatial_size_and_train_eval_switching():
    model = _paired_conv_model(window=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for shape in [(4, 3, 8, 8), (1, 3, 5, 5), (2, 3, 11, 7)]:
        _train_steps(model, [torch.randn(shape)], optimizer)
        model.eval()
        assert torch.isfinite(model(torch.randn(shape))).all()
        model.train()
    assert sorted(model[1].window_state.positions[0].stats[:, 4, 0].tolist()) == [1 * 5 * 5, 2 * 11 * 7]


def test_weights_loaded_from_outside_the_optimizer_start_a_new_iteration():
    model = _paired_conv_model(window=3)
    model(torch.randn(2, 3, 5, 5))
    model(torch.randn(2, 3, 5, 5))  # same weights: gradient accumulation, same iteration
    assert model[1].iterations == 1
    other = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    model[0].load_state_dict(other[0].state_dict())
    out = model(torch.randn(2, 3, 5, 5))
    assert model[1].iterations == 2 and torch.isfinite(out).all()


def test_frozen_producer_skips_gradient_work():
    model = _paired_conv_model(window=3)
    model[0].requires_grad_(False)
    for _ in range(3):
        model(torch.randn(2, 3, 5, 5))
    assert model[1].window_state.positions[0].var_grad is None  # never allocated
    assert model[1].iterations == 3  # no moving weights: each forward is an iteration


def test_standalone_layer_without_producer_warns_and_averages():
    layer = cbn.CrossIterationBatchNorm2d(3, window=2)
    with pytest.warns(UserWarning, match="averages uncompensated statistics: no autograd record"):
        layer(torch.randn(2, 3, 4, 4))
    out = layer(torch.randn(2, 3, 4, 4))
    assert torch.isfinite(out).all()


def test_window_one_trains_bitwise_like_batchnorm_in_float32():
    # Window 1 and burn-in steps run BatchNorm's own kernels: a whole network trains identically.
    from cbn.experiments.models import resnet8

    torch.manual_seed(7)
    reference = resnet8()
    model = cbn.convert_model(copy.deepcopy(reference), window=1)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (reference, model)]
    for _ in range(3):
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        losses = []
        for net, optimizer in zip((reference, model), optimizers):
            loss = nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1])
    for p, q in zip(reference.parameters(), model.parameters()):
        assert torch.equal(p, q)
