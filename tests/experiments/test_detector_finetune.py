"""The detector fine-tuning study (examples/detector_finetune.py) and the inference-cost script, at tiny sizes."""

import json

import pytest
import torch
from torch import nn

from cbn import CrossIterationBatchNorm2d
from cbn.experiments.finetune import FrozenBatchNorm2d
from cbn.experiments.scenes import compose_scenes
from examples import detector_finetune as df
from examples.detector import images_and_targets


def _scenes(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, 255, (20, 28, 28), generator=g, dtype=torch.uint8)
    return compose_scenes(items, torch.arange(20) % 10, n, seed=seed)


@pytest.fixture(scope="module")
def body_weights(tmp_path_factory):
    torch.manual_seed(3)
    model = df.classifier()
    with torch.no_grad():  # non-default BN state, so that loading it is visible
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("w") / "body.pt"
    torch.save(df.body_state(model), path)
    return path


def _train(model, steps=2):
    scenes = _scenes()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    model.train()
    for step in range(steps):
        images, targets = images_and_targets(scenes, [2 * step % 4, (2 * step + 1) % 4])
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_pretrained_body_loads_into_every_variant(body_weights):
    state = torch.load(body_weights, weights_only=True)
    assert any(v.dtype == torch.float16 for v in state.values())  # conv weights stored small
    for variant in df.VARIANTS:
        model = df.build(variant, seed=0, pretrained=str(body_weights), window=2)
        body = model.backbone.body.state_dict()
        assert torch.equal(body["layer3.0.conv1.weight"], state["layer3.0.conv1.weight"].float())
        assert torch.equal(body["bn1.running_var"], state["bn1.running_var"])
        assert model.pretrained_entries == len(state)


def test_same_head_init_for_every_variant_of_a_seed(body_weights):
    heads = [df.build(v, seed=5, pretrained=str(body_weights), window=2).rpn.head.conv[0][0].weight
             for v in df.VARIANTS]
    assert all(torch.equal(heads[0], h) for h in heads[1:])


def test_variants_put_the_right_norms_in_backbone_and_heads(body_weights):
    census = {v: df.norm_census(df.build(v, 0, str(body_weights), window=2)) for v in df.VARIANTS}
    assert census["frozen-bn"] == {"backbone": {"FrozenBatchNorm2d": 12}, "heads": {"BatchNorm2d": 8}}
    assert census["bn"] == {"backbone": {"BatchNorm2d": 12}, "heads": {"BatchNorm2d": 8}}
    assert census["gn"] == {"backbone": {"BatchNorm2d": 12}, "heads": {"GroupNorm": 8}}
    assert census["cbn"] == {"backbone": {"CrossIterationBatchNorm2d": 12}, "heads": {"CrossIterationBatchNorm2d": 8}}
    assert census["cbn-heads"] == {"backbone": {"FrozenBatchNorm2d": 12}, "heads": {"CrossIterationBatchNorm2d": 8}}


@pytest.mark.parametrize("variant", ["frozen-bn", "cbn-heads"])
def test_frozen_backbone_keeps_its_running_statistics_and_trains_its_affine(variant, body_weights):
    model = df.build(variant, seed=0, pretrained=str(body_weights), window=2)
    frozen = [m for m in model.backbone.body.modules() if isinstance(m, FrozenBatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone(), m.weight.detach().clone()) for m in frozen]
    heads = [m for m in model.roi_heads.box_head.modules() if isinstance(m, (nn.BatchNorm2d, CrossIterationBatchNorm2d))]
    head_means = [m.running_mean.clone() for m in heads]
    _train(model)
    for m, (mean, var, weight) in zip(frozen, before):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
    assert any(not torch.equal(m.weight, w) for m, (_, _, w) in zip(frozen, before))  # affine is trained
    assert any(not torch.equal(m.running_mean, old) for m, old in zip(heads, head_means))  # heads do adapt


def test_run_one_writes_a_complete_record(body_weights):
    scenes = _scenes(6)
    cfg = df.RunConfig(variant="cbn", seed=0, steps=2, window=2, test_scenes=2, train_eval_scenes=2,
                       curve_points=2, pretrained=str(body_weights))
    record = df.run_one(cfg, scenes, _scenes(2, seed=9), log=lambda *_: None)
    assert record["compensated"] == 20 and record["cbn_layers"] == 20
    assert [p["step"] for p in record["curve"]] == [1, 2]
    assert 0 <= record["test_map"] <= record["test_map50"] <= 1 and record["step_ms_median"] > 0
    assert record["pretrained"]["entries_loaded"] > 0 and len(record["pretrained"]["sha256"]) == 64
    assert "cpu" in record["environment"] and record["environment"]["cbn_kernels_ran"] is not None


def test_pretrain_tiny_writes_weights_and_record(tiny_fashion, tmp_path):
    cfg = df.PretrainConfig(epochs=1, batch_size=16, train_images=80, data_dir=str(tiny_fashion))
    record = df.pretrain(cfg, str(tmp_path / "body.pt"), progress=False)
    saved = json.loads((tmp_path / "body.json").read_text())
    assert saved["steps"] == 5 and 0 <= saved["test_accuracy"] <= 100
    assert saved["weights_sha256"] == record["weights_sha256"] and saved["commit"]
    state = torch.load(tmp_path / "body.pt", weights_only=True)
    assert not any(k.startswith("fc.") for k in state)
    df.build("bn", 0, str(tmp_path / "body.pt"))  # loads into the detector


def test_summary_pairs_by_seed(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for variant, offset in (("cbn", 0.1), ("bn", 0.0)):
        for seed in (0, 1, 2):
            value = 0.3 + offset + 0.01 * seed + (0.005 if variant == "bn" and seed == 1 else 0)
            record = {"variant": variant, "config": {"seed": seed}, "test_map": value, "test_map50": value + 0.2,
                      "train_map": value, "train_loss_final": 1.0, "step_ms_median": 100.0, "curve": [
                          {"step": 1, "test_map": value}], "losses": [1.0, 0.9]}
            (runs / f"{variant}_seed{seed}.json").write_text(json.dumps(record))
    result = df.summary(str(tmp_path))
    (entry,) = result["against_default"]
    assert entry["against"] == "bn" and entry["test_map"]["wins"] == 3
    assert abs(entry["test_map"]["diff"] - (10 - 0.5 / 3)) < 1e-9 and entry["test_map"]["paired_p"] < 0.05
    assert (tmp_path / "summary.md").exists() and (tmp_path / "summary.png").stat().st_size > 1000


def test_folding_matches_unfolded_bn():
    from cbn.experiments.inference_cost import _randomize_bn_state, fold_conv_bn
    from cbn.experiments.segmentation import FCN
    from examples.detector import assemble_detector, resnet10_body

    fcn = _randomize_bn_state(FCN(nn.BatchNorm2d, (8, 16))).eval()
    folded, n = fold_conv_bn(fcn)
    x = torch.randn(2, 1, 16, 16)
    assert n == 4 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), fcn(x), rtol=1e-4, atol=1e-5)
    det = _randomize_bn_state(assemble_detector(resnet10_body(), nn.BatchNorm2d)).eval()
    folded_det, n = fold_conv_bn(det)
    assert n == 20 and not any(isinstance(m, nn.BatchNorm2d) for m in folded_det.modules())
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        a, b = det.backbone(x), folded_det.backbone(x)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4)


def test_inference_cost_smoke(tmp_path):
    from cbn.experiments import inference_cost

    assert inference_cost.main(["--smoke", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "inference_cost.json").read_text())
    variants = {(r["model"][:5], r["variant"]) for r in saved["rows"]}
    assert ("dense", "GroupNorm") in variants and ("dense", "MABN (eval, as implemented)") in variants
    assert ("detec", "GN heads (backbone BN folded)") in variants
    folded = [r for r in saved["rows"] if r["variant"] == "CBN/BN folded"]
    assert all(r["max_abs_diff_vs_unfolded"] < 1e-3 for r in folded) and not folded[0]["norms"]
    assert "| model |" in (tmp_path / "inference_cost.md").read_text()
