"""The paths a real training stack takes around a converted model (see docs/reliability.md).

Each test compares with an independent reference: the same model without the wrapper
(checkpointing), nn.BatchNorm or the documented estimate computed here from the producer's
outputs (update_bn), the exact property of a compensated entry (its first-order mean term
equals its mean for y = W u + b), or an equivalent model on a path known to be correct.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.checkpoint import checkpoint

import cbn
from cbn import model_step
from cbn.functional.window import MEAN, MEAN_SHIFT, SAMPLES


def _block() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))


def _batches(count: int, batch: int = 2, size: int = 6, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=generator) for _ in range(count)]


def _train(model: nn.Module, batches, forward=None) -> list[list[torch.Tensor]]:
    """SGD steps; returns every step's gradients."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gradients = []
    for x in batches:
        out = model(x) if forward is None else forward(model, x)
        out.square().mean().backward()
        gradients.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad()
    return gradients


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_gradients_of_the_plain_model(use_reentrant):
    model = cbn.convert_model(_block(), window=3)
    checkpointed = copy.deepcopy(model)

    def forward(module, x):
        return checkpoint(module, x.requires_grad_(use_reentrant), use_reentrant=use_reentrant)

    plain = _train(model, _batches(5))
    recomputed = _train(checkpointed, _batches(5), forward)
    for step_plain, step_recomputed in zip(plain, recomputed):
        for a, b in zip(step_plain, step_recomputed):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    for layer, twin in ((model[1], checkpointed[1]), (model[4], checkpointed[4])):
        # One window entry per step: the recompute records nothing.
        torch.testing.assert_close(twin.window_state.positions[0].stats, layer.window_state.positions[0].stats)
        assert twin.window_state.positions[0].next_slot == layer.window_state.positions[0].next_slot
        assert torch.equal(twin.running_mean, layer.running_mean)


def test_update_bn_recomputes_the_running_statistics():
    model = cbn.convert_model(_block(), window=3)
    assert isinstance(model[1], nn.modules.batchnorm._BatchNorm)  # what update_bn looks for
    _train(model, _batches(4))
    layer = model[1]
    layer.running_mean.fill_(5.0)
    layer.running_var.fill_(5.0)
    loader = _batches(4, seed=7)
    update_bn(loader, model)

    # The documented estimate, from the producer's outputs: the window is emptied, every forward
    # pools its batch with the previous ones of the loader (same weights, so exact), and the
    # running statistics are the cumulative average (momentum None) of the pooled estimates,
    # the variance unbiased over all pooled values.
    with torch.no_grad():
        outputs = [model[0](x).double() for x in loader]
    means, variances = [], []
    for j in range(len(outputs)):
        pooled = torch.cat(outputs[max(0, j - 2): j + 1])
        values = pooled.transpose(0, 1).reshape(8, -1)
        means.append(values.mean(1))
        variances.append(values.var(1, unbiased=True))
    torch.testing.assert_close(layer.running_mean.double(), torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var.double(), torch.stack(variances).mean(0), rtol=1e-5, atol=1e-6)
    assert layer.momentum == 0.1  # restored by update_bn


def test_an_in_place_op_between_producer_and_norm_is_not_compensated():
    model = cbn.convert_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(8)),
                              window=3)
    with pytest.warns(UserWarning, match="input is the result of relu"):
        _train(model, _batches(3))
    (row,) = cbn.pairing_report(model)
    assert not row.compensated and "relu" in row.reason
    # The entries hold no first-order terms of the convolution.
    assert model[2].window_state.positions[0].var_grad is None


class _LateBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.late_conv, self.late_norm = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.late = False

    def forward(self, x):
        y = self.norm(self.conv(x))
        return y + self.late_norm(self.late_conv(x)) if self.late else y


def test_a_norm_reached_after_the_first_training_forward_is_compensated():
    model = cbn.convert_model(_LateBranch(), window=3)
    _train(model, _batches(2))
    model.late = True
    _train(model, _batches(2, seed=3))
    report = {row.layer: row for row in cbn.pairing_report(model)}
    assert report["late_norm"].compensated
    # Pairing is read from each forward: its very first entry is compensated, exactly
    # (s_mu = mu for y = W u + b).
    stats = model.late_norm.window_state.positions[0].stats
    torch.testing.assert_close(stats[:2, MEAN_SHIFT], stats[:2, MEAN], atol=1e-5, rtol=0)


class _DataSGD(torch.optim.Optimizer):
    """An optimizer that writes through ``.data`` (invisible to version counters)."""

    def __init__(self, params) -> None:
        super().__init__(params, {})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-0.1)


@pytest.mark.parametrize("make_copy", [copy.deepcopy, lambda m: __import__("pickle").loads(__import__("pickle").dumps(m))])
def test_a_copy_of_a_paired_model_counts_the_steps_of_a_data_writing_optimizer(make_copy):
    model = cbn.convert_model(_block(), window=3)
    _train(model, _batches(1))
    twin = make_copy(model)
    before = twin[1].iterations
    optimizer = _DataSGD(twin.parameters())
    for x in _batches(3):
        twin(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    twin(_batches(1)[0])  # the forward after the last step records the count
    # Three steps are three iterations (the copy's new parameters also count as one change).
    assert twin[1].iterations - before >= 3


def test_a_training_forward_under_inference_mode_then_training():
    model = cbn.convert_model(_block(), window=3)
    reference = copy.deepcopy(model)
    x = _batches(1, seed=5)[0]
    with torch.inference_mode():
        out = model(x)
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(out, expected)
    _train(model, _batches(3))
    _train(reference, _batches(3))
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert not a.is_inference()
        torch.testing.assert_close(a, b)


def test_a_half_precision_model_trains_on_the_cpu():
    model = cbn.convert_model(_block(), window=3)
    reference = copy.deepcopy(model)
    model.half()
    _train(model, [x.half() for x in _batches(3)])
    _train(reference, _batches(3))
    x = _batches(1, seed=9)[0]
    out, expected = model(x.half()), reference(x)
    assert out.dtype == torch.float16 and model[1].window_state.positions[0].stats.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=0.05)


def test_an_empty_batch_gives_an_empty_output_and_changes_no_state():
    model = cbn.convert_model(_block(), window=3)
    _train(model, _batches(3))
    state = copy.deepcopy(model.state_dict())
    out = model(torch.randn(0, 3, 6, 6))
    assert out.shape == (0, 8, 6, 6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_forgotten_eval_before_a_no_grad_pass_records_like_batchnorm_and_training_goes_on():
    # A training-mode pass under no_grad (a forgotten model.eval()) updates the statistics, as
    # BatchNorm's running statistics would be, opens no call position, and an input of another
    # size afterwards trains (the earlier design refused it).
    model = cbn.convert_model(_block(), window=3)
    _train(model, _batches(2))
    tracked = int(model[1].num_batches_tracked)
    with torch.no_grad():
        model(torch.randn(2, 3, 6, 6))
    assert int(model[1].num_batches_tracked) == tracked + 1
    _train(model, [torch.randn(2, 3, 7, 7)])
    assert len(model[1].window_state.positions) == 1


def test_script_and_fx_say_to_revert_first():
    model = cbn.convert_model(_block())
    with pytest.raises(RuntimeError, match="revert_model"):
        torch.jit.script(model)
    with pytest.raises(TypeError, match="revert_model"):
        torch.fx.symbolic_trace(model)
    torch.jit.script(cbn.revert_model(copy.deepcopy(model)))


def test_nothing_stays_alive_without_the_cyclic_collector():
    gc.collect()
    gc.disable()
    try:
        model = cbn.convert_model(_block(), window=3)
        _train(model, _batches(2))
        dead_model = weakref.ref(model)
        del model
        assert dead_model() is None
        plain = cbn.convert_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))  # no BatchNorm
        x = torch.randn(2, 3, 6, 6)
        dead_input = weakref.ref(x)
        plain(x).sum().backward()
        del x
        assert dead_input() is None
    finally:
        gc.enable()


def _spectral_normed(kind: str, conv: nn.Conv2d) -> nn.Conv2d:
    conv = copy.deepcopy(conv)
    if kind == "pre-hook":  # the original spectral_norm: a forward pre-hook sets ``weight``
        return nn.utils.spectral_norm(conv)
    return nn.utils.parametrizations.spectral_norm(conv)  # ``weight`` computed at each read


def _spectral_u(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight_u if hasattr(conv, "weight_u") else conv.parametrizations.weight[0]._u


@pytest.mark.parametrize("kind", ["pre-hook", "parametrization"])
def test_a_spectral_normed_producer_runs_one_power_iteration_per_forward(kind):
    """With a zero learning rate only the power iterations move ``u``: the converted model must
    run exactly as many as the original (reading the weight again would run more)."""
    conv = nn.Conv2d(3, 8, 3)
    original = nn.Sequential(_spectral_normed(kind, conv), nn.BatchNorm2d(8))
    converted = cbn.convert_model(copy.deepcopy(original), window=3)
    for model in (original, converted):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        for x in _batches(4):
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    torch.testing.assert_close(_spectral_u(converted[0]), _spectral_u(original[0]), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["pre-hook", "parametrization"])
def test_a_spectral_normed_producer_is_compensated_in_the_weight_of_the_forward(kind):
    """The model-level step summarizes windows before the forward, when a pre-hook has not yet
    set this forward's weight: the layer must wait for its call. Reference: the same model
    without the model-level step, where every layer summarizes its window at its call."""
    producer = _spectral_normed(kind, nn.Conv2d(3, 8, 3))
    batched = cbn.convert_model(nn.Sequential(producer, nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)),
                                window=3)
    per_layer = copy.deepcopy(batched)
    model_step.remove(per_layer)
    outputs = []
    for model in (batched, per_layer):
        optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
        steps = []
        for x in _batches(4):
            out = model(x)
            out.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            steps.append(out.detach())
        outputs.append(steps)
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # And the Taylor-moved mean is that of the weight of the call: exact for the mean (linear in W).
    first, second = _batches(2, seed=11)
    batched(first).square().mean().backward()
    used = {}
    hook = producer.register_forward_hook(lambda module, args, out: used.update(weight=module.weight.detach()))
    with nn.utils.parametrize.cached():  # the hook reads the weight of the call, not a new one
        batched(second)
    hook.remove()
    expected = nn.functional.conv2d(first, used["weight"], producer.bias.detach()).mean((0, 2, 3))
    torch.testing.assert_close(batched[1].window_statistics()["mean_compensated"][1], expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- copies and state
@pytest.mark.parametrize("recipe", ["timm-ema-v3", "timm-ema-v2", "averaged-model"])
def test_ema_and_swa_copies_made_before_the_first_forward_update_and_evaluate(recipe):
    # timm's train.py --model-ema, torch's AveragedModel recipe: the copy is made at once, then
    # updated after every step from the model's state. The state has BatchNorm's keys and
    # shapes plus the iteration count, whatever pairing found since (the window is not in it).
    from timm.utils import ModelEmaV2, ModelEmaV3
    from torch.optim.swa_utils import AveragedModel, update_bn

    model = cbn.convert_model(_block(), window=3)
    reference = _block()  # BatchNorm: what the copy's state must look like
    copy_of = {"timm-ema-v3": lambda m: ModelEmaV3(m, decay=0.9), "timm-ema-v2": lambda m: ModelEmaV2(m, decay=0.9),
               "averaged-model": lambda m: AveragedModel(m, use_buffers=True)}[recipe](model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in _batches(4):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        copy_of.update(model) if recipe != "averaged-model" else copy_of.update_parameters(model)
    state = model.state_dict()
    expected = {key: value.shape for key, value in reference.state_dict().items()}
    assert {key: value.shape for key, value in state.items() if key.split(".")[-1] != "num_iterations"} == expected
    averaged = copy_of.module
    if recipe == "averaged-model":
        update_bn([x for x in _batches(2, seed=4)], copy_of)
    averaged.eval()
    out = averaged(_batches(1, seed=5)[0])
    assert torch.isfinite(out).all()


def test_a_window_changed_during_training_takes_effect_at_once():
    model = cbn.convert_model(_block(), window=3)
    _train(model, _batches(3))
    model[1].window = 5
    assert model[1].window_state.positions[0].stats.shape[0] == 4 and not model[1].window_state.positions[0].has_entries()
    _train(model, _batches(5, seed=2))
    assert int((model[1].window_state.positions[0].stats[:, 4, 0] > 0).sum()) == 4
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        model[1].window = 0
    assert model[1].window == 5


def test_a_batch_refused_with_one_value_per_channel_changes_no_state():
    # BatchNorm's error, raised before anything changes: the next batch, of another size, trains.
    model = cbn.convert_model(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), window=3)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model(torch.randn(1, 4))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model[1].iterations == 0 and not model[1].window_state.positions[0].has_entries()
    model(torch.randn(3, 4)).sum().backward()
    assert model[1].iterations == 1 and cbn.pairing_report(model)[0].compensated


def test_double_backward_works_where_batchnorm_does_and_names_cbn_elsewhere():
    # A gradient penalty (create_graph=True): with window=1 and during burn-in the layer is
    # BatchNorm, twice differentiable, equal to nn.BatchNorm2d; once it pools, one clear error.
    def penalty(model, x):
        x = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        grad.square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for options in (dict(window=1), dict(window=3, burnin=5)):
        model = cbn.convert_model(copy.deepcopy(reference), **options)
        for a, b in zip(penalty(model, x), penalty(copy.deepcopy(reference), x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    model = cbn.convert_model(copy.deepcopy(reference), window=3)
    model(x).sum().backward()  # one entry: the next forward pools
    with pytest.raises(RuntimeError, match="cbn.*double backward"):
        penalty(model, x)


def test_no_producer_input_stays_alive_between_steps_in_training_nor_in_eval():
    model = cbn.convert_model(_block(), window=3)
    _train(model, _batches(2))
    x = torch.randn(2, 3, 6, 6)
    dead = weakref.ref(x)
    model(x).square().mean().backward()
    del x
    assert dead() is None
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    dead = weakref.ref(x)
    with torch.no_grad():
        model(x)
    del x
    assert dead() is None


def _differentiable_model() -> nn.Module:
    torch.manual_seed(0)
    return cbn.convert_model(_block(), window=3)


def _warm(model: nn.Module, steps: int = 4) -> None:
    _train(model, _batches(steps, seed=3))


def test_a_backward_reads_the_entries_its_forward_pooled_whatever_was_recorded_since():
    # Differentiable compensation reads the window in backward. Two forwards of a converted model
    # before one backward take call position 0 both, so the second one's records overwrite the
    # slots the first one pooled; the first one's gradients must not change.
    model = _differentiable_model()
    _warm(model)
    alone, overwritten = model, copy.deepcopy(model)
    x, other = _batches(2, seed=5)
    alone(x).square().mean().backward()
    out = overwritten(x)
    for _ in range(3):  # wraps the 2-slot ring
        overwritten(other)
    out.square().mean().backward()
    for a, b in zip(alone.parameters(), overwritten.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_two_backwards_of_one_forward_before_the_next_add_up():
    model = _differentiable_model()
    _warm(model)
    together, apart = model, copy.deepcopy(model)
    x = _batches(1, seed=6)[0]
    out = together(x)
    (out.square().mean() + out.abs().mean()).backward()
    out = apart(x)
    out.square().mean().backward(retain_graph=True)
    out.abs().mean().backward()
    for a, b in zip(together.parameters(), apart.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_a_second_backward_after_the_window_moved_on_reads_the_entries_its_forward_pooled():
    model = _differentiable_model()
    _warm(model)
    x, later = _batches(2, seed=7)
    out = model(x)
    out.square().mean().backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(later).square().mean().backward()  # a new entry in every slot ring: the window moved on
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad()
    out.square().mean().backward()
    # The same graph, the same entries (the slots it pooled, which the later record replaced
    # rather than overwrote): the same gradients, bit for bit.
    for before, p in zip(first, model.parameters()):
        assert torch.equal(p.grad, before)
