"""Self time of pairing and fingerprint (cbn::convolution_producer) in default-CBN training steps.

    OMP_NUM_THREADS=1 python docs/performance-ab/issue29/session-l/pairing-in-step.py resnet18:160 resnet50:128

Run from the repository root of either version. benchmarks.backbone_step's model and SGD step at
batch 2, window 4, 5 warm-up steps, then 3 steps under torch.profiler: the operator's self CPU
time per step, and the whole step's.
"""
import sys

import torch
from torch.profiler import profile

sys.path.insert(0, "src")
sys.path.insert(0, ".")
torch.set_num_threads(1)
from benchmarks.backbone_step import Step, build  # noqa: E402

for cell in sys.argv[1:]:
    name, size = cell.split(":")
    step = Step(name, build(name, "cbn-diff", 4, 0), 2, int(size), 0)
    for _ in range(5):
        step()
    with profile() as prof:
        for _ in range(3):
            step()
    events = {e.key: e for e in prof.key_averages()}
    total = sum(e.self_cpu_time_total for e in events.values()) / 3e3
    pairing = events["cbn::convolution_producer"].self_cpu_time_total / 3e3
    print(f"{cell}: cbn::convolution_producer {pairing:.2f} ms per step of {total:.0f} ms (profiled)")
