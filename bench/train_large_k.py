"""Training at 10^5 classes on CPU: `haframe train` for HAFrame and cross-entropy on a large random taxonomy.

    python bench/train_large_k.py --classes 100000 --out bench/results/train_large_k

Writes the taxonomy as an edge-list file (``Hierarchy.random``: unbalanced, seeded), then runs
``haframe train`` once per method in a child process (wall time and peak RSS of that process),
one epoch over ``n_per_class * K`` synthetic samples, and collects each run's results.json into
``<out>.json`` and a markdown table ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _run(cmd: list, log: str) -> dict:
    """Run a command; its exit code, wall time and peak RSS (that child's own rusage, from wait4)."""
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        child = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    return {"rc": os.waitstatus_to_exitcode(status), "seconds": wall, "peak_rss_gib": usage.ru_maxrss / 2**20,
            "log": log}


def main(argv=None) -> int:
    """Write the tree, train each method, write the JSON and markdown summaries."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=100_000, help="number of classes K")
    p.add_argument("--dim", type=int, default=512, help="feature and frame dimension")
    p.add_argument("--n-per-class", type=int, default=1, help="training samples per class (one epoch)")
    p.add_argument("--eval-samples", type=int, default=10_000, help="validation and test samples each")
    p.add_argument("--methods", nargs="+", default=["haframe", "cross-entropy"], help="methods to train")
    p.add_argument("--batch-size", type=int, default=256, help="training batch size")
    p.add_argument("--out", default="bench/results/train_large_k", help="output prefix (.json, .md, runs)")
    args = p.parse_args(argv)

    from haframe_ext.hierarchy import Hierarchy

    work = args.out + "_runs"
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    h = Hierarchy.random(args.classes, seed=0)
    edges, classes = os.path.join(work, "tree.tsv"), os.path.join(work, "classes.txt")
    h.to_edges(edges)
    h.to_classes(classes)
    tree_s = time.perf_counter() - t0
    rows = []
    for method in args.methods:
        out = os.path.join(work, method)
        cmd = [sys.executable, "-m", "haframe_ext.cli", "train", "--hierarchy", edges, "--classes", classes,
               "--method", method, "--dataset", "synthetic", "--feature-dim", str(args.dim),
               "--n-per-class", str(args.n_per_class), "--eval-samples", str(args.eval_samples),
               "--input-dim", "64", "--hidden", "512", "--epochs", "1", "--batch-size", str(args.batch_size),
               "--eval-batch-size", "512", "--lr", "0.1", "--no-progress", "--no-tensorboard",
               "--overwrite", "--out", out]
        row = {"method": method, **_run(cmd, out + ".log")}
        if row["rc"] == 0:
            with open(os.path.join(out, "results.json"), encoding="utf-8") as fh:
                res = json.load(fh)
            row.update(test=res["test"], test_crm=res["test_crm"], frame=res.get("frame"),
                       train_seconds=res["seconds"])
        print(json.dumps(row), flush=True)
        rows.append(row)
    summary = {"K": args.classes, "nodes": len(h.nodes), "leaf_depths": [min(h.depth(c) for c in h.classes),
                                                                         h.max_depth],
               "tree_seconds": tree_s, "dim": args.dim, "train_samples": args.n_per_class * args.classes,
               "eval_samples": args.eval_samples, "runs": rows}
    with open(args.out + ".json", "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    lines = ["| method | wall (s) | peak RSS (GiB) | top1 | mistake severity | HierDist@1 | HierDist@5 | HierDist@20 "
             "| CRM HierDist@5 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["rc"] != 0:
            lines.append(f"| {r['method']} | failed (rc {r['rc']}, see {r['log']}) |")
            continue
        t, c = r["test"], r["test_crm"]
        lines.append(f"| {r['method']} | {r['seconds']:.0f} | {r['peak_rss_gib']:.2f} | {t['top1']:.2f} | "
                     f"{t['mistake_severity']:.3f} | {t['hierdist@1']:.3f} | {t['hierdist@5']:.3f} | "
                     f"{t['hierdist@20']:.3f} | {c['hierdist@5']:.3f} |")
    with open(args.out + ".md", "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
