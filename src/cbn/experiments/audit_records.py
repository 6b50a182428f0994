"""Is every per-seed figure of a committed summary backed by a committed run record? (issue 28, item 6)

For each summary under ``docs/data`` (``summary.json`` of the dense and fine-tuning studies,
``results.json`` of the differentiable study, ``summary.json`` of the issue-9 grid, the detector
studies' ``summary.json``), every cell's per-seed value is looked up in the run records of the
summary's own ``runs/`` folder (same method, batch size and seed), the values compared, and the
record's commit checked to be a commit of this repository's history (``git cat-file -e``).

    python -m cbn.experiments.audit_records              # prints the table, exit 1 if a figure is unbacked
    python -m cbn.experiments.audit_records --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

SUMMARIES = (
    ("docs/data/evidence/summary.json", "test_acc"),
    ("docs/data/differentiable/results.json", "test_acc"),
    ("docs/data/dense/summary.json", "test_miou"),
    ("docs/data/finetune/summary.json", "test_miou"),
    ("docs/data/finetune/reference-long/summary.json", "test_miou"),
    ("docs/data/finetune/reference-32k/summary.json", "test_miou"),
    ("docs/data/finetune/budget-32k/summary.json", "test_miou"),
    ("docs/data/finetune/budget-32k-no-photometry/summary.json", "test_miou"),
    ("docs/data/detector-finetune/summary.json", "test_map"),
)


def _commit_known(commit: str | None, root: Path, cache: dict) -> bool:
    if not commit:
        return False
    commit = commit.replace("+dirty", "")
    if commit not in cache:
        cache[commit] = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=root,
                                       capture_output=True).returncode == 0
    return cache[commit]


def _records(runs: Path) -> dict:
    """(method, batch, seed) -> record, from the records' own config."""
    out = {}
    for path in sorted(runs.glob("*.json")) if runs.is_dir() else []:
        r = json.loads(path.read_text())
        cfg = r.get("config", {})
        method = r.get("variant") or cfg.get("method") or r["name"].rsplit("_bs", 1)[0]
        batch = cfg.get("batch_size", cfg.get("batch"))
        out[(method, batch, cfg.get("seed"))] = r
    return out


def audit(root: str | Path = ".") -> list[dict]:
    """One row per summary cell: seeds, how many are backed, the unbacked seeds and why."""
    root = Path(root)
    cache: dict = {}
    rows = []
    for rel, key in SUMMARIES:
        path = root / rel
        if not path.exists():
            continue
        summary = json.loads(path.read_text())
        records = _records(path.parent / "runs")
        for cell in summary.get("cells", []):
            method = cell.get("method") or cell.get("variant")
            batch = cell.get("batch_size", 2 if "detector" in rel else None)
            values = cell.get(key)
            if isinstance(values, dict) and "per_seed" in values:
                values = values["per_seed"]
            problems, backed = [], 0
            for seed, value in (values or {}).items():
                precise = method.endswith("+precise")  # BN runs evaluated with recomputed statistics
                r = records.get((method.removesuffix("+precise"), batch, int(seed)))
                if r is None:
                    problems.append(f"seed {seed}: no record")
                    continue
                mine = (r.get("precise_bn") or {}).get(key) if precise else r.get(key)
                scale = 100 if key == "test_map" and value > 1 else 1
                if mine is None or abs(scale * mine - value) > 1e-6:
                    problems.append(f"seed {seed}: record has {mine}, summary {value}")
                elif not _commit_known(r.get("commit"), root, cache):
                    problems.append(f"seed {seed}: commit {r.get('commit')} not in history")
                else:
                    backed += 1
            rows.append({"summary": rel, "method": method, "batch": batch, "seeds": len(values or {}),
                         "backed": backed, "problems": problems})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbn.experiments.audit_records", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = audit(args.root)
    for r in rows:
        status = "ok" if not r["problems"] else "; ".join(r["problems"][:3]) + (" ..." if len(r["problems"]) > 3 else "")
        print(f"{r['summary']:<50} {r['method']:<22} bs {str(r['batch']):>3}: {r['backed']}/{r['seeds']} backed  {status}")
    by_file: dict = {}
    for r in rows:
        f = by_file.setdefault(r["summary"], [0, 0])
        f[0] += r["backed"]
        f[1] += r["seeds"]
    print("\n".join(f"{k}: {b} of {n} per-seed figures backed by a record" for k, (b, n) in by_file.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "files": by_file}, indent=1) + "\n")
    return 0 if all(not r["problems"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
