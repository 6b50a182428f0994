"""The producer fingerprint over a timm model's convolution weights, cold, beside torch.sum of them.

    OMP_NUM_THREADS=1 python docs/performance-ab/issue29/session-l/fingerprint-cold.py resnet18 resnet50

Run from the repository root of either version (before: two probes of periods 4093 and 4099,
``_probe_periods``; after: the lane and block probes, ``_probe_parts``). One
``cbn::weight_fingerprint`` call per convolution, as pairing takes it, after a 64 MiB write that
evicts the caches; median of 15.
"""
import statistics
import sys
import time

import timm
import torch

sys.path.insert(0, "src")
torch.set_num_threads(1)
import cbn.kernels  # noqa: E402
from cbn import producer_call  # noqa: E402

assert cbn.kernels.active()
probe = getattr(producer_call, "_probe_parts", None) or getattr(producer_call, "_probe_periods")
parts = probe(torch.float32, torch.device("cpu"))
for name in sys.argv[1:]:
    model = timm.create_model(name, num_classes=10)
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    nbytes = sum(w.numel() * 4 for w in weights)
    evict = torch.empty(64 * 2**20 // 4)

    def cold(run):
        times = []
        for _ in range(15):
            evict.fill_(1.0)
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    fingerprint = cold(lambda: [torch.ops.cbn.weight_fingerprint([w], *parts) for w in weights])
    plain_sum = cold(lambda: [w.sum() for w in weights])
    print(f"{name}: {nbytes / 1e6:.0f} MB, fingerprint {fingerprint:.2f} ms ({nbytes / fingerprint / 1e6:.1f} GB/s), "
          f"torch.sum {plain_sum:.2f} ms ({nbytes / plain_sum / 1e6:.1f} GB/s)")
