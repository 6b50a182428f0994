"""The ``cbn`` command line: train, sweep, demo, stats-error."""

from __future__ import annotations

import argparse
import json
import sys

from cbn.experiments.norms import MODELS, NORM_KINDS


def _add_train_options(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    from cbn.experiments.train import TrainConfig

    d = TrainConfig()
    if not sweep:
        p.add_argument("--norm", choices=NORM_KINDS, default=d.norm)
        p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step (per process for syncbn)")
        p.add_argument("--seed", type=int, default=d.seed)
        p.add_argument("--window", type=int, default=None, help="CBN window k (default: protocol rule min(cap, ref_batch // batch))")
        p.add_argument("--burnin", type=int, default=None, help="CBN burn-in steps (default: burnin-fraction of all steps)")
        p.add_argument("--lr", type=float, default=None, help="explicit learning rate (default: base-lr * batch / ref-batch)")
        p.add_argument("--out", default=None, help="directory for the JSON record")
        p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--model", choices=sorted(MODELS), default=d.model)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--base-lr", type=float, default=d.base_lr, help="learning rate at the reference batch")
    p.add_argument("--ref-batch", type=int, default=d.ref_batch)
    p.add_argument("--min-lr", type=float, default=d.min_lr, help="floor of the scaled learning rate")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--window-cap", type=int, default=d.window_cap)
    p.add_argument("--burnin-fraction", type=float, default=d.burnin_fraction)
    p.add_argument("--gn-groups", type=int, default=d.gn_groups)
    p.add_argument("--bn-momentum", type=float, default=d.bn_momentum)
    p.add_argument("--train-subset", type=int, default=None, help="fixed class-balanced training subset size")
    p.add_argument("--test-subset", type=int, default=None, help="fixed class-balanced test subset size")
    p.add_argument("--subset-seed", type=int, default=d.subset_seed)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--padding", type=int, default=d.padding, help="random-crop padding")
    p.add_argument("--nproc", type=int, default=d.nproc, help="syncbn: processes (gloo), batch-size examples each")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every N epochs (0: last only)")
    p.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST idx files")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per process")


def _config_from(args: argparse.Namespace, **overrides):
    from dataclasses import fields

    from cbn.experiments.train import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return TrainConfig(**values)


def _sweep_options(p: argparse.ArgumentParser, defaults) -> None:
    p.add_argument("--norms", nargs="+", choices=NORM_KINDS, default=list(defaults.norms))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=list(defaults.batch_sizes))
    p.add_argument("--seeds", nargs="+", type=int, default=list(defaults.seeds))
    p.add_argument("--workers", type=int, default=defaults.workers, help="parallel single-thread slots")
    p.add_argument("--out", default=defaults.out, help="sweep directory (runs/<name>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbn", description="Cross-Iteration Batch Normalization experiments")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model and print per-epoch test accuracy")
    _add_train_options(p)

    from cbn.experiments.sweep import DEMO, EVIDENCE, FULL

    p = sub.add_parser("sweep", help="grid of norms x batch sizes x seeds; table and plot")
    _add_train_options(p, sweep=True)
    _sweep_options(p, FULL)
    p.set_defaults(**FULL.train_overrides)

    p = sub.add_parser("demo", help="the headline (BN fails at batch 1, what CBN does there), about 2.5 minutes")
    p.add_argument("--out", default=DEMO.out)
    p.add_argument("--workers", type=int, default=DEMO.workers)
    p.add_argument("--data-dir", default=None)

    p = sub.add_parser("evidence", help="the evidence sweep of docs/results.md (resumable; hours on 2 cores)")
    p.add_argument("--out", default=None, help=f"default: {EVIDENCE.out} (differentiable: runs/differentiable)")
    p.add_argument("--workers", type=int, default=EVIDENCE.workers)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--preset", choices=("evidence", "differentiable"), default="evidence",
                   help="differentiable: naive, paper and differentiable CBN at batch 1 and 2, 5 seeds")

    p = sub.add_parser("report", help="rebuild results.json, table and plot of a sweep directory")
    p.add_argument("dir")
    p.add_argument("--against", default=None, help="summary.json of another sweep on the same protocol")

    p = sub.add_parser("build-kernels", help="compile the optional C++ kernels now (cached; else at first use)")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")

    p = sub.add_parser("stats-error", help="error of naive vs compensated cross-iteration statistics")
    from cbn.experiments.stats_error import add_arguments

    add_arguments(p)
    return parser


def _print_summary(summary: dict) -> None:
    print("Test accuracy (%): mean ± std [± 95 % interval] / eval-mode train accuracy (n seeds)")
    print(summary["table"])
    if summary["reading"]:
        print(summary["reading"])
    print(summary["comparisons"])
    if summary["ablations"]:
        print(summary["ablations"])
    print(f"plot: {summary['plot']}")
    if summary["ablation_plot"]:
        print(f"ablations: {summary['ablation_plot']}")
    if summary["curves"]:
        print(f"curves: {summary['curves']}")
    print(f"results: {summary['results']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "build-kernels":
        import cbn.kernels

        built = cbn.kernels.build(verbose=args.verbose)
        origin = cbn.kernels.origin()
        source = "built at first use" if origin == "jit" else f"installed ahead of time: {origin}"
        print(f"cbn: C++ kernels ready ({source})" if built else
              "cbn: C++ kernels unavailable; the Python implementation is used")
        return 0 if built else 1
    if args.command == "train":
        from cbn.experiments.data import DataNotFoundError
        from cbn.experiments.train import train

        try:
            record = train(_config_from(args))
        except DataNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(json.dumps({"name": record["name"], "test_acc": record["test_acc"], "diverged": record["diverged"]}))
        return 0
    if args.command in ("sweep", "demo", "evidence"):
        from cbn.experiments.data import DataNotFoundError, load_split
        from cbn.experiments import sweep

        try:
            load_split("test", args.data_dir)  # fail early with the install hint
        except DataNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if args.command in ("demo", "evidence"):
            if args.command == "demo":
                preset = sweep.DEMO
            else:
                preset = sweep.DIFFERENTIABLE if args.preset == "differentiable" else sweep.EVIDENCE
            spec = preset.with_(out=args.out, workers=args.workers, data_dir=args.data_dir)
        else:
            spec = sweep.SweepSpec(
                norms=tuple(args.norms), batch_sizes=tuple(args.batch_sizes), seeds=tuple(args.seeds),
                workers=args.workers, out=args.out, train=_config_from(args, progress=False),
            )
        _print_summary(sweep.run_sweep(spec))
        return 0
    if args.command == "report":
        from cbn.experiments import sweep

        _print_summary(sweep.report(args.dir, against=args.against))
        return 0
    if args.command == "stats-error":
        from cbn.experiments.stats_error import main as stats_main

        return stats_main(args)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
