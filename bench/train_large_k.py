"""Training at large K on CPU: `haframe train` per method and seed on a large taxonomy, side by side.

    python bench/train_large_k.py --classes 100000 --out bench/results/train_large_k
    python bench/train_large_k.py --taxonomy wordnet:artifact --dim 256 --epochs 3 --n-per-class 12 \
        --eval-per-class 12 --gamma 3 --seeds 0 1 2 --out bench/results/artifact

Writes the taxonomy as an edge-list file (``Hierarchy.random``: unbalanced, seeded; or ``wordnet:NAME``, every
leaf synset under a WordNet noun, from wordnet-base), then runs ``haframe train`` once per method and seed in a
child process (wall time and peak RSS of that process) over ``n_per_class * K`` synthetic samples per epoch, and
collects each run's results.json into ``<out>.json`` and a markdown table ``<out>.md`` (per run, then the mean
and 95% CI over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORDNET_ROOTS = {"artifact": 21939, "animal": 15388}  # WordNet 3.0 noun offsets of artifact.n.01, animal.n.01


def wordnet_subtree(name: str):
    """The Hierarchy of every leaf synset under a WordNet noun (first hypernyms; leaves: synsets no synset names)."""
    from haframe_ext.hierarchy import Hierarchy
    from haframe_ext.hierarchy.wordnet import read_synsets

    syn = read_synsets()
    parent = {off: next(iter(syn.get(off)[1]), None) for off in syn.lines}  # the first listed hypernym
    inner = {p for p in parent.values() if p is not None}
    top = WORDNET_ROOTS[name]

    def under(o):
        while o is not None and o != top:
            o = parent[o]
        return o == top

    return Hierarchy.from_wordnet([f"n{o:08d}" for o in sorted(parent) if o not in inner and under(o)])


def mean_ci(values):
    """(mean, half-width of the 95% t interval) of a list of floats."""
    from scipy import stats

    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    sd = (sum((v - m) ** 2 for v in values) / (n - 1)) ** 0.5
    return m, float(stats.t.ppf(0.975, n - 1) * sd / n ** 0.5)


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
    p.add_argument("--classes", type=int, default=100_000, help="number of classes K of the random taxonomy")
    p.add_argument("--taxonomy", default="random", help="random (Hierarchy.random(--classes)) or wordnet:NAME "
                                                         f"({', '.join(WORDNET_ROOTS)})")
    p.add_argument("--dim", type=int, default=512, help="feature and frame dimension")
    p.add_argument("--n-per-class", type=int, default=1, help="training samples per class (one epoch)")
    p.add_argument("--eval-samples", type=int, default=10_000, help="validation and test samples each")
    p.add_argument("--eval-per-class", type=int, default=None, help="instead of --eval-samples: this many per class")
    p.add_argument("--epochs", type=int, default=1, help="epochs per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (one run per method and seed)")
    p.add_argument("--gamma", type=float, default=2.0, help="frame gamma")
    p.add_argument("--difficulty", type=float, default=1.0, help="synthetic task difficulty")
    p.add_argument("--extra", nargs="*", default=[], help="more haframe train flags, e.g. --extra=--cosine-scale=sum")
    p.add_argument("--methods", nargs="+", default=["haframe", "cross-entropy"], help="methods to train")
    p.add_argument("--batch-size", type=int, default=256, help="training batch size")
    p.add_argument("--out", default="bench/results/train_large_k", help="output prefix (.json, .md, runs)")
    args = p.parse_args(argv)

    from haframe_ext.hierarchy import Hierarchy

    work = args.out + "_runs"
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    h = (wordnet_subtree(args.taxonomy.split(":", 1)[1]) if args.taxonomy.startswith("wordnet:")
         else Hierarchy.random(args.classes, seed=0))
    edges, classes = os.path.join(work, "tree.tsv"), os.path.join(work, "classes.txt")
    h.to_edges(edges)
    h.to_classes(classes)
    tree_s = time.perf_counter() - t0
    evals = (["--eval-per-class", str(args.eval_per_class)] if args.eval_per_class
             else ["--eval-samples", str(args.eval_samples)])
    rows = []
    for method in args.methods:
        for seed in args.seeds:
            out = os.path.join(work, f"{method}_seed{seed}")
            cmd = [sys.executable, "-m", "haframe_ext.cli", "train", "--hierarchy", edges, "--classes", classes,
                   "--method", method, "--dataset", "synthetic", "--feature-dim", str(args.dim),
                   "--n-per-class", str(args.n_per_class), *evals, "--input-dim", "64", "--hidden", "512",
                   "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--eval-batch-size", "512",
                   "--lr", "0.1", "--gamma", str(args.gamma), "--difficulty", str(args.difficulty), "--seed", str(seed),
                   "--no-progress", "--no-tensorboard", "--overwrite", "--out", out, *args.extra]
            row = {"method": method, "seed": seed, **_run(cmd, out + ".log")}
            if row["rc"] == 0:
                with open(os.path.join(out, "results.json"), encoding="utf-8") as fh:
                    res = json.load(fh)
                row.update(test=res["test"], test_crm=res["test_crm"], frame=res.get("frame"),
                           train_seconds=res["seconds"])
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {"K": h.num_classes, "taxonomy": args.taxonomy, "epochs": args.epochs, "gamma": args.gamma,
               "extra": args.extra, "nodes": len(h.nodes), "leaf_depths": [min(h.depth(c) for c in h.classes),
                                                                         h.max_depth],
               "tree_seconds": tree_s, "dim": args.dim, "train_samples": args.n_per_class * h.num_classes,
               "eval_samples": args.eval_samples, "runs": rows}
    with open(args.out + ".json", "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    lines = ["| method | seed | wall (s) | peak RSS (GiB) | top1 | mistake severity | HierDist@1 | HierDist@5 "
             "| HierDist@20 | CRM HierDist@5 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["rc"] != 0:
            lines.append(f"| {r['method']} | {r['seed']} | failed (rc {r['rc']}, see {r['log']}) |")
            continue
        t, c = r["test"], r["test_crm"]
        lines.append(f"| {r['method']} | {r['seed']} | {r['seconds']:.0f} | {r['peak_rss_gib']:.2f} | "
                     f"{t['top1']:.2f} | {t['mistake_severity']:.3f} | {t['hierdist@1']:.3f} | {t['hierdist@5']:.3f} | "
                     f"{t['hierdist@20']:.3f} | {c['hierdist@5']:.3f} |")
    keys = ("top1", "mistake_severity", "hierdist@1", "hierdist@5", "hierdist@20")
    lines += ["", "| method (mean +/- 95% CI over seeds) | " + " | ".join(keys) + " | CRM HierDist@5 |",
              "|---|" + "---:|" * (len(keys) + 1)]
    for method in args.methods:
        ok = [r for r in rows if r["method"] == method and r["rc"] == 0]
        if not ok:
            continue
        cells = [mean_ci([r["test"][k] for r in ok]) for k in keys]
        cells.append(mean_ci([r["test_crm"]["hierdist@5"] for r in ok]))
        lines.append(f"| {method} (n={len(ok)}) | " + " | ".join(f"{m:.3f} +/- {c:.3f}" for m, c in cells) + " |")
    with open(args.out + ".md", "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
