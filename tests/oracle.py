"""An independent implementation of cbn-math.md for the tests: dense Jacobians, weight snapshots.

It follows the paper's equations literally: raw moments (mu, nu), Jacobians of both with respect
to the producer's full weight and bias from ``torch.autograd.functional.jacobian``, a copy of the
weights per stored iteration, the per-entry clamp ``nu >= mu^2`` and ``var = nu_bar - mu_bar^2``.
It shares no code with the library.

With ``differentiable=True`` the Taylor-moved past entries stay functions of the producer's
current weight and bias (``weight - stored weight`` is not detached), so autograd of the explicit
pooled formula gives the gradients of differentiable compensation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


_TRANSPOSED = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
               nn.ConvTranspose3d: F.conv_transpose3d}


def produce(producer: nn.Module, x, weight, bias):
    if isinstance(producer, nn.Linear):
        return F.linear(x, weight, bias)
    if type(producer) in _TRANSPOSED:
        # What the module computes when called without output_size.
        return _TRANSPOSED[type(producer)](x, weight, bias, producer.stride, producer.padding,
                                           producer.output_padding, producer.groups, producer.dilation)
    if producer.padding_mode != "zeros":
        padded = F.pad(x, producer._reversed_padding_repeated_twice, mode=producer.padding_mode)
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
        return conv(padded, weight, bias, producer.stride, 0, producer.dilation, producer.groups)
    return producer._conv_forward(x, weight, bias)


def parameters_as_they_are(producer: nn.Module):
    return producer.weight, producer.bias


class DenseJacobianCBN:
    """``effective(producer) -> (weight, bias)`` and ``apply(producer, x, weight, bias) -> y`` describe
    what the producer really computes (defaults: its parameters, and the stock module's maths); the
    Taylor step is in that effective weight."""

    def __init__(self, producer: nn.Module, window: int, compensate: bool, eps: float = 1e-5,
                 effective=parameters_as_they_are, apply=produce, differentiable: bool = False):
        self.producer = producer
        self.effective = effective
        self.apply = apply
        self.window = window
        self.compensate = compensate
        self.eps = eps
        self.differentiable = differentiable
        self.history: list[dict] = []

    def __call__(self, x, gamma, beta, pool: bool = True):
        """``pool=False``: BatchNorm for this step (burn-in); the entry is stored all the same."""
        producer = self.producer
        weight, bias = self.effective(producer)
        y = self.apply(producer, x, weight, bias)
        dims = [0, *range(2, y.dim())]
        shape = (1, -1) + (1,) * (y.dim() - 2)
        mu, nu = y.mean(dims), (y * y).mean(dims)

        means, second = [mu], [torch.maximum(nu, mu * mu)]
        for entry in self.history if pool else []:
            mu_old, nu_old = entry["mu"], entry["nu"]
            if self.compensate:
                now_weight = weight if self.differentiable else weight.detach()
                dw = (now_weight - entry["weight"]).flatten()
                mu_old = mu_old + entry["dmu_dw"] @ dw
                nu_old = nu_old + entry["dnu_dw"] @ dw
                if bias is not None:
                    db = (bias if self.differentiable else bias.detach()) - entry["bias"]
                    mu_old = mu_old + entry["dmu_db"] @ db
                    nu_old = nu_old + entry["dnu_db"] @ db
            means.append(mu_old)
            second.append(torch.maximum(nu_old, mu_old * mu_old))
        n = len(means)
        mu_bar = sum(means) / n
        nu_bar = sum(second) / n
        var_bar = nu_bar - mu_bar * mu_bar
        out = (y - mu_bar.view(shape)) / torch.sqrt(var_bar.view(shape) + self.eps)
        out = out * gamma.view(shape) + beta.view(shape)

        self._store(x.detach(), mu.detach(), nu.detach(), dims)
        return out, mu_bar, var_bar

    def _store(self, x, mu, nu, dims):
        if self.window == 1:
            return
        producer = self.producer
        weight, bias = self.effective(producer)
        weight = weight.detach().clone()
        bias = None if bias is None else bias.detach().clone()

        def moments_of_weight(w):
            yy = self.apply(producer, x, w, bias)
            return torch.stack([yy.mean(dims), (yy * yy).mean(dims)])

        jac_w = torch.autograd.functional.jacobian(moments_of_weight, weight).flatten(2)
        entry = dict(mu=mu, nu=nu, weight=weight, bias=bias, dmu_dw=jac_w[0], dnu_dw=jac_w[1])
        if bias is not None:

            def moments_of_bias(b):
                yy = self.apply(producer, x, weight, b)
                return torch.stack([yy.mean(dims), (yy * yy).mean(dims)])

            jac_b = torch.autograd.functional.jacobian(moments_of_bias, bias)
            entry.update(dmu_db=jac_b[0], dnu_db=jac_b[1])
        self.history.insert(0, entry)
        del self.history[self.window - 1 :]


def train_beside_oracle(producer: nn.Module, norm: nn.Module, oracle: DenseJacobianCBN, input_shape, steps: int,
                        lr: float = 0.2, burnin: int = 0, on_step=None) -> None:
    """Train ``Sequential(producer, norm)`` (converted) with SGD beside ``oracle``, asserting at every
    step that the output and every gradient (producer, norm affine, input) equal the oracle's
    (float64, ``atol=1e-9``). Inputs are drawn on the producer's device; ``on_step(step)`` runs
    before each forward."""
    import cbn

    device = producer.weight.device
    model = cbn.convert_model(nn.Sequential(producer, norm))
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for step in range(steps):
        x = (torch.randn(input_shape, dtype=torch.float64) * 2 + 0.5).to(device).requires_grad_()
        if on_step is not None:
            on_step(step)
        out = model(x)
        projection = torch.randn_like(out)
        (out * projection).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]

        x_oracle = x.detach().clone().requires_grad_()
        gamma = norm.weight.detach().clone().requires_grad_()
        beta = norm.bias.detach().clone().requires_grad_()
        params = [producer.weight] + ([producer.bias] if producer.bias is not None else [])
        expected, _, _ = oracle(x_oracle, gamma, beta, pool=step >= burnin)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
        expected_grads = torch.autograd.grad((expected * projection).sum(), params + [gamma, beta, x_oracle])
        by_name = dict(zip([id(p) for p in params + [norm.weight, norm.bias]], expected_grads[:-1]))
        for p, g in zip(model.parameters(), grads):
            torch.testing.assert_close(g, by_name[id(p)], rtol=0, atol=1e-9)
        torch.testing.assert_close(grads[-1], expected_grads[-1], rtol=0, atol=1e-9)
        optimizer.step()
        optimizer.zero_grad()
