"""``haframe compare``: several methods x seeds on one task with the same trainer, each run in
``<out>/<method>/seed<k>`` (a finished run is reused, a killed one resumed), summarised as the papers do (mean and
95% CI per metric, CRM rows too) in ``compare.json``, ``compare.md`` and a figure of top-1 against HierDist@5."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..files import atomic_write, atomic_write_text, claim_folder, release_folder
from ..training.config import TrainConfig
from ..metrics.hierarchical import DEFAULT_COMPARE_METRICS
from ..metrics.summary import format_table, summarize_seeds
from ..training.models import check_method
from .plots import MATPLOTLIB_MISSING, matplotlib_available
from ..training.runlog import clean_json, write_json
from ..train import train

__all__ = ["COMPARE_METHODS", "compare", "compare_configs", "compare_figure", "parse_methods", "run_state"]

COMPARE_METHODS = ("cross-entropy", "hxe", "soft-labels", "haframe")

# config fields that do not change what a run computes: a finished run is reused whatever they were
_NOT_RESULTS = ("out", "resume", "resume_from", "overwrite", "progress", "tensorboard", "dist_timeout",
                "stop_after_epochs", "eval_batch_size", "device")


def parse_methods(methods) -> List[str]:
    """Method names from a comma-separated string or a list of them (each checked, none twice)."""
    names = [m.strip() for part in ([methods] if isinstance(methods, str) else methods) for m in str(part).split(",")]
    names = [m for m in names if m]
    if not names:
        raise ValueError("--methods is empty: name at least one method, e.g. --methods cross-entropy,haframe")
    for m in names:
        check_method(m)
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise ValueError(f"method(s) {', '.join(twice)} listed more than once (--methods): "
                         "each is trained once per seed")
    return names


def compare_configs(config: TrainConfig, methods: Sequence[str],
                    seeds: Sequence[int]) -> Dict[str, Dict[int, TrainConfig]]:
    """The run of each method and seed: ``config`` with that method and seed, in ``<out>/<method>/seed<k>``."""
    out = Path(config.out)
    return {m: {s: dataclasses.replace(config, method=m, seed=int(s), out=str(out / m / f"seed{s}"))
                for s in seeds} for m in methods}


def _differences(done: Dict[str, Any], cfg: TrainConfig) -> List[str]:
    """The fields where a finished run's config differs from ``cfg`` (those that change results)."""
    now = cfg.to_dict()
    return [f"{k}: {done.get(k)!r} there, {now[k]!r} now" for k in now
            if k not in _NOT_RESULTS and k in done and done[k] != now[k]]


def run_state(cfg: TrainConfig) -> Optional[Dict[str, Any]]:
    """The results of the finished run in ``cfg.out`` trained with the same settings, or None when the run is still
    to train (or to resume); a finished run with other settings is refused (it would be mixed into the table)."""
    path = Path(cfg.out) / "results.json"
    if cfg.overwrite or not path.is_file():
        return None
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable results file ({exc}): delete that run folder or pass --overwrite "
                         "to train it again") from None
    if not isinstance(done, dict) or not isinstance(done.get("test"), dict) or not isinstance(done.get("config"), dict):
        raise ValueError(f"{path} is not a results file of 'haframe train' (no test metrics or config): delete that "
                         "run folder or pass --overwrite to train it again")
    diff = _differences(done["config"], cfg)
    if diff:
        raise ValueError(f"{cfg.out} holds a finished run with other settings ({'; '.join(diff[:3])}): pass the same "
                         "settings, another --out, or --overwrite to train every run again")
    return done


def compare(config: TrainConfig, methods: Sequence[str] = COMPARE_METHODS, seeds: Sequence[int] = (0, 1, 2), *,
            metrics: Optional[Sequence[str]] = None, plot: bool = True, verbose: bool = True,
            header: Optional[str] = None) -> Dict[str, Any]:
    """Train (or reuse, or resume) every method x seed of ``config`` and summarise them.

    Returns ``{"finished": bool, "summary": {row: summary_seeds}, "table": str, ...}`` as written to
    ``<out>/compare.json``; rows are the methods and, after them, ``"<method> + CRM"``. ``metrics``: the columns
    (default: :data:`~haframe_ext.metrics.hierarchical.DEFAULT_COMPARE_METRICS`, those the runs report). A run stopped
    by ``stop_after_epochs`` ends the call unfinished (``"finished": False``); the same call again resumes it.
    ``verbose``: a line per run, then ``header`` (if given) and the table.
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if config.resume_from:
        raise ValueError("compare resumes each killed run from its own folder: drop resume_from (--resume-from)")
    methods = parse_methods(methods)
    seeds = _check_seeds(seeds)
    grid = compare_configs(config, methods, seeds)
    for runs in grid.values():  # every run's config and finished state is checked before the first one trains
        for cfg in runs.values():
            cfg.validate()
            run_state(cfg)
    out = Path(config.out)
    main = int(os.environ.get("RANK", "0") or 0) == 0
    claim = claim_folder(out) if main else None  # compare.json's folder (each run claims its own)
    try:
        results: Dict[str, Dict[int, Dict[str, Any]]] = {m: {} for m in methods}
        for m in methods:
            for s, cfg in grid[m].items():
                done = run_state(cfg)
                if done is None:
                    if verbose and main:
                        print(f"[compare] {m} seed {s}: training in {cfg.out}", flush=True)
                    # resume: continue a killed run from its last checkpoint (a fresh folder starts a new run)
                    done = train(dataclasses.replace(cfg, resume=not cfg.overwrite))
                    if not done.get("finished", True):
                        if verbose and main:
                            print(f"[compare] {m} seed {s} stopped after epoch {done['stopped_after_epoch']}: run the "
                                  "same command again to resume", flush=True)
                        return {"finished": False, "stopped": {"method": m, "seed": s, **done}}
                elif verbose and main:
                    print(f"[compare] {m} seed {s}: reusing the finished run in {cfg.out}", flush=True)
                results[m][s] = done
        summary = _summarize(config, methods, seeds, results, metrics)
        if main:
            _write(out, summary, plot, verbose, header)
        return summary
    finally:
        release_folder(claim)


def _check_seeds(seeds: Sequence[int]) -> List[int]:
    seeds = list(seeds)
    if not seeds:
        raise ValueError("--seeds is empty: give at least one seed")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ValueError(f"seed(s) {', '.join(map(str, twice))} listed more than once (--seeds): each seed is one run")
    return [int(s) for s in seeds]


def _summarize(config: TrainConfig, methods: List[str], seeds: List[int], results, metrics) -> Dict[str, Any]:
    """Mean and 95% CI per method (and per method after CRM) over the seeds, and the table of the chosen columns."""
    summary, summary_crm = {}, {}
    for m in methods:
        runs = [results[m][s] for s in seeds]
        summary[m] = summarize_seeds([r["test"] for r in runs])
        crm = [r.get("test_crm") for r in runs]
        if all(crm):
            summary_crm[m] = summarize_seeds(crm)
    rows = {**summary, **{f"{m} + CRM": v for m, v in summary_crm.items()}}
    reported = [k for k in summary[methods[0]] if all(k in s for s in rows.values())]
    if metrics is None:
        columns = [k for k in DEFAULT_COMPARE_METRICS if k in reported]
    else:
        missing = [k for k in metrics if k not in reported]
        if missing:
            raise ValueError(f"metric(s) {', '.join(missing)} not reported by every run (--metrics); choose from "
                             f"{', '.join(k for k in reported if k != 'num_samples')}")
        columns = list(metrics)
    base = {k: v for k, v in config.to_dict().items() if k not in ("method", "seed", "out")}
    return {"finished": True, "methods": methods, "seeds": seeds, "metrics": columns, "config": base,
            "summary": clean_json(rows), "table": format_table(rows, columns),
            "runs": {m: {f"seed{s}": {"out": str(Path(config.out) / m / f"seed{s}"), "test": results[m][s]["test"],
                                      "test_crm": results[m][s].get("test_crm"),
                                      "seconds": results[m][s].get("seconds")} for s in seeds} for m in methods}}


def _markdown(summary: Dict[str, Any]) -> str:
    """The table as Markdown: one row per method (and per method after CRM), cells ``mean ± CI``."""
    cols = summary["metrics"]
    lines = [f"# haframe compare: {len(summary['seeds'])} seed(s) ({', '.join(map(str, summary['seeds']))}), "
             "mean ± 95% CI", "", "| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for row, s in summary["summary"].items():
        lines.append(f"| {row} | " + " | ".join(f"{s[c]['mean']:.2f} ± {s[c]['ci95']:.2f}" for c in cols) + " |")
    cfg = summary["config"]
    lines += ["", f"Task: dataset {cfg['dataset']}, hierarchy {cfg['hierarchy']}, {cfg['epochs']} epochs."]
    return "\n".join(lines) + "\n"


def _write(out: Path, summary: Dict[str, Any], plot: bool, verbose: bool, header: Optional[str]) -> None:
    """compare.json, compare.md and (with matplotlib) compare.png in ``out``; ``header`` and the table on stdout."""
    write_json(summary, out / "compare.json")
    atomic_write_text(_markdown(summary), out / "compare.md")
    wrote = [out / "compare.json", out / "compare.md"]
    if plot and matplotlib_available():
        compare_figure(summary["summary"], out / "compare.png", f"{summary['config']['hierarchy']}, "
                       f"{len(summary['seeds'])} seed(s), mean and 95% CI")
        wrote.append(out / "compare.png")
    elif plot and verbose:
        print(f"{MATPLOTLIB_MISSING}: skipping compare.png")
    if verbose:
        if header:
            print(header)
        print(summary["table"])
        print("wrote " + ", ".join(map(str, wrote)))


def compare_figure(rows: Dict[str, Dict[str, Any]], path: Path, title: str) -> None:
    """Write a PNG of top-1 against HierDist@5 (else the largest k reported) per row of ``rows`` (summarize_seeds
    results), with 95% CI error bars; rows after CRM are hollow markers in their method's colour."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    first = next(iter(rows.values()))
    ks = sorted(int(k.split("@")[1]) for k in first if k.startswith("hierdist@"))
    y_key = "hierdist@5" if 5 in ks else f"hierdist@{ks[-1]}"
    methods = [r for r in rows if not r.endswith(" + CRM")]
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, m in enumerate(methods):
        color = colors[i % len(colors)]
        for row, hollow in ((m, False), (f"{m} + CRM", True)):
            if row not in rows:
                continue
            x, y = rows[row]["top1"], rows[row][y_key]
            ax.errorbar(x["mean"], y["mean"], xerr=x["ci95"], yerr=y["ci95"], fmt="o", color=color, capsize=4,
                        markersize=8, markerfacecolor="none" if hollow else color, label=row)
    ax.set_xlabel("top-1 accuracy (%), higher is better")
    ax.set_ylabel(f"{y_key.replace('hierdist', 'HierDist')}, lower is better")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))  # a full disk keeps the old file
    plt.close(fig)
