"""Multi-process training helpers: a local launcher and process-group setup.

Under ``DistributedDataParallel`` each rank's Cross-Iteration BatchNorm window holds that rank's
own statistics (or, with ``process_group``, the statistics pooled over the ranks, which are the
same everywhere): the window is not a buffer, so DDP's ``broadcast_buffers=True`` never copies
rank 0's over the others'. The running statistics are buffers: DDP broadcasts them from rank 0,
exactly as for ``nn.BatchNorm``, so the eval-mode model is the same on every rank.

Local runs (CPU, gloo)::

    from cbn.distributed import launch

    def main(rank, world_size, steps):          # runs in each process, group already set up
        ...

    launch(main, 2, 100)                        # 2 processes on this machine

Multi-GPU runs use ``torchrun``, which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous variables; :func:`init_process_group` reads them::

    torchrun --standalone --nproc-per-node=P train.py ...
"""

from __future__ import annotations

import faulthandler
import os
import tempfile
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_process_group(
    rank: int | None = None,
    world_size: int | None = None,
    backend: str | None = None,
    timeout_s: float = 60.0,
    init_method: str | None = None,
) -> torch.device:
    """Join the default process group and return this rank's device.

    ``rank`` and ``world_size`` default to the ``RANK``/``WORLD_SIZE`` environment variables
    (set by ``torchrun``); without ``init_method``, ``MASTER_ADDR``/``MASTER_PORT`` must be set
    (``torchrun`` does). With NCCL, the device is ``cuda:LOCAL_RANK`` and becomes the current one.
    """
    rank = int(os.environ["RANK"]) if rank is None else rank
    world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
    backend = backend or default_backend()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    return device


def cleanup() -> None:
    """Leave the default process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(rank: int, fn: Callable, world_size: int, rendezvous: str, backend: str | None, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: the loopback interface
    # A worker killed by a signal (a native abort) reports nothing through the spawn context's
    # error file: print the Python stack of every thread to stderr first.
    faulthandler.enable(all_threads=True)
    init_process_group(rank, world_size, backend, init_method=f"file://{rendezvous}")
    try:
        fn(rank, world_size, *args)
        # No rank tears its connections down while another may still use them: a peer closing
        # mid-teardown can abort gloo's transport thread in the rank that is slower to finish.
        dist.barrier()
    finally:
        cleanup()


def launch(fn: Callable, nproc: int, *args, backend: str | None = None, timeout_s: float | None = None) -> None:
    """Run ``fn(rank, nproc, *args)`` in ``nproc`` fresh processes joined in one process group.

    The processes are spawned (``torch.multiprocessing``, start method ``spawn``) on this machine
    and rendezvous through a file in a fresh temporary directory (no port to pick, so no race
    with other programs for one); the backend defaults to NCCL when CUDA is available,
    else gloo. ``fn`` must be importable (a module-level function). An exception in any process
    stops the others and is raised here; so is exceeding ``timeout_s`` (``TimeoutError``).

    Example::

        >>> launch(train_worker, 2, config)   # like: torchrun --nproc-per-node=2 ...
    """
    with tempfile.TemporaryDirectory(prefix="cbn-launch-") as directory:
        _start_and_join(fn, nproc, os.path.join(directory, "rendezvous"), backend, args, timeout_s)


def _start_and_join(fn, nproc: int, rendezvous: str, backend, args: tuple, timeout_s: float | None) -> None:
    context = mp.start_processes(
        _run, args=(fn, nproc, rendezvous, backend, args), nprocs=nproc, join=False, start_method="spawn"
    )
    start = time.monotonic()
    while not context.join(timeout=1.0):  # raises if a process failed, stopping the others
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            for process in context.processes:
                process.join(5)
            raise TimeoutError(f"launch: {nproc} processes did not finish within {timeout_s} s")
