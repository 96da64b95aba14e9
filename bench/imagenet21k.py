"""ImageNet-21k end to end: its WordNet tree, exact s_min, a dim-512 frame checked over every class pair, one epoch.

    python bench/imagenet21k.py IDS [--wordnet DIR] [--out bench/results/imagenet21k] [--work DIR] [--skip-train]

IDS is a class list of WordNet noun ids, one per line, in label order.  The ImageNet-21k list
(21,843 ids), the 12k and the MIIL lists ship inside the ``timm`` wheel, not in this repository
(their licence): ``pip download timm --no-deps``, unzip, ``timm/data/_info/imagenet21k_goog_synsets.txt``.

1. The tree: ``Hierarchy.from_wordnet`` under both parent rules (time, nodes, classes at inner
   nodes, synsets with several hypernyms), the exact s_min at gamma, and the written edge list read
   back with the same distance digest; then ``haframe hierarchy --wordnet-ids IDS --gamma G`` timed
   in a child process.
2. The frame: ``haframe frame --dim D`` on the written tree, timed in a child process; the saved
   frame is loaded and ``W W^T`` is formed block by block (upper triangle only, never K x K at once)
   for the largest cosine over all K (K - 1) / 2 pairs, its margin against the exact frame's.
3. One epoch of ``haframe train`` per method on the synthetic task (``--dataset synthetic``:
   inputs whose class geometry follows the tree), HierDist@5 and CRM side by side.

Writes ``<out>.json`` and ``<out>.md``; the tree, the frame and the runs go to ``--work`` (default a
temporary folder: they hold the ids, which stay out of the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def run_child(cmd: list, log: str) -> dict:
    """Run a command with its output in log; exit code, wall seconds and the child's peak RSS (GiB)."""
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        child = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    return {"rc": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - t0,
            "peak_rss_gib": usage.ru_maxrss / 2**20, "log": log}


def pair_cosine_max(weight, threshold: float, block: int = 2048) -> dict:
    """Largest cosine over every pair of rows of weight [K, d] (unit rows), and how many pairs exceed threshold.

    Upper-triangular blocks of W W^T, block rows at a time: O(block * K) memory.
    """
    import torch

    W = weight.float()
    K = W.shape[0]
    best, where, above = -2.0, (0, 0), 0
    for i in range(0, K, block):
        G = W[i:i + block] @ W[i:].T  # [b, K - i]: rows i.., columns i..
        b = G.shape[0]
        G[:, :b].masked_fill_(torch.ones(b, b, dtype=torch.bool).tril_(), -2.0)  # each pair once, no diagonal
        above += int((G > threshold).sum())
        m = float(G.max())
        if m > best:
            r, c = divmod(int(G.argmax()), G.shape[1])
            best, where = m, (i + r, i + c)
    return {"max_cos": best, "pair": where, "pairs_above": above, "threshold": threshold,
            "pairs": K * (K - 1) // 2}


def tree_part(args, work: str) -> tuple[dict, str, str]:
    """Build and describe the tree; write its edges and classes; time the ``haframe hierarchy`` CLI."""
    from haframe_ext.hierarchy import Hierarchy
    from haframe_ext.hierarchy.wordnet import PARENT_RULES

    out = {}
    for rule in PARENT_RULES:
        t0 = time.perf_counter()
        h = Hierarchy.from_wordnet(args.ids, args.wordnet, parent=rule)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        s_min = h.tree.exact_s_min(args.gamma)
        out[rule] = {"build_seconds": built, "s_min_seconds": time.perf_counter() - t0, "s_min": s_min,
                     "classes": h.num_classes, "nodes": len(h.nodes), "D": h.max_depth,
                     "inner_classes": len(h.inner_classes), **h.wordnet_info}
        if rule == PARENT_RULES[0]:
            kept = h
        print(json.dumps({"tree": rule, **out[rule]}), flush=True)
    edges, classes = os.path.join(work, "tree.tsv"), os.path.join(work, "classes.txt")
    kept.to_edges(edges)
    kept.to_classes(classes)
    back = Hierarchy.from_edges(edges, classes)
    out["written_digest_equal"] = back.distance_digest() == kept.distance_digest()
    cmd = [sys.executable, "-m", "haframe_ext.cli", "hierarchy", "--wordnet-ids", args.ids, "--gamma", str(args.gamma)]
    if args.wordnet:
        cmd += ["--wordnet", args.wordnet]
    out["cli"] = run_child(cmd, os.path.join(work, "hierarchy.log"))
    print(json.dumps({"written_digest_equal": out["written_digest_equal"], "cli": out["cli"]}), flush=True)
    return out, edges, classes


def frame_part(args, work: str, edges: str, classes: str) -> dict:
    """Time ``haframe frame --dim`` on the tree, then check the saved frame over every class pair."""
    from haframe_ext.frame import HAFrame

    path = os.path.join(work, "frame.pt")
    cmd = [sys.executable, "-m", "haframe_ext.cli", "frame", "--hierarchy", edges, "--classes", classes,
           "--gamma", str(args.gamma), "--dim", str(args.dim), "--seed", "0", "--out", path]
    out = {"cli": run_child(cmd, os.path.join(work, "frame.log"))}
    if out["cli"]["rc"] != 0:
        return out
    frame = HAFrame.load(path)
    diag = frame.approximation or {}  # margins and Gram errors over the tree-neighbour and random pairs
    t0 = time.perf_counter()
    pairs = pair_cosine_max(frame.weight, args.threshold)
    pairs["seconds"] = time.perf_counter() - t0
    out.update(pairs=pairs, margin_all_pairs=1.0 - pairs["max_cos"], exact_margin=diag.get("exact_margin"),
               sampled_margin=diag.get("margin"), gram_error_mean=diag.get("gram_error_mean"))
    print(json.dumps({"frame": out}), flush=True)
    return out


def train_part(args, work: str, edges: str, classes: str) -> list:
    """One epoch of ``haframe train`` per method; each run's test metrics, with and without CRM."""
    rows = []
    for method in args.methods:
        out = os.path.join(work, method)
        cmd = [sys.executable, "-m", "haframe_ext.cli", "train", "--hierarchy", edges, "--classes", classes,
               "--method", method, "--dataset", "synthetic", "--feature-dim", str(args.dim),
               "--n-per-class", str(args.n_per_class), "--eval-samples", str(args.eval_samples),
               "--input-dim", "64", "--hidden", "512", "--epochs", "1", "--batch-size", "256",
               "--eval-batch-size", "512", "--lr", "0.1", "--gamma", str(args.gamma), "--no-progress",
               "--no-tensorboard", "--overwrite", "--out", out]
        row = {"method": method, **run_child(cmd, out + ".log")}
        if row["rc"] == 0:
            with open(os.path.join(out, "results.json"), encoding="utf-8") as fh:
                res = json.load(fh)
            row.update(test=res["test"], test_crm=res["test_crm"])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(summary: dict) -> list[str]:
    """The tables of <out>.md."""
    lines = ["| parent rule | build (s) | nodes | D | classes at inner nodes | several hypernyms | s_min (exact) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for rule, t in summary["tree"].items():
        if isinstance(t, dict) and "nodes" in t:
            lines.append(f"| {rule} | {t['build_seconds']:.1f} | {t['nodes']} | {t['D']} | {t['inner_classes']} | "
                         f"{t['several_hypernyms']} of {t['synsets']} | {t['s_min']:.6f} |")
    f = summary.get("frame", {})
    if "pairs" in f:
        p = f["pairs"]
        lines += ["", "| frame CLI (s) | max cos, all pairs | pairs > {:.2f} | margin, all pairs | exact margin | "
                  "sampled margin |".format(p["threshold"]), "|---:|---:|---:|---:|---:|---:|",
                  f"| {f['cli']['seconds']:.1f} | {p['max_cos']:.4f} | {p['pairs_above']} of {p['pairs']} | "
                  f"{f['margin_all_pairs']:.4f} | {f['exact_margin']:.4f} | {f['sampled_margin']:.4f} |"]
    if summary.get("train"):
        lines += ["", "| method | wall (s) | peak RSS (GiB) | top1 (%) | mistake severity | HierDist@5 "
                  "| CRM top1 (%) | CRM HierDist@5 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in summary["train"]:
            if r["rc"] != 0:
                lines.append(f"| {r['method']} | failed (rc {r['rc']}, see {r['log']}) |")
                continue
            t, c = r["test"], r["test_crm"]
            lines.append(f"| {r['method']} | {r['seconds']:.0f} | {r['peak_rss_gib']:.2f} | {t['top1']:.3f} | "
                         f"{t['mistake_severity']:.3f} | {t['hierdist@5']:.3f} | {c['top1']:.3f} | "
                         f"{c['hierdist@5']:.3f} |")
    return lines


def main(argv=None) -> int:
    """Run the three parts and write <out>.json and <out>.md."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ids", help="WordNet id list, one per line (e.g. timm's imagenet21k_goog_synsets.txt)")
    p.add_argument("--wordnet", default=None, help="folder holding WordNet's data.noun (default: searched)")
    p.add_argument("--gamma", type=float, default=3.0, help="kernel sharpness gamma")
    p.add_argument("--dim", type=int, default=512, help="frame and feature dimension")
    p.add_argument("--threshold", type=float, default=0.97, help="count the class pairs above this cosine")
    p.add_argument("--methods", nargs="+", default=["cross-entropy", "haframe", "hxe", "soft-labels"],
                   help="methods to train one epoch each")
    p.add_argument("--n-per-class", type=int, default=1, help="training samples per class")
    p.add_argument("--eval-samples", type=int, default=5000, help="validation and test samples each")
    p.add_argument("--skip-train", action="store_true", help="only the tree and the frame")
    p.add_argument("--out", default="bench/results/imagenet21k", help="output prefix (.json, .md)")
    p.add_argument("--work", default=None, help="folder for the tree, the frame and the runs (default: a new "
                                                "temporary folder, so nothing holding the ids lands in the repository)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.ids):
        p.error(f"id list not found: {args.ids} (timm ships it: timm/data/_info/imagenet21k_goog_synsets.txt)")

    work = args.work or tempfile.mkdtemp(prefix="imagenet21k_")
    os.makedirs(work, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    summary = {"ids": os.path.basename(args.ids), "commit": commit, "gamma": args.gamma, "dim": args.dim,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    summary["tree"], edges, classes = tree_part(args, work)
    summary["frame"] = frame_part(args, work, edges, classes)
    if not args.skip_train:
        summary["train_samples"] = args.n_per_class * summary["tree"]["first"]["classes"]
        summary["eval_samples"] = args.eval_samples
        summary["train"] = train_part(args, work, edges, classes)
    with open(args.out + ".json", "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    lines = markdown(summary)
    with open(args.out + ".md", "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["rc"] == 0 for r in summary.get("train", [])) else 1


if __name__ == "__main__":
    sys.exit(main())
