import pytest
import torch
from torch import nn

from cbn.functional import producer_statistic_gradients, statistic_shifts
from oracle import produce

PRODUCERS = {
    "conv2d_grouped_strided": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (3, 4, 9, 8)),
    "conv2d_circular": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", bias=False), (2, 2, 5, 5)),
    "conv1d_replicate_same": (lambda: nn.Conv1d(3, 4, 4, padding="same", padding_mode="replicate"), (2, 3, 9)),
    "conv3d_dilated": (lambda: nn.Conv3d(2, 4, 3, padding=(1, 0, 2), dilation=(1, 2, 1)), (2, 2, 4, 7, 6)),
    "depthwise": (lambda: nn.Conv2d(3, 3, 3, groups=3), (2, 3, 6, 6)),
    "linear": (lambda: nn.Linear(5, 4), (7, 5)),
}


@pytest.mark.parametrize("name", list(PRODUCERS))
def test_closed_form_equals_dense_jacobian(name):
    make, shape = PRODUCERS[name]
    producer = make().double()
    x = torch.randn(shape, dtype=torch.float64) + 1
    y = producer(x).detach()
    dims = [0, *range(2, y.dim())]
    gradients = producer_statistic_gradients(producer, x, y, y.mean(dims))

    def stats(weight):
        out = produce(producer, x, weight, producer.bias)
        return torch.stack([out.mean(dims), out.var(dims, unbiased=False)])

    jacobian = torch.autograd.functional.jacobian(stats, producer.weight.detach()).flatten(3)
    channels, groups = y.shape[1], gradients.mean.shape[0]
    assert gradients.mean.shape[1] == gradients.var.shape[1] == 1
    for c in range(channels):
        others = [d for d in range(channels) if d != c]
        assert jacobian[:, c, others].abs().max() < 1e-12  # sparsity: only row c matters
        torch.testing.assert_close(gradients.mean[c // (channels // groups), 0], jacobian[0, c, c], rtol=0, atol=1e-12)
        torch.testing.assert_close(gradients.var[c, 0], jacobian[1, c, c], rtol=0, atol=1e-12)


def test_mean_compensation_is_exact_for_own_weights():
    # mu is linear in W: moving it with the Taylor step equals recomputing it.
    producer = nn.Conv2d(3, 4, 3, groups=1, bias=True).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    y = producer(x).detach()
    gradients = producer_statistic_gradients(producer, x, y, y.mean((0, 2, 3)))
    before = statistic_shifts(gradients, producer.weight, producer.bias)
    with torch.no_grad():
        producer.weight.add_(torch.randn_like(producer.weight))
        producer.bias.add_(torch.randn_like(producer.bias))
    after = statistic_shifts(gradients, producer.weight, producer.bias)
    recomputed = producer(x).mean((0, 2, 3))
    torch.testing.assert_close(y.mean((0, 2, 3)) + after[0][0] - before[0][0], recomputed, rtol=0, atol=1e-12)
