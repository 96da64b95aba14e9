"""Figures: a frame's target and realised similarity (``haframe frame --plot``) and the demo's summary figure."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np

from ..files import atomic_write

__all__ = ["MATPLOTLIB_MISSING", "matplotlib_available", "tree_order", "plot_frame", "demo_figure", "severity_figure"]

MATPLOTLIB_MISSING = "matplotlib is not installed (pip install matplotlib)"


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (checked without importing it, so a caller can refuse early)."""
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (figures go to files only)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def tree_order(distances) -> np.ndarray:
    """A class order that puts classes close in the hierarchy next to each other (for heatmaps)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    d = np.asarray(distances, dtype=np.float64)
    if d.shape[0] < 3:
        return np.arange(d.shape[0])
    return leaves_list(linkage(squareform(d, checks=False), method="average"))


def plot_frame(frame, path: Path, label: str) -> None:
    """Write a PNG of the frame's target similarity S, its realised W W^T and their difference, in tree order."""
    plt = _pyplot()
    S = frame.similarity.double().cpu().numpy()
    W = frame.weight.double().cpu().numpy()
    R = W @ W.T
    order = tree_order(1.0 - S)  # similar classes next to each other
    S, R = S[np.ix_(order, order)], R[np.ix_(order, order)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    # antialiased: with more classes than pixels, "nearest" would drop rows (the diagonal flickers in and
    # out between panels); averaging shows the same picture for S and W W^T
    vmin, vmax = min(S.min(), R.min()), 1.0
    for ax, M, title in ((axes[0], S, "target similarity S"), (axes[1], R, "realised W W^T")):
        im = ax.imshow(M, vmin=vmin, vmax=vmax, cmap="viridis", interpolation="antialiased")
        ax.set_title(title)
        ax.set_xlabel("class (tree order)")
        ax.set_ylabel("class (tree order)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    im = axes[2].imshow(np.abs(R - S), cmap="magma", interpolation="antialiased")
    axes[2].set_title(f"|W W^T - S| (max {np.abs(R - S).max():.2e})")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    fig.suptitle(f"HAFrame: {label}, K={frame.num_classes}, dim={frame.dim}, s_min={frame.s_min:.4f}")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=90, format="png"))  # a full disk keeps the old file
    plt.close(fig)


def demo_figure(results: Dict[str, Dict[str, Any]], S: np.ndarray, path: Path, columns: Sequence[str],
                data: str) -> None:
    """Write the demo's PNG titled with ``data``: top-1 and the other ``columns`` per method, and the frame's S."""
    plt = _pyplot()
    methods = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), gridspec_kw={"width_ratios": [1, 2.2, 1.5]})
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    ax = axes[0]
    bars = ax.bar(range(len(methods)), [results[m]["top1"] for m in methods],
                  color=[colors[i % len(colors)] for i in range(len(methods))])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("top-1 (higher is better)")
    ax = axes[1]
    cols = [c for c in columns if c != "top1"]
    w = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        bars = ax.bar(np.arange(len(cols)) + (i - (len(methods) - 1) / 2) * w,
                      [results[m].get(c, np.nan) for c in cols], w, label=m, color=colors[i % len(colors)])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("hierarchical distance")
    ax.set_title("mistake severity and HierDist@k (lower is better)")
    ax.legend()
    ax = axes[2]
    order = tree_order(1.0 - S)
    im = ax.imshow(S[np.ix_(order, order)], cmap="viridis", interpolation="antialiased")
    ax.set_title("HAFrame similarity S (CIFAR-100 tree)")
    ax.set_xlabel("class (tree order)")
    ax.set_ylabel("class (tree order)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"Test metrics on {data}")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=90, format="png"))  # a full disk keeps the old file
    plt.close(fig)


def severity_figure(rows: Dict[str, Dict[str, Any]], path: Path, title: str) -> None:
    """Write a PNG of each method's top-1 mistakes per LCA height (``severity_histogram``), bars side by side."""
    plt = _pyplot()
    rows = {m: r["severity_histogram"] for m, r in rows.items() if r and r.get("severity_histogram") is not None}
    if not rows:
        raise ValueError("no severity_histogram to plot: it needs integer distances (a tree, or an integer matrix)")
    heights = max(len(h) for h in rows.values())
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * heights * len(rows) + 2), 4.5))
    w = 0.8 / len(rows)
    for i, (m, hist) in enumerate(rows.items()):
        x = np.arange(1, len(hist) + 1) + (i - (len(rows) - 1) / 2) * w
        ax.bar_label(ax.bar(x, hist, w, label=m), fontsize=7)
    ax.set_xticks(range(1, heights + 1))
    ax.set_xlabel("LCA height of the mistake (distance to the label)")
    ax.set_ylabel("top-1 mistakes")
    ax.set_title(f"Mistakes by severity, {title}")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=90, format="png"))  # a full disk keeps the old file
    plt.close(fig)
