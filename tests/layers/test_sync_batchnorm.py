"""CPU SyncBatchNorm: 2 gloo processes must equal one BatchNorm on the concatenated batch."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cbn.layers.sync_batchnorm import SyncBatchNorm1d, SyncBatchNorm2d, SyncBatchNorm3d, convert_sync_batchnorm

WORLD = 2


def _inputs(dtype):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2 * 3, 4, 5, 5, generator=g, dtype=dtype) * 2 + 1
    grad = torch.randn(2 * 3, 4, 5, 5, generator=g, dtype=dtype)
    weight = torch.randn(4, generator=g, dtype=dtype)
    bias = torch.randn(4, generator=g, dtype=dtype)
    return x, grad, weight, bias


def _worker(rank, path, dtype):
    os.environ.update(GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    from datetime import timedelta

    dist.init_process_group("gloo", init_method=f"file://{path}.rendezvous", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    x, grad, weight, bias = _inputs(dtype)
    layer = SyncBatchNorm2d(4).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    local = slice(rank * 3, (rank + 1) * 3)
    xl = x[local].clone().requires_grad_()
    out = layer(xl)
    out.backward(grad[local])
    # parameter gradients: the local share, summed over processes as data-parallel training does
    gw, gb = layer.weight.grad.clone(), layer.bias.grad.clone()
    dist.all_reduce(gw)
    dist.all_reduce(gb)
    torch.save(dict(out=out.detach(), gx=xl.grad, gw=gw, gb=gb, rm=layer.running_mean, rv=layer.running_var),
               f"{path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_two_processes_equal_batchnorm_on_concatenated_batch(dtype, tol):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "res")
        ctx = mp.start_processes(_worker, args=(path, dtype), nprocs=WORLD, join=False, start_method="spawn")
        try:
            for proc in ctx.processes:
                proc.join(timeout=90)
            assert all(p.exitcode == 0 for p in ctx.processes), [p.exitcode for p in ctx.processes]
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.terminate()
        results = [torch.load(f"{path}.{r}") for r in range(WORLD)]
    x, grad, weight, bias = _inputs(dtype)
    bn = nn.BatchNorm2d(4).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    xr = x.clone().requires_grad_()
    out = bn(xr)
    out.backward(grad)
    close = dict(rtol=tol, atol=tol)
    torch.testing.assert_close(torch.cat([r["out"] for r in results]), out.detach(), **close)
    torch.testing.assert_close(torch.cat([r["gx"] for r in results]), xr.grad, **close)
    for r in results:
        torch.testing.assert_close(r["gw"], bn.weight.grad, **close)
        torch.testing.assert_close(r["gb"], bn.bias.grad, **close)
        torch.testing.assert_close(r["rm"], bn.running_mean, **close)
        torch.testing.assert_close(r["rv"], bn.running_var, **close)


@pytest.mark.parametrize("cls,bn_cls,shape", [(SyncBatchNorm1d, nn.BatchNorm1d, (7, 3)),
                                              (SyncBatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 2)),
                                              (SyncBatchNorm3d, nn.BatchNorm3d, (2, 3, 2, 2, 3))])
def test_single_process_is_batchnorm(cls, bn_cls, shape):
    """Without an initialized process group (world size 1) the layer is BatchNorm, train and eval."""
    sync, bn = cls(3, momentum=0.3).double(), bn_cls(3, momentum=0.3).double()
    for _ in range(2):
        x = torch.randn(*shape, dtype=torch.float64) * 3 - 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = sync(xa), bn(xb)
        g = torch.randn_like(ya)
        ya.backward(g), yb.backward(g)
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(xa.grad, xb.grad)
        torch.testing.assert_close(sync.weight.grad, bn.weight.grad)
        torch.testing.assert_close(sync.bias.grad, bn.bias.grad)
        torch.testing.assert_close(sync.running_var, bn.running_var)
    sync.eval(), bn.eval()
    torch.testing.assert_close(sync(x), bn(x))


def test_gradcheck_single_process():
    """The hand-written backward against finite differences (input, weight and bias)."""
    from cbn.layers.sync_batchnorm import _SyncBatchNormFunction

    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: _SyncBatchNormFunction.apply(x, w, b, None, None, 1e-5, 0.0, None)
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_convert_shares_parameters():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    w = model[1].weight
    model = convert_sync_batchnorm(model)
    assert isinstance(model[1], SyncBatchNorm2d) and model[1].weight is w
