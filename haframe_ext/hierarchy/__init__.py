"""Class hierarchies: their input formats, the tree and its distances, tree operators for large K, WordNet trees and
the depth-first class order; ``haframe_ext.hierarchy`` hands on the names users need."""

from .edges import HierarchyError
from .hierarchy import (BUILTIN_NAMES, CONVENTIONS, INNER_SUFFIX, INTERNAL_CLASSES, Hierarchy, as_distance_matrix,
                        inner_node_name)

__all__ = ["Hierarchy", "HierarchyError", "as_distance_matrix", "inner_node_name", "BUILTIN_NAMES", "CONVENTIONS",
           "INTERNAL_CLASSES", "INNER_SUFFIX"]
