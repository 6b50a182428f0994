"""End to end on a tiny synthetic dataset: the train command, its JSON record, the protocol."""

import json

import pytest

from cbn.cli import main
from cbn.experiments.train import TrainConfig, resolve_protocol


def test_protocol_rules():
    p = resolve_protocol(TrainConfig(norm="cbn", batch_size=4, epochs=2, window_cap=8), 1000)
    assert p["lr"] == pytest.approx(0.1 * 4 / 32) and p["window"] == 8 and p["total_steps"] == 500
    assert p["burnin"] == 125
    assert resolve_protocol(TrainConfig(batch_size=32), 1000)["window"] == 1
    assert resolve_protocol(TrainConfig(batch_size=1, window_cap=16), 1000)["window"] == 16
    s = resolve_protocol(TrainConfig(norm="syncbn", batch_size=4, nproc=2), 1000)
    assert s["global_batch"] == 8 and s["lr"] == pytest.approx(0.1 * 8 / 32)
    assert resolve_protocol(TrainConfig(batch_size=1, min_lr=0.01), 1000)["lr"] == 0.01


@pytest.mark.parametrize("norm", ["bn", "cbn"])
def test_train_command_writes_record(tiny_fashion, tmp_path, capsys, norm):
    out = tmp_path / "out"
    rc = main(["train", "--norm", norm, "--batch-size", "8", "--epochs", "2", "--model", "resnet8",
               "--data-dir", str(tiny_fashion), "--out", str(out), "--no-progress", "--burnin", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "epoch 1/2" in printed and "epoch 2/2" in printed and "test acc" in printed
    record = json.loads((out / f"{norm}_bs8_seed0.json").read_text())
    assert record["config"]["norm"] == norm and record["protocol"]["burnin"] == 2
    assert record["steps"] == 20 and 0 <= record["test_acc"] <= 100
    assert len(record["epochs"]) == 2 and all("test_acc" in e for e in record["epochs"])
    assert all(0 <= e["train_eval_acc"] <= 100 for e in record["epochs"]) and "train acc (eval mode)" in printed
    assert 0 <= record["precise_bn"]["test_acc"] <= 100 and record["precise_bn"]["layers"] == 9
    assert record["commit"] != "" and record["config"]["tag"] == ""
    if norm == "cbn":
        assert record["pairing"] == "9 of 9 CBN layers compensated" and "pairing: 9 of 9" in printed


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    rc = main(["train", "--data-dir", str(tmp_path), "--epochs", "1", "--no-progress"])
    assert rc == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
