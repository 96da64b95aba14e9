"""A hierarchy's nodes indexed breadth-first: the queries on them (parents, children, depths, heights, LCA), and the
tree and its classes written out."""

from __future__ import annotations

import os
from typing import IO, Mapping, Optional, Sequence, Union

import numpy as np

from .edges import HierarchyError, quote, write_text

__all__ = ["TreeNodes", "TextSource"]

TextSource = Union[str, os.PathLike, IO]  # a path, or an open text or binary file


class TreeNodes:
    """A rooted tree indexed breadth-first from its root, with its classes (leaves) in label order.

    The base of :class:`~haframe_ext.hierarchy.Hierarchy`, which builds it from checked input (``_index_nodes``).
    """

    def _index_nodes(self, root: str, children: Mapping[str, list], parent_of: Mapping[str, str],
                     classes: Sequence[str], inner_classes: Sequence[str]) -> None:
        """Index a checked tree: breadth-first order, parent indices, depths, heights and the classes' nodes."""
        order = [root]  # breadth-first
        for node in order:
            order.extend(children[node])
        index = {n: i for i, n in enumerate(order)}
        parent_idx = np.array([index[parent_of[n]] if n in parent_of else -1 for n in order], dtype=np.int64)
        depth = np.zeros(len(order), dtype=np.int64)
        for i in range(1, len(order)):  # breadth-first: a parent's depth is set before its children's
            depth[i] = depth[parent_idx[i]] + 1
        height = np.zeros(len(order), dtype=np.int64)
        for lvl in range(int(depth.max()), 0, -1):  # deepest level first: children before parents
            idx = np.flatnonzero(depth == lvl)
            np.maximum.at(height, parent_idx[idx], height[idx] + 1)
        self._inner_classes = list(inner_classes)
        self._root = root
        self._children = children
        self._parent_of = dict(parent_of)
        self._order = order
        self._index = index
        self._parent_idx = parent_idx
        self._depth = depth
        self._height = height
        self._classes = list(classes)
        self._class_idx = np.array([index[c] for c in classes], dtype=np.int64)

    def _idx(self, node: str) -> int:
        """Index of a node, raising a HierarchyError for an unknown name."""
        try:
            return self._index[node]
        except (KeyError, TypeError):
            raise HierarchyError(f"unknown node {quote(node)}; not in this hierarchy") from None

    @property
    def classes(self) -> list[str]:
        """The class names in label order (a copy)."""
        return list(self._classes)

    @property
    def inner_classes(self) -> list[str]:
        """The classes that were inner nodes of the input, in label order; each is now a leaf below its node."""
        return list(self._inner_classes)

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self._classes)

    @property
    def nodes(self) -> list[str]:
        """Every node, breadth-first from the root."""
        return list(self._order)

    @property
    def root(self) -> str:
        """The root node."""
        return self._root

    @property
    def height(self) -> int:
        """Height of the tree (the height of its root)."""
        return int(self._height[0])

    @property
    def max_depth(self) -> int:
        """D, the depth of the deepest class (the published convention pads every leaf down to it)."""
        return int(self._depth[self._class_idx].max())

    @property
    def is_balanced(self) -> bool:
        """True when every class is at the same depth (then both conventions give the same distances)."""
        leaf_depth = self._depth[self._class_idx]
        return bool(leaf_depth.min() == leaf_depth.max())

    def parent(self, node: str) -> Optional[str]:
        """The parent of node (None for the root).

        Args:
            node: the name of a node of the tree.

        Returns:
            The parent's name, or None for the root.

        Raises:
            HierarchyError: node is not in the tree (the same for every query by name).
        """
        p = self._parent_idx[self._idx(node)]
        return None if p < 0 else self._order[p]

    def children(self, node: str) -> list[str]:
        """The children of node, in the order their edges were given.

        Args:
            node: the name of a node of the tree.

        Returns:
            The children's names (a new list; empty for a leaf).
        """
        return list(self._children[self._order[self._idx(node)]])

    def depth(self, node: str) -> int:
        """Number of edges from the root down to node.

        Args:
            node: the name of a node of the tree.

        Returns:
            The depth, 0 for the root.
        """
        return int(self._depth[self._idx(node)])

    def node_height(self, node: str) -> int:
        """Length of the longest downward path from node to a leaf.

        Args:
            node: the name of a node of the tree.

        Returns:
            The height, 0 for a leaf.
        """
        return int(self._height[self._idx(node)])

    def is_leaf(self, node: str) -> bool:
        """True if node has no children.

        Args:
            node: the name of a node of the tree.

        Returns:
            Whether node is a leaf.
        """
        return not self._children[self._order[self._idx(node)]]

    def ancestors(self, node: str) -> list[str]:
        """The ancestors of node, from its parent up to the root.

        Args:
            node: the name of a node of the tree.

        Returns:
            The ancestors' names, nearest first (empty for the root).
        """
        out = []
        p = self._parent_idx[self._idx(node)]
        while p >= 0:
            out.append(self._order[p])
            p = self._parent_idx[p]
        return out

    def lca(self, a: str, b: str) -> str:
        """The lowest common ancestor of nodes a and b.

        Args:
            a: the name of a node of the tree.
            b: the name of another (or the same) node.

        Returns:
            The name of their lowest common ancestor (a itself when b is below a, and the reverse).
        """
        i, j = self._idx(a), self._idx(b)
        while self._depth[i] > self._depth[j]:
            i = self._parent_idx[i]
        while self._depth[j] > self._depth[i]:
            j = self._parent_idx[j]
        while i != j:
            i, j = self._parent_idx[i], self._parent_idx[j]
        return self._order[i]

    def _lca_matrix(self, level: np.ndarray) -> np.ndarray:
        """level[LCA(i, j)] for every class pair, int64 [K, K] in label order, 0 on the diagonal (level: [nodes]).

        O(K^2 + nodes) time, whatever the depth: with the classes in depth-first order every subtree
        is a contiguous block, and the pairs whose LCA is node v are the blocks between one child's
        leaves and the leaves of the children before it, each written with v's level.
        """
        K = self.num_classes
        n = len(self._order)
        index = self._index
        kids = [[index[c] for c in self._children[name]] for name in self._order]  # node -> child indices
        count = np.zeros(n, dtype=np.int64)  # leaves under each node
        count[[i for i in range(n) if not kids[i]]] = 1
        for i in range(n - 1, 0, -1):  # breadth-first order reversed: children before parents
            count[self._parent_idx[i]] += count[i]
        start = np.zeros(n, dtype=np.int64)  # first depth-first leaf position under each node
        for v in range(n):  # breadth-first: a parent's start is set before its children's
            s = int(start[v])
            for c in kids[v]:
                start[c] = s
                s += int(count[c])
        lca_height = np.zeros((K, K), dtype=np.int64)  # [K, K] in depth-first leaf order
        for v in range(n):  # breadth-first: a node is written before its descendants
            if len(kids[v]) < 2:
                continue
            h, first, size = level[v], int(start[v]), int(count[v])
            inner = sum(int(count[c]) ** 2 for c in kids[v])  # pairs within one child (and the diagonal)
            if inner <= size * size - inner:
                # Mostly cross pairs (wide or balanced nodes): one contiguous block write is cheaper, and
                # the pairs within a child are overwritten later by their own (lower) LCA.  The extra
                # work is at most the cross pairs written, so the total stays O(K^2).
                lca_height[first:first + size, first:first + size] = h
                continue
            for c in kids[v][1:]:  # the cross pairs only: child c against the children before it
                lo, hi = int(start[c]), int(start[c] + count[c])
                lca_height[first:lo, lo:hi] = h
                lca_height[lo:hi, first:lo] = h
        np.fill_diagonal(lca_height, 0)
        pos = start[self._class_idx]  # [K] depth-first position of each class label
        if np.array_equal(pos, np.arange(K)):  # classes already in depth-first order: no permuted copy
            return lca_height
        return lca_height[np.ix_(pos, pos)]

    # ------------------------------------------------------------------ output
    def to_edges(self, path: TextSource) -> None:
        """Write the tree as a tab-separated 'parent<TAB>child' edge list (breadth-first) to a path or text file.

        Args:
            path: a path (written atomically, UTF-8) or an open text file; ``from_edges(path, classes)`` reads it
                back with the same distance digest.
        """
        write_text(path, "".join(f"{self._order[self._parent_idx[i]]}\t{self._order[i]}\n"
                                 for i in range(1, len(self._order))))

    def to_classes(self, path: TextSource) -> None:
        """Write the class names in label order, one per line, to a path or text file.

        Args:
            path: a path (written atomically, UTF-8) or an open text file.
        """
        write_text(path, "".join(f"{c}\n" for c in self._classes))

    def __len__(self) -> int:
        return self.num_classes
