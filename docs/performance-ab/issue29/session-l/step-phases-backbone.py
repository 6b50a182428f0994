"""benchmarks.step_phases' clock on a timm model: each phase's median over alternated steps.

    OMP_NUM_THREADS=1 python docs/performance-ab/issue29/session-l/step-phases-backbone.py resnet18 160 2 bn,floor,traffic,cbn,cbn-diff 9

Arguments: model, input size, batch, variants (benchmarks.backbone_step's names), steps (after 4
warm-up steps each). Variants alternate step by step, their order rotating; milliseconds.
"""
import statistics
import sys

import torch

sys.path.insert(0, "src")
sys.path.insert(0, ".")
torch.set_num_threads(1)
from benchmarks.backbone_step import build  # noqa: E402
from benchmarks.step_phases import PhaseTrainer  # noqa: E402

model_name, size, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
variants = sys.argv[4].split(",")
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 9
generator = torch.Generator().manual_seed(0)
x = torch.randn(batch, 3, size, size, generator=generator)
target = torch.randint(0, 10, (batch,), generator=generator)
trainers = {v: PhaseTrainer(build(model_name, v, 4, 0), x, target) for v in variants}
for trainer in trainers.values():
    for _ in range(4):
        trainer.step()
samples = {v: [] for v in variants}
for r in range(steps):
    for v in variants[r % len(variants):] + variants[:r % len(variants)]:
        samples[v].append(trainers[v].step())
phases = ["summaries", "producers", "norm layers", "record", "other forward", "forward", "backward", "optimizer",
          "step"]
print(f"{model_name} {size}px batch {batch}, medians of {steps} steps (ms)")
print("variant".ljust(10), *[p.rjust(13) for p in phases])
for v in variants:
    print(v.ljust(10), *[f"{1e3 * statistics.median(s[p] for s in samples[v]):13.1f}" for p in phases])
