"""The model-level window step: batched recording must equal each layer recording its own step."""

import copy
import warnings

import pytest
import torch
from torch import nn

import cbn
from cbn import model_step


class _MixedModel(nn.Module):
    """Layers that take every branch of the batched recording: compensated (with and without
    a producer bias), naive, window 1, no running statistics, cumulative momentum, a linear
    producer, and one norm called twice per forward."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=True)
        self.bn1 = cbn.CrossIterationBatchNorm2d(6, window=3)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1, bias=False)
        self.bn2 = cbn.CrossIterationBatchNorm2d(5, window=4, compensate=False)
        self.conv3 = nn.Conv2d(5, 4, 3, padding=1, groups=1)
        self.bn3 = cbn.CrossIterationBatchNorm2d(4, window=1)
        self.conv4 = nn.Conv2d(4, 4, 1)
        self.bn4 = cbn.CrossIterationBatchNorm2d(4, window=2, momentum=None, track_running_stats=True)
        self.conv5 = nn.Conv2d(4, 3, 1)
        self.bn5 = cbn.CrossIterationBatchNorm2d(3, window=3, track_running_stats=False)
        self.shared = nn.Conv2d(3, 3, 1)
        self.shared_bn = cbn.CrossIterationBatchNorm2d(3, window=3, check_shared_use=False)
        self.subsampled_bn = cbn.CrossIterationBatchNorm2d(3, window=3)
        self.fc = nn.Linear(3, 7)
        self.bn_fc = cbn.CrossIterationBatchNorm1d(7, window=3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.relu(self.bn4(self.conv4(x)))
        x = self.bn5(self.conv5(x))
        # One producer feeding two norms. (One norm called twice in a converted model's forward
        # keeps a window per call, which a layer outside one cannot: tests/test_shared_norms.py.)
        x = self.shared_bn(self.shared(x)) + self.subsampled_bn(self.shared(x[:, :, ::2, ::2])).mean()
        return self.bn_fc(self.fc(x.mean((2, 3))))


def _model_step_of(model):
    for hook in model._forward_pre_hooks.values():
        if isinstance(getattr(hook, "__self__", None), model_step.ModelWindowStep):
            return hook.__self__
    return None


def _train(model, batches):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outputs = []
    for x in batches:
        out = model(x)
        outputs.append(out.detach())
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        if torch.isfinite(out).all():  # else skipped, as GradScaler skips a step with non-finite gradients
            optimizer.step()
        optimizer.zero_grad()
    return outputs


def _batches(count, nan_at=None):
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 3, 6, 6, generator=generator, dtype=torch.float64) for _ in range(count)]
    if nan_at is not None:
        batches[nan_at][0, 0, 0, 0] = float("nan")
    return batches


@pytest.mark.parametrize("nan_at", [None, 4], ids=["finite", "nan_batch"])
def test_batched_recording_equals_per_layer_recording(nan_at):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = cbn.convert_model(_MixedModel().double())
        per_layer = copy.deepcopy(batched)
        model_step.remove(per_layer)  # each layer summarizes and records its own step
        assert not any(hasattr(h, "__self__") for h in per_layer._forward_pre_hooks.values())
        runs = {}
        for name, model in (("batched", batched), ("per_layer", per_layer)):
            runs[name] = _train(model, _batches(6, nan_at))
    deferred = _model_step_of(batched)
    assert deferred is not None and deferred.pending is None  # collected during forwards only
    for out_batched, out_per_layer in zip(runs["batched"], runs["per_layer"]):
        torch.testing.assert_close(out_batched, out_per_layer, rtol=0, atol=1e-12, equal_nan=True)
    state_batched, state_per_layer = batched.state_dict(), per_layer.state_dict()
    assert state_batched.keys() == state_per_layer.keys()
    for key in state_batched:
        torch.testing.assert_close(state_batched[key], state_per_layer[key], rtol=0, atol=1e-12, msg=key)
    for key, value in state_batched.items():
        assert torch.isfinite(value.double()).all(), key
    iterations = 6 if nan_at is None else 5  # the last forward's; the skipped step is no iteration
    assert batched.shared_bn.iterations == iterations
    # One call per forward: one call position, entries in 2 slots.
    assert [p.next_slot for p in batched.shared_bn.window_state.positions] == [6 % 2]  # 6 entries
    if nan_at is not None:
        assert int((batched.bn1.window_state.positions[0].stats[:, 4, 0] > 0).sum()) == 1  # the NaN entry is an empty slot


def test_records_are_written_even_when_the_forward_raises():
    # The forward fails after the norm (4 features reach a Linear(5, 2)): like BatchNorm, whose
    # running statistics are already updated then, the norm's step is recorded.
    model = cbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(5, 2)),
                              window=3)
    norm = model[1]
    for _ in range(2):
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 3, 3, 3))
    assert int(norm.num_batches_tracked) == 2
    assert int((norm.window_state.positions[0].stats[:, 4, 0] > 0).sum()) == 2
    assert _model_step_of(model).pending is None


def test_frozen_producer_with_bias_equals_naive_averaging():
    # Entries stored without gradients carry the shifts of zero gradients (s_mu = bias), so a
    # frozen producer (nothing to compensate) gives exactly naive averaging.
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4))
    with torch.no_grad():
        base[0].bias.fill_(5.0)
    base[0].requires_grad_(False)
    compensated = cbn.convert_model(copy.deepcopy(base), window=3)
    naive = cbn.convert_model(copy.deepcopy(base), window=3, compensate=False)
    for _ in range(4):
        x = torch.randn(4, 3, 6, 6)
        torch.testing.assert_close(compensated(x), naive(x), rtol=0, atol=1e-6)
    moved = compensated[1].window_statistics()
    torch.testing.assert_close(moved["mean_compensated"], moved["mean"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("differentiable", [False, True])
def test_summaries_prepared_together_equal_each_layers_own(monkeypatch, differentiable):
    # The model step summarizes all windows before the forward (one chain for all layers); a
    # layer without it summarizes its own at its call: the same training run, and the batched
    # path really taken (no layer summarizes its own window once producers are known).
    from cbn.layers.window_state import PositionWindow

    from cbn.experiments.models import resnet8

    torch.manual_seed(5)
    batched = cbn.convert_model(resnet8().double(), window=3, differentiable_compensation=differentiable)
    per_layer = copy.deepcopy(batched)
    model_step.remove(per_layer)
    own_summaries = []
    real = PositionWindow.summary
    monkeypatch.setattr(PositionWindow, "summary", lambda self, *args: own_summaries.append(1) or real(self, *args))
    runs = []
    for model in (batched, per_layer):
        torch.manual_seed(6)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        outputs, calls = [], []
        for _ in range(4):
            own_summaries.clear()
            out = model(torch.randn(2, 1, 28, 28, dtype=torch.float64))
            calls.append(len(own_summaries))
            out.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            outputs.append(out.detach())
        runs.append((outputs, calls))
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert runs[0][1][-1] == 0 and runs[1][1][-1] > 0
