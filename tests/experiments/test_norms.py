"""make_norm / build_model produce the right layers for every kind."""

import pytest
import torch
from torch import nn

import cbn
from cbn.experiments.norms import NORM_KINDS, build_model, make_norm, norm_layers
from cbn.layers.batch_renorm import BatchRenorm2d
from cbn.layers.sync_batchnorm import SyncBatchNorm2d

EXPECTED = {"bn": nn.BatchNorm2d, "brn": BatchRenorm2d, "gn": nn.GroupNorm,
            "naive": cbn.CrossIterationBatchNorm2d, "cbn": cbn.CrossIterationBatchNorm2d,
            "cbn-diff": cbn.CrossIterationBatchNorm2d, "syncbn": SyncBatchNorm2d}


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_build_model_every_kind_trains_one_step(kind):
    torch.manual_seed(0)
    model = build_model("resnet8", kind, window=3, burnin=0, warmup_steps=0, rmax_ramp_steps=1, dmax_ramp_steps=1)
    layers = norm_layers(model)
    assert len(layers) == 9 and all(type(m) is EXPECTED[kind] for _, m in layers)
    if kind in ("naive", "cbn", "cbn-diff"):
        assert all(m.compensate == (kind != "naive") and m.window == 3 for _, m in layers)
        assert all(m.differentiable_compensation == (kind == "cbn-diff") for _, m in layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(torch.randn(2, 1, 28, 28)), torch.tensor([0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    model.eval()
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_make_norm_options():
    assert make_norm("gn", gn_groups=4)(16).num_groups == 4
    assert make_norm("gn", gn_groups=32)(16).num_groups == 16
    assert make_norm("brn", rmax=2.0, warmup_steps=3)(8).rmax == 2.0
    assert make_norm("bn", momentum=0.2)(8).momentum == 0.2
    with pytest.raises(ValueError):
        make_norm("ln")
