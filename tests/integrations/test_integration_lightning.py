"""Lightning's Trainer with the callback, 2 gloo ranks on CPU, against plain DDP on the same data."""

import json

import pytest

from cbn.distributed import launch
from integrations import lightning_workers

TIMEOUT_S = 150  # spawn, imports (torch, Lightning) and 4 trainings of 4 steps: about 25 s on 2 idle cores


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("lightning_ranks")
    launch(lightning_workers.run, 2, str(out_dir), timeout_s=TIMEOUT_S)
    return [json.loads((out_dir / f"{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("rank", [0, 1])
def test_sync_batchnorm_true_trains_cross_process_cbn_as_plain_ddp(results, rank):
    result = results[rank]["sync=True"]
    # Not clobbered into SyncBatchNorm: CBN with the world group, one window shared by the ranks.
    assert result["kinds"] == ["CrossIterationBatchNorm2d"] and result["process_group_set"]
    assert result["keys_equal"] and result["max_difference"] == 0.0, result
    assert result["iterations"] == lightning_workers.STEPS and result["compensated"]
    assert result["window_spread_across_ranks"] == 0.0


@pytest.mark.parametrize("rank", [0, 1])
def test_default_keeps_a_window_per_rank_as_plain_ddp(results, rank):
    result = results[rank]["sync=False"]
    assert result["kinds"] == ["CrossIterationBatchNorm2d"] and not result["process_group_set"]
    assert result["keys_equal"] and result["max_difference"] == 0.0, result
    assert result["iterations"] == lightning_workers.STEPS and result["compensated"]
    assert result["window_spread_across_ranks"] > 1e-3  # each rank's own batches


def test_single_device_trainer_converts_once_and_pairs():
    import pytorch_lightning as pl
    import torch

    import cbn
    from cbn.integrations.lightning import CrossIterationBatchNorm

    module = lightning_workers._Module()
    x, y = (torch.cat(part) for part in zip(*lightning_workers._batches(0)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    callback = CrossIterationBatchNorm(window=2)
    for epochs in (1, 2):  # a second fit continues the same layers: converted once
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
        layer = module.net[1]
        trainer.fit(module, train_dataloaders=loader)
        assert type(module.net[1]) is cbn.CrossIterationBatchNorm2d and (epochs == 1 or module.net[1] is layer)
    # 1 epoch, then 2 more (a new Trainer counts its epochs from 0): one window counted on through both fits.
    assert module.net[1].iterations == 3 * lightning_workers.STEPS
    assert all(row.compensated for row in cbn.pairing_report(module.net)) and module.net[1].process_group is None
