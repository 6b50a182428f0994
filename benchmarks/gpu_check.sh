#!/usr/bin/env bash
# The GPU check of issue 29, ready to run on a machine with one CUDA GPU (under 10 minutes):
#   1. the device tests (tests/test_device.py) on CUDA tensors: the float64 oracle for the paper's
#      rule and the default, with and without cbn's C++ kernels (which fall back to ATen on CUDA),
#      BatchNorm equality at window 1, float16 autocast with a GradScaler;
#   2. the differentiable-compensation tests and the reliability tests on the CPU of that machine;
#   3. the backbone benchmark on the GPU (timm resnet18/resnet50/efficientnet_b0 and the detector
#      at batch 1, 2 and 8), figures in docs/performance-ab/backbones-cuda.json and .md.
# Usage, from the repository root, in an environment made by `make venv` (or PY=python):
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH=src:.
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
CBN_TEST_DEVICE=cuda "$PY" -m pytest tests/test_device.py -q -p no:cacheprovider
"$PY" -m pytest tests/functional/test_differentiable_compensation.py tests/test_reliability.py -q -p no:cacheprovider
"$PY" -m benchmarks.backbone_step --device cuda --threads 4 --rounds 15 \
  --json docs/performance-ab/backbones-cuda.json --md docs/performance-ab/backbones-cuda.md
