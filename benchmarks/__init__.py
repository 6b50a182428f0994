"""Benchmarks of the cbn layers (run as ``python -m benchmarks.<name>`` from the repository root)."""
