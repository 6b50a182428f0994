"""Prototype (not used by the library): CBN's differentiable normalization as one autograd node.

The core computes ``cross_iteration_batch_norm`` (``cbn.functional.normalization``) with a
var_mean and ~10 elementwise ops, which autograd turns into ~17 backward nodes per layer. The
same function, with the same gradients (through the current batch statistics only), can run
on BatchNorm's fused kernels:

forward:  ``mu_t, var_t`` in two passes (faster than ``var_mean`` on CPU); pooled ``M, V`` from ``(c, P, count)`` (tiny ops); then
          ``torch.batch_norm(x, g, b, M, V, training=False)``: one fused pass.
backward: ``native_batch_norm_backward(train=False)`` with ``M, V`` as running statistics gives
          ``dg = s * sum(dy * (x - M))`` and ``db = sum(dy)`` in one fused reduction pass, and
          ``dx = g s dy + k2 x + k1`` with per-channel constants::

              dL/dM = -g s sum(dy),  dL/dV = -1/2 g s^3 sum(dy (x - M)),  delta = mu_t - c
              dL/dmu_t  = dL/dM / n + dL/dV * 2 (n - 1) delta / n^2
              dL/dvar_t = dL/dV / n
              k2 = 2 dL/dvar_t / m,  k1 = dL/dmu_t / m - k2 mu_t

    PYTHONPATH=src:. python -m benchmarks.proto_fused_norm     # checks gradients, times both
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor

from cbn.functional.normalization import cross_iteration_batch_norm
from cbn.functional.window import PastStatistics


class FusedPooledNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, center: Tensor, spread: Tensor, count: Tensor, weight: Tensor,
                bias: Tensor, eps: float):
        # Two passes (mean, then mean of centred squares) over an (N, C, L) view: on CPU this is
        # 2-4x faster than torch.var_mean's Welford reduction over dims (0, 2, 3), and as exact.
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        mu_t = flat.mean((0, 2))
        var_t = (flat - mu_t.view(1, -1, 1)).square_().mean((0, 2))
        n = count + 1
        delta = mu_t - center
        mean = center + delta / n
        var = (var_t + spread + count / n * delta * delta) / n
        out = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        ctx.save_for_backward(x, weight, mean, var, mu_t, delta, n)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, mean, var, mu_t, delta, n = ctx.saved_tensors
        m = x.numel() // x.shape[1]
        dx_direct, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, mean, var, None, None, False, ctx.eps, [True, True, True]
        )
        s = torch.rsqrt(var + ctx.eps)
        sum_dy = dbias
        sum_dy_xm = dweight / s
        dmean = -weight * s * sum_dy
        dvar = -0.5 * weight * s.pow(3) * sum_dy_xm
        dmu_t = dmean / n + dvar * 2 * (n - 1) * delta / (n * n)
        dvar_t = dvar / n
        k2 = 2 * dvar_t / m
        k1 = dmu_t / m - k2 * mu_t
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dx = dx_direct.addcmul_(x, k2.view(shape)).add_(k1.view(shape))
        return dx, None, None, None, dweight, dbias, None


def _check_and_time(shape=(2, 16, 28, 28), rounds=50) -> dict:
    torch.manual_seed(0)
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    past = PastStatistics(torch.randn(c, dtype=torch.float64) * 0.1,
                          torch.rand(c, dtype=torch.float64) * 3, torch.tensor(3.0, dtype=torch.float64))
    w = torch.rand(c, dtype=torch.float64) + 0.5
    b = torch.randn(c, dtype=torch.float64)
    dy = torch.randn(shape, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref, _ = cross_iteration_batch_norm(leaves[0], past, leaves[1], leaves[2], 1e-5, torch.float64)
    ref_grads = torch.autograd.grad(ref, leaves, dy)
    leaves2 = [t.clone().requires_grad_() for t in (x, w, b)]
    out = FusedPooledNorm.apply(leaves2[0], *past, leaves2[1], leaves2[2], 1e-5)
    grads = torch.autograd.grad(out, leaves2, dy)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)

    x32 = x.float().requires_grad_()
    past32 = PastStatistics(*(t.float() for t in past))
    w32, b32 = w.float().requires_grad_(), b.float().requires_grad_()
    dy32 = dy.float()
    bn_w, bn_b = w32.detach().clone().requires_grad_(), b32.detach().clone().requires_grad_()

    def core():
        y, _ = cross_iteration_batch_norm(x32, past32, w32, b32, 1e-5)
        y.backward(dy32)

    def fused():
        FusedPooledNorm.apply(x32, *past32, w32, b32, 1e-5).backward(dy32)

    def batchnorm():
        torch.nn.functional.batch_norm(x32, None, None, bn_w, bn_b, True, 0.1, 1e-5).backward(dy32)

    fns = {"batchnorm": batchnorm, "core": core, "fused": fused}
    times = {k: [] for k in fns}
    for r in range(rounds):
        for k, f in fns.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    return {k: 1e6 * statistics.median(v) for k, v in times.items()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    for shape in [(2, 16, 28, 28), (2, 64, 7, 7), (32, 16, 28, 28)]:
        t = _check_and_time(shape)
        print(f"{shape}: gradients match; fwd+bwd median us: " +
              ", ".join(f"{k} {v:.0f}" for k, v in t.items()))
