"""Iteration counting survives every way a training stack writes weights (cbn.iterations)."""

import warnings

import pytest
import torch
from torch import nn

import cbn
from cbn.iterations import SUSPICIOUS_FORWARDS


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2))
    return cbn.convert_model(net, window=3, burnin=2)


def _iterations(model) -> int:
    return model[1].iterations


class DataSGD(torch.optim.Optimizer):
    """An optimizer that writes through ``.data`` (version counters untouched), as older stacks do."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = p.data - group["lr"] * p.grad
        return None


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False),
    "sgd-foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=True),
    "data-writes": lambda ps: DataSGD(ps),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_every_optimizer_step_is_one_iteration(kind):
    model = _model()
    optimizer = OPTIMIZERS[kind](model.parameters())
    x = torch.randn(2, 3, 6, 6)
    for step in range(1, 6):
        model(x).square().mean().backward()
        assert _iterations(model) == step
        optimizer.step()
        optimizer.zero_grad()
    # burn-in (2 iterations) is over: the layer pools its window
    assert not model[1]._in_burnin


def test_data_writes_change_the_weights_that_are_counted():
    model = _model()
    before = model[0].weight.detach().clone()
    optimizer = DataSGD(model.parameters())
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model[0].weight)


def test_gradient_accumulation_is_one_iteration_and_skipped_steps_none():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(2, 3, 6, 6)
    for _ in range(3):  # three micro-batches, one step
        model(x).sum().backward()
    assert _iterations(model) == 1
    optimizer.step()
    optimizer.zero_grad()
    scaler.scale(model(x).sum() * float("inf")).backward()  # overflow: GradScaler skips the step
    assert _iterations(model) == 2
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    model(x).sum().backward()
    assert _iterations(model) == 2


def _hand_written_loop(model, forwards, through_data, mark):
    x = torch.randn(2, 3, 6, 6)
    for _ in range(forwards):
        model.zero_grad()
        model(x).square().mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                if through_data:
                    p.data.sub_(0.01 * p.grad)
                else:
                    p.sub_(0.01 * p.grad)
        if mark:
            cbn.mark_step(model)


def test_hand_written_update_through_data_warns_once_with_the_remedy():
    model = _model()
    with pytest.warns(UserWarning, match=r"cbn\.mark_step\(model\)") as record:
        _hand_written_loop(model, SUSPICIOUS_FORWARDS + 5, through_data=True, mark=False)
    assert sum("mark_step" in str(w.message) for w in record) == 1
    assert _iterations(model) == 1


@pytest.mark.parametrize("through_data, mark", [(True, True), (False, False)])
def test_marked_or_in_place_hand_written_updates_count(through_data, mark):
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _hand_written_loop(model, SUSPICIOUS_FORWARDS + 5, through_data=through_data, mark=mark)
    assert _iterations(model) == SUSPICIOUS_FORWARDS + 5


def test_long_accumulation_without_weight_change_does_not_warn():
    model = _model()
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2 * SUSPICIOUS_FORWARDS + 1):
            model(x).sum().backward()
    assert _iterations(model) == 1


def test_parametrized_producer_counts_steps_through_its_parameters():
    # model[0].weight is recomputed at each access (a fresh tensor, version 0): the iteration is
    # read from the parameters the parametrization computes it from.
    torch.manual_seed(0)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3, bias=False))
    model = cbn.convert_model(nn.Sequential(conv, nn.BatchNorm2d(4)), window=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 4):
        model(torch.randn(2, 3, 6, 6)).square().mean().backward()
        assert _iterations(model) == step
        optimizer.step()
        optimizer.zero_grad()


def test_step_hook_marks_only_paired_producers():
    model = _model()
    optimizer = DataSGD(model.parameters())
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    conv, head = model[0].weight._version, model[5].weight._version
    optimizer.step()
    assert model[0].weight._version > conv  # the producer of model[1]
    assert model[5].weight._version == head  # a linear layer no norm follows: left alone


def test_steps_are_counted_at_the_step_and_a_skipped_forward_is_counted_later():
    # The step hook counts an iteration at once for a layer that ran since its last count (what
    # a compiled forward relies on); a step the layer did not run before is counted by its next
    # forward, which therefore starts a new iteration (another input size is then accepted).
    model = cbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), window=3)
    norm = model[1]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    assert norm.iterations == 1
    optimizer.step()
    assert norm.iterations == 2 and int(norm.iteration_count) == 2
    optimizer.step()  # again, without a forward in between (stale gradients)
    assert norm.iterations == 2
    model(torch.randn(2, 3, 9, 9))  # another size: a new iteration, not a shared-use error
    assert norm.iterations == 3 and norm.iterations == 3
