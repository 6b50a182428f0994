"""The backbone benchmark runs, names its floor and variants, and its --cells selection parses."""

import pytest

from benchmarks.backbone_step import MODELS, markdown, parse_args, run


def test_smoke_run_measures_every_variant_with_op_counts(tmp_path):
    md = tmp_path / "section.md"
    rows = run(["--smoke", "--md", str(md)])
    assert {r["variant"] for r in rows} == {"bn", "floor", "traffic", "naive", "cbn", "cbn-diff"}
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["bn"]["ratio"] == 1.0
    # Every CBN variant does strictly more operations than BatchNorm; the windows hold bytes.
    for variant in ("naive", "cbn", "cbn-diff"):
        assert by_variant[variant]["aten_ops"] > by_variant["bn"]["aten_ops"]
    assert by_variant["cbn-diff"]["window_bytes"] > by_variant["naive"]["window_bytes"] > 0
    text = md.read_text()
    assert "Real backbones" in text and "default (differentiable)" in text


def test_cells_select_model_and_size_pairs():
    args = parse_args(["--cells", "resnet50:128", "detector:192", "resnet50:96"])
    assert args.models == ["resnet50", "detector"]
    assert args.sizes_of("resnet50") == [128, 96] and args.sizes_of("detector") == [192]
    assert tuple(parse_args([]).sizes_of("efficientnet_b0")) == MODELS["efficientnet_b0"]
    with pytest.raises(SystemExit):
        parse_args(["--cells", "vgg:64"])


def test_markdown_reports_the_default_against_the_paper_rule():
    row = dict(model="resnet18", size=64, batch=2, window=4, q1_ms=1.0, q3_ms=2.0)
    rows = [dict(row, variant="bn", step_ms=10.0, ratio=1.0), dict(row, variant="cbn", step_ms=15.0, ratio=1.5),
            dict(row, variant="cbn-diff", step_ms=18.0, ratio=1.8)]
    text = markdown(rows, "cmd", {"git_commit": "abc", "device": "cpu", "threads": 1, "load_average_start": (0, 0, 0)})
    assert "| resnet18 | 64 | 2 | 10 ms (1-2) | 1.50x (1-2 ms) | 1.80x (1-2 ms) | 1.20x |" in text


def test_window_traffic_counts_the_compensated_weights_per_pass():
    import torch
    from torch import nn

    import cbn
    from benchmarks.backbone_step import window_traffic

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    weights = 8 * 3 * 9 + 4 * 8  # the two producers' weight values, |W|
    model = cbn.convert_model(model, window=4, burnin=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):  # windows full: 3 past slots
        optimizer.zero_grad()
        model(torch.randn(2, 3, 8, 8)).square().mean().backward()
        optimizer.step()
    assert window_traffic(model, differentiable=False) == (3 + 2) * weights * 4
    assert window_traffic(model, differentiable=True) == (2 * 3 + 3) * weights * 4


def test_markdown_reports_the_memory_bound_beside_the_measured_ratio():
    row = dict(model="resnet18", size=64, batch=2, window=4, q1_ms=1.0, q3_ms=2.0)
    bound = dict(read_bandwidth=8e9, traffic_bytes=2**20 * 100)
    rows = [dict(row, variant="bn", step_ms=10.0, ratio=1.0), dict(row, variant="floor", step_ms=12.0, ratio=1.2),
            dict(row, variant="cbn", step_ms=15.0, ratio=1.5, bound_ms=13.0, **bound),
            dict(row, variant="cbn-diff", step_ms=18.0, ratio=1.8, bound_ms=14.0, **bound)]
    text = markdown(rows, "cmd", {"git_commit": "abc", "device": "cpu", "threads": 1, "load_average_start": (0, 0, 0)})
    assert "| resnet18 | 64 | 2 | 8.0 | 100 MiB / 100 MiB | 1.30x, 1.50x | 1.40x, 1.80x | - |" in text
    rows.append(dict(row, variant="traffic", step_ms=13.5, ratio=1.35, traffic_bytes=2**20 * 100))
    text = markdown(rows, "cmd", {"git_commit": "abc", "device": "cpu", "threads": 1, "load_average_start": (0, 0, 0)})
    assert "| 1.40x, 1.80x | 1.35x (100 MiB) |" in text


def test_window_traffic_floor_moves_the_default_windows_bytes_and_leaves_the_output():
    import torch
    from torch import nn

    import cbn
    from benchmarks.backbone_step import WindowTrafficFloor, build, window_traffic
    from benchmarks.train_step import add_floor

    def small():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))

    x = torch.randn(2, 3, 8, 8)
    traffic = add_floor(small(), lambda conv: WindowTrafficFloor(conv, 3))
    floors = [m for m in traffic.modules() if isinstance(m, WindowTrafficFloor)]
    assert len(floors) == 2
    torch.testing.assert_close(traffic(x), small()(x), rtol=0, atol=0)  # the plain model's output
    traffic(x).square().mean().backward()
    for floor in floors:  # the backward's pass read every slot and wrote the weight-sized sum
        torch.testing.assert_close(floor.window_gradient, floor.window_slots.sum(0))

    converted = cbn.convert_model(small(), window=4, burnin=0)
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        converted(x).square().mean().backward()
        optimizer.step()
    assert sum(m.traffic_bytes() for m in floors) == window_traffic(converted, differentiable=True)
    assert any(isinstance(m, WindowTrafficFloor) for m in build("resnet18", "traffic", 4, 0).modules())
