"""The no-download demo: train a few methods on the synthetic CIFAR-100-hierarchy task, print a table, plot it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from .models import check_method
from .train import TrainConfig, _clean, _distances_for, _json_default, load_hierarchy, train

__all__ = ["DEMO_METHODS", "DEMO_COLUMNS", "demo_config", "demo", "tree_order"]

DEMO_METHODS = ("cross-entropy", "haframe", "etf")
DEMO_COLUMNS = ("top1", "mistake_severity", "hierdist@1", "hierdist@5", "hierdist@20")


def demo_config(method: str, out, epochs: int = 30, seed: int = 0, **overrides) -> TrainConfig:
    """The demo's configuration for one method: synthetic data on the CIFAR-100 hierarchy, MLP backbone."""
    base = dict(out=str(Path(out) / method), method=method, dataset="synthetic", hierarchy="cifar100",
                backbone="mlp", hidden=256, depth=2, input_dim=64, n_per_class=60, eval_per_class=30,
                difficulty=1.0, gamma=2.0, alpha=0.4, epochs=epochs, batch_size=128, eval_batch_size=1024,
                lr=0.05, weight_decay=5e-4, seed=seed, progress=False, tensorboard=False,
                overwrite=True)  # the demo always starts over in its folder
    base.update(overrides)
    return TrainConfig.from_dict(base)


def _demo_table(results: Dict[str, Dict[str, Any]]) -> str:
    head = "method".ljust(16) + "".join(c.rjust(18) for c in DEMO_COLUMNS) + "seconds".rjust(10)
    lines = [head, "-" * len(head)]
    for m, r in results.items():
        lines.append(m.ljust(16) + "".join(f"{float(r.get(c, float('nan'))):18.4f}" for c in DEMO_COLUMNS)
                     + f"{r.get('seconds', 0.0):10.1f}")
    return "\n".join(lines)


def demo(out="haframe-demo", epochs: int = 30, seed: int = 0, methods: Sequence[str] = DEMO_METHODS, *,
         plot: bool = True, verbose: bool = True, progress: bool = False, threads: Optional[int] = 1,
         **overrides) -> Dict[str, Dict[str, Any]]:
    """Train the demo's methods on the synthetic CIFAR-100-hierarchy task; print a table, write
    ``<out>/results.json`` (method -> test metrics plus ``seconds``; CRM variants under
    ``"<method>+crm"`` in ``results_crm.json``) and ``<out>/demo.png``. ``overrides`` go to
    :func:`demo_config` (e.g. ``n_per_class``, ``difficulty``, ``hidden``).

    ``threads``: torch intra-op threads during the demo (restored afterwards). One thread is as
    fast as two for these small MLPs and far more robust when other processes share the CPUs.
    """
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _demo(out, epochs, seed, methods, plot, verbose, progress, **overrides)
    finally:
        torch.set_num_threads(prev_threads)


def _demo(out, epochs, seed, methods, plot, verbose, progress, **overrides):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for m in methods:
        check_method(m)
    results: Dict[str, Dict[str, Any]] = {}
    crm: Dict[str, Dict[str, Any]] = {}
    frame_S = None
    for m in methods:
        cfg = demo_config(m, out, epochs, seed, progress=progress, **overrides)
        t0 = time.perf_counter()
        r = train(cfg)
        secs = time.perf_counter() - t0
        results[m] = dict(r["test"], seconds=secs)
        if r.get("test_crm"):
            crm[m] = r["test_crm"]
        if m == "haframe" and frame_S is None:
            frame_S = _frame_similarity(cfg)
        if verbose:
            print(f"[demo] {m}: top-1 {results[m].get('top1', float('nan')):.4f}, "
                  f"hierdist@5 {results[m].get('hierdist@5', float('nan')):.3f}, {secs:.1f} s", flush=True)
    (out / "results.json").write_text(json.dumps(_clean(results), indent=2, default=_json_default) + "\n")
    if crm:
        (out / "results_crm.json").write_text(json.dumps(_clean(crm), indent=2, default=_json_default) + "\n")
    table = _demo_table(results)
    if verbose:
        print()
        print(table)
        if crm:
            print("\nafter CRM re-ranking:")
            print(_demo_table({m: dict(v, seconds=results[m]["seconds"]) for m, v in crm.items()}))
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            plot = False
            if verbose:
                print("\nmatplotlib is not installed: skipping demo.png (pip install matplotlib)")
    if plot:
        if frame_S is None:
            frame_S = _frame_similarity(demo_config("haframe", out, epochs, seed, **overrides))
        _demo_plot(results, frame_S, out / "demo.png")
    if verbose:
        print(f"\nwrote {out / 'results.json'}" + (f" and {out / 'demo.png'}" if plot else ""))
    return results


def _frame_similarity(cfg: TrainConfig) -> np.ndarray:
    from .frame import HAFrame

    h = load_hierarchy(cfg.hierarchy, cfg.classes)
    fr = HAFrame.from_distances(_distances_for(cfg, h), cfg.gamma, s_min=cfg.s_min)
    return fr.similarity.double().cpu().numpy()


def tree_order(distances) -> np.ndarray:
    """A class order that puts classes close in the hierarchy next to each other (for heatmaps)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    d = np.asarray(distances, dtype=np.float64)
    if d.shape[0] < 3:
        return np.arange(d.shape[0])
    return leaves_list(linkage(squareform(d, checks=False), method="average"))


def _demo_plot(results: Dict[str, Dict[str, Any]], S: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    methods = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1, 2.2, 1.5]})
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    ax = axes[0]
    bars = ax.bar(range(len(methods)), [results[m]["top1"] for m in methods],
                  color=[colors[i % len(colors)] for i in range(len(methods))])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("top-1 (higher is better)")
    ax = axes[1]
    cols = [c for c in DEMO_COLUMNS if c != "top1"]
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
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
