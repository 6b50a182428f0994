"""audit_records: a per-seed figure of a summary is backed only by a record with the same value
and a commit of the repository's history."""

import json
import subprocess

from cbn.experiments import audit_records


def _git(root, *args):
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def test_backed_missing_mismatched_and_unknown_commit(tmp_path):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "x")
    head = _git(tmp_path, "rev-parse", "HEAD")
    study = tmp_path / "docs/data/dense"
    (study / "runs").mkdir(parents=True)
    cells = [{"method": "bn", "batch_size": 2, "test_miou": {"0": 30.0, "1": 31.0, "2": 32.0}},
             {"method": "bn+precise", "batch_size": 2, "test_miou": {"0": 33.0}},
             {"method": "gn", "batch_size": 2, "test_miou": {"0": 40.0}}]
    (study / "summary.json").write_text(json.dumps({"cells": cells}))
    records = [("bn_bs2_seed0", 0, 30.0, head), ("bn_bs2_seed1", 1, 31.5, head), ("bn_bs2_seed2", 2, 32.0, "f" * 40)]
    for name, seed, value, commit in records:
        (study / "runs" / f"{name}.json").write_text(json.dumps({
            "name": name, "config": {"method": "bn", "batch_size": 2, "seed": seed}, "test_miou": value,
            "commit": commit, "precise_bn": {"test_miou": 33.0}}))
    rows = {r["method"]: r for r in audit_records.audit(tmp_path)}
    assert rows["bn"]["backed"] == 1 and len(rows["bn"]["problems"]) == 2
    assert "record has 31.5" in rows["bn"]["problems"][0] and "not in history" in rows["bn"]["problems"][1]
    assert rows["bn+precise"]["backed"] == 1 and not rows["bn+precise"]["problems"]
    assert rows["gn"]["backed"] == 0 and rows["gn"]["problems"] == ["seed 0: no record"]
    assert audit_records.main(["--root", str(tmp_path)]) == 1
