"""Smoke test of examples/detector.py at a tiny size: it trains, evaluates with pycocotools and
reports well-formed numbers for BN, GN and CBN."""

import json
import math

import pytest
import torch
from torch import nn

from examples.detector import build_detector, coco_map, main
from cbn.experiments.data import load_split
from cbn.experiments.scenes import compose_scenes


def test_tiny_run_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "out"
    result = main(["--steps", "3", "--test-scenes", "2", "--log-every", "3", "--window", "2", "--out", str(out)])
    summary = {r["variant"]: r for r in result["summary"]}
    assert list(summary) == ["bn", "gn", "cbn"]
    for r in summary.values():
        assert 0 <= r["map"] <= 1 and 0 <= r["map50"] <= 1 and r["map"] <= r["map50"]
        assert math.isfinite(r["train_loss_final"]) and r["train_loss_final"] > 0 and r["step_ms"] > 0
    cbn_run = next(r for r in result["runs"] if r["variant"] == "cbn")
    # Every norm of the detector follows a convolution: the backbone's 12, the FPN's 6, the box head's 2.
    assert cbn_run["cbn_layers"] == 20 and cbn_run["compensated"] == 20
    assert summary["cbn"]["pairing"].startswith("20 of 20 CBN layers compensated")
    printed = capsys.readouterr().out
    assert "COMPOSED" in printed and "step 3/3" in printed and "mAP50" in printed
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) >= {"data", "config", "commit", "torch", "summary", "runs"}
    assert saved["data"].startswith("composed scenes") and saved["config"]["steps"] == 3
    assert len(saved["runs"][0]["losses"]) == 3
    assert (out / "detector.png").stat().st_size > 1000


@pytest.mark.parametrize("variant, norm", [("bn", nn.BatchNorm2d), ("gn", nn.GroupNorm)])
def test_variants_put_their_norm_in_backbone_fpn_and_box_head(variant, norm):
    model = build_detector(variant)
    for part in (model.backbone.body, model.backbone.fpn, model.roi_heads.box_head):
        kinds = {type(m) for m in part.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))}
        assert kinds == {norm}, part
    assert not any("Frozen" in type(m).__name__ for m in model.modules())


def test_coco_map_scores_the_ground_truth_as_perfect_and_nothing_as_zero():
    """The evaluator against a model that returns the exact boxes, and one that finds nothing."""
    scenes = compose_scenes(*load_split("test"), 4, seed=1)

    class Oracle(nn.Module):
        def __init__(self, empty):
            super().__init__()
            self.empty, self.calls = empty, 0

        def forward(self, images):
            outs = []
            for _ in images:
                i, self.calls = self.calls, self.calls + 1
                k = 0 if self.empty else len(scenes.boxes[i])
                outs.append({"boxes": scenes.boxes[i][:k], "labels": scenes.labels[i][:k] + 1,
                             "scores": torch.ones(k)})
            return outs

    perfect = coco_map(Oracle(empty=False), scenes)
    assert perfect["map"] == pytest.approx(1.0) and perfect["map50"] == pytest.approx(1.0)
    assert coco_map(Oracle(empty=True), scenes) == {"map": 0.0, "map50": 0.0, "map75": 0.0, "detections": 0}
