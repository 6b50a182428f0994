"""The authors' port used by the benchmarks: BatchNorm at window 1, and it trains."""

import torch
from torch import nn

from benchmarks.authors_cbn import AuthorsCBN2d, ConvNorm, authors_resnet20, window_bytes


def test_window1_forward_is_batchnorm():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    x = torch.randn(4, 3, 6, 6)
    y = conv(x)
    ours = AuthorsCBN2d(8, eps=1e-12, window=1)
    ref = nn.BatchNorm2d(8, eps=1e-12)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    torch.testing.assert_close(ours(y, conv.weight), ref(y), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(y, conv.weight), ref(y), atol=1e-5, rtol=1e-5)


def test_compensated_mean_is_exact_for_own_weight_change():
    # mu is linear in W: with the input fixed, the moved old mean equals the recomputed one, so
    # two iterations on the same input after a weight change give the batch mean exactly.
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    layer = ConvNorm(conv, AuthorsCBN2d(8, window=2, affine=False))
    x = torch.randn(2, 3, 5, 5)
    layer(x)
    with torch.no_grad():
        conv.weight.add_(0.01 * torch.randn_like(conv.weight))
    out = layer(x)
    assert len(layer.norm.past_weight) == 1
    # The stored d mu / d W is the mean input patch, the same for every output channel.
    dmu = layer.norm.past_dmu[0]
    torch.testing.assert_close(dmu[0], dmu[5])
    # Old mean moved exactly to the new weight: averaged mean == current batch mean, so the
    # output is centred. Without compensation it would be off by half the mean shift.
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(8), atol=1e-5, rtol=0)


def test_resnet20_trains_and_keeps_three_weight_copies_per_past_iteration():
    torch.manual_seed(0)
    model = authors_resnet20(window=3)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    convs = [m.conv for m in model.modules() if isinstance(m, ConvNorm)]
    assert len(convs) == 21
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, target = torch.randn(2, 1, 28, 28), torch.randint(0, 10, (2,))
    for _ in range(4):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    weight_bytes = sum(c.weight.numel() * c.weight.element_size() for c in convs)
    assert window_bytes(model)["weight_sized"] == 3 * (3 - 1) * weight_bytes
    model.eval()
    assert model(x).shape == (2, 10)
