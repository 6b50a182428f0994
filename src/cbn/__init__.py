"""Cross-Iteration Batch Normalization for PyTorch."""
