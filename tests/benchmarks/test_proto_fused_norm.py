"""The fused-normalization prototype gives the core's outputs and gradients (float64)."""

from benchmarks.proto_fused_norm import _check_and_time


def test_fused_prototype_matches_core_gradients():
    times = _check_and_time((3, 5, 4, 4), rounds=2)  # asserts outputs and gradients match
    assert set(times) == {"batchnorm", "core", "fused"} and min(times.values()) > 0
