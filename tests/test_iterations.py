"""Iteration counting survives every way a training stack writes weights (cbn.iterations)."""

import warnings

import pytest
import torch
from torch import nn

import cbn
import threading


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
    assert model[1].iterations > model[1].burnin


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


@pytest.mark.parametrize("through_data, mark", [(True, False), (True, True), (False, False)])
def test_hand_written_updates_count_with_or_without_mark_step(through_data, mark):
    # Iterations are read from the weights each forward uses: writes through .data count
    # without cbn.mark_step (kept as a no-op for earlier code), and nothing warns.
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _hand_written_loop(model, 70, through_data=through_data, mark=mark)
    assert _iterations(model) == 70


def test_long_accumulation_without_weight_change_is_one_iteration():
    model = _model()
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(130):
            model(x).sum().backward()
    assert _iterations(model) == 1


def test_an_assign_load_after_training_started_counts_the_next_steps():
    # load_state_dict(assign=True) replaces the parameter objects: the layer follows the new ones.
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(2, 3, 6, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    assert model[1].iterations == 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3, 6):
        model(torch.randn(2, 3, 6, 6)).square().mean().backward()
        assert _iterations(model) == step
        optimizer.step()
        optimizer.zero_grad()


def test_two_models_in_two_threads_count_their_own_steps():
    # No global state: each layer counts the changes of its own producer's weights.
    models = [_model() for _ in range(2)]
    counts, errors = {}, []

    def train(index, steps):
        try:
            model = models[index]
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            for _ in range(steps):
                model(torch.randn(2, 3, 6, 6)).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
            model(torch.randn(2, 3, 6, 6))
            counts[index] = _iterations(model)
        except Exception as error:  # reported below, in the main thread
            errors.append(error)

    threads = [threading.Thread(target=train, args=(i, steps)) for i, steps in enumerate((20, 35))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert counts == {0: 21, 1: 36}


def test_one_norm_on_two_convolutions_counts_one_iteration_per_step():
    torch.manual_seed(0)
    convs = nn.ModuleList([nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 1, padding=0, stride=1, dilation=1)])
    norm = cbn.CrossIterationBatchNorm2d(4, window=3)
    optimizer = torch.optim.SGD([*convs.parameters(), *norm.parameters()], lr=0.1)
    for step in range(1, 5):
        x = torch.randn(2, 3, 6, 6)
        (norm(convs[0](x)).square().mean() + norm(convs[1](x)).square().mean()).backward()
        assert norm.iterations == step
        optimizer.step()
        optimizer.zero_grad()


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
