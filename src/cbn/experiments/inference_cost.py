"""Inference cost beside accuracy (issue 28, item 4): what a BN-family norm keeps at inference.

After training, a CBN model is turned back into BatchNorm (``cbn.revert_model``) and every
BatchNorm that follows a convolution is folded into it (``torch.nn.utils.fusion.fuse_conv_bn_eval``):
the norm costs nothing at inference, and the folded model computes the same function as the
BN model in eval mode (checked here, to float tolerance). GroupNorm normalizes with statistics of
the input itself, so it cannot be folded. MABN, as :mod:`cbn.experiments.mabn` implements it, runs
its weight centralization and the division by its moving second moment at every forward; both are
fixed at inference, so MABN could be folded too (a per-channel scale), which this file does not do:
it times MABN as it ships.

Timed: eval-mode forward under ``torch.inference_mode`` at batch 1 and 8, one thread, the
variants interleaved round by round (each round times every variant once, in a rotating order),
the median over rounds reported.

- the dense task's FCN (widths 8-128, 64x64 inputs, :class:`cbn.experiments.segmentation.FCN`):
  BN unfolded; BN folded (= CBN after ``revert_model``, folded); GroupNorm (8 groups); MABN;
- the detector of ``examples/detector.py`` (Faster R-CNN + FPN, ResNet-10, 128x128): every norm
  BN folded (CBN or BN after training); BN unfolded; GroupNorm heads (backbone BN folded, the
  FPN's and box head's GN kept).

Weights are random (the cost does not depend on them); the folded models are checked equal to
their unfolded BN models on the timed input.

    OMP_NUM_THREADS=1 python -m cbn.experiments.inference_cost           # docs/data/finetune/inference_cost.{md,json}
    python -m cbn.experiments.inference_cost --smoke --out /tmp/ic          # a few rounds, for tests
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

OUT = "docs/data/finetune"


# ----------------------------------------------------------------------------- folding


def fold_conv_bn(model: nn.Module) -> tuple[nn.Module, int]:
    """Fold every eval-mode BatchNorm2d that directly follows a bias-or-not ``nn.Conv2d`` into it.

    Two patterns are recognised: consecutive children of an ``nn.Sequential`` (``Conv2d`` then
    ``BatchNorm2d``, as in torchvision's ``Conv2dNormActivation``, ResNet's ``downsample`` and
    the dense task's ``DoubleConv``) and attribute pairs ``convK`` / ``bnK`` of one module (as in
    torchvision's ResNet stem and ``BasicBlock``/``Bottleneck``). The folded BN becomes
    ``nn.Identity``. Returns a folded deep copy (the input is untouched) and the number folded.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = module._modules[a], module._modules[b]
                if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d:
                    module._modules[a] = fuse_conv_bn_eval(conv, bn)
                    module._modules[b] = nn.Identity()
                    folded += 1
        for name, child in list(module._modules.items()):
            if name.startswith("conv") and type(child) is nn.Conv2d:
                bn_name = "bn" + name[len("conv"):]
                bn = module._modules.get(bn_name)
                if type(bn) is nn.BatchNorm2d:
                    module._modules[name] = fuse_conv_bn_eval(child, bn)
                    module._modules[bn_name] = nn.Identity()
                    folded += 1
    return model, folded


def count_norms(model: nn.Module) -> dict:
    out: dict = {}
    for m in model.modules():
        kind = type(m).__name__  # norm layers only, not wrappers such as Conv2dNormActivation
        if kind.endswith(("Norm", "Norm1d", "Norm2d", "Norm3d")) or kind.startswith("MABN"):
            out[kind] = out.get(kind, 0) + 1
    return out


# ----------------------------------------------------------------------------- models


def _randomize_bn_state(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine (so that folding is really checked)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def dense_models(widths=(8, 16, 32, 64, 128)) -> dict:
    """name -> eval-mode FCN; the CBN model is trained one step, reverted and folded."""
    import cbn
    from cbn.experiments.mabn import MABN2d, centralize_convolutions
    from cbn.experiments.segmentation import FCN

    torch.manual_seed(0)
    bn = _randomize_bn_state(FCN(nn.BatchNorm2d, widths)).eval()
    # the CBN path a user takes: convert, train, revert, fold
    converted = cbn.convert_model(copy.deepcopy(bn), window=2, burnin=0).train()
    converted(torch.randn(2, 1, 64, 64)).sum().backward()
    reverted = cbn.revert_model(converted).eval()
    folded, n = fold_conv_bn(reverted)
    assert n == 2 * len(widths), n
    torch.manual_seed(0)
    gn = FCN(lambda c: nn.GroupNorm(min(8, c), c), widths).eval()
    torch.manual_seed(0)
    mabn = centralize_convolutions(FCN(lambda c: MABN2d(c, window=16), widths)).eval()
    return {"BN (unfolded)": bn, "CBN/BN folded": folded, "GroupNorm": gn, "MABN (eval, as implemented)": mabn,
            "_reference": {"CBN/BN folded": reverted}}


def detector_models() -> dict:
    """name -> eval-mode detector of examples/detector.py (needs the repository root on sys.path)."""
    try:
        from examples.detector import assemble_detector, resnet10_body
    except ImportError as error:  # pragma: no cover - run from the repository root
        raise SystemExit(f"the detector needs examples/ importable (run from the repository root): {error}")
    from cbn.experiments.norms import make_norm

    torch.manual_seed(0)
    bn = _randomize_bn_state(assemble_detector(resnet10_body(nn.BatchNorm2d), nn.BatchNorm2d)).eval()
    folded, n = fold_conv_bn(bn)
    torch.manual_seed(0)
    gn_heads = assemble_detector(resnet10_body(nn.BatchNorm2d), make_norm("gn", gn_groups=32)).eval()
    gn_heads.backbone.body.load_state_dict(bn.backbone.body.state_dict())
    gn_heads_folded, n_gn = fold_conv_bn(gn_heads)
    return {"BN (unfolded)": bn, "CBN/BN folded": folded, "GN heads (backbone BN folded)": gn_heads_folded,
            "_reference": {"CBN/BN folded": bn}, "_folded": {"CBN/BN folded": n, "GN heads (backbone BN folded)": n_gn}}


# ----------------------------------------------------------------------------- timing


def time_interleaved(models: dict, make_input, rounds: int, repeats: int = 1, warmup: int = 2) -> dict:
    """Median seconds of one forward per model; every round times each model ``repeats`` times
    in a rotating order."""
    names = list(models)
    times = {n: [] for n in names}
    with torch.inference_mode():
        x = make_input()
        for _ in range(warmup):
            for n in names:
                models[n](x)
        for r in range(rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                for _ in range(repeats):
                    models[n](x)
                times[n].append((time.perf_counter() - t0) / repeats)
    return {n: {"median_ms": 1000 * statistics.median(v), "min_ms": 1000 * min(v), "rounds": len(v)}
            for n, v in times.items()}


def max_difference(a: nn.Module, b: nn.Module, x, detector: bool = False) -> float:
    with torch.inference_mode():
        if detector:
            # compare the backbone + FPN features: the post-processing (NMS, thresholds) is discrete
            fa, fb = a.backbone(a.transform(x)[0].tensors), b.backbone(b.transform(x)[0].tensors)
            return max(float((fa[k] - fb[k]).abs().max()) for k in fa)
        return float((a(x) - b(x)).abs().max())


def measure(smoke: bool = False, threads: int = 1) -> dict:
    from cbn.experiments.finetune import environment
    from cbn.experiments.train import source_commit

    torch.set_num_threads(threads)
    rounds = {"dense": 3 if smoke else 40, "detector": 2 if smoke else 12}
    batches = (1, 2) if smoke else (1, 8)
    results = {"commit": source_commit(), "environment": environment(), "smoke": smoke, "rows": []}
    dense = dense_models()
    ref = dense.pop("_reference")
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 1, 64, 64, generator=g)
        diff = max_difference(dense["CBN/BN folded"], ref["CBN/BN folded"], x)
        timed = time_interleaved(dense, lambda: x, rounds["dense"], repeats=1 if smoke else 5)
        for name, t in timed.items():
            results["rows"].append({"model": "dense FCN (8-128, 64x64)", "variant": name, "batch": batch, **t,
                                    "norms": count_norms(dense[name]),
                                    "max_abs_diff_vs_unfolded": diff if name == "CBN/BN folded" else None})
    det = detector_models()
    ref, folded_counts = det.pop("_reference"), det.pop("_folded")
    for batch in batches:
        g = torch.Generator().manual_seed(100 + batch)
        images = [torch.rand(1, 128, 128, generator=g) for _ in range(batch)]
        diff = max_difference(det["CBN/BN folded"], ref["CBN/BN folded"], images, detector=True)
        timed = time_interleaved(det, lambda: images, rounds["detector"])
        for name, t in timed.items():
            results["rows"].append({"model": "detector (Faster R-CNN + FPN, ResNet-10, 128x128)", "variant": name,
                                    "batch": batch, **t, "norms": count_norms(det[name]),
                                    "bn_folded": folded_counts.get(name, 0),
                                    "max_abs_diff_vs_unfolded": diff if name == "CBN/BN folded" else None})
    return results


def table(results: dict) -> str:
    lines = ["| model | variant | batch | median ms / forward | vs folded | norm layers left | max abs diff folded vs unfolded |",
             "|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["batch"]): r["median_ms"] for r in results["rows"] if r["variant"] == "CBN/BN folded"}
    for r in results["rows"]:
        norms = ", ".join(f"{k} x{v}" for k, v in sorted(r["norms"].items())) or "none"
        diff = "" if r["max_abs_diff_vs_unfolded"] is None else f"{r['max_abs_diff_vs_unfolded']:.1e}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['median_ms']:.2f} | "
                     f"{r['median_ms'] / base[(r['model'], r['batch'])]:.2f}x | {norms} | {diff} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbn.experiments.inference_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--smoke", action="store_true", help="a few rounds (tests)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    results = measure(args.smoke, args.threads)
    text = table(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "OMP_NUM_THREADS=1 PYTHONPATH=src:. python -m cbn.experiments.inference_cost" + (" --smoke" if args.smoke else "")
    (out / "inference_cost.json").write_text(json.dumps({**results, "command": command}, indent=1, default=float) + "\n")
    (out / "inference_cost.md").write_text(
        f"Eval-mode forward, `torch.inference_mode`, {args.threads} thread, variants interleaved, median over rounds "
        f"(commit `{results['commit'][:7]}`, CPU {results['environment']['cpu']}):\n\n    {command}\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
