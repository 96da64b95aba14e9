"""Summaries over runs: the mean and 95% confidence interval of each metric over seeds, and plain-text tables."""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Sequence

import numpy as np
import scipy.stats

__all__ = ["summarize_seeds", "format_table", "format_report"]


def summarize_seeds(runs: Sequence[Mapping[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Per metric over runs (e.g. seeds): {"mean", "ci95" (t-distribution half-width; 0 for one run), "n"}.

    Metrics are the numeric entries of the first run; other (e.g. string) entries are skipped.

    Args:
        runs: one mapping metric -> value per run (evaluate's results, say).

    Returns:
        metric -> {"mean", "ci95", "n"}.

    Raises:
        ValueError: no runs, or a run without a metric of the first.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("summarize_seeds needs at least one run")
    out = {}
    for key, first in runs[0].items():
        if isinstance(first, bool) or not isinstance(first, (int, float, np.number)):
            continue
        values = []
        for r, run in enumerate(runs):
            if key not in run:
                raise ValueError(f"run {r} has no {key!r}; every run must report the same metrics")
            values.append(float(run[key]))
        x = np.asarray(values)
        n = len(x)
        ci = float(scipy.stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        out[key] = {"mean": float(x.mean()), "ci95": ci, "n": n}
    return out


def format_table(rows: Mapping[str, Mapping], metrics: Sequence[str] | None = None,
                 digits: int = 2, ci_digits: int = 4) -> str:
    """A plain-text table, one row per method, cells like the paper's "77.71 +/- 0.2319" (from summarize_seeds).

    Args:
        rows: method -> its metrics: summarize_seeds' {"mean", "ci95"} per metric, or plain numbers.
        metrics: the columns, in order; default every metric of the rows, in first-seen order.
        digits: decimals of a mean (or number).
        ci_digits: decimals of a confidence half-width.

    Returns:
        The table's lines joined by newlines ("-" where a method lacks a metric).
    """
    if metrics is None:
        metrics = list(dict.fromkeys(k for summary in rows.values() for k in summary))

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, Mapping):
            return f"{v['mean']:.{digits}f} +/- {v['ci95']:.{ci_digits}f}"
        return f"{float(v):.{digits}f}"

    table = [["method", *metrics]]
    table += [[str(method), *(cell(summary.get(m)) for m in metrics)] for method, summary in rows.items()]
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    lines = [" | ".join(s.ljust(w) if c == 0 else s.rjust(w) for c, (s, w) in enumerate(zip(r, widths))).rstrip()
             for r in table]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(rows: Mapping[str, Mapping], digits: int = 4, width: int = 7) -> str:
    """Every metric of evaluate results (one row per method) as text: top-1, severity and HierDist@k first, the
    other scalar metrics in tables of at most ``width`` columns, then each severity histogram and level accuracy.

    Args:
        rows: method -> its evaluate results.
        digits: decimals of each value.
        width: the most metric columns per table.

    Returns:
        The tables and lines, joined by newlines.
    """
    keys = list(dict.fromkeys(k for m in rows.values() for k, v in m.items()
                              if not isinstance(v, (list, str, bool)) and k != "num_samples"))
    first = [k for k in keys if k in ("top1", "mistake_severity") or k.startswith("hierdist@")]
    rest = [k for k in keys if k not in first]
    families = list(dict.fromkeys(k.split("@")[0] for k in rest))
    rest.sort(key=lambda k: families.index(k.split("@")[0]))  # best@1, best@5, ..., mistakes@1, ...
    tables = [format_table(rows, first, digits)] if first else []
    tables += [format_table(rows, rest[i:i + width], digits) for i in range(0, len(rest), width)]
    lines = ["\n\n".join(tables)]
    for name, m in rows.items():
        if m.get("severity_histogram") is not None:
            hist = m["severity_histogram"]
            lines.append(f"{name}: top-1 mistakes at LCA height 1..{len(hist)}: {' '.join(map(str, hist))}")
        if m.get("level_accuracy") is not None:
            acc = m["level_accuracy"]
            lines.append(f"{name}: accuracy at depth 1..{len(acc)}: {' '.join(f'{a:.4f}' for a in acc)}")
    return "\n".join(lines)
