"""The no-download demo: cross-entropy, HXE, soft labels and HAFrame on the synthetic CIFAR-100-hierarchy task, a few
seeds each through :func:`haframe_ext.cli.compare.compare`; prints the paper-style table, plots the means."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from .compare import compare
from ..training.config import TrainConfig, distances_for, load_hierarchy
from ..training.models import check_method
from .plots import MATPLOTLIB_MISSING, demo_figure, matplotlib_available
from ..training.runlog import clean_json, earlier_run, write_json

__all__ = ["DEMO_METHODS", "DEMO_COLUMNS", "DEMO_EPOCHS", "DEMO_SEEDS", "demo_config", "demo"]

DEMO_METHODS = ("cross-entropy", "hxe", "soft-labels", "haframe")
# 4 methods x 3 seeds x 10 epochs of 4,000 samples: about 75 s of one core's time (measured, docs in README)
DEMO_SEEDS = (0, 1, 2)
DEMO_EPOCHS = 10
DEMO_COLUMNS = ("top1", "mistake_severity", "hierdist@1", "hierdist@5", "hierdist@20")
# what the demo trains on, in its printout, results.json and figure: generated data, not CIFAR-100 images
DEMO_DATA = "synthetic data (generated from the CIFAR-100 class tree; no images)"


def demo_config(method: str, out, epochs: int = DEMO_EPOCHS, seed: int = 0, **overrides) -> TrainConfig:
    """The demo's configuration for one method: synthetic data on the CIFAR-100 hierarchy, MLP backbone."""
    base = dict(out=str(Path(out) / method), method=method, dataset="synthetic", hierarchy="cifar100",
                backbone="mlp", hidden=256, depth=2, input_dim=64, n_per_class=40, eval_per_class=30,
                difficulty=1.0, gamma=2.0, alpha=0.4, epochs=epochs, batch_size=128, eval_batch_size=1024,
                lr=0.05, weight_decay=5e-4, seed=seed, progress=False, tensorboard=False,
                overwrite=True)  # the demo always starts over in its folder
    base.update(overrides)
    return TrainConfig.from_dict(base)


def demo(out="haframe-demo", epochs: int = DEMO_EPOCHS, seed: int = 0, methods: Sequence[str] = DEMO_METHODS, *,
         seeds: Optional[Sequence[int]] = None, plot: bool = True, verbose: bool = True, progress: bool = False,
         threads: Optional[int] = 1, **overrides) -> Dict[str, Dict[str, Any]]:
    """Train the demo's methods on the synthetic CIFAR-100-hierarchy task, once per seed of ``seeds`` (default: just
    ``seed``) in ``<out>/<method>/seed<k>``; print the mean and 95% CI table (rows after CRM too), write
    ``<out>/compare.json`` and ``compare.md``, ``<out>/results.json`` (method -> mean test metrics plus the
    ``seconds`` of its runs; CRM means in ``results_crm.json``) and ``<out>/demo.png``; return the means per
    method. ``overrides`` go to :func:`demo_config` (e.g. ``n_per_class``, ``difficulty``, ``hidden``).

    ``threads``: torch intra-op threads during the demo (restored afterwards). One thread is as
    fast as two for these small MLPs and far more robust when other processes share the CPUs.
    """
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _demo(out, epochs, [seed] if seeds is None else list(seeds), methods, plot, verbose, progress,
                     **overrides)
    finally:
        torch.set_num_threads(prev_threads)


# marks a folder the demo writes: only there does it start its runs over (a training run elsewhere is never replaced)
DEMO_MARK = ".haframe-demo"


def _check_demo_folder(out: Path, methods: Sequence[str], seeds: Sequence[int]) -> None:
    """Refuse a demo folder that holds runs or results the demo did not write (they would be replaced)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"demo output {out} is an existing file, not a folder: choose another --out")
    if (out / DEMO_MARK).exists():
        return
    taken = [out / n for n in ("results.json", "results_crm.json", "demo.png") if (out / n).exists()]
    for folder in [out] + [out / m for m in methods] + [out / m / f"seed{s}" for m in methods for s in seeds]:
        taken += [folder / n for n in earlier_run(folder) if folder / n not in taken]
    if taken:
        raise ValueError(f"demo output folder {out} holds files the demo did not write "
                         f"({', '.join(map(str, taken[:3]))}{', ...' if len(taken) > 3 else ''}): "
                         "the demo starts its runs over, so choose another --out (a folder the demo wrote is marked "
                         "by its .haframe-demo file)")


def _demo(out, epochs, seeds, methods, plot, verbose, progress, **overrides):
    out = Path(out)
    for m in methods:
        check_method(m)
    _check_demo_folder(out, methods, seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARK).touch()
    # the demo starts over in its own folder (overwrite), each method and seed as compare lays them out
    cfg = dataclasses.replace(demo_config(methods[0], out, epochs, seeds[0], progress=progress, **overrides),
                              out=str(out))
    header = f"\ntest metrics on {DEMO_DATA}, mean and 95% CI over seeds {', '.join(map(str, seeds))}:"
    res = compare(cfg, methods, seeds, plot=False, verbose=verbose, header=header)
    rows = {row: {k: v["mean"] for k, v in summary.items()} for row, summary in res["summary"].items()}
    results = {m: dict(rows[m], seconds=sum(r["seconds"] or 0.0 for r in res["runs"][m].values()), data=DEMO_DATA)
               for m in methods}
    crm = {m: rows[f"{m} + CRM"] for m in methods if f"{m} + CRM" in rows}
    write_json(clean_json(results), out / "results.json")
    if crm:
        write_json(clean_json(crm), out / "results_crm.json")
    if verbose:
        print("training time: " + ", ".join(f"{m} {results[m]['seconds']:.1f} s" for m in methods))
    if plot:
        if not matplotlib_available():
            plot = False
            if verbose:
                print(f"\n{MATPLOTLIB_MISSING}: skipping demo.png")
    if plot:
        frame_S = _frame_similarity(demo_config("haframe", out, epochs, seeds[0], **overrides))
        demo_figure(results, frame_S, out / "demo.png", DEMO_COLUMNS, DEMO_DATA)
    if verbose:
        print(f"wrote {out / 'results.json'}" + (f" and {out / 'demo.png'}" if plot else ""))
    return results


def _frame_similarity(cfg: TrainConfig) -> np.ndarray:
    from ..frame.frame import HAFrame

    h = load_hierarchy(cfg.hierarchy, cfg.classes)
    fr = HAFrame.from_distances(distances_for(cfg, h), cfg.gamma, s_min=cfg.s_min)
    return fr.similarity.double().cpu().numpy()
