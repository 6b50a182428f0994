"""FSDP2 (``fully_shard``) on two gloo ranks, CPU: iterations counted, pairing, and parameters
equal to a DDP run of the same data; layers built directly."""

import json

import pytest
import torch

from cbn.distributed import launch
from distributed import workers

TIMEOUT_S = 180


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    launch(workers.fsdp_against_ddp, 2, str(out_dir), timeout_s=TIMEOUT_S)
    return [json.loads((out_dir / f"{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("mode", ["fsdp", "fsdp_blocks"])
@pytest.mark.parametrize("rank", [0, 1])
def test_fully_shard_trains_like_ddp_with_iterations_counted(results, rank, mode):
    ours, reference = results[rank][mode], results[rank]["ddp"]
    assert ours["iterations"] == reference["iterations"] == [6, 6]  # burn-in (2) ends on time
    assert all(ours["compensated"])
    for name, value in reference["parameters"].items():
        torch.testing.assert_close(torch.tensor(ours["parameters"][name]), torch.tensor(value), rtol=0, atol=1e-6)
    # Each rank's window is its own and unsharded: the same bytes as under DDP.
    assert ours["window_bytes"] == reference["window_bytes"] > 0
