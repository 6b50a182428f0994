"""The statistics-error study against direct computations."""

import torch
from torch import nn

import cbn
from cbn.experiments.stats_error import measure_errors, true_statistics, truncation_study


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5),
                        nn.Flatten(), nn.Linear(5 * 36, 3))
    return cbn.convert_model(net, window=4, burnin=0)


def _train(model, steps, lr, frozen=()):
    for name, p in model.named_parameters():
        p.requires_grad_(not any(name.startswith(f) for f in frozen))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    inputs = []
    for _ in range(steps):
        x = torch.randn(3, 1, 6, 6)
        loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        inputs.insert(0, x)
    return inputs


def test_truth_of_first_layer_is_its_convolution_output():
    model = _model()
    x = torch.randn(5, 1, 6, 6)
    truth = true_statistics(model, [x])
    y = model[0](x).double()
    torch.testing.assert_close(truth["1"][0][0], y.mean((0, 2, 3)))
    torch.testing.assert_close(truth["1"][1][0], y.var((0, 2, 3), unbiased=False))


def _snapshots(model, steps, lr, frozen=()):
    """Train like _train, also returning parameter snapshots taken before each forward."""
    for name, p in model.named_parameters():
        p.requires_grad_(not any(name.startswith(f) for f in frozen))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    inputs, params = [], []
    for _ in range(steps):
        x = torch.randn(3, 1, 6, 6)
        params.insert(0, {n: p.detach().clone() for n, p in model.named_parameters()})
        loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        inputs.insert(0, x)
    return inputs, params


def test_unchanged_weights_give_zero_weight_change_error():
    model = _model()
    inputs, params = _snapshots(model, 5, lr=0.0)
    errors = measure_errors(model, inputs, params)
    assert set(errors) == {"1", "4", "7"} and len(errors["1"]) == 3
    for name, rows in errors.items():
        for row in rows:
            assert max(row[k] for k in row if k.endswith("_w")) < 1e-5
            if name == "1":  # no norm upstream: stored statistics are the truth itself
                assert max(row[k] for k in row if k != "tau") < 1e-5


def test_weight_change_errors_of_first_layer_when_everything_moves():
    model = _model()
    inputs, params = _snapshots(model, 6, lr=0.3)
    first = measure_errors(model, inputs, params)["1"]
    for row in first:
        assert row["mean_compensated_w"] < 1e-5 < 1e-3 < row["mean_naive_w"]
        assert abs(row["mean_compensated_w"] - row["mean_compensated"]) < 1e-5


def test_compensation_exact_for_the_mean_of_a_layer_whose_own_weights_moved():
    model = _model()
    inputs = _train(model, 5, lr=0.0)  # fill the windows with unchanged weights
    with torch.no_grad():  # then move only the first conv, by a known amount
        model[0].weight.add_(0.01 * torch.randn_like(model[0].weight))  # small: first order dominates
    first = measure_errors(model, inputs)["1"]
    assert all(r["mean_compensated"] < 1e-5 for r in first)  # the mean is linear in W: exact
    assert all(r["mean_naive"] > 1e-3 for r in first)
    assert all(r["var_compensated"] < 0.25 * r["var_naive"] for r in first)  # residual: 2nd order
    deeper = measure_errors(model, inputs)["4"]  # its input moved through upstream weights only
    assert all(r["mean_naive"] > 1e-3 for r in deeper)


def test_truncation_study_ratios():
    model = _model()
    _train(model, 2, lr=0.01)
    rows = truncation_study(model, torch.randn(4, 1, 6, 6), ["7"], depth=2)
    assert [r["r"] for r in rows] == [0, 1, 2]
    assert rows[0]["dmean_ratio"] == 1.0 and rows[0]["weight"] == "6"
    assert rows[1]["weight"] == "3" and rows[2]["weight"] == "0"
    assert all(r["dvar_norm"] > 0 for r in rows)


def test_truncation_skips_parallel_branches():
    from cbn.experiments.norms import build_model

    torch.manual_seed(0)
    model = build_model("resnet8", "cbn", window=2, burnin=0)
    model(torch.randn(2, 1, 28, 28))  # one training forward pairs the layers
    rows = truncation_study(model, torch.randn(2, 1, 28, 28), ["layer2.0.bn1"], depth=1)
    # downsample.0 runs just before layer2.0.conv1 but lies on a parallel branch
    assert [r["weight"] for r in rows] == ["layer2.0.conv1", "layer1.0.conv2"]
