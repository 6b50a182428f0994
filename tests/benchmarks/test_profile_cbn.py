"""The per-layer profile runs and attributes CBN's internal steps."""

from benchmarks.profile_cbn import main


def test_profile_reports_norm_ops_and_phases(tmp_path, capsys):
    md = tmp_path / "profile.md"
    # Every op listed (--top): which ops rank first by time depends on the machine's load.
    text = main(["--batch", "2", "--window", "2", "--steps", "1", "--threads", "1", "--phases",
                 "--top", "1000", "--md", str(md)])
    assert md.read_text() == text
    assert "Norm layers: 21" in text
    for name in ("record_steps", "cross_iteration_batch_norm", "prepare_summaries", "_pair", "convolution_backward"):
        assert name in text, name
    # The phase wrappers are removed afterwards: the core is left as it was.
    from cbn.layers import cross_iteration_batchnorm as layer_module

    assert not hasattr(layer_module._CrossIterationBatchNorm._record, "_phase_wrapped")
    assert not hasattr(layer_module.cross_iteration_batch_norm, "_phase_wrapped")
