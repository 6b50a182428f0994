"""The statistics-error study against direct computations."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cbn
from cbn.experiments import stats_error
from cbn.experiments.stats_error import (
    NormStatisticsRecorder,
    add_arguments,
    markdown,
    measure_errors,
    render,
    run_study,
    true_statistics,
    truncation_study,
)

NORMS = ("1", "4", "7")


def _model(window=4):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5),
                        nn.Flatten(), nn.Linear(5 * 36, 3))
    return cbn.convert_model(net, window=window, burnin=0)


def _train(model, steps, lr, batch=3):
    """SGD on random batches; returns inputs, recorded norm statistics, parameter snapshots (newest first)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    inputs, norm_stats, params = [], [], []
    with NormStatisticsRecorder(model) as recorder:
        for _ in range(steps):
            x = torch.randn(batch, 1, 6, 6)
            params.insert(0, {n: p.detach().clone() for n, p in model.named_parameters()})
            loss = F.cross_entropy(model(x), torch.arange(batch) % 3)
            opt.zero_grad()
            loss.backward()
            opt.step()
            inputs.insert(0, x)
            norm_stats.insert(0, recorder.take())
    return inputs, norm_stats, params


def _values(errors, keys):
    return [row[k] for rows in errors.values() for row in rows for k in keys]


def test_recorder_keeps_what_each_layer_normalized_with():
    from cbn.layers import cross_iteration_batchnorm as layer_module

    model = _model()
    original = layer_module.cross_iteration_batch_norm
    _train(model, 3, lr=0.1)  # the window is filled: the next forward pools
    seen = {}
    hook_counts = (len(model[1]._forward_pre_hooks), len(model[1]._forward_hooks))
    hooks = [model[i].register_forward_hook(
        lambda mod, args, out, i=i: seen.__setitem__(str(i), (args[0].detach(), out.detach()))) for i in (1, 4, 7)]
    with NormStatisticsRecorder(model) as recorder:
        model(torch.randn(3, 1, 6, 6))
        recorded = recorder.take()
        with pytest.raises(RuntimeError, match="no normalization statistics"):
            recorder.take()
    for h in hooks:
        h.remove()
    assert layer_module.cross_iteration_batch_norm is original  # restored on exit
    for name in NORMS:
        x, out = seen[name]
        mean, var = recorded[name]
        norm = model[int(name)]
        torch.testing.assert_close(out, F.batch_norm(x, mean, var, norm.weight, norm.bias, False, 0.0, norm.eps))
        batch_mean = x.mean((0, 2, 3))
        assert (mean - batch_mean).abs().max() > 1e-4  # pooled with the window, not the batch's own
    assert (len(model[1]._forward_pre_hooks), len(model[1]._forward_hooks)) == hook_counts  # removed


@torch.no_grad()
def test_truth_runs_the_current_weights_with_the_given_normalizers():
    model = _model()
    model(torch.randn(3, 1, 6, 6))  # pairs the layers
    x = torch.randn(5, 1, 6, 6)
    torch.manual_seed(1)
    given = {n: (torch.randn(c), torch.rand(c) + 0.5) for n, c in zip(NORMS, (4, 6, 5))}
    truth = true_statistics(model, [x], [given])
    y = model[0](x).double()  # first layer: its convolution's output, whatever the normalizers
    torch.testing.assert_close(truth["1"][0][0], y.mean((0, 2, 3)))
    torch.testing.assert_close(truth["1"][1][0], y.var((0, 2, 3), unbiased=False))
    bn = model[1]
    h = torch.relu(F.batch_norm(model[0](x), *given["1"], bn.weight, bn.bias, False, 0.0, bn.eps))
    z = model[3](h).double()  # second: through the first norm with the GIVEN statistics
    torch.testing.assert_close(truth["4"][0][0], z.mean((0, 2, 3)))
    torch.testing.assert_close(truth["4"][1][0], z.var((0, 2, 3), unbiased=False))


@pytest.mark.parametrize("batch", [1, 3])
def test_learning_rate_zero_gives_truth_equal_to_naive_and_compensated(batch):
    model = _model()
    inputs, norm_stats, params = _train(model, 5, lr=0.0, batch=batch)
    errors = measure_errors(model, inputs, norm_stats, params)
    assert set(errors) == set(NORMS) and all(len(rows) == 3 for rows in errors.values())
    # every layer, every offset, plain, weight-change-only and replay: rounding only
    assert max(v for rows in errors.values() for row in rows for k, v in row.items() if k != "tau") < 1e-6
    # and the estimates agree with each other directly
    for name in NORMS:
        w = model[int(name)].window_statistics()
        torch.testing.assert_close(w["mean_compensated"], w["mean"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(w["var_compensated"], w["var"], rtol=1e-6, atol=1e-6)


def test_weight_change_only_compensated_mean_is_exact_and_beats_naive():
    model = _model()
    inputs, norm_stats, params = _train(model, 6, lr=0.3)
    errors = measure_errors(model, inputs, norm_stats, params)
    for name, rows in errors.items():
        for row in rows:
            # the layer's input held fixed: the mean is linear in its own weights, Taylor is exact
            assert row["mean_compensated_w"] < 1e-5 < 1e-3 < row["mean_naive_w"]
            # the replay with the old weights and normalizers reproduces the stored entry
            assert row["replay_mean"] < 1e-6 and row["replay_var"] < 1e-6
    for row in errors["1"]:  # no weights upstream of the first layer: both truths coincide
        assert abs(row["mean_naive"] - row["mean_naive_w"]) < 1e-6
        assert row["mean_compensated"] < 1e-5
    # deeper layers: the upstream weights moved their inputs, which CBN's step ignores
    assert max(row["mean_compensated"] for row in errors["7"]) > 1e-2


def test_compensation_exact_for_the_mean_of_a_layer_whose_own_weights_moved():
    model = _model()
    inputs, norm_stats, params = _train(model, 5, lr=0.0)  # fill the windows with unchanged weights
    with torch.no_grad():  # then move only the first conv, by a known amount
        model[0].weight.add_(0.01 * torch.randn_like(model[0].weight))  # small: first order dominates
    errors = measure_errors(model, inputs, norm_stats, params)
    first = errors["1"]
    assert all(r["mean_compensated"] < 1e-5 for r in first)  # the mean is linear in W: exact
    assert all(r["mean_naive"] > 1e-3 for r in first)
    assert all(r["var_compensated"] < 0.25 * r["var_naive"] for r in first)  # residual: 2nd order
    for r in errors["4"]:  # its input moved through upstream weights only
        assert r["mean_naive"] > 1e-3
        assert max(r[k] for k in r if k.endswith("_w")) < 1e-6  # its own weights did not move


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


def _study_args(tiny_fashion, tmp_path, *extra):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([
        "--model", "resnet8", "--window", "16", "--burnin", "0", "--steps", "17", "--at", "17",
        "--train-subset", "0", "--trunc-layers", "1", "--trunc-batch", "2", "--no-progress",
        "--data-dir", str(tiny_fashion), "--out", str(tmp_path / "out"), *extra,
    ])


@pytest.mark.parametrize("batch", ["1", "2"])
def test_study_on_resnet8_small_batches_window_16_is_exact_at_learning_rate_zero(tiny_fashion, tmp_path, batch):
    result = run_study(_study_args(tiny_fashion, tmp_path, "--batch-size", batch, "--lr", "0"))
    assert [m["iteration"] for m in result["measurements"]] == [17]
    layers = result["measurements"][0]["layers"]
    assert len(layers) == 9 and all(len(rows) == 15 for rows in layers.values())
    assert max(v for rows in layers.values() for row in rows for k, v in row.items() if k != "tau") < 1e-6


def test_study_report(tiny_fashion, tmp_path):
    args = _study_args(tiny_fashion, tmp_path, "--batch-size", "1", "--lr", "0.05", "--window", "4",
                       "--steps", "6", "--at", "5", "6")
    result = run_study(args)
    assert [m["iteration"] for m in result["measurements"]] == [5, 6]
    rows = [row for m in result["measurements"] for rs in m["layers"].values() for row in rs]
    assert len(rows) == 2 * 9 * 3 and max(r["mean_compensated_w"] for r in rows) < 1e-5
    assert [e["tau"] for e in result["summary"]] == [1, 2, 3]
    (tmp_path / "out").mkdir()
    text = render(tmp_path / "out", result)
    assert stats_error.NOTE[1:] in text and stats_error.NOTE_WEIGHT_CHANGE in text
    assert "Replay check" in text and (tmp_path / "out" / "stats_error.png").is_file()
    assert text == markdown(result)
