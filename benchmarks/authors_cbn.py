"""A port of the CBN authors' released algorithm, written from its description, for benchmarking.

This is the *reference cost* the project's layer is measured against, not a layer to train
with. It follows the described behaviour of the authors' release (see
``/work/shared/cbn-math.md``, last section):

- the forward takes ``(x, conv_weight)``: the norm needs the weight of the convolution that
  produced ``x`` (4-D convolution weights only);
- per training step it makes two ``torch.autograd.grad`` calls on the current statistics,
  d mean / d W and d second-moment / d W (``create_graph=False, retain_graph=True``);
  because output channel c depends only on row c of W, the vector-Jacobian product with a
  vector of ones gives every channel's own gradient row at once;
- per past iteration it keeps, in plain Python lists, a copy of the weight and both gradients
  (three weight-sized tensors per past iteration, lost on checkpoint);
- old statistics are moved to the current weight with an elementwise product and a sum,
  ``mu + (g_mu * (W_t - W_old)).sum((1, 2, 3))``;
- entries whose compensated variance is negative are dropped (no clamp);
- eps sits outside the square root: ``(x - mu) / (sqrt(var) + eps)``;
- running statistics are fed with the current batch only;
- burn-in is counted in forward calls.

``ConvNorm`` pairs a convolution with its norm so the norm receives the conv weight, and
``authors_resnet20`` builds the project's ResNet-20 with it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cbn.experiments.models import resnet20

__all__ = ["AuthorsCBN2d", "ConvNorm", "pair_conv_norm", "authors_resnet20", "window_bytes"]


class AuthorsCBN2d(nn.Module):
    """Cross-iteration BN the way the authors' release does it (see module docstring).

    Args:
        num_features: channels C of the (N, C, H, W) input.
        eps: added to the standard deviation (outside the square root).
        momentum: running-statistics update factor, as in ``nn.BatchNorm2d``.
        affine: learnable per-channel scale and shift.
        window: iterations averaged, the current one included (``window=1`` is BatchNorm,
            up to where eps sits).
        burnin: forward calls in training mode that run as BatchNorm before compensation starts.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        window: int = 4,
        burnin: int = 0,
    ) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.window = window
        self.burnin = burnin
        self.forward_calls = 0
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        # Past iterations, newest first: statistics, their weight gradients and the weight.
        self.past_mu: list[Tensor] = []
        self.past_nu: list[Tensor] = []
        self.past_dmu: list[Tensor] = []
        self.past_dnu: list[Tensor] = []
        self.past_weight: list[Tensor] = []

    def _clear(self) -> None:
        for past in (self.past_mu, self.past_nu, self.past_dmu, self.past_dnu, self.past_weight):
            past.clear()

    def forward(self, x: Tensor, conv_weight: Tensor) -> Tensor:
        if x.dim() != 4 or conv_weight.dim() != 4:
            raise ValueError("AuthorsCBN2d supports 4-D inputs and 4-D convolution weights only")
        if self.training:
            self.forward_calls += 1
            mu = x.mean((0, 2, 3))
            nu = (x * x).mean((0, 2, 3))
            past_needed = self.window - 1 if self.forward_calls > self.burnin else 0
            if past_needed > 0 and conv_weight.requires_grad and torch.is_grad_enabled():
                ones = torch.ones_like(mu)
                dmu = torch.autograd.grad(
                    mu, conv_weight, ones, retain_graph=True, create_graph=False
                )[0]
                dnu = torch.autograd.grad(
                    nu, conv_weight, ones, retain_graph=True, create_graph=False
                )[0]
                weight_now = conv_weight.detach()
                mus, nus = [mu], [nu]
                for old_mu, old_nu, old_dmu, old_dnu, old_weight in zip(
                    self.past_mu, self.past_nu, self.past_dmu, self.past_dnu, self.past_weight
                ):
                    delta = weight_now - old_weight
                    mus.append(old_mu + (old_dmu * delta).sum((1, 2, 3)))
                    nus.append(old_nu + (old_dnu * delta).sum((1, 2, 3)))
                mu_all = torch.stack(mus)
                nu_all = torch.stack(nus)
                valid = (nu_all - mu_all * mu_all) >= 0
                valid[0] = True  # the current batch always counts
                valid = valid.to(mu_all.dtype)
                count = valid.sum(0)
                mean = (mu_all * valid).sum(0) / count
                second = (nu_all * valid).sum(0) / count
                var = second - mean * mean
                # Push the current entry, drop the oldest.
                self.past_mu.insert(0, mu.detach())
                self.past_nu.insert(0, nu.detach())
                self.past_dmu.insert(0, dmu.detach())
                self.past_dnu.insert(0, dnu.detach())
                self.past_weight.insert(0, weight_now.clone())
                for past in (
                    self.past_mu, self.past_nu, self.past_dmu, self.past_dnu, self.past_weight
                ):
                    del past[past_needed:]
            else:
                self._clear()
                mean = mu
                var = nu - mu * mu
            with torch.no_grad():
                m = x.numel() / x.size(1)
                batch_var = (nu - mu * mu) * (m / max(m - 1, 1))
                self.running_mean.mul_(1 - self.momentum).add_(mu.detach(), alpha=self.momentum)
                self.running_var.mul_(1 - self.momentum).add_(
                    batch_var.detach(), alpha=self.momentum
                )
        else:
            mean, var = self.running_mean, self.running_var
        shape = (1, -1, 1, 1)
        out = (x - mean.view(shape)) / (var.clamp_min(0).sqrt().view(shape) + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    def window_bytes(self) -> dict[str, int]:
        """Bytes held in the Python lists: all of them, and the weight-sized part."""
        weight_sized = sum(
            t.numel() * t.element_size()
            for past in (self.past_dmu, self.past_dnu, self.past_weight)
            for t in past
        )
        stats = sum(t.numel() * t.element_size() for past in (self.past_mu, self.past_nu) for t in past)
        return {"total": weight_sized + stats, "weight_sized": weight_sized}

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, window={self.window}, burnin={self.burnin}"


class ConvNorm(nn.Module):
    """A convolution followed by an ``AuthorsCBN2d`` that receives the convolution's weight."""

    def __init__(self, conv: nn.Conv2d, norm: AuthorsCBN2d) -> None:
        super().__init__()
        self.conv = conv
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x), self.conv.weight)


def pair_conv_norm(model: nn.Module) -> nn.Module:
    """Replace, in every container, a ``Conv2d`` child immediately followed (in registration
    order) by an ``AuthorsCBN2d`` child with ``ConvNorm(conv, norm)`` and the norm with
    ``nn.Identity``. This matches modules whose forward is ``norm(conv(x))`` with the pair
    registered next to each other (true of the project's ResNets). Raises if a norm is left
    unpaired. Returns the model (modified in place)."""
    for parent in list(model.modules()):
        names = list(parent._modules.keys())
        for first, second in zip(names, names[1:]):
            conv, norm = parent._modules[first], parent._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, AuthorsCBN2d):
                parent._modules[first] = ConvNorm(conv, norm)
                parent._modules[second] = nn.Identity()
    for module in model.modules():
        if isinstance(module, AuthorsCBN2d):
            owners = [m for m in model.modules() if isinstance(m, ConvNorm) and m.norm is module]
            if not owners:
                raise ValueError("an AuthorsCBN2d has no convolution registered just before it")
    return model


def authors_resnet20(window: int = 4, burnin: int = 0, **model_kwargs) -> nn.Module:
    """The project's ResNet-20 with every BatchNorm replaced by the authors' port."""
    model = resnet20(lambda c: AuthorsCBN2d(c, window=window, burnin=burnin), **model_kwargs)
    return pair_conv_norm(model)


def window_bytes(model: nn.Module) -> dict[str, int]:
    """Sum of ``AuthorsCBN2d.window_bytes`` over a model."""
    total = {"total": 0, "weight_sized": 0}
    for module in model.modules():
        if isinstance(module, AuthorsCBN2d):
            for key, value in module.window_bytes().items():
                total[key] += value
    return total
