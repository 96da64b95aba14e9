"""The summary ``haframe hierarchy`` prints: size, depths, balance, the distance convention and s_min.

Everything is O(nodes) with numpy (no K x K matrix), so it runs on hierarchies of 10^6 leaves.
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..hierarchy.edges import quote
from ..hierarchy.edges import HierarchyError
from ..hierarchy.hierarchy import BUILTIN_NAMES, CONVENTIONS, Hierarchy

__all__ = ["load_for_report", "hierarchy_summary", "format_summary", "convention_changes"]


def load_for_report(spec=None, classes=None, wordnet_ids=None, wordnet=None, *, wordnet_parent="first",
                    internal_classes="leaf") -> tuple[Hierarchy, str]:
    """(hierarchy, label) from a builtin name or edge-list file, or from WordNet ids (a file)."""
    if wordnet_ids is not None:
        if spec is not None or classes is not None:
            raise HierarchyError("--wordnet-ids builds the tree and its class order from WordNet; "
                                 "give it without a hierarchy FILE|NAME and without --classes")
        if not os.path.isfile(wordnet_ids):
            raise HierarchyError(f"WordNet id file not found: {quote(wordnet_ids)}")
        h = Hierarchy.from_wordnet(wordnet_ids, wordnet, parent=wordnet_parent, internal_classes=internal_classes)
        return h, f"WordNet ids {os.path.basename(wordnet_ids)}"
    if spec is None:
        raise HierarchyError("give a hierarchy (a builtin name or an edge-list file) or --wordnet-ids F")
    if classes is not None and not os.path.isfile(classes):
        raise HierarchyError(f"classes file not found: {quote(classes)}")
    if spec in BUILTIN_NAMES:
        if classes is not None:
            raise HierarchyError(f"--classes applies to an edge-list file; the builtin {spec!r} has its own order")
        return Hierarchy.builtin(spec), spec
    if re.fullmatch(r"random:\d+", spec, re.ASCII) and not os.path.isfile(spec):  # as train and frame accept it
        if classes is not None:
            raise HierarchyError(f"--classes applies to an edge-list file; {spec!r} has its own order")
        return Hierarchy.random(int(spec.split(":")[1])), spec
    if spec.lower().endswith((".npy", ".csv")):
        raise HierarchyError(f"{quote(spec)} is a distance matrix, which has no tree to describe; "
                             "give an edge-list file, or use 'haframe frame --distances' for a matrix")
    if not os.path.isfile(spec):
        raise HierarchyError(f"unknown hierarchy {quote(spec)}: not a builtin name "
                             f"({', '.join(BUILTIN_NAMES)}) nor an existing edge-list file")
    if spec.lower().endswith(".json"):  # nested JSON, as train and frame read it
        return Hierarchy.from_nested(spec, classes, internal_classes=internal_classes), os.path.basename(spec)
    return Hierarchy.from_edges(spec, classes, internal_classes=internal_classes), os.path.basename(spec)


def _node_arrays(h: Hierarchy):
    """(parent index, leaves under each node, class pairs whose LCA is each node), int64 [nodes], breadth-first."""
    parent = h.tree.parent  # breadth-first order: parents before children
    n = len(parent)
    child_count = np.bincount(parent[1:], minlength=n)
    leaves = (child_count == 0).astype(np.int64)
    depth = h.tree.depth
    # breadth-first order keeps each depth contiguous; add each level into its parents, deepest first
    bounds = np.flatnonzero(np.diff(depth)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [n]))
    for s, e in zip(starts[::-1], ends[::-1]):
        if s == 0:
            break
        np.add.at(leaves, parent[s:e], leaves[s:e])
    sq_children = np.zeros(n, dtype=np.int64)
    np.add.at(sq_children, parent[1:], leaves[1:] ** 2)
    pairs = np.where(child_count > 0, (leaves ** 2 - sq_children) // 2, 0)  # leaves: only the diagonal
    return parent, leaves, pairs


def convention_changes(h: Hierarchy) -> int:
    """How many class pairs i < j have a different distance under the two conventions (no K x K matrix)."""
    _, _, pairs = _node_arrays(h)
    a, b = (h.with_convention(c).tree.level for c in CONVENTIONS)
    return int(pairs[a != b].sum())


def hierarchy_summary(h: Hierarchy, gamma=None) -> dict:
    """The figures ``haframe hierarchy`` prints, as a dict."""
    from ..frame.similarity import exact_s_min

    _, _, pairs = _node_arrays(h)
    levels = {c: h.with_convention(c).tree.level for c in CONVENTIONS}
    leaf_depth = h.tree.depth[h.tree.class_idx]
    K = h.num_classes
    other = next(c for c in CONVENTIONS if c != h.convention)
    out = {
        "classes": K,
        "nodes": len(h.nodes),
        "leaf_depth_min": int(leaf_depth.min()),
        "leaf_depth_max": int(leaf_depth.max()),
        "balanced": h.is_balanced,
        "convention": h.convention,
        "D": h.max_depth,
        "other_convention": other,
        "pairs": K * (K - 1) // 2,
        "pairs_changed": int(pairs[levels[CONVENTIONS[0]] != levels[CONVENTIONS[1]]].sum()),
        "d_max": int(levels[h.convention][pairs > 0].max(initial=0)),  # 0 for a single class
        "inner_classes": len(h.inner_classes),
    }
    if h.wordnet_info is not None:
        out.update({f"wordnet_{k}": v for k, v in h.wordnet_info.items()})
    if gamma is not None:
        out["gamma"] = float(gamma)
        out["s_min"] = float(exact_s_min(h, gamma))
    return out


def format_summary(s: dict, label: str) -> list[str]:
    """The lines ``haframe hierarchy`` prints for a summary."""
    formula = (f"D - depth(LCA), D = {s['D']}, the deepest class's depth" if s["convention"] == "published"
               else "the longest path from the LCA down to a leaf")
    share = 100.0 * s["pairs_changed"] / s["pairs"] if s["pairs"] else 0.0
    rows = [
        ("classes K", s["classes"]),
        ("nodes", s["nodes"]),
        ("leaf depths", f"{s['leaf_depth_min']} to {s['leaf_depth_max']}"),
        ("balanced", "yes" if s["balanced"] else "no"),
        ("convention", f"{s['convention']} (d = {formula})"),
        (f"pairs '{s['other_convention']}' changes", f"{s['pairs_changed']} of {s['pairs']} ({share:.2f}%)"),
        ("d_max", s["d_max"]),
        ("classes at inner nodes", f"{s['inner_classes']}" + (" (each a leaf below its node, renamed "
                                                               "'<class>:node')" if s["inner_classes"] else "")),
    ]
    if "wordnet_parent" in s:
        rows.append(("several WordNet hypernyms", f"{s['wordnet_several_hypernyms']} of the "
                     f"{s['wordnet_synsets']} synsets on the paths (kept: the {s['wordnet_parent']} one)"))
    if "s_min" in s:
        rows.append((f"s_min (gamma {s['gamma']:g})", f"{s['s_min']:.6f} (exact)"))
    return [f"hierarchy: {label}"] + [f"  {k:26s} {v}" for k, v in rows]
