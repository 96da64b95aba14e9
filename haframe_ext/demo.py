"""The no-download demo: train a few methods on the synthetic CIFAR-100-hierarchy task, print a table, plot it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from .config import TrainConfig, distances_for, load_hierarchy
from .metrics import format_table
from .models import check_method
from .plots import MATPLOTLIB_MISSING, demo_figure, matplotlib_available, tree_order
from .runlog import clean_json, earlier_run, write_json
from .train import train

__all__ = ["DEMO_METHODS", "DEMO_COLUMNS", "demo_config", "demo", "tree_order"]

DEMO_METHODS = ("cross-entropy", "haframe", "etf")
DEMO_COLUMNS = ("top1", "mistake_severity", "hierdist@1", "hierdist@5", "hierdist@20")
# what the demo trains on, in its printout, results.json and figure: generated data, not CIFAR-100 images
DEMO_DATA = "synthetic data (generated from the CIFAR-100 class tree; no images)"


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
    """The demo's results, one row per method (metrics.format_table)."""
    return format_table(results, list(DEMO_COLUMNS) + ["seconds"], digits=4)


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


# marks a folder the demo writes: only there does it start its runs over (a training run elsewhere is never replaced)
DEMO_MARK = ".haframe-demo"


def _check_demo_folder(out: Path, methods: Sequence[str]) -> None:
    """Refuse a demo folder that holds runs or results the demo did not write (they would be replaced)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"demo output {out} is an existing file, not a folder: choose another --out")
    if (out / DEMO_MARK).exists():
        return
    taken = [out / n for n in ("results.json", "results_crm.json", "demo.png") if (out / n).exists()]
    for folder in [out] + [out / m for m in methods]:
        taken += [folder / n for n in earlier_run(folder) if folder / n not in taken]
    if taken:
        raise ValueError(f"demo output folder {out} holds files the demo did not write ({', '.join(map(str, taken[:3]))}"
                         f"{', ...' if len(taken) > 3 else ''}): the demo starts its runs over, so choose another "
                         "--out (a folder the demo wrote is marked by its .haframe-demo file)")


def _demo(out, epochs, seed, methods, plot, verbose, progress, **overrides):
    out = Path(out)
    for m in methods:
        check_method(m)
    _check_demo_folder(out, methods)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARK).touch()
    results: Dict[str, Dict[str, Any]] = {}
    crm: Dict[str, Dict[str, Any]] = {}
    frame_S = None
    for m in methods:
        cfg = demo_config(m, out, epochs, seed, progress=progress, **overrides)
        t0 = time.perf_counter()
        r = train(cfg)
        secs = time.perf_counter() - t0
        results[m] = dict(r["test"], seconds=secs, data=DEMO_DATA)
        if r.get("test_crm"):
            crm[m] = r["test_crm"]
        if m == "haframe" and frame_S is None:
            frame_S = _frame_similarity(cfg)
        if verbose:
            print(f"[demo] {m}: top-1 {results[m].get('top1', float('nan')):.4f}, "
                  f"hierdist@5 {results[m].get('hierdist@5', float('nan')):.3f}, {secs:.1f} s", flush=True)
    write_json(clean_json(results), out / "results.json")
    if crm:
        write_json(clean_json(crm), out / "results_crm.json")
    table = _demo_table(results)
    if verbose:
        print(f"\ntest metrics on {DEMO_DATA}:")
        print(table)
        if crm:
            print("\nafter CRM re-ranking:")
            print(_demo_table({m: dict(v, seconds=results[m]["seconds"]) for m, v in crm.items()}))
    if plot:
        if not matplotlib_available():
            plot = False
            if verbose:
                print(f"\n{MATPLOTLIB_MISSING}: skipping demo.png")
    if plot:
        if frame_S is None:
            frame_S = _frame_similarity(demo_config("haframe", out, epochs, seed, **overrides))
        demo_figure(results, frame_S, out / "demo.png", DEMO_COLUMNS, DEMO_DATA)
    if verbose:
        print(f"\nwrote {out / 'results.json'}" + (f" and {out / 'demo.png'}" if plot else ""))
    return results


def _frame_similarity(cfg: TrainConfig) -> np.ndarray:
    from .frame import HAFrame

    h = load_hierarchy(cfg.hierarchy, cfg.classes)
    fr = HAFrame.from_distances(distances_for(cfg, h), cfg.gamma, s_min=cfg.s_min)
    return fr.similarity.double().cpu().numpy()
