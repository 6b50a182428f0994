"""timm builds cbn's layers from ``norm_layer=``: plain-BN and norm + act models, trained compensated."""

import functools
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

import cbn
from cbn.layers.norm_act import make_activation

# (name, uses timm's norm + act layers): each built small enough for a CPU test at 32 x 32.
ARCHITECTURES = [
    ("resnet10t", False),
    ("efficientnet_b0", True),
    ("mobilenetv2_050", True),
    ("regnetx_002", True),
    ("fbnetc_100", True),
    ("cspresnet50", True),
]


def _twin(name, norm_layer):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=3, norm_layer=norm_layer)


@pytest.mark.parametrize("name,norm_act", ARCHITECTURES)
def test_create_model_builds_cbn_where_timm_builds_batchnorm_and_trains_compensated(name, norm_act):
    reference = _twin(name, None)  # timm's own BatchNorm2d / BatchNormAct2d
    model = _twin(name, functools.partial(cbn.CrossIterationBatchNorm2d, window=2))
    built = dict(model.named_modules())
    expected = {nn.BatchNorm2d: cbn.CrossIterationBatchNorm2d, BatchNormAct2d: cbn.CrossIterationBatchNormAct2d}
    norms = [(path, module) for path, module in reference.named_modules() if type(module) in expected]
    assert norms and any(type(m) is BatchNormAct2d for _, m in norms) == norm_act
    for path, module in norms:
        layer = built[path]
        assert type(layer) is expected[type(module)], path
        assert layer.window == 2 and layer.num_features == module.num_features and layer.eps == module.eps
        if type(module) is BatchNormAct2d:  # the same activation and drop modules as timm makes
            assert type(layer.act) is type(module.act) and type(layer.drop) is type(module.drop), path
            assert getattr(layer.act, "inplace", None) == getattr(module.act, "inplace", None), path

    # Eval mode is BatchNorm: with timm's weights the outputs are timm's, so act and drop sit where timm's do.
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and all(key.rsplit(".", 1)[-1] == "num_iterations" for key in missing)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=0, atol=0)

    # Until layers built directly pair by themselves, convert_model keeps them and pairs them.
    model = cbn.convert_model(model.train())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    target = torch.tensor([0, 2])
    layer = built[norms[0][0]]
    losses, updates = [], []
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        # At batch 2 on 32 x 32 inputs timm's deepest norms see 2 values per channel: which of the
        # two is larger is decided by rounding, the first gradients reach 1e12, and without clipping
        # the losses that follow depend on the CPU's convolution kernels (NaN on some).
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        producer = layer.pairing_status()[1]
        before = [p.detach().clone() for p in producer]
        optimizer.step()
        updates.append(any(not torch.equal(b, p) for b, p in zip(before, producer)))
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    report = cbn.pairing_report(model)
    assert len(report) == len(norms)
    assert all(row.compensated for row in report), cbn.format_pairing_report(report)
    # An iteration is a change of the producer's weights: the first forward, then each update
    # before a forward.
    assert updates[0] and layer.iterations == 1 + sum(updates[:2])
    assert layer.window_state.positions[0].stats[0, 4].min() > 0  # the window holds a past entry


def test_norm_act_class_and_string_names_resolve_in_timms_lookup():
    model = _twin("efficientnet_b0", cbn.CrossIterationBatchNormAct2d)
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {cbn.CrossIterationBatchNormAct2d}
    assert {type(m.act) for m in model.modules() if isinstance(m, cbn.CrossIterationBatchNormAct2d)} == {nn.SiLU, nn.Identity}
    from timm.layers import get_norm_act_layer, get_norm_layer

    assert get_norm_act_layer("cbn", nn.SiLU).func is cbn.CrossIterationBatchNormAct2d
    assert get_norm_layer("cbn") is cbn.CrossIterationBatchNorm2d
    any_rank = get_norm_act_layer(functools.partial(cbn.CrossIterationBatchNorm, window=3), nn.GELU)
    assert any_rank.func is cbn.CrossIterationBatchNormAct and any_rank.keywords == {"window": 3, "act_layer": nn.GELU}
    layer = any_rank(8)
    assert isinstance(layer.act, nn.GELU) and layer.window == 3


def test_timm_signature_positional_and_keywords_as_batchnormact2d():
    # timm's positional order first, cbn's options as keywords.
    layer = cbn.CrossIterationBatchNormAct2d(6, 1e-3, 0.2, True, True, True, nn.Hardswish, None, False, nn.Dropout,
                                             window=5, burnin=2, compensate=False)
    timm_layer = BatchNormAct2d(6, 1e-3, 0.2, True, True, True, nn.Hardswish, None, False, nn.Dropout)
    assert (layer.eps, layer.momentum, layer.window, layer.burnin, layer.compensate) == (1e-3, 0.2, 5, 2, False)
    assert type(layer.act) is type(timm_layer.act) and layer.act.inplace is False and type(layer.drop) is nn.Dropout
    assert isinstance(cbn.CrossIterationBatchNormAct2d(4, apply_act=False).act, nn.Identity)
    assert isinstance(cbn.CrossIterationBatchNormAct2d(4, act_layer=None).act, nn.Identity)
    gelu = make_activation(nn.GELU, {"approximate": "tanh"})  # no inplace argument: retried without it
    assert isinstance(gelu, nn.GELU) and gelu.approximate == "tanh"
    assert isinstance(make_activation("silu"), nn.SiLU)  # a timm name
    with pytest.raises(ValueError, match="window"):
        cbn.CrossIterationBatchNormAct2d(4, window=0)


def test_registration_happens_when_timm_is_imported_after_cbn():
    # A fresh interpreter: `import cbn` before timm, with nothing else imported.
    script = textwrap.dedent("""
        import cbn, timm
        model = timm.create_model("mobilenetv2_050", norm_layer=cbn.CrossIterationBatchNorm2d)
        print(sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}))
        print(cbn.__file__)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                         env={**__import__("os").environ, "PYTHONPATH": ":".join(sys.path)})
    assert out.returncode == 0, out.stderr
    kinds, source = out.stdout.split()[:-1], out.stdout.split()[-1]
    assert " ".join(kinds) == "['CrossIterationBatchNormAct2d']" and source == cbn.__file__
