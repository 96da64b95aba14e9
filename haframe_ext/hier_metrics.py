"""The metrics beyond top-1 and HierDist@k, from the tree: label distance profiles, HOPS weights, calibration bins,
temperature scaling.

Definitions of the keys are in :mod:`haframe_ext.metrics` (and the README's Metrics section).
"""

from __future__ import annotations

__all__ = ["DEFAULT_COMPARE_METRICS", "CALIBRATION_BINS"]

# the metrics `haframe compare` shows unless told otherwise (keys of the evaluate dict)
DEFAULT_COMPARE_METRICS = ("top1", "mistake_severity", "hierdist@1", "hierdist@5", "hierdist@20", "best@5",
                           "hprecision@5", "ece", "hier_f1")

CALIBRATION_BINS = 15  # equal-width bins of (0, 1] for ECE and MCE
