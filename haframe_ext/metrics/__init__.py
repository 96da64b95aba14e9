"""Metrics: top-1, mistake severity, HierDist@k and CRM (metrics.py), the hierarchical metrics' per-sample parts
(hierarchical.py), neural collapse (collapse.py) and seed summaries (summary.py); ``haframe_ext.metrics`` hands on the
names users need."""

from .collapse import neural_collapse
from .metrics import DEFAULT_KS, HISTOGRAM_MAX_BINS, StreamingEvaluator, crm, evaluate
from .summary import format_report, format_table, summarize_seeds

__all__ = ["evaluate", "StreamingEvaluator", "crm", "neural_collapse", "summarize_seeds", "format_table",
           "format_report", "DEFAULT_KS", "HISTOGRAM_MAX_BINS"]
