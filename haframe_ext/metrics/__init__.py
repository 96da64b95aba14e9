"""Metrics: top-1, mistake severity, HierDist@k, CRM, neural collapse and seed summaries, and the hierarchical
metrics' per-sample parts; ``haframe_ext.metrics`` hands on the names users need."""

from .metrics import (DEFAULT_KS, HISTOGRAM_MAX_BINS, StreamingEvaluator, crm, evaluate, format_report, format_table,
                      neural_collapse, summarize_seeds)

__all__ = ["evaluate", "StreamingEvaluator", "crm", "neural_collapse", "summarize_seeds", "format_table",
           "format_report", "DEFAULT_KS", "HISTOGRAM_MAX_BINS"]
