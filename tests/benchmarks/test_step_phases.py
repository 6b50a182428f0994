"""The phase benchmark times every phase of BatchNorm's and CBN's steps, and they add up."""

import json

from benchmarks.step_phases import PHASES, main


def test_step_phases_smoke(tmp_path):
    out = tmp_path / "phases.json"
    results = main(["--batch-sizes", "2", "--steps", "3", "--warmup", "5", "--json", str(out)])
    (by_variant,) = results.values()
    assert list(by_variant) == ["bn", "cbn", "cbn-diff"]
    for variant, phases in by_variant.items():
        assert list(phases) == list(PHASES)
        assert all(phases[p] > 0 for p in ("forward", "producers", "norm layers", "backward", "optimizer", "step"))
        # The model-level step exists only in converted models.
        assert (phases["record"] > 0.05) == (variant != "bn")
    assert json.loads(out.read_text())["results"]["2"]["bn"]["step"] == by_variant["bn"]["step"]
