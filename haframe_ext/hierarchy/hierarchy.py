"""Class hierarchies: trees whose leaves are the classes, and their class distances under a convention.

A hierarchy is a rooted tree.  The classes are its leaves, in label order.

**Distance convention.**  By default (``convention="published"``) the distance between
classes i != j is

    d[i, j] = D - depth(LCA(i, j)),    D = the depth of the deepest class,

and ``d[i, i] = 0``: the height of the LCA once every leaf is padded down to depth D.  This is
the convention of the published distance matrices ("Making Better Mistakes", used as they are
by the HAFrame, CRM and HAF code), so frames, s_min and metrics reproduce published numbers;
the bundled tieredImageNet-H tree and the ImageNet-1k isa tree give their published matrices
exactly.  ``convention="height"`` takes instead the longest downward path from the LCA to a
leaf.  The two agree on balanced trees and differ on unbalanced ones::

    root -> A -> a1, a2;  root -> B -> b1, B2 -> b2, b3     (D = 3)
    published: d[a1, a2] = 3 - 1 = 2     height: d[a1, a2] = 1   (A's longest path down)

**Classes at inner nodes.**  Label sets such as ImageNet-21k label images at several levels, so a
class may be an inner node of the tree (a genus above its species).  By default
(``internal_classes="leaf"``) such a class c becomes a leaf named c, the first child of the inner
node it stood for, and that node is renamed ``c:node`` (:func:`inner_node_name`); a derived name
that is already a node of the tree (a class or not) is refused.  So c is one step below its old
node, and under the published convention its distance to its descendants is ``D - depth(node)``.
Everything downstream (frames, metrics, checkpoints, ``to_edges``) sees the resulting tree, in
which every class is a leaf, so ``from_edges(written, classes)`` rebuilds it with the same digest.
``internal_classes="error"`` refuses such a class instead.  Two spellings of one class name (the
same text in composed and decomposed Unicode) are refused like a duplicate.

File formats and name rules: :mod:`haframe_ext.hierarchy.edges`; distance-matrix input:
:mod:`haframe_ext.hierarchy.distance_matrix`.
"""

from __future__ import annotations

import io
import unicodedata
from importlib import resources
from typing import Mapping

import numpy as np

from .distance_matrix import read_distance_matrix
from ..sizes import available_memory
from .edges import (EdgeSet, HierarchyError, listed, parse_classes, parse_edges, parse_nested, quote, read_text,
                    write_text)

__all__ = ["Hierarchy", "as_distance_matrix", "inner_node_name", "BUILTIN_NAMES", "CONVENTIONS", "INTERNAL_CLASSES",
           "INNER_SUFFIX"]

BUILTIN_NAMES = ("cifar100", "fgvc_aircraft", "inat19", "tiered_imagenet_h")
CONVENTIONS = ("published", "height")  # distance conventions (module docstring); the first is the default
# what a class at an inner node becomes (module docstring); the first is the default
INTERNAL_CLASSES = ("leaf", "error")
INNER_SUFFIX = ":node"  # appended to a class's name to name the inner node it stood for
_RANDOM_BYTES_PER_CLASS = 2048  # memory of Hierarchy.random per class (measured: about 720 bytes, then its tree)


def _check_internal_classes(policy) -> str:
    """Return a valid internal_classes policy, or raise naming the valid ones."""
    if policy not in INTERNAL_CLASSES:
        raise HierarchyError(f"unknown internal_classes {quote(policy)}; valid: {', '.join(INTERNAL_CLASSES)} "
                             "('leaf' gives a class at an inner node a leaf of its own)")
    return policy


def inner_node_name(cls: str) -> str:
    """The derived name of the inner node that class cls stood for, once cls hangs below it as a leaf."""
    return cls + INNER_SUFFIX


def _children_of(nodes, parent_of: Mapping[str, str]) -> dict[str, list[str]]:
    """node -> its children, in the order of their edges, for every node in nodes."""
    children: dict[str, list[str]] = {n: [] for n in nodes}
    for child, parent in parent_of.items():
        children[parent].append(child)
    return children


def _lift_inner_classes(parent_of: Mapping[str, str], root: str, inner: list, where_of: dict,
                        children: Mapping) -> tuple[dict[str, str], str]:
    """(parent_of, root) with each inner-node class c a leaf, first child of its node renamed c:node."""
    renamed = {c: inner_node_name(c) for c in inner}
    for c, node in renamed.items():
        if node in children:
            what = (f"class {quote(node)} ({where_of[node]})" if node in where_of
                    else f"node {quote(node)} of the hierarchy")
            raise HierarchyError(
                f"{where_of[c]}: class {quote(c)} is an inner node, which is renamed {quote(node)} so that the "
                f"class can be a leaf below it, but {what} has that name already; rename that node, "
                "or pass internal_classes='error' and give the class a leaf yourself")
    out = {c: node for c, node in renamed.items()}  # first: each class is the first child of its node
    for child, parent in parent_of.items():
        out[renamed.get(child, child)] = renamed.get(parent, parent)
    return out, renamed.get(root, root)


def _check_convention(convention) -> str:
    """Return a valid distance-convention name, or raise naming the valid ones."""
    if convention not in CONVENTIONS:
        raise HierarchyError(f"unknown distance convention {quote(convention)}; valid: {', '.join(CONVENTIONS)} "
                             "('published' reproduces the published distance matrices)")
    return convention



# ----------------------------------------------------------------------------- the tree
class Hierarchy:
    """A rooted tree whose leaves are the classes, with LCA-height distances between classes."""

    def __init__(self, parent_of: Mapping[str, str], classes=None, *, internal_classes: str = "leaf") -> None:
        """Build from a child -> parent mapping; same as ``Hierarchy.from_parents``."""
        edges = EdgeSet()
        for child, parent in parent_of.items():
            edges.add(parent, child, f"entry {quote(child)}: {quote(parent)}")
        self._build(edges, classes, "parent mapping", internal_classes)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_parents(cls, parent_of: Mapping[str, str], classes=None, *,
                     internal_classes: str = "leaf") -> "Hierarchy":
        """Build from a mapping child -> parent (classes: list/path/file, default the sorted leaves).

        internal_classes: 'leaf' (a class at an inner node gets a leaf of its own, module docstring)
        or 'error' (refuse it); the same for every constructor.
        """
        return cls(parent_of, classes, internal_classes=internal_classes)

    @classmethod
    def from_edges(cls, source, classes=None, *, internal_classes: str = "leaf") -> "Hierarchy":
        """Build from an edge-list path or open file (classes: list/path/file, default the sorted leaves)."""
        text, label = read_text(source, "edge list")
        return cls._new(parse_edges(text, label), classes, label, internal_classes)

    @classmethod
    def from_nested(cls, obj, classes=None, *, internal_classes: str = "leaf") -> "Hierarchy":
        """Build from nested dicts {name: {child: ...}} (leaf: {}, None or a name in a list), JSON text or path."""
        edges, label = parse_nested(obj)
        return cls._new(edges, classes, label, internal_classes)

    @classmethod
    def from_wordnet(cls, wnids, wordnet=None, *, collapse: bool = True, parent: str = "first",
                     internal_classes: str = "leaf") -> "Hierarchy":
        """Build the tree of WordNet noun ids ``n########`` from WordNet's data.noun (rules:
        haframe_ext.hierarchy.wordnet).

        parent: which hypernym a synset with several keeps, 'first' (listed first, as the published
        trees do) or 'deepest' (the one with the longest hypernym path to the top).
        """
        from .wordnet import wordnet_edges  # imported when used: reading WordNet is rarely needed

        edges, ids, label, info = wordnet_edges(wnids, wordnet, collapse=collapse, parent=parent,
                                                internal_classes=_check_internal_classes(internal_classes))
        h = cls._new(edges, ids, label, internal_classes)
        h._wordnet_info = info
        return h

    @classmethod
    def builtin(cls, name: str) -> "Hierarchy":
        """Load a bundled benchmark hierarchy: 'cifar100', 'fgvc_aircraft', 'inat19' or 'tiered_imagenet_h'."""
        if name not in BUILTIN_NAMES:
            raise HierarchyError(f"unknown builtin hierarchy {quote(name)}; valid names: {', '.join(BUILTIN_NAMES)}")
        folder = resources.files("haframe_ext").joinpath("_hierarchies")
        edges = io.BytesIO(folder.joinpath(f"{name}.tsv").read_bytes())
        edges.name = f"{name}.tsv"
        classes = io.BytesIO(folder.joinpath(f"{name}_classes.txt").read_bytes())
        classes.name = f"{name}_classes.txt"
        h = cls.from_edges(edges, classes)
        h._name = name
        return h

    @classmethod
    def random(cls, num_classes: int, seed: int = 0, max_children: int = 8) -> "Hierarchy":
        """A seeded random unbalanced tree with exactly num_classes leaves ('c0', 'c1', ... in label order).

        Each inner node splits its leaves among 2..max_children children by a uniform Dirichlet
        draw, so subtree sizes, and with them the leaf depths, vary; for tests and benchmarks at any K.
        """
        K = int(num_classes)
        if K < 2 or max_children < 2:
            raise ValueError("a random hierarchy needs num_classes >= 2 and max_children >= 2, "
                             f"got {K}, {max_children}")
        avail = available_memory()
        if avail is not None and K * _RANDOM_BYTES_PER_CLASS > avail:  # refused before it fills the memory
            raise ValueError(f"a random hierarchy of K={K:,} classes needs about "
                             f"{K * _RANDOM_BYTES_PER_CLASS / 2 ** 30:,.1f} GiB of memory and "
                             f"{avail / 2 ** 30:,.1f} GiB is available: at most about "
                             f"{avail // _RANDOM_BYTES_PER_CLASS:,} classes fit")
        rng = np.random.default_rng(seed)
        edges = EdgeSet()
        parent_of, nodes = edges.parent_of, edges.nodes
        queue, leaf, inner = [("n0", K)], 0, 1
        nodes["n0"] = None
        for name, n in queue:  # breadth-first; the queue grows while it is walked
            c = int(rng.integers(2, min(n, max_children) + 1))
            sizes = rng.multinomial(n - c, rng.dirichlet(np.ones(c))) + 1
            for size in sizes.tolist():
                if size == 1:
                    child, leaf = f"c{leaf}", leaf + 1
                else:
                    child, inner = f"n{inner}", inner + 1
                    queue.append((child, size))
                parent_of[child] = name
                nodes[child] = None
        h = cls._new(edges, [f"c{i}" for i in range(K)], f"random hierarchy (K={K}, seed={seed})")
        h._name = f"random:{K}"
        return h

    @classmethod
    def _new(cls, edges: EdgeSet, classes, label: str, internal_classes: str = "leaf") -> "Hierarchy":
        """Create an instance from collected edges without going through __init__."""
        self = cls.__new__(cls)
        self._build(edges, classes, label, internal_classes)
        return self

    # ------------------------------------------------------------------ validation and indexing
    def _build(self, edges: EdgeSet, classes, label: str, internal_classes: str = "leaf") -> None:
        """Validate the tree and the classes, give inner-node classes their leaves, then index the nodes."""
        internal_classes = _check_internal_classes(internal_classes)
        parent_of = edges.parent_of
        if not parent_of:
            raise HierarchyError(f"{label}: the hierarchy is empty (no edges); give at least one 'parent child' edge")
        self._check_acyclic(edges)
        roots = [n for n in edges.nodes if n not in parent_of]
        if len(roots) != 1:
            raise HierarchyError(
                f"{label}: the hierarchy has {len(roots)} roots ({listed(roots)}); a tree needs exactly one, "
                "so add a common parent above them")
        root = roots[0]
        children = _children_of(edges.nodes, parent_of)
        inner: list[str] = []
        if classes is None:
            names = sorted(n for n in edges.nodes if not children[n])
        else:
            names, wheres = parse_classes(classes)
            self._check_classes(names, wheres, children, internal_classes)
            inner = [c for c in names if children[c]]
            if inner:
                parent_of, root = _lift_inner_classes(parent_of, root, inner, dict(zip(names, wheres)), children)
                children = _children_of([root, *parent_of], parent_of)
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

        self._name = None
        self._inner_classes = inner
        self._wordnet_info = None
        self._root = root
        self._children = children
        self._parent_of = dict(parent_of)
        self._order = order
        self._index = index
        self._parent_idx = parent_idx
        self._depth = depth
        self._height = height
        self._classes = list(names)
        self._class_idx = np.array([index[c] for c in names], dtype=np.int64)
        self._convention = CONVENTIONS[0]
        self._distances = None
        self._tree = None

    @staticmethod
    def _check_acyclic(edges: EdgeSet) -> None:
        """Raise naming the cycle if following parents from some node comes back to it."""
        state: dict[str, int] = {}  # 1: on the current path, 2: known to reach a root
        for start in edges.nodes:
            path = []
            node = start
            while node is not None and state.get(node, 0) == 0:
                state[node] = 1
                path.append(node)
                node = edges.parent_of.get(node)
            if node is not None and state[node] == 1:
                cycle = path[path.index(node):][::-1]  # parent -> child order
                where = "; ".join(edges.where_of(c) for c in cycle)
                raise HierarchyError(
                    f"cycle in the hierarchy: {' -> '.join(map(repr, cycle + [cycle[0]]))} ({where}); "
                    "a tree has no cycles, so remove one of these edges")
            for n in path:
                state[n] = 2

    @staticmethod
    def _check_classes(names, wheres, children, internal_classes: str) -> None:
        """Raise on duplicate, unknown or (under 'error') inner-node classes and on leaves missing from the classes."""
        if not names:
            raise HierarchyError("the class list is empty; give one class (a leaf name) per line")
        seen: dict[str, str] = {}
        spelled: dict[str, str] = {}  # NFC form -> the first non-ASCII name with it (ASCII text is its own NFC form)
        for name, where in zip(names, wheres):
            if not isinstance(name, str):
                raise HierarchyError(f"{where}: class names must be strings, got {type(name).__name__} {quote(name)}")
            if name in seen:
                raise HierarchyError(f"{where}: duplicate class {quote(name)} (first at {seen[name]}); "
                                     "list each class once")
            seen[name] = where
            first = name
            if not name.isascii():
                key = unicodedata.normalize("NFC", name)
                first = spelled.setdefault(key, name)
                if first == name and key != name and key in seen:
                    first = key  # its composed spelling was listed before
            elif spelled:
                first = spelled.get(name, name)
            if first != name:  # two code-point sequences that display as one name
                raise HierarchyError(
                    f"{where}: class {quote(name)} is class {quote(first)} ({seen[first]}) spelled with other "
                    "Unicode code points (composed and decomposed accents); list each class once, spelled one way")
            if name not in children:
                raise HierarchyError(
                    f"{where}: unknown class {quote(name)}, not a node of the hierarchy; check the spelling")
            if children[name] and internal_classes == "error":
                raise HierarchyError(
                    f"{where}: class {quote(name)} is not a leaf (it has children {listed(children[name])}); "
                    "classes must be the leaves of the tree (internal_classes='leaf' gives it a leaf of its own)")
        missing = [n for n, kids in children.items() if not kids and n not in seen]
        if missing:
            raise HierarchyError(
                f"{len(missing)} leaves are not in the class list ({listed(missing)}); every leaf must be "
                "a class: add them to the classes or remove their edges")

    # ------------------------------------------------------------------ queries
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
    def wordnet_info(self):
        """For a tree built by from_wordnet, what the build chose (haframe_ext.hierarchy.wordnet); else None."""
        return None if self._wordnet_info is None else dict(self._wordnet_info)

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

    def parent(self, node: str):
        """The parent of node (None for the root)."""
        p = self._parent_idx[self._idx(node)]
        return None if p < 0 else self._order[p]

    def children(self, node: str) -> list[str]:
        """The children of node, in the order their edges were given."""
        return list(self._children[self._order[self._idx(node)]])

    def depth(self, node: str) -> int:
        """Number of edges from the root down to node."""
        return int(self._depth[self._idx(node)])

    def node_height(self, node: str) -> int:
        """Length of the longest downward path from node to a leaf."""
        return int(self._height[self._idx(node)])

    def lca_height(self, node: str) -> int:
        """The distance this node gives as an LCA under the hierarchy's convention: d[i, j] = lca_height(LCA(i, j))."""
        return int(self._levels(self._convention)[self._idx(node)])

    @property
    def max_depth(self) -> int:
        """D, the depth of the deepest class (the published convention pads every leaf down to it)."""
        return int(self._depth[self._class_idx].max())

    @property
    def is_balanced(self) -> bool:
        """True when every class is at the same depth (then both conventions give the same distances)."""
        leaf_depth = self._depth[self._class_idx]
        return bool(leaf_depth.min() == leaf_depth.max())

    @property
    def convention(self) -> str:
        """The distance convention of distances(), frames and metrics: 'published' (default) or 'height'."""
        return self._convention

    def with_convention(self, convention: str) -> "Hierarchy":
        """The same tree with distances under another convention ('published' or 'height'; module docstring)."""
        convention = _check_convention(convention)
        if convention == self._convention:
            return self
        out = Hierarchy.__new__(Hierarchy)
        out.__dict__.update(self.__dict__)
        out._convention, out._distances, out._tree = convention, None, None
        return out

    @property
    def tree(self):
        """The TreeOperator of this hierarchy under its convention: E, S, d products and pair distances, no K x K."""
        if self._tree is None:
            from .tree import TreeOperator
            self._tree = TreeOperator(self._parent_idx, self._depth, self._levels(self._convention), self._class_idx)
        return self._tree

    def distance_digest(self) -> str:
        """SHA-256 (hex) of what defines the class distances: the tree's shape, the class order, the convention.

        Equal digests give equal distances; node names do not enter (``classes`` is compared apart).
        """
        import hashlib

        t = self.tree
        h = hashlib.sha256(b"haframe-tree-distances-v1")
        for a in (t.parent, t.level, t.class_idx):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def _levels(self, convention: str) -> np.ndarray:
        """Per node, the distance it gives as an LCA, int64 [nodes]: 0 at leaves; D - depth or the height above."""
        if convention == "height":
            return self._height
        D = self.max_depth
        return np.where(self._height == 0, 0, D - self._depth)

    def is_leaf(self, node: str) -> bool:
        """True if node has no children."""
        return not self._children[self._order[self._idx(node)]]

    def ancestors(self, node: str) -> list[str]:
        """The ancestors of node, from its parent up to the root."""
        out = []
        p = self._parent_idx[self._idx(node)]
        while p >= 0:
            out.append(self._order[p])
            p = self._parent_idx[p]
        return out

    def lca(self, a: str, b: str) -> str:
        """The lowest common ancestor of nodes a and b."""
        i, j = self._idx(a), self._idx(b)
        while self._depth[i] > self._depth[j]:
            i = self._parent_idx[i]
        while self._depth[j] > self._depth[i]:
            j = self._parent_idx[j]
        while i != j:
            i, j = self._parent_idx[i], self._parent_idx[j]
        return self._order[i]

    def tree_distances(self, convention=None) -> np.ndarray:
        """The distance matrix computed on the tree, int64 [K, K], uncached (distances() caches it).

        convention: 'published' or 'height' (module docstring), default the hierarchy's.
        O(K^2 + nodes) time, whatever the depth: with the classes in depth-first order every subtree
        is a contiguous block, and the pairs whose LCA is node v are the blocks between one child's
        leaves and the leaves of the children before it, each written with v's height.
        """
        level = self._levels(_check_convention(convention or self._convention))
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

    def distances(self, convention=None) -> np.ndarray:
        """Class distance matrix, int64 [K, K] (a copy): d[i, j] under convention, default the hierarchy's.

        K x K memory: for large K use ``tree`` (pair distances, products with E and S) instead.
        """
        convention = _check_convention(convention or self._convention)
        if convention != self._convention:
            return self.tree_distances(convention)
        if self._distances is None:
            self._distances = self.tree_distances()
        return self._distances.copy()

    # ------------------------------------------------------------------ output
    def to_edges(self, path) -> None:
        """Write the tree as a tab-separated 'parent<TAB>child' edge list (breadth-first) to a path or text file."""
        write_text(path, "".join(f"{self._order[self._parent_idx[i]]}\t{self._order[i]}\n"
                                 for i in range(1, len(self._order))))

    def to_classes(self, path) -> None:
        """Write the class names in label order, one per line, to a path or text file."""
        write_text(path, "".join(f"{c}\n" for c in self._classes))

    def __len__(self) -> int:
        return self.num_classes

    def __repr__(self) -> str:
        name = f"{self._name!r}, " if self._name else ""
        return (f"Hierarchy({name}num_classes={self.num_classes}, nodes={len(self._order)}, "
                f"height={self.height}, root={self._root!r}, convention={self._convention!r})")



def as_distance_matrix(x) -> np.ndarray:
    """A validated [K, K] distance matrix from a Hierarchy (its ``distances()``) or any input of
    :func:`haframe_ext.hierarchy.distance_matrix.read_distance_matrix` (a copy, int64 if all integer-valued else
    float64)."""
    if isinstance(x, Hierarchy):
        return x.distances()
    return read_distance_matrix(x)
