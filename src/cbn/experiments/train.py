"""One training run on Fashion-MNIST with one norm kind and one batch size.

Protocol (recorded in every JSON record):
    * the same number of epochs at every batch size;
    * SGD with momentum, learning rate scaled linearly with the (global) batch size from a
      reference batch, ``lr = base_lr * batch / ref_batch``, optionally floored at ``min_lr``;
      cosine decay to 0 over all steps;
    * CBN / naive CBN window ``min(window_cap, max(1, ref_batch // batch))`` (larger windows at
      smaller batches, so window x batch stays near the reference batch), burn-in a fixed
      fraction of all steps (the paper: 25 of 90 ImageNet epochs);
    * Batch Renorm: plain BN for the same fraction of steps, then r_max 1 -> 3 over 40 % and
      d_max 0 -> 5 over 25 % of all steps (the paper's 5k/40k/25k schedule, scaled);
    * the same seeds for every norm (same conv initialization and data order);
    * evaluation in eval mode (running statistics; GroupNorm has none), on the test set and on
      a fixed part of the training set (``train_eval_subset`` images, unaugmented), so the
      train/test gap of eval mode is recorded beside the test accuracy;
    * after training, a copy of every model with running statistics is evaluated again with its
      population statistics recomputed (``precise_bn.py``, over ``precise_bn_images`` training
      images): the "precise BN" control.
"""

from __future__ import annotations

import json
import math
import copy
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cbn.experiments.data import FashionMNIST, eval_batches, normalize, train_batches
from cbn.experiments.norms import NORM_KINDS, build_model
from cbn.experiments.precise_bn import recompute_population_statistics
from cbn.pairing import pairing_report, pairing_summary


@dataclass
class TrainConfig:
    norm: str = "bn"
    batch_size: int = 32
    epochs: int = 2
    model: str = "resnet20"
    seed: int = 0
    base_lr: float = 0.1
    ref_batch: int = 32
    lr: float | None = None  # explicit learning rate; overrides the linear scaling
    min_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    window: int | None = None  # None: protocol rule
    window_cap: int = 16
    burnin: int | None = None  # None: protocol rule (steps)
    burnin_fraction: float = 0.25
    gn_groups: int = 8
    bn_momentum: float = 0.1
    train_subset: int | None = None
    test_subset: int | None = None
    subset_seed: int = 0
    augment: bool = True
    padding: int = 2
    nproc: int = 1  # syncbn only: processes, each with batch_size examples
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    eval_batch: int = 500
    train_eval_subset: int = 2000  # training images evaluated in eval mode (0: none)
    precise_bn_images: int = 2000  # training images for the precise-BN control (0: none)
    tag: str = ""  # names a variant of the protocol (ablations); part of the run name
    data_dir: str | None = None
    out: str | None = None  # directory for the JSON record
    progress: bool = True
    threads: int = 1

    def run_name(self) -> str:
        tag = f"_{self.tag}" if self.tag else ""
        return f"{self.norm}{tag}_bs{self.batch_size}_seed{self.seed}"


def resolve_protocol(cfg: TrainConfig, n_train: int) -> dict:
    """Every derived choice (lr, window, burn-in, BRN ramps, steps) for this run."""
    if cfg.norm not in NORM_KINDS:
        raise ValueError(f"unknown norm {cfg.norm!r}")
    nproc = cfg.nproc if cfg.norm == "syncbn" else 1
    global_batch = cfg.batch_size * nproc
    steps_per_epoch = n_train // global_batch
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.lr is not None:
        lr, lr_rule = cfg.lr, "explicit"
    else:
        lr = cfg.base_lr * global_batch / cfg.ref_batch
        lr_rule = f"linear: base_lr * global_batch / {cfg.ref_batch}"
        if lr < cfg.min_lr:
            lr, lr_rule = cfg.min_lr, lr_rule + f", floored at min_lr={cfg.min_lr}"
    window = cfg.window if cfg.window is not None else min(cfg.window_cap, max(1, cfg.ref_batch // cfg.batch_size))
    burnin = cfg.burnin if cfg.burnin is not None else int(round(cfg.burnin_fraction * total_steps))
    return {
        "nproc": nproc,
        "global_batch": global_batch,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "lr": lr,
        "lr_rule": lr_rule,
        "schedule": "cosine to 0 over total_steps, no warm-up",
        "window": window,
        "burnin": burnin,
        "brn_warmup_steps": burnin,
        "brn_rmax_ramp_steps": int(round(0.40 * total_steps)),
        "brn_dmax_ramp_steps": int(round(0.25 * total_steps)),
        "brn_rmax": 3.0,
        "brn_dmax": 5.0,
        "n_train": n_train,
    }


def make_model(cfg: TrainConfig, proto: dict) -> nn.Module:
    torch.manual_seed(cfg.seed)
    return build_model(
        cfg.model,
        cfg.norm,
        momentum=cfg.bn_momentum,
        gn_groups=cfg.gn_groups,
        window=proto["window"],
        burnin=proto["burnin"],
        rmax=proto["brn_rmax"],
        dmax=proto["brn_dmax"],
        warmup_steps=proto["brn_warmup_steps"],
        rmax_ramp_steps=proto["brn_rmax_ramp_steps"],
        dmax_ramp_steps=proto["brn_dmax_ramp_steps"],
    )


@torch.no_grad()
def evaluate(model: nn.Module, images, labels, batch_size: int = 500) -> tuple[float, float]:
    """(accuracy in %, mean loss) in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for x, y in eval_batches(images, labels, batch_size):
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train(was_training)
    return 100.0 * correct / len(labels), loss_sum / len(labels)


def has_running_stats(model: nn.Module) -> bool:
    from torch.nn.modules.batchnorm import _NormBase

    return any(isinstance(m, _NormBase) and m.track_running_stats for m in model.modules())


def precise_bn_accuracy(model: nn.Module, data: FashionMNIST, cfg: TrainConfig, train_eval_set) -> dict:
    """Test and eval-mode train accuracy of a copy of ``model`` with recomputed population statistics.

    The statistics come from the first ``precise_bn_images`` training images (unaugmented,
    normalized as for evaluation); ``model`` itself is left unchanged.
    """
    t0 = time.perf_counter()
    frozen = copy.deepcopy(model)
    images = normalize(data.train_images[: cfg.precise_bn_images])
    layers = recompute_population_statistics(frozen, images, cfg.eval_batch)
    test_acc = evaluate(frozen, data.test_images, data.test_labels, cfg.eval_batch)[0]
    train_acc = evaluate(frozen, *train_eval_set, cfg.eval_batch)[0] if cfg.train_eval_subset else float("nan")
    return {"test_acc": test_acc, "train_eval_acc": train_acc, "images": len(images), "layers": layers,
            "seconds": time.perf_counter() - t0}


def source_commit() -> str:
    """The git commit of the code that runs (``+dirty`` with uncommitted changes), or ``unknown``."""
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _train_worker(rank: int, cfg: TrainConfig, rendezvous: str | None, result_path: str | None) -> dict | None:
    """Training body; rank > 0 only exists for syncbn with nproc > 1."""
    torch.set_num_threads(cfg.threads)
    nproc = cfg.nproc if cfg.norm == "syncbn" else 1
    distributed = nproc > 1
    if distributed:
        import torch.distributed as dist
        from datetime import timedelta

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: much lower latency here
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=nproc,
                                timeout=timedelta(minutes=30))
    data = FashionMNIST.load(cfg.data_dir, cfg.train_subset, cfg.test_subset, cfg.subset_seed)
    proto = resolve_protocol(cfg, len(data.train_labels))
    model = make_model(cfg, proto)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=proto["lr"], momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    total = max(1, proto["total_steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    is_main = rank == 0
    record = {
        "name": cfg.run_name(),
        "config": asdict(cfg),
        "protocol": proto,
        "torch": torch.__version__,
        "commit": source_commit(),
        "epochs": [],
        "diverged": False,
    }
    show = cfg.progress and is_main
    train_eval_set = (data.train_images[: cfg.train_eval_subset], data.train_labels[: cfg.train_eval_subset])
    if show:
        from tqdm import tqdm
    step = 0
    train_time = 0.0
    model.train()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        batches = train_batches(
            data.train_images, data.train_labels, proto["global_batch"], cfg.seed, epoch,
            augmentation=cfg.augment, padding=cfg.padding,
        )
        if show:
            batches = tqdm(batches, total=proto["steps_per_epoch"], desc=f"{cfg.run_name()} ep {epoch + 1}/{cfg.epochs}",
                           leave=False, file=sys.stderr)
        for x, y in batches:
            if distributed:
                x = x[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
                y = y[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if distributed:  # data-parallel: average the gradients, one all-reduce
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat)
                flat.div_(nproc)
                offset = 0
                for g in grads:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == 1 and is_main and cfg.norm in ("naive", "cbn", "cbn-diff"):
                record["pairing"] = pairing_summary(pairing_report(model))
                print(f"[{cfg.run_name()}] pairing: {record['pairing']}", flush=True)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                record["diverged"] = True
                break
            loss_sum += loss_value * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        entry = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, seen),
            "train_acc": 100.0 * correct / max(1, seen),
            "train_seconds": epoch_time,
            "step_ms": 1000.0 * epoch_time / max(1, proto["steps_per_epoch"]),
        }
        last = epoch + 1 == cfg.epochs or record["diverged"]
        if is_main and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            t1 = time.perf_counter()
            acc, test_loss = evaluate(model, data.test_images, data.test_labels, cfg.eval_batch)
            entry.update(test_acc=acc, test_loss=test_loss)
            train_eval = ""
            if cfg.train_eval_subset:
                entry["train_eval_acc"] = evaluate(model, *train_eval_set, cfg.eval_batch)[0]
                train_eval = f"  train acc (eval mode) {entry['train_eval_acc']:.2f}"
            entry["eval_seconds"] = time.perf_counter() - t1
            print(
                f"[{cfg.run_name()}] epoch {epoch + 1}/{cfg.epochs}  train loss {entry['train_loss']:.4f}  "
                f"train acc {entry['train_acc']:.2f}{train_eval}  test acc {acc:.2f}  ({epoch_time:.1f}s)",
                flush=True,
            )
        record["epochs"].append(entry)
        if record["diverged"]:
            break
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    if not is_main:
        return None
    finals = [e for e in record["epochs"] if "test_acc" in e]
    record["test_acc"] = float("nan") if record["diverged"] else finals[-1]["test_acc"]
    record["train_eval_acc"] = float("nan") if record["diverged"] else finals[-1].get("train_eval_acc", float("nan"))
    if cfg.precise_bn_images and not record["diverged"] and has_running_stats(model):
        record["precise_bn"] = precise_bn_accuracy(model, data, cfg, train_eval_set)
    record["train_seconds"] = train_time
    record["steps"] = step
    if result_path:
        Path(result_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(result_path) + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=float))
        tmp.replace(result_path)  # atomic: a JSON present means a finished run
    return record


def _spawn_entry(rank: int, cfg: TrainConfig, rendezvous: str, result_path: str | None) -> None:
    _train_worker(rank, cfg, rendezvous, result_path)


def train(cfg: TrainConfig) -> dict:
    """Run one configuration; returns the JSON record (also written to ``cfg.out`` if set)."""
    result_path = str(Path(cfg.out) / f"{cfg.run_name()}.json") if cfg.out else None
    nproc = cfg.nproc if cfg.norm == "syncbn" else 1
    if nproc <= 1:
        return _train_worker(0, cfg, None, result_path)
    import tempfile
    import torch.multiprocessing as mp

    own_tmp = result_path is None
    if own_tmp:
        result_path = tempfile.mktemp(suffix=".json")
    with tempfile.TemporaryDirectory(prefix="cbn-syncbn-") as directory:
        # A rendezvous file, not a free port picked before the workers bind it (a race).
        rendezvous = os.path.join(directory, "rendezvous")
        mp.spawn(_spawn_entry, args=(cfg, rendezvous, result_path), nprocs=nproc, join=True)
    record = json.loads(Path(result_path).read_text())
    if own_tmp:
        os.unlink(result_path)
    return record


def main(argv: list[str] | None = None) -> int:
    """``python -m cbn.experiments.train CONFIG.json``: one run from a saved TrainConfig (sweep worker)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m cbn.experiments.train CONFIG.json", file=sys.stderr)
        return 2
    cfg = TrainConfig(**json.loads(Path(argv[0]).read_text()))
    record = train(cfg)
    print(json.dumps({"name": record["name"], "test_acc": record["test_acc"], "diverged": record["diverged"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
