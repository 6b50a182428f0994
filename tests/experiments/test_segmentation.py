"""The dense task: composed scenes, the U-Net, mIoU, and the study's records, resume and summary."""

import json
import math
import statistics

import numpy as np
import pytest
import torch
from torch import nn

from cbn.experiments import dense_sweep
from cbn.experiments.segmentation import (
    METHODS, SegConfig, UNet, build_segmentation_model, compose_scenes, confusion_matrix, iou_scores,
    resolve_protocol, training_batches, Scenes, vary_photometry,
)


def _coded_objects(n=30, side=28, seed=0):
    """Objects whose every foreground pixel value encodes the object's class (20 + 20 * class), on a
    background of values below the threshold, with holes: the canvas then names its mask."""
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy((np.arange(n) % 10).astype(np.int64))
    images = np.zeros((n, 1, side, side), dtype=np.uint8)
    for i in range(n):
        shape = rng.random((side, side)) < 0.6
        images[i, 0][shape] = 20 + 20 * int(labels[i])
        images[i, 0][~shape] = rng.integers(0, 16, size=int((~shape).sum()))  # below the threshold
    return torch.from_numpy(images), labels


def test_compose_scenes_masks_are_exact_and_deterministic():
    images, labels = _coded_objects()
    scenes, masks, counts = compose_scenes(images, labels, 40, canvas=64, objects=(0, 4), seed=3, threshold=16)
    assert scenes.shape == (40, 1, 64, 64) and masks.shape == (40, 64, 64)
    assert counts.min() >= 0 and counts.max() <= 4 and len(set(counts.tolist())) > 2
    # Independent of the composer's bookkeeping: a visible pixel's value names its class, and
    # overlaps resolve to the last pasted object (whose value is what the canvas shows).
    values = scenes[:, 0].long()
    expected = torch.where(values > 0, (values - 20) // 20 + 1, torch.zeros_like(values))
    assert torch.equal(masks, expected)
    assert bool((masks[counts == 0] == 0).all())
    again = compose_scenes(images, labels, 40, canvas=64, objects=(0, 4), seed=3, threshold=16)
    assert torch.equal(again[0], scenes) and torch.equal(again[1], masks)
    other = compose_scenes(images, labels, 40, canvas=64, objects=(0, 4), seed=4, threshold=16)
    assert not torch.equal(other[1], masks)


def test_compose_scenes_pastes_whole_objects_at_one_offset():
    images, labels = _coded_objects(n=1)
    scenes, masks, _ = compose_scenes(images, labels, 5, canvas=40, objects=(1, 1), seed=0)
    foreground = images[0, 0] >= 16
    for scene, mask in zip(scenes[:, 0], masks):
        rows, cols = torch.nonzero(mask, as_tuple=True)
        r, c = int(rows.min()) - int(torch.nonzero(foreground, as_tuple=True)[0].min()), \
            int(cols.min()) - int(torch.nonzero(foreground, as_tuple=True)[1].min())
        window = scene[r : r + 28, c : c + 28]
        assert torch.equal(window, torch.where(foreground, images[0, 0], torch.zeros_like(images[0, 0])))
        assert int(mask.sum()) == int(foreground.sum()) * (int(labels[0]) + 1)


def test_vary_photometry_is_one_affine_map_per_scene():
    images, labels = _coded_objects()
    scenes, _, _ = compose_scenes(images, labels, 200, canvas=32, objects=(1, 2), seed=0)
    assert torch.equal(vary_photometry(scenes, 0.0, seed=1), scenes)
    varied = vary_photometry(scenes, 0.8, seed=1)
    assert varied.dtype == torch.uint8 and torch.equal(varied, vary_photometry(scenes, 0.8, seed=1))
    levels, contrasts = [], []
    for before, after in zip(scenes[:, 0].double(), varied[:, 0].double()):
        # Each scene's map, recovered by least squares on its own pixels, then checked on every pixel.
        design = torch.stack([torch.ones_like(before.flatten()), before.flatten()], 1)
        level, contrast = torch.linalg.lstsq(design, after.flatten()[:, None]).solution.flatten().tolist()
        assert torch.allclose(after, (level + contrast * before).round(), atol=1.0)
        # Rounding to uint8 moves the fitted contrast by up to ~1/value, hence the slack of the bounds.
        assert 0.2 - 0.02 <= contrast <= 1.0 + 0.02 and -0.6 <= level <= (1 - contrast) * 255 + 6
        levels.append(level)
        contrasts.append(contrast)
        if bool((before == 0).any()):  # an object pixel stays brighter than the background
            assert bool((after[before > 0] > after[before == 0].max()).all())
    assert statistics.pstdev(contrasts) > 0.15 and statistics.pstdev(levels) > 20
    with pytest.raises(ValueError, match="photometric strength"):
        vary_photometry(scenes, 1.0, seed=0)


def test_iou_scores_match_set_definitions():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 11, size=(3, 9, 9))
    prediction = np.where(rng.random((3, 9, 9)) < 0.6, target, rng.integers(0, 11, size=(3, 9, 9)))
    prediction[prediction == 7] = 3  # class 7 never predicted
    scores = iou_scores(confusion_matrix(torch.from_numpy(prediction), torch.from_numpy(target)))
    ious = []
    for c in range(11):
        inter = np.logical_and(prediction == c, target == c).sum()
        union = np.logical_or(prediction == c, target == c).sum()
        if union:
            ious.append(inter / union)
            assert scores["iou"][c] == pytest.approx(100 * inter / union)
    assert scores["miou"] == pytest.approx(100 * np.mean(ious))
    assert scores["pixel_acc"] == pytest.approx(100 * (prediction == target).mean())


def test_unet_shape_norms_and_every_cbn_layer_compensated():
    model = UNet(nn.BatchNorm2d, widths=(4, 8, 16))
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 11, 32, 32)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 10
    from cbn.pairing import pairing_report, pairing_summary

    cfg = SegConfig(widths=(4, 8, 16), batch_size=2).with_method("cbn")
    net = build_segmentation_model(cfg, resolve_protocol(cfg))
    net(torch.randn(2, 1, 32, 32)).sum().backward()
    assert pairing_summary(pairing_report(net)) == "10 of 10 CBN layers compensated"
    # Every method gets the same convolutions for a seed.
    gn = build_segmentation_model(cfg.with_method("gn"), resolve_protocol(cfg))
    assert torch.equal(gn.down[0][0].weight, net.down[0][0].weight)


def test_protocol_same_images_at_every_batch():
    for batch, steps, lr, window in ((16, 250, 0.05, 1), (2, 2000, 0.00625, 8), (1, 4000, 0.003125, 16)):
        p = resolve_protocol(SegConfig(batch_size=batch, images=4000, base_lr=0.05, ref_batch=16).with_method("cbn"))
        assert (p["total_steps"], p["window"], p["images_seen"]) == (steps, window, 4000)
        assert p["lr"] == pytest.approx(lr) and p["burnin"] == steps // 4
    sync = resolve_protocol(SegConfig(batch_size=2, images=4000).with_method("syncbn"))
    assert sync["global_batch"] == 4 and sync["total_steps"] == 1000


def test_training_batches_cover_the_scenes_in_a_seeded_order():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).clone()
    scenes = Scenes(images, images[:, 0].long(), images, images[:, 0].long())
    first = [y[:, 0, 0].tolist() for _, y in training_batches(scenes, 2, 5, seed=0, flip=False)]
    assert sorted(v for b in first for v in b) == list(range(10))
    assert first == [y[:, 0, 0].tolist() for _, y in training_batches(scenes, 2, 5, seed=0, flip=False)]
    assert len(list(training_batches(scenes, 3, 7, seed=0, flip=False))) == 7  # several passes


def test_study_records_resumes_and_summarizes(tiny_fashion, tmp_path, monkeypatch, capsys):
    base = {"canvas": 32, "widths": [4, 8], "train_scenes": 8, "test_scenes": 4, "images": 8,
            "eval_points": 2, "train_eval_scenes": 4, "precise_bn_scenes": 4, "data_dir": str(tiny_fashion)}
    spec = dense_sweep.StudySpec(methods=("bn", "naive"), batch_sizes=(4, 2), seeds=(0,), small_batch_seeds=(0, 1),
                                 base=base, skip=(("naive", 4),))
    out = tmp_path / "dense"
    launched = []
    real_launch = dense_sweep._launch

    def launch(cfg):
        launched.append(cfg.run_name())
        if len(launched) == 1:
            return real_launch(cfg)  # one real subprocess run
        from cbn.experiments.segmentation import train

        train(cfg)
        return 0

    monkeypatch.setattr(dense_sweep, "_launch", launch)
    dense_sweep.run_study(spec, str(out))
    assert launched[:2] == ["bn_bs4_seed0", "bn_bs2_seed0"] and len(launched) == 5
    record = json.loads((out / "runs" / "bn_bs2_seed0.json").read_text())
    assert record["config"]["method"] == "bn" and record["protocol"]["total_steps"] == 4
    assert [e["step"] for e in record["curve"]] == [2, 4] and record["commit"]
    assert 0 <= record["test_miou"] <= 100 and 0 <= record["train_miou"] <= 100 and record["wall_seconds"] > 0
    assert record["precise_bn"]["layers"] == 6
    assert "pairing" in json.loads((out / "runs" / "naive_bs2_seed1.json").read_text())
    printed = capsys.readouterr().out
    assert "run 1/5: bn_bs4_seed0" in printed and "ETA" in printed

    monkeypatch.setattr(dense_sweep, "_launch", lambda cfg: pytest.fail(f"{cfg.run_name()} ran again"))
    result = dense_sweep.run_study(spec, str(out))
    assert "5 recorded, 0 to run" in capsys.readouterr().out
    values = [json.loads((out / "runs" / f"naive_bs2_seed{s}.json").read_text())["test_miou"] for s in (0, 1)]
    cell = next(c for c in result["cells"] if (c["method"], c["batch_size"]) == ("naive", 2))
    assert cell["mean"] == pytest.approx(statistics.fmean(values)) and cell["n"] == 2
    assert cell["std"] == pytest.approx(statistics.stdev(values))
    assert f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}" in result["table"]
    assert any(c["a"] == "naive@2" and c["b"] == "bn@4" for c in json.loads((out / "summary.json").read_text())["comparisons"])
    assert (out / "miou_vs_batch.png").stat().st_size > 1000 and "BN + precise stats" in result["table"]


def test_a_run_recorded_meanwhile_by_another_lane_is_not_run_again(tiny_fashion, tmp_path, monkeypatch, capsys):
    # Two processes of one study (two single-thread lanes): a run the other lane recorded after this
    # one planned its runs is skipped, not trained again over its record.
    from cbn.experiments.segmentation import train

    base = {"canvas": 32, "widths": [4, 8], "train_scenes": 8, "test_scenes": 4, "images": 4,
            "eval_points": 1, "train_eval_scenes": 4, "precise_bn_scenes": 4, "data_dir": str(tiny_fashion)}
    spec = dense_sweep.StudySpec(methods=("bn",), batch_sizes=(2,), seeds=(0,), small_batch_seeds=(0, 1), base=base)
    out = tmp_path / "dense"
    first, second = spec.configs(str(out))
    launched = []

    def launch(cfg):
        launched.append(cfg.run_name())
        train(cfg)
        train(second)  # meanwhile, the other lane records the next run
        return 0

    monkeypatch.setattr(dense_sweep, "_launch", launch)
    dense_sweep.run_study(spec, str(out))
    assert launched == [first.run_name()]
    assert f"{second.run_name()} recorded meanwhile by another process: skipped" in capsys.readouterr().out


def test_methods_are_data_driven():
    assert METHODS["naive"].convert == {"compensate": False} and METHODS["syncbn"].nproc == 2
    args = dense_sweep.build_parser().parse_args(
        ["--method", 'cbn_x={"kind": "cbn", "convert": {"compensate": true}, "label": "X"}', "--set", "images=64"])
    spec = dense_sweep.spec_from_args(args)
    assert "cbn_x" in spec.methods and spec.base["images"] == 64
    cfg = next(c for c in spec.configs("o") if c.method == "cbn_x")
    assert cfg.kind == "cbn" and cfg.convert == {"compensate": True} and math.isclose(cfg.images, 64)
