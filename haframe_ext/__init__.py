"""haframe_ext: hierarchy-aware classification with fixed HAFrame classifiers (Liang & Davis, ICCV 2023)."""

from .startup import guard_startup

guard_startup()  # Ctrl-C while the haframe command imports torch: one line, exit 130

# the imports come after the guard (pyproject.toml ignores E402 for this file)
from .ops.native import native_available, native_error
from . import hierarchy, frame, metrics, ops, nn
from .hierarchy.edges import HierarchyError
from .hierarchy.hierarchy import Hierarchy
from .frame.align import aligned_frame, align_model_frame
from .frame.frame import HAFrame
from .ops.fused import haframe_loss
from .ops.hier_losses import (hxe_loss, soft_label_loss, linear_hierarchical_loss, HXELoss, SoftLabelLoss,
                          LinearHierarchicalLoss)

__version__ = "0.1.0"

__all__ = [
    "Hierarchy", "HierarchyError", "HAFrame", "aligned_frame", "align_model_frame", "haframe_loss",
    "hxe_loss", "soft_label_loss", "linear_hierarchical_loss", "HXELoss", "SoftLabelLoss", "LinearHierarchicalLoss",
    "hierarchy", "frame", "metrics", "ops", "nn",
    "native_available", "native_error", "__version__",
]
