"""The checks that matter on an accelerator, on the device named by ``CBN_TEST_DEVICE``.

On the CPU (the default, as in ``make test``) they run with the rest of the suite; on a GPU
machine ``CBN_TEST_DEVICE=cuda python -m pytest tests/test_device.py`` (what
``benchmarks/gpu_check.sh`` runs) checks the same maths on CUDA tensors, where the C++ kernels
fall back to ATen: the float64 oracle for the paper's rule and for differentiable compensation,
BatchNorm equality at window 1, the library without its C++ kernels, and mixed precision.
"""

import os

import pytest
import torch
from torch import nn

import cbn
import cbn.kernels
from oracle import DenseJacobianCBN, train_beside_oracle

DEVICE = torch.device(os.environ.get("CBN_TEST_DEVICE", "cpu"))
PRODUCERS = {
    "conv2d_groups": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (3, 4, 9, 9)),
    "linear": (lambda: nn.Linear(6, 5), (4, 6)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (3, 4, 4, 4)),
}


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "python"])
@pytest.mark.parametrize("differentiable", [False, True], ids=["paper", "default"])
@pytest.mark.parametrize("case", list(PRODUCERS))
def test_training_steps_equal_the_float64_oracle_on_the_device(case, differentiable, use_kernels):
    make_producer, shape = PRODUCERS[case]
    torch.manual_seed(0)
    producer = make_producer().double().to(DEVICE)
    channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    norm = cbn.CrossIterationBatchNorm(channels, window=4, differentiable_compensation=differentiable,
                                       dtype=torch.float64, device=DEVICE)
    oracle = DenseJacobianCBN(producer, window=4, compensate=True, differentiable=differentiable)
    with cbn.kernels.use_kernels(use_kernels):
        train_beside_oracle(producer, norm, oracle, shape, steps=7)


def test_window_one_is_batchnorm_on_the_device():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).to(DEVICE)
    converted = cbn.convert_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), window=1).to(DEVICE)
    converted.load_state_dict(reference.state_dict())
    for _ in range(3):
        x = torch.randn(2, 3, 8, 8, device=DEVICE)
        expected, out = reference(x), converted(x)
        torch.testing.assert_close(out, expected)
        expected.square().sum().backward()
        out.square().sum().backward()
        for a, b in zip(converted.parameters(), reference.parameters()):
            torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(converted[1].running_var, reference[1].running_var)


def test_mixed_precision_training_keeps_float32_windows_on_the_device():
    # bf16 autocast (float16 with a GradScaler on CUDA): finite steps, windows and running
    # statistics in float32, compensation active.
    torch.manual_seed(0)
    model = cbn.convert_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                            nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)), window=3).to(DEVICE)
    low = torch.float16 if DEVICE.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=DEVICE.type == "cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(6):
        with torch.autocast(DEVICE.type, dtype=low):
            loss = model(torch.randn(2, 3, 10, 10, device=DEVICE)).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        assert torch.isfinite(loss)
    norms = [m for m in model.modules() if isinstance(m, cbn.CrossIterationBatchNormBase)]
    for norm in norms:
        position = norm.window_state.positions[0]
        assert position.stats.dtype == torch.float32 and position.var_grad.dtype == torch.float32
        assert norm.running_var.dtype == torch.float32 and torch.isfinite(norm.running_var).all()
    assert all(row.compensated for row in cbn.pairing_report(model))
