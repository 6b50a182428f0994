import torch
from torch import nn

from cbn.functional import PastStatistics, cross_iteration_batch_norm, move_to_current_weights, pool_past


def _past(channels):
    mean = torch.randn(3, channels, dtype=torch.float64)
    var = torch.rand(3, channels, dtype=torch.float64) + 0.1
    return pool_past(mean, var, torch.tensor([[1.0], [1.0], [0.0]], dtype=torch.float64)), mean[:2], var[:2]


def test_gradcheck_training_forward():
    past, _, _ = _past(3)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def forward(x, weight, bias):
        return cross_iteration_batch_norm(x, past, weight, bias, 1e-5, torch.float64)[0]

    assert torch.autograd.gradcheck(forward, (x, weight, bias))
    assert torch.autograd.gradcheck(forward, (x, weight.detach(), None))
    assert torch.autograd.gradcheck(forward, (x, None, bias))


def test_pooled_statistics_equal_raw_moment_definition():
    past, mean, var = _past(5)
    x = torch.randn(6, 5, 3, dtype=torch.float64) * 4 + 2
    _, stats = cross_iteration_batch_norm(x, past, None, None, 0.0, torch.float64)
    current_mean = x.mean((0, 2))
    current_second = (x * x).mean((0, 2))
    means = torch.cat([current_mean[None], mean])
    seconds = torch.cat([current_second[None], var + mean * mean])
    mean_bar = means.mean(0)
    torch.testing.assert_close(stats.mean, mean_bar, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.var, seconds.mean(0) - mean_bar**2, rtol=0, atol=1e-10)


def test_empty_past_is_batchnorm():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    zeros = torch.zeros(3, dtype=torch.float64)
    out, _ = cross_iteration_batch_norm(x, PastStatistics(zeros, zeros, zeros.sum()), None, None, 1e-5,
                                        torch.float64)
    expected = nn.functional.batch_norm(x, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_move_clamps_each_entry_at_zero_variance():
    mean, var = torch.zeros(1, 2), torch.tensor([[0.01, 1.0]])
    zero = torch.zeros(1, 2)
    moved_mean, moved_var = move_to_current_weights(mean, var, zero, zero, torch.tensor([[1.0, 0.1]]), zero)
    torch.testing.assert_close(moved_mean, torch.tensor([[1.0, 0.1]]))
    torch.testing.assert_close(moved_var, torch.tensor([[0.0, 0.99]]))


def test_traceable_form_equals_the_hand_written_backward():
    # The compiled mode's plain-autograd normalization against the hand-written Function, float64.
    from cbn.functional.normalization import traceable_cross_iteration_batch_norm

    torch.manual_seed(0)
    mean, var = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64) + 0.1
    valid = torch.tensor([[1.0], [0.0], [1.0]], dtype=torch.float64)
    for past in (None, pool_past(mean, var, valid)):
        x = (torch.randn(2, 4, 3, 3, dtype=torch.float64) * 2 + 1).requires_grad_()
        gamma = torch.rand(4, dtype=torch.float64).requires_grad_()
        beta = torch.randn(4, dtype=torch.float64).requires_grad_()
        projection = torch.randn(2, 4, 3, 3, dtype=torch.float64)
        results = []
        for function in (cross_iteration_batch_norm, traceable_cross_iteration_batch_norm):
            out, stats = function(x, past, gamma, beta, 1e-5, torch.float64)
            grads = torch.autograd.grad((out * projection).sum(), (x, gamma, beta))
            results.append((out, stats.mean.detach(), stats.var.detach(), *grads))
        for hand, traced in zip(*results):
            torch.testing.assert_close(traced, hand, rtol=0, atol=1e-10)


def test_float32_pooled_normalization_matches_float64():
    # The hand-written backward in float32 at a realistic size, against the same maths in float64.
    torch.manual_seed(0)
    past, _, _ = _past(16)
    x = torch.randn(4, 16, 28, 28, dtype=torch.float64) * 2 + 1
    gamma, beta = torch.rand(16, dtype=torch.float64) + 0.5, torch.randn(16, dtype=torch.float64)
    projection = torch.randn_like(x)
    results = []
    for dtype in (torch.float64, torch.float32):
        leaves = [t.to(dtype).requires_grad_() for t in (x, gamma, beta)]
        past_of = PastStatistics(*(t.to(dtype) if t is not None else None for t in past))
        out, stats = cross_iteration_batch_norm(*leaves[:1], past_of, *leaves[1:], 1e-5, dtype)
        grads = torch.autograd.grad((out * projection.to(dtype)).sum(), leaves)
        results.append([t.double() for t in (out, stats.batch_mean, stats.batch_var, *grads)])
    for single, double in zip(results[1], results[0]):
        torch.testing.assert_close(single, double, rtol=1e-4, atol=1e-4)
