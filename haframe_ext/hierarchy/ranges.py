"""Depth-first class ranges of a tree: every node's classes form one contiguous range of positions.

Ordering the classes depth-first once turns every sum over "the classes under node v" into a range
sum, so the label's ancestors v_0 (root), ..., v_L (the label's leaf) are L + 1 nested ranges.  Per
row, the positions split into segments: segment i is range(v_i) minus range(v_{i+1}) (segment L is
the leaf itself), and every class in segment i has v_i as its LCA with the label.  HXE and
soft-label losses are piecewise constant over these segments (haframe_ext.ops.hier_losses), so a row
costs O(K + L) and nothing K x K is built.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

__all__ = ["HierRanges", "ranges_of"]

_TABLE_MAX = 1 << 24  # entries of the per-class path table (K x (max depth + 1)); deeper trees walk up per batch


class HierRanges:
    """Per-node depth-first ranges of a tree and the per-row paths of labels through them."""

    def __init__(self, parent: np.ndarray, depth: np.ndarray, level: np.ndarray, class_idx: np.ndarray):
        """parent [n] (-1 at the root), depth [n], level [n] (the LCA distance of each node), class_idx [K]."""
        self.parent = np.asarray(parent, dtype=np.int64)  # [n]
        self.depth = np.asarray(depth, dtype=np.int64)  # [n]
        self.level = np.asarray(level, dtype=np.float64)  # [n]
        self.class_idx = np.asarray(class_idx, dtype=np.int64)  # [K]
        n, K = len(self.parent), len(self.class_idx)
        self.num_nodes, self.num_classes = n, K
        by_depth = np.argsort(self.depth, kind="stable")
        bounds = np.searchsorted(self.depth[by_depth], np.arange(int(self.depth.max()) + 2))
        count = np.zeros(n, dtype=np.int64)  # classes under each node
        count[self.class_idx] = 1
        for L in range(len(bounds) - 2, 0, -1):  # deepest first: children before parents
            sl = by_depth[bounds[L]:bounds[L + 1]]
            np.add.at(count, self.parent[sl], count[sl])
        start = np.zeros(n, dtype=np.int64)  # first depth-first position under each node
        for L in range(1, len(bounds) - 1):  # parents' starts are set before their children's
            sl = by_depth[bounds[L]:bounds[L + 1]]
            sl = sl[np.lexsort((sl, self.parent[sl]))]  # grouped by parent, siblings in node order
            par = self.parent[sl]
            excl = np.cumsum(count[sl]) - count[sl]  # exclusive prefix over the slice
            first = np.r_[True, par[1:] != par[:-1]]
            group_base = np.maximum.accumulate(np.where(first, np.arange(len(sl)), 0))
            start[sl] = start[par] + excl - excl[group_base]
        self.start = start  # [n]
        self.end = start + count  # [n]
        self.position = start[self.class_idx]  # [K] depth-first position of each label
        if not np.array_equal(np.sort(self.position), np.arange(K)) or np.any(count[self.class_idx] != 1):
            raise ValueError("the tree's classes must be its leaves (a class with classes below it has no range)")
        self.order = np.argsort(self.position)  # [K] the label at each depth-first position
        self.identity_order = bool(np.array_equal(self.order, np.arange(K)))
        self.max_depth = int(self.depth[self.class_idx].max())
        self.table = None  # [K, max_depth + 1] node at each depth of each label's path (-1 past it), when small
        if K * (self.max_depth + 1) <= _TABLE_MAX:
            table = np.full((K, self.max_depth + 1), -1, dtype=np.int64)
            rows, cur = np.arange(K), self.class_idx.copy()
            while len(cur):
                table[rows, self.depth[cur]] = cur
                cur = self.parent[cur]
                keep = cur >= 0
                rows, cur = rows[keep], cur[keep]
            self.table = table
        self._torch = {}

    def tensors(self, device) -> dict:
        """The per-node arrays as int64/float64 tensors on device (cached per device)."""
        key = str(device)
        if key not in self._torch:
            t = lambda a: torch.as_tensor(a).to(device)  # noqa: E731
            self._torch[key] = dict(parent=t(self.parent), depth=t(self.depth), start=t(self.start), end=t(self.end),
                                    leaf=t(self.class_idx), order=t(self.order), position=t(self.position))
            if self.table is not None:  # ranges along each label's path, -1 past its depth
                table = t(self.table)
                node = table.clamp_min(0)
                self._torch[key].update(table=table, table_start=torch.where(table >= 0, t(self.start)[node], -1),
                                        table_end=torch.where(table >= 0, t(self.end)[node], -1))
        return self._torch[key]

    def paths(self, target: torch.Tensor, node_value: torch.Tensor):
        """(start [B, P], end [B, P], value [B, P]) of the ranges on each label's root path, by depth.

        target [B] int64 labels (checked by the caller); node_value [n] float64 on target's device.
        Column i is the ancestor at depth i; columns past the label's depth hold start = end = -1, value 0.
        P = the deepest class's depth + 1 (from a per-class table), or the deepest label's in the batch + 1 (walked
        up the tree, when the table would be too large: very deep trees).
        """
        t = self.tensors(target.device)
        if "table" in t:  # one gather per array
            node = t["table"].index_select(0, target)  # [B, P]
            value = torch.where(node >= 0, node_value[node.clamp_min(0)], 0.0)
            return t["table_start"].index_select(0, target), t["table_end"].index_select(0, target), value
        cur = t["leaf"].index_select(0, target)  # [B]
        B = target.shape[0]
        P = (int(t["depth"].index_select(0, cur).max()) + 1) if B else 1
        start = torch.full((B, P), -1, dtype=torch.int64, device=target.device)
        end = torch.full((B, P), -1, dtype=torch.int64, device=target.device)
        value = torch.zeros((B, P), dtype=torch.float64, device=target.device)
        rows = torch.arange(B, device=target.device)
        live = torch.ones(B, dtype=torch.bool, device=target.device)
        for _ in range(P):
            node = torch.where(live, cur, 0)
            col = torch.where(live, t["depth"].index_select(0, node), P)  # P: a dropped write
            keep = col < P
            r, c, v = rows[keep], col[keep], node[keep]
            start[r, c] = t["start"].index_select(0, v)
            end[r, c] = t["end"].index_select(0, v)
            value[r, c] = node_value.index_select(0, v)
            cur = t["parent"].index_select(0, node)
            live = live & (cur >= 0)
            cur = torch.where(live, cur, 0)
        return start, end, value


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def ranges_of(hierarchy) -> HierRanges:
    """The HierRanges of a Hierarchy under its convention (built once per tree operator)."""
    tree = hierarchy.tree
    out = _CACHE.get(tree)
    if out is None:
        out = HierRanges(tree.parent, tree.depth, tree.level, tree.class_idx)
        _CACHE[tree] = out
    return out
