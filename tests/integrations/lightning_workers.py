"""Run in each of 2 gloo ranks: the same training by plain DDP and by Lightning's Trainer with the callback."""

import json
import logging
import os

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import cbn
from cbn.integrations.lightning import CrossIterationBatchNorm

STEPS = 4
WINDOW = 3


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def _batches(rank):
    generator = torch.Generator().manual_seed(1)
    data = torch.randn(STEPS, 4, 3, 8, 8, generator=generator) * 2 + 1  # 2 examples per rank and step
    targets = torch.randint(0, 2, (STEPS, 4), generator=generator)
    return [(data[s, 2 * rank:2 * rank + 2], targets[s, 2 * rank:2 * rank + 2]) for s in range(STEPS)]


class _Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _net()

    def training_step(self, batch, index):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _plain_ddp(rank, process_group):
    net = cbn.convert_model(_net(), window=WINDOW, process_group=process_group)
    model = DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in _batches(rank):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net


def _lightning(rank, world_size, sync_batchnorm):
    module = _Module()
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", sync_batchnorm=sync_batchnorm,
                         callbacks=[CrossIterationBatchNorm(window=WINDOW)], max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False)
    x, y = (torch.cat(part) for part in zip(*_batches(rank)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)  # the same batches
    trainer.fit(module, train_dataloaders=loader)
    return module.net


def _state(net):
    return {key: value.double() for key, value in net.state_dict().items()}


def _gathered_spread(tensor):
    copies = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, tensor.contiguous())
    return max((c - copies[0]).abs().max().item() for c in copies)


def run(rank, world_size, out_dir):
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    result = {}
    for sync in (True, False):
        reference = _plain_ddp(rank, dist.group.WORLD if sync else None)
        trained = _lightning(rank, world_size, sync)
        expected, got = _state(reference), _state(trained)
        result[f"sync={sync}"] = {
            "kinds": sorted({type(m).__name__ for m in trained.modules() if "Norm" in type(m).__name__}),
            "keys_equal": list(expected) == list(got),
            "max_difference": max((expected[k] - got[k]).abs().max().item() for k in expected),
            "differences": {k: (expected[k] - got[k]).abs().max().item() for k in expected},
            "iterations": trained[1].iterations,
            "process_group_set": trained[1].process_group is not None,
            "window_spread_across_ranks": _gathered_spread(trained[1].window_state.positions[0].stats),
            "compensated": all(row.compensated for row in cbn.pairing_report(trained)),
        }
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as file:
        json.dump(result, file)
