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

import os
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np

from .build import (builtin_files, check_acyclic, check_classes, children_of, lift_inner_classes, random_edges,
                    single_root)
from .distance_matrix import read_distance_matrix
from .edges import EdgeSet, HierarchyError, parse_classes, parse_edges, parse_nested, quote, read_text
from .nodes import TextSource, TreeNodes

if TYPE_CHECKING:
    import torch

__all__ = ["Hierarchy", "as_distance_matrix", "inner_node_name", "BUILTIN_NAMES", "CONVENTIONS", "INTERNAL_CLASSES",
           "INNER_SUFFIX"]

BUILTIN_NAMES = ("cifar100", "fgvc_aircraft", "inat19", "tiered_imagenet_h")
CONVENTIONS = ("published", "height")  # distance conventions (module docstring); the first is the default
# what a class at an inner node becomes (module docstring); the first is the default
INTERNAL_CLASSES = ("leaf", "error")
INNER_SUFFIX = ":node"  # appended to a class's name to name the inner node it stood for
ClassList = Union[Sequence[str], TextSource]  # class names in label order: a list, or a file of one name per line
# what as_distance_matrix (every distances argument) takes: a Hierarchy, a [K, K] array, list or tensor, a .npy/.csv
DistanceSource = Union["Hierarchy", np.ndarray, "torch.Tensor", Sequence[Sequence[float]], str, os.PathLike]


def _check_internal_classes(policy) -> str:
    """Return a valid internal_classes policy, or raise naming the valid ones."""
    if policy not in INTERNAL_CLASSES:
        raise HierarchyError(f"unknown internal_classes {quote(policy)}; valid: {', '.join(INTERNAL_CLASSES)} "
                             "('leaf' gives a class at an inner node a leaf of its own)")
    return policy


def inner_node_name(cls: str) -> str:
    """The derived name of the inner node that class cls stood for, once cls hangs below it as a leaf."""
    return cls + INNER_SUFFIX


def _check_convention(convention) -> str:
    """Return a valid distance-convention name, or raise naming the valid ones."""
    if convention not in CONVENTIONS:
        raise HierarchyError(f"unknown distance convention {quote(convention)}; valid: {', '.join(CONVENTIONS)} "
                             "('published' reproduces the published distance matrices)")
    return convention


# ----------------------------------------------------------------------------- the tree
class Hierarchy(TreeNodes):
    """A rooted tree whose leaves are the classes, with LCA-height distances between classes."""

    def __init__(self, parent_of: Mapping[str, str], classes: Optional[ClassList] = None, *,
                 internal_classes: str = "leaf") -> None:
        """Build from a child -> parent mapping; same as ``Hierarchy.from_parents``.

        Args:
            parent_of: child name -> parent name, one entry per edge; the node that is nobody's child is the root.
            classes: the class names in label order (line i of a file is label i): a list, a path or an open
                file; default the sorted leaves.
            internal_classes: 'leaf' (a class at an inner node gets a leaf of its own, module docstring) or
                'error' (refuse it); the same for every constructor.

        Raises:
            HierarchyError: no edges, a cycle, several roots, an unknown, duplicate or missing class, or (under
                'error') a class at an inner node; the same for every constructor.
        """
        edges = EdgeSet()
        for child, parent in parent_of.items():
            edges.add(parent, child, f"entry {quote(child)}: {quote(parent)}")
        self._build(edges, classes, "parent mapping", internal_classes)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_parents(cls, parent_of: Mapping[str, str], classes: Optional[ClassList] = None, *,
                     internal_classes: str = "leaf") -> "Hierarchy":
        """Build from a mapping child -> parent (classes: list/path/file, default the sorted leaves).

        Args:
            parent_of: child name -> parent name, one entry per edge.
            classes: the class names in label order (a list, a path or an open file); default the sorted leaves.
            internal_classes: 'leaf' (a class at an inner node gets a leaf of its own, module docstring)
                or 'error' (refuse it); the same for every constructor.

        Returns:
            The hierarchy, under the published distance convention (``with_convention`` changes it).
        """
        return cls(parent_of, classes, internal_classes=internal_classes)

    @classmethod
    def from_edges(cls, source: TextSource, classes: Optional[ClassList] = None, *,
                   internal_classes: str = "leaf") -> "Hierarchy":
        """Build from an edge-list path or open file (classes: list/path/file, default the sorted leaves).

        Args:
            source: a path or an open text or binary file of UTF-8 'parent child' lines (formats:
                :mod:`haframe_ext.hierarchy.edges`).
            classes: the class names in label order (a list, a path or an open file); default the sorted leaves.
            internal_classes: 'leaf' or 'error', as for ``from_parents``.

        Returns:
            The hierarchy.
        """
        text, label = read_text(source, "edge list")
        return cls._new(parse_edges(text, label), classes, label, internal_classes)

    @classmethod
    def from_nested(cls, obj: Union[Mapping[str, Any], TextSource], classes: Optional[ClassList] = None, *,
                    internal_classes: str = "leaf") -> "Hierarchy":
        """Build from nested dicts {name: {child: ...}} (leaf: {}, None or a name in a list), JSON text or path.

        Args:
            obj: the nested dicts with one root key, the same as JSON text, or a path or open file of that JSON.
            classes: the class names in label order (a list, a path or an open file); default the sorted leaves.
            internal_classes: 'leaf' or 'error', as for ``from_parents``.

        Returns:
            The hierarchy.
        """
        edges, label = parse_nested(obj)
        return cls._new(edges, classes, label, internal_classes)

    @classmethod
    def from_wordnet(cls, wnids: ClassList,
                     wordnet: Union[str, os.PathLike, None] = None, *, collapse: bool = True, parent: str = "first",
                     internal_classes: str = "leaf") -> "Hierarchy":
        """Build the tree of WordNet noun ids ``n########`` from WordNet's data.noun (rules:
        haframe_ext.hierarchy.wordnet).

        Args:
            wnids: the class ids in label order: a list, or a path / open file with one id per line.
            wordnet: a folder holding data.noun, a data.noun path or nltk's wordnet.zip; default: searched.
            collapse: remove the nodes that are not classes and have one child.
            parent: which hypernym a synset with several keeps, 'first' (listed first, as the published
                trees do) or 'deepest' (the one with the longest hypernym path to the top).
            internal_classes: 'leaf' or 'error', as for ``from_parents``.

        Returns:
            The hierarchy; ``wordnet_info`` says what the build chose.
        """
        from .wordnet import wordnet_edges  # imported when used: reading WordNet is rarely needed

        edges, ids, label, info = wordnet_edges(wnids, wordnet, collapse=collapse, parent=parent,
                                                internal_classes=_check_internal_classes(internal_classes))
        h = cls._new(edges, ids, label, internal_classes)
        h._wordnet_info = info
        return h

    @classmethod
    def builtin(cls, name: str) -> "Hierarchy":
        """Load a bundled benchmark hierarchy: 'cifar100', 'fgvc_aircraft', 'inat19' or 'tiered_imagenet_h'.

        Args:
            name: one of ``BUILTIN_NAMES``.

        Returns:
            The hierarchy with the benchmark's class order.

        Raises:
            HierarchyError: an unknown name.
        """
        if name not in BUILTIN_NAMES:
            raise HierarchyError(f"unknown builtin hierarchy {quote(name)}; valid names: {', '.join(BUILTIN_NAMES)}")
        h = cls.from_edges(*builtin_files(name))
        h._name = name
        return h

    @classmethod
    def random(cls, num_classes: int, seed: int = 0, max_children: int = 8) -> "Hierarchy":
        """A seeded random unbalanced tree with exactly num_classes leaves ('c0', 'c1', ... in label order).

        Each inner node splits its leaves among 2..max_children children by a uniform Dirichlet
        draw, so subtree sizes, and with them the leaf depths, vary; for tests and benchmarks at any K.

        Args:
            num_classes: K >= 2.
            seed: seed of numpy's default generator; the same seed gives the same tree.
            max_children: the most children of a node, >= 2.

        Returns:
            The hierarchy, its nodes named 'n0' (the root), 'n1', ... and its classes 'c0', 'c1', ....

        Raises:
            ValueError: K or max_children below 2, or a K whose tree would not fit in the available memory.
        """
        K = int(num_classes)
        edges = random_edges(K, seed, max_children)
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
        check_acyclic(edges)
        root = single_root(edges, label)
        children = children_of(edges.nodes, parent_of)
        inner: list[str] = []
        if classes is None:
            names = sorted(n for n in edges.nodes if not children[n])
        else:
            names, wheres = parse_classes(classes)
            check_classes(names, wheres, children, internal_classes)
            inner = [c for c in names if children[c]]
            if inner:
                renamed = {c: inner_node_name(c) for c in inner}
                parent_of, root = lift_inner_classes(parent_of, root, renamed, dict(zip(names, wheres)), children)
                children = children_of([root, *parent_of], parent_of)
        self._index_nodes(root, children, parent_of, names, inner)
        self._name = None
        self._wordnet_info = None
        self._convention = CONVENTIONS[0]
        self._distances = None
        self._tree = None

    # ------------------------------------------------------------------ queries
    @property
    def wordnet_info(self) -> Optional[dict]:
        """For a tree built by from_wordnet, what the build chose (haframe_ext.hierarchy.wordnet); else None."""
        return None if self._wordnet_info is None else dict(self._wordnet_info)

    def lca_height(self, node: str) -> int:
        """The distance this node gives as an LCA under the hierarchy's convention: d[i, j] = lca_height(LCA(i, j)).

        Args:
            node: the name of a node of the tree.

        Returns:
            0 for a leaf; else D - depth(node) (published) or node_height(node) (height).
        """
        return int(self._levels(self._convention)[self._idx(node)])

    @property
    def convention(self) -> str:
        """The distance convention of distances(), frames and metrics: 'published' (default) or 'height'."""
        return self._convention

    def with_convention(self, convention: str) -> "Hierarchy":
        """The same tree with distances under another convention ('published' or 'height'; module docstring).

        Args:
            convention: 'published' or 'height'.

        Returns:
            self when the convention is already this one, else a copy that shares the tree's index.

        Raises:
            HierarchyError: an unknown convention.
        """
        convention = _check_convention(convention)
        if convention == self._convention:
            return self
        out = Hierarchy.__new__(Hierarchy)
        out.__dict__.update(self.__dict__)
        out._convention, out._distances, out._tree = convention, None, None
        return out

    @property
    def tree(self):  # -> TreeOperator (imported when used: scipy loads with it)
        """The TreeOperator of this hierarchy under its convention: E, S, d products and pair distances, no K x K."""
        if self._tree is None:
            from .tree import TreeOperator
            self._tree = TreeOperator(self._parent_idx, self._depth, self._levels(self._convention), self._class_idx)
        return self._tree

    def distance_digest(self) -> str:
        """SHA-256 (hex) of what defines the class distances: the tree's shape, the class order, the convention.

        Equal digests give equal distances; node names do not enter (``classes`` is compared apart).

        Returns:
            64 hexadecimal digits.
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

    def tree_distances(self, convention: Optional[str] = None) -> np.ndarray:
        """The distance matrix computed on the tree, int64 [K, K], uncached (distances() caches it).

        O(K^2 + nodes) time, whatever the depth: with the classes in depth-first order every subtree
        is a contiguous block, written once per LCA (``TreeNodes._lca_matrix``).

        Args:
            convention: 'published' or 'height' (module docstring); default the hierarchy's.

        Returns:
            d, int64 [K, K] in label order, 0 on the diagonal.
        """
        return self._lca_matrix(self._levels(_check_convention(convention or self._convention)))

    def distances(self, convention: Optional[str] = None) -> np.ndarray:
        """Class distance matrix, int64 [K, K] (a copy): d[i, j] under convention, default the hierarchy's.

        K x K memory: for large K use ``tree`` (pair distances, products with E and S) instead.

        Args:
            convention: 'published' or 'height'; default the hierarchy's (whose matrix is cached).

        Returns:
            d, int64 [K, K] in label order, 0 on the diagonal (a copy).
        """
        convention = _check_convention(convention or self._convention)
        if convention != self._convention:
            return self.tree_distances(convention)
        if self._distances is None:
            self._distances = self.tree_distances()
        return self._distances.copy()

    def __repr__(self) -> str:
        name = f"{self._name!r}, " if self._name else ""
        return (f"Hierarchy({name}num_classes={self.num_classes}, nodes={len(self._order)}, "
                f"height={self.height}, root={self._root!r}, convention={self._convention!r})")



def as_distance_matrix(x: DistanceSource) -> np.ndarray:
    """A validated [K, K] distance matrix from a Hierarchy (its ``distances()``) or any input of
    :func:`haframe_ext.hierarchy.distance_matrix.read_distance_matrix` (a copy, int64 if all integer-valued else
    float64)."""
    if isinstance(x, Hierarchy):
        return x.distances()
    return read_distance_matrix(x)
