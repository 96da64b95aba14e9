"""Frame construction against K: wall time and peak RSS of the tree path and the dense path, one child process per
point.

    python bench/frame_scaling.py --out bench/results/frame_scaling     # writes .csv, .json and .png

Every point runs in a fresh process (peak RSS = that process's ru_maxrss), on a seeded random
unbalanced tree (``Hierarchy.random``).  The tree path is ``HAFrame.from_hierarchy(h, gamma,
dim, approximate=True)`` (O(nodes) s_min, Gaussian projection of the exact sparse factor); the
dense path is ``HAFrame.from_distances(h.distances(), ...)`` (K x K distances, Cholesky s_min,
eigh), run while it fits in --dense-max-k.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time


def _point(path: str, K: int, dim: int, gamma: float) -> dict:
    """Build one frame in this process and report its timings, quality and peak RSS."""
    import torch

    from haframe_ext.frame import HAFrame
    from haframe_ext.hierarchy import Hierarchy

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    t0 = time.perf_counter()
    h = Hierarchy.random(K, seed=0)
    t1 = time.perf_counter()
    s_min = h.tree.exact_s_min(gamma) if path == "tree" else None
    t2 = time.perf_counter()
    if path == "tree":
        frame = HAFrame.from_hierarchy(h, gamma, dim=dim, approximate=True)
    else:
        frame = HAFrame.from_distances(h.distances(), gamma, dim=dim, approximate=True)
    t3 = time.perf_counter()
    a = frame.approximation or {}
    return {
        "path": path, "K": K, "nodes": len(h.nodes), "max_depth": h.max_depth,
        "min_leaf_depth": min(h.depth(c) for c in h.classes[:1000]), "dim": dim, "gamma": gamma,
        "hierarchy_s": t1 - t0, "s_min_s": (t2 - t1) if s_min is not None else None,
        "frame_s": t3 - t2, "s_min": frame.s_min,
        "margin": a.get("margin"), "exact_margin": a.get("exact_margin"),
        "margin_ratio": (a["margin"] / a["exact_margin"]) if a else None,
        "gram_error_mean": a.get("gram_error_mean"), "gram_error_max": a.get("gram_error_max"),
        "pairs": a.get("pairs"),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def _run(path: str, K: int, dim: int, gamma: float, timeout: float) -> dict:
    """One point in a child process (a fresh peak RSS); a failure or timeout is recorded, not raised."""
    cmd = [sys.executable, __file__, "--child", path, str(K), str(dim), str(gamma)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"path": path, "K": K, "dim": dim, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"path": path, "K": K, "dim": dim, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _plot(rows: list, png: str) -> None:
    """Time and peak RSS against K, log-log, one line per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for path, style in (("tree", "o-"), ("dense", "s--")):
        pts = [r for r in rows if r["path"] == path and "error" not in r]
        if not pts:
            continue
        K = [r["K"] for r in pts]
        axes[0].loglog(K, [r["hierarchy_s"] + r["frame_s"] + (r["s_min_s"] or 0) for r in pts], style,
                       label=f"{path} path")
        axes[1].loglog(K, [r["peak_rss_gib"] for r in pts], style, label=f"{path} path")
    axes[0].set(xlabel="classes K", ylabel="seconds (tree + s_min + frame)", title="frame construction time")
    axes[1].set(xlabel="classes K", ylabel="peak RSS (GiB)", title="peak memory")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("HAFrame construction, random unbalanced trees, approximate frames (Gaussian projection)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> int:
    """Run the sweep and write the CSV, JSON and plot."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=4, metavar=("PATH", "K", "DIM", "GAMMA"), help=argparse.SUPPRESS)
    p.add_argument("--ks", type=int, nargs="+", default=[1000, 4000, 10_000, 100_000, 1_000_000],
                   help="class counts of the tree path")
    p.add_argument("--dense-ks", type=int, nargs="+", default=[1000, 2000, 4000],
                   help="class counts of the dense path (it grows as K^3 in time and K^2 in memory)")
    p.add_argument("--dim", type=int, default=512, help="frame dimension (K = 10^6 uses --dim-1m)")
    p.add_argument("--dim-1m", type=int, default=256, help="frame dimension at K >= 10^6")
    p.add_argument("--gamma", type=float, default=3.0, help="gamma of the frame")
    p.add_argument("--timeout", type=float, default=900, help="seconds per point before it is recorded as timed out")
    p.add_argument("--out", default="bench/results/frame_scaling", help="output prefix (.csv, .json, .png)")
    args = p.parse_args(argv)
    if args.child:
        path, K, dim, gamma = args.child
        print(json.dumps(_point(path, int(K), int(dim), float(gamma))))
        return 0
    rows = []
    for path, ks in (("tree", args.ks), ("dense", args.dense_ks)):
        for K in ks:
            dim = args.dim_1m if K >= 1_000_000 else args.dim
            row = _run(path, K, min(dim, K - 1), args.gamma, args.timeout)
            print(json.dumps(row), flush=True)
            rows.append(row)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as fh:
        json.dump(rows, fh, indent=1)
    keys = sorted({k for r in rows for k in r})
    with open(args.out + ".csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    _plot(rows, args.out + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
