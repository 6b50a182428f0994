"""The fine-tuning study's pieces (issue 28): MABN against its equations, frozen BN, the
pretrained-weight loading of every method, and one tiny end-to-end run."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbn.experiments.finetune import FrozenBatchNorm2d, build_finetune_model, freeze_batchnorms
from cbn.experiments.mabn import CentralizedConv2d, MABN2d, centralize_convolutions
from cbn.experiments.segmentation import FCN, METHODS, SegConfig, resolve_protocol


# ----------------------------------------------------------------------------- MABN


def _mabn_reference(xs, gs, window, warmup, eps):
    """MABN's training steps in float64 numpy, channel by channel, from the paper's equations:
    chi_B = mean(x^2); chi_bar = mean of the last `window` chi_B (this one included) once `warmup`
    steps have passed, else chi_B; y = x / sqrt(chi_bar + eps); Psi_B = mean(g * y); Psi_bar alike;
    dx = (g - y * Psi_bar) / sqrt(chi_bar + eps)."""
    chis, psis, ys, dxs = [], [], [], []
    for t, (x, g) in enumerate(zip(xs, gs)):
        y, dx = np.empty_like(x), np.empty_like(x)
        chi_t, psi_t = [], []
        for c in range(x.shape[1]):
            xc, gc = x[:, c], g[:, c]
            chi_b = float(np.mean(xc * xc))
            chi = np.mean([h[c] for h in chis[-(window - 1):]] + [chi_b]) if t >= warmup and window > 1 else chi_b
            yc = xc / np.sqrt(chi + eps)
            psi_b = float(np.mean(gc * yc))
            psi = np.mean([h[c] for h in psis[-(window - 1):]] + [psi_b]) if t >= warmup and window > 1 else psi_b
            y[:, c] = yc
            dx[:, c] = (gc - yc * psi) / np.sqrt(chi + eps)
            chi_t.append(chi_b)
            psi_t.append(psi_b)
        chis.append(chi_t)
        psis.append(psi_t)
        ys.append(y)
        dxs.append(dx)
    return ys, dxs, chis


def test_mabn_matches_the_papers_equations_step_by_step():
    rng = np.random.default_rng(0)
    steps, window, warmup, eps, momentum = 6, 3, 2, 1e-5, 0.1
    xs = [rng.normal(0.3, 1.0 + 0.3 * t, size=(2, 3, 4, 5)) for t in range(steps)]
    gs = [rng.normal(size=(2, 3, 4, 5)) for _ in range(steps)]
    ys_ref, dxs_ref, chis = _mabn_reference(xs, gs, window, warmup, eps)
    layer = MABN2d(3, window=window, warmup=warmup, eps=eps, momentum=momentum, affine=False).double()
    running = np.ones(3)
    for t in range(steps):
        x = torch.tensor(xs[t], requires_grad=True)
        y = layer(x)
        y.backward(torch.tensor(gs[t]))
        np.testing.assert_allclose(y.detach().numpy(), ys_ref[t], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(x.grad.numpy(), dxs_ref[t], rtol=1e-10, atol=1e-12)
        running = (1 - momentum) * running + momentum * np.array(chis[t])
    np.testing.assert_allclose(layer.running_chi.numpy(), running, rtol=1e-12)
    layer.eval()
    x = torch.tensor(xs[0])
    np.testing.assert_allclose(layer(x).numpy(), xs[0] / np.sqrt(running + eps)[None, :, None, None], rtol=1e-12)


def test_mabn_before_warmup_is_the_exact_gradient_of_second_moment_normalization():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda v: MABN2d(4, window=4, warmup=10, affine=False).double()(v), (x,))


def test_mabn_affine_and_centralized_convolution():
    torch.manual_seed(0)
    conv = CentralizedConv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 6, 6)
    w = conv.weight.detach()
    expected = F.conv2d(x, w - w.mean(dim=(1, 2, 3), keepdim=True), padding=1)
    torch.testing.assert_close(conv(x), expected)
    with torch.no_grad():  # a constant added to an output channel's weights changes nothing
        conv.weight[1] += 0.7
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)
    conv(x).sum().backward()
    assert conv.weight.grad is not None
    torch.testing.assert_close(conv.weight.grad.sum(dim=(1, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    net = centralize_convolutions(nn.Sequential(nn.Conv2d(3, 4, 3), MABN2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)))
    assert type(net[0]) is CentralizedConv2d and type(net[3]) is nn.Conv2d


# ----------------------------------------------------------------------------- frozen BN


def test_frozen_bn_keeps_its_statistics_and_trains_its_affine():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    model = freeze_batchnorms(nn.Sequential(nn.Conv2d(2, 5, 1), bn))
    frozen = model[1]
    assert isinstance(frozen, FrozenBatchNorm2d)
    x = torch.randn(1, 5, 4, 4)
    torch.testing.assert_close(frozen(x), bn.eval()(x))
    before = frozen.running_mean.clone(), frozen.running_var.clone()
    model.train()
    model(torch.randn(1, 2, 4, 4)).sum().backward()
    assert frozen.weight.grad is not None and frozen.bias.grad is not None
    assert torch.equal(frozen.running_mean, before[0]) and torch.equal(frozen.running_var, before[1])


# ----------------------------------------------------------------------------- pretrained loading


@pytest.fixture()
def pretrained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(123)
    net = FCN(nn.BatchNorm2d, (4, 8))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    state = {k: v for k, v in net.state_dict().items() if k.startswith("down.")}
    torch.save(state, "enc.pt")
    return state


def _cfg(name, **values):
    from cbn.experiments.finetune import METHOD_DEFS

    method = METHODS[name] if name not in METHOD_DEFS else __import__(
        "cbn.experiments.segmentation", fromlist=["Method"]).Method(**METHOD_DEFS[name])
    return SegConfig(arch="fcn", widths=(4, 8), pretrained="enc.pt", images=8, **values).with_method(name, method)


@pytest.mark.parametrize("name", ["bn", "frozen-bn", "cbn-diff", "cbn", "mabn", "gn-pretrained", "gn", "brn"])
def test_every_method_starts_from_the_pretrained_weights_it_can_use(pretrained, name):
    cfg = _cfg(name)
    model = build_finetune_model(cfg, resolve_protocol(cfg))
    own = model.state_dict()
    conv = "down.1.3.weight"
    if name == "gn":
        assert not torch.equal(own[conv], pretrained[conv])
        assert model.pretrained_info["init"] == "scratch"
        return
    assert torch.equal(own[conv], pretrained[conv])
    affine = "down.1.1.weight"
    if name == "gn-pretrained":
        assert torch.equal(own[affine], torch.ones(8))
    else:
        assert torch.equal(own[affine], pretrained[affine])
    if name in ("bn", "frozen-bn", "cbn", "cbn-diff", "brn"):
        assert torch.equal(own["down.1.1.running_var"], pretrained["down.1.1.running_var"])
    # the score heads are new and the same for every method of a seed
    reference = build_finetune_model(_cfg("bn"), resolve_protocol(_cfg("bn")))
    assert torch.equal(own["scores.0.weight"], reference.state_dict()["scores.0.weight"])


# ----------------------------------------------------------------------------- end to end


def test_a_tiny_finetuning_run_records_its_environment_and_no_paths(pretrained, tmp_path):
    from cbn.experiments.segmentation import train

    cfg = replace(_cfg("mabn"), batch_size=2, train_scenes=8, test_scenes=4, train_eval_scenes=4, images=8,
                  eval_points=1, out="runs", progress=False)
    record = train(cfg)
    assert record["environment"]["threads"] >= 1 and "torch" in record["environment"]
    assert record["pretrained"]["entries_loaded"] > 0 and len(record["pretrained"]["sha256"]) == 64
    text = (tmp_path / "runs" / "mabn_bs2_seed0.json").read_text()
    assert str(tmp_path) not in text and "/home/" not in text
    assert json.loads(text)["config"]["method"] == "mabn"


def test_pretrain_tiny_writes_the_encoder_and_its_record(tiny_fashion, tmp_path):
    from cbn.experiments.finetune import PretrainConfig, pretrain

    cfg = PretrainConfig(epochs=2, batch_size=16, train_images=48, data_dir=str(tiny_fashion))
    record = pretrain(cfg, str(tmp_path / "encoder.pt"), progress=False)
    saved = json.loads((tmp_path / "encoder.json").read_text())
    assert saved["steps"] == 6 and [point["step"] for point in saved["curve"]] == [3, 6]
    assert 0 <= saved["test_accuracy"] <= 100 and saved["weights_sha256"] == record["weights_sha256"]
    state = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert state and all(key.startswith("down.") for key in state)
