"""Production training: resume in a fresh process, channels_last, AMP, ONNX, torch.compile,
gradient accumulation and a norm shared across inputs."""

import copy
import warnings

import pytest
import torch
from torch import nn

import cbn
from zoo import produced_by
from cbn.distributed import launch
from cbn.functional.statistic_gradients import StatisticGradients, statistic_shifts
from distributed import workers


def _conv_model(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    return cbn.convert_model(model.to(dtype), window=3, **kwargs)


def _batches(steps, dtype=torch.float32, shape=(4, 3, 8, 8)):
    generator = torch.Generator().manual_seed(7)
    return [(torch.randn(shape, generator=generator).to(dtype) * 2 + 0.5,
             torch.randint(0, 5, shape[:1], generator=generator)) for _ in range(steps)]


def _train(model, batches, lr=0.1, autocast=False, memory_format=torch.contiguous_format):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses, outputs = [], []
    for x, y in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x.contiguous(memory_format=memory_format))
            loss = nn.functional.cross_entropy(out.float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        outputs.append(out.detach().float())
    return torch.stack(losses), outputs


# ----------------------------------------------------------------------------- exact resume
def test_resume_in_a_fresh_process_is_bitwise_exact_across_burnin(tmp_path):
    # burnin=4, saved after 3 steps: burn-in ends after the save point, in the resumed process.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, optimizer = workers.resume_model(seed=0)
            workers.resume_train(model, optimizer, range(3))
            torch.save({"model": model.state_dict(), "windows": cbn.window_state_dict(model),
                        "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
            uninterrupted = workers.resume_train(model, optimizer, range(3, 8))
    finally:
        torch.set_num_threads(threads)
    launch(workers.resume_in_fresh_process, 1, str(tmp_path / "ckpt.pt"), list(range(3, 8)),
           str(tmp_path / "losses.pt"), timeout_s=60)  # 11 s idle, 22 s under load
    resumed = torch.load(tmp_path / "losses.pt")
    assert torch.equal(resumed, uninterrupted), (resumed, uninterrupted)


# ----------------------------------------------------------------------------- memory format
def test_channels_last_equals_contiguous():
    # float64: the comparison sees the layer, not the convolution's float32 summation order.
    batches = _batches(4, torch.float64)
    contiguous = _conv_model(torch.float64)
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    losses, outputs = _train(contiguous, batches)
    losses_cl, outputs_cl = _train(channels_last, batches, memory_format=torch.channels_last)
    torch.testing.assert_close(losses_cl, losses, rtol=0, atol=1e-6)
    for a, b in zip(outputs_cl, outputs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for (name, a), b in zip(channels_last.state_dict().items(), contiguous.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert channels_last[1].window_state.positions[0].var_grad.abs().sum() > 0  # compensation was active


# ----------------------------------------------------------------------------- AMP
AMP_LOSS_RTOL = 2e-2  # bf16 has an 8-bit mantissa (relative step 2^-8 = 3.9e-3)


def test_bf16_autocast_trains_with_float32_statistics_and_tracks_fp32():
    batches = _batches(6)
    reference = _conv_model()
    amp = copy.deepcopy(reference)
    losses, _ = _train(reference, batches, lr=0.05)
    losses_amp, outputs_amp = _train(amp, batches, lr=0.05, autocast=True)
    assert all(torch.isfinite(o).all() for o in outputs_amp)
    torch.testing.assert_close(losses_amp, losses, rtol=AMP_LOSS_RTOL, atol=0)
    for norm in (amp[1], amp[4]):
        for name, buffer in norm.named_buffers():
            if buffer.is_floating_point():
                assert buffer.dtype == torch.float32, name
    # The newest entry's Taylor terms were computed in float32 inside autocast (the weights have
    # moved once since; recompute them with the stored float32 gradients and the old weights).
    norm, conv = amp[4], amp[3]
    x, _ = batches[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp(x)  # one more forward, no step: the newest entry belongs to the current weights
    slot = (norm.window_state.positions[0].next_slot - 1) % (norm.window - 1)
    gradients = StatisticGradients(norm.window_state.positions[0].mean_grad[:, slot : slot + 1], norm.window_state.positions[0].var_grad[:, slot : slot + 1])
    mean_shift, var_shift = statistic_shifts(gradients, conv.weight, conv.bias)
    torch.testing.assert_close(norm.window_state.positions[0].stats[slot, 2], mean_shift[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm.window_state.positions[0].stats[slot, 3], var_shift[0], rtol=1e-6, atol=1e-6)
    # ... and the entry's batch statistics are those of the (bf16) input, in float32.
    assert norm.window_state.positions[0].stats.dtype == torch.float32


# ----------------------------------------------------------------------------- ONNX
def test_reverted_model_exports_to_onnx_and_onnxruntime_matches_eval():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _conv_model()
    _train(model, _batches(3))
    model.eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    reverted = cbn.revert_model(model)
    import io

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # dynamo=False: the TorchScript exporter needs no package beyond onnx (no onnxscript).
        torch.onnx.export(reverted, (x,), buffer, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()))
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- torch.compile
def test_a_compiled_model_trains_with_its_norms_outside_the_graph_and_says_why_uncompensated():
    # The design reads each norm's producer from autograd's record of it, which a compiled graph
    # replaces by one node of its own: under torch.compile every CBN step runs eagerly (a graph
    # break per norm); a norm whose input comes out of a graph pools uncompensated statistics and
    # the report says why. fullgraph=True is refused by dynamo at the first norm.
    # (docs/reliability.md, "Known limits".)
    from cbn.experiments.models import resnet8

    torch.manual_seed(0)
    model = cbn.convert_model(resnet8(), window=3, burnin=1)  # compiled from step 0, across burn-in
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            loss = compiled(torch.randn(2, 1, 28, 28)).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            assert torch.isfinite(loss)
    rows = cbn.pairing_report(model)
    assert any("torch.compile" in row.reason for row in rows)
    assert all(row.compensated or "torch.compile" in row.reason for row in rows), rows
    assert all(layer.iterations == 3 for layer in model.modules() if isinstance(layer, cbn.CrossIterationBatchNormBase))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="disable"):
        torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)(torch.randn(2, 1, 28, 28))


# ----------------------------------------------------------------------------- several forwards per step
def test_gradient_accumulation_pools_like_the_concatenated_micro_batches():
    torch.manual_seed(5)
    model = cbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double(),
                              window=3, momentum=None)
    norm = model[1]
    micro = [torch.randn(2, 3, 6, 6, dtype=torch.float64) * 2 + 1 for _ in range(3)]
    for x in micro:  # unchanged weights: one iteration, one entry per forward
        out = model(x)
        out.square().mean().backward()
    assert norm.iterations == 1
    with torch.no_grad():
        y = torch.cat([model[0](x) for x in micro])
        y_last = model[0](micro[-1])
    mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    expected = (y_last - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + norm.eps)
    expected = expected * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-9)
    # momentum=None: the running statistics average the pooled estimates of the three forwards.
    assert int(norm.num_batches_tracked) == 3


def test_inputs_of_other_sizes_at_unchanged_weights_train_as_one_iteration():
    # Multi-scale training where a step is skipped (GradScaler), or gradient accumulation over
    # varying sizes: two forwards at unchanged weights are one iteration, each with its entry
    # (the earlier design refused the second size).
    head = cbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), window=3)
    levels = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)]
    for x in levels:
        head(x).square().mean().backward()
    assert head[1].iterations == 1
    assert sorted(head[1].window_state.positions[0].stats[:, 4, 0].tolist()) == [2 * 4 * 4, 2 * 8 * 8]
    # One norm per level, the convolution shared: each norm pairs with it.
    conv = nn.Conv2d(3, 4, 3, padding=1)
    norms = nn.ModuleList(nn.BatchNorm2d(4) for _ in levels)
    model = cbn.convert_model(nn.ModuleDict(dict(conv=conv, norms=norms)), window=3)
    for norm, x in zip(model["norms"], levels):
        norm(model["conv"](x))
    assert all(produced_by(norm, conv) for norm in model["norms"])
