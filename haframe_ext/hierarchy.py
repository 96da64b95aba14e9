"""Class hierarchies (trees whose leaves are the classes), their tree distances, and distance-matrix input.

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

Edge-list format (``from_edges`` / ``to_edges``): one ``parent child`` edge per line.
A line containing a tab splits on tabs only (names may contain spaces, such as
``v-Boeing 717``); a line without a tab splits on whitespace.  Blank lines and comment
lines are skipped: a comment line's first non-blank character is ``#``, followed by a space,
by nothing, or with no tab anywhere on the line.  So ``#tag<TAB>child`` is an edge from the node
``#tag``, and ``to_edges`` (which always writes tabs) reads back whole: a name may begin with
``#`` but not with ``# `` (every constructor refuses that, and names beginning with a
byte-order mark or containing NUL, which a file cannot carry back either).  The whitespace around each name is
stripped (so names never begin or end with whitespace).  Error messages quote at most about
80 characters of any input, then name its full length.  A class file holds one class per line
(the whole stripped line is the name; blank lines skipped), line i being label i.  A line repeating an edge already
given is tolerated and skipped, because merged or concatenated edge lists commonly
repeat the shared upper levels; a node given two *different* parents is an error.
"""

from __future__ import annotations

import io
import json
import os
import reprlib
import sys
from importlib import resources
from typing import Iterable, Mapping

import numpy as np

__all__ = ["Hierarchy", "HierarchyError", "as_distance_matrix", "BUILTIN_NAMES", "CONVENTIONS"]

BUILTIN_NAMES = ("cifar100", "fgvc_aircraft", "inat19", "tiered_imagenet_h")
CONVENTIONS = ("published", "height")  # distance conventions (module docstring); the first is the default

_MAX_LISTED = 8  # names listed in one error message before "..."
_MAX_QUOTED = 80  # characters of one quoted input kept in an error message


def _quote(value, limit: int = _MAX_QUOTED) -> str:
    """repr(value) for an error message, cut to about limit characters with the full length named.

    Only a prefix of a long string is repr'd, and containers go through reprlib (bounded depth),
    so a 50 MB line or a 5,000-deep list costs neither memory nor a RecursionError here.
    """
    if isinstance(value, (str, bytes)):
        text = repr(value[:limit])
        if len(value) <= limit and len(text) <= limit + 3:
            return text
        return f"{text[:limit]}... ({len(value)} characters)"
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, limit, limit
    text = short.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


class HierarchyError(ValueError):
    """The package's error for a malformed hierarchy, class list or distance matrix."""


# ----------------------------------------------------------------------------- reading input
def _check_convention(convention) -> str:
    """Return a valid distance-convention name, or raise naming the valid ones."""
    if convention not in CONVENTIONS:
        raise HierarchyError(f"unknown distance convention {_quote(convention)}; valid: {', '.join(CONVENTIONS)} "
                             "('published' reproduces the published distance matrices)")
    return convention


def _listed(names: Iterable) -> str:
    """Format names for an error message, at most _MAX_LISTED of them."""
    names = list(names)
    shown = ", ".join(_quote(n) for n in names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


def _decode(data, label: str) -> str:
    """Turn file contents into text, rejecting non-UTF-8 and binary data with a HierarchyError."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HierarchyError(
                f"{label}: not UTF-8 text (undecodable byte at offset {exc.start}); "
                "expected a UTF-8 text file") from None
    if not isinstance(data, str):
        raise HierarchyError(f"{label}: reading gave {type(data).__name__}, expected text")
    if "\x00" in data:
        raise HierarchyError(f"{label}: contains NUL bytes, so it is binary data, not a text file")
    return data[1:] if data.startswith("\ufeff") else data


def _read_text(source, what: str) -> tuple[str, str]:
    """Read a path or an open (text or binary) file; return (text, label for error messages)."""
    if isinstance(source, (str, os.PathLike)):
        label = f"{what} file {_quote(os.fspath(source))}"
        with open(source, "rb") as fh:
            return _decode(fh.read(), label), label
    if hasattr(source, "read"):
        label = f"{what} file {_quote(getattr(source, 'name', '<stream>'))}"
        try:
            data = source.read()
        except UnicodeDecodeError as exc:
            raise HierarchyError(
                f"{label}: not UTF-8 text (undecodable byte at offset {exc.start}); "
                "expected a UTF-8 text file") from None
        return _decode(data, label), label
    raise TypeError(f"{what} source must be a path or an open file, got {type(source).__name__}")


def _lines(text: str):
    """Yield (line number, line without its trailing CR/LF) for every line of text."""
    for lineno, raw in enumerate(text.split("\n"), 1):
        yield lineno, raw.rstrip("\r\n")


def _check_name(name, where: str) -> str:
    """Return name if it is usable as a node name, else raise naming the place it came from."""
    if not isinstance(name, str):
        raise HierarchyError(f"{where}: node names must be strings, got {type(name).__name__} {_quote(name)}")
    if not name or name != name.strip() or "\t" in name or "\r" in name or "\n" in name:
        raise HierarchyError(
            f"{where}: invalid node name {_quote(name)}; names must be non-empty, contain no tab or "
            "newline, and not begin or end with whitespace")
    if name.startswith(("# ", "\ufeff")) or "\x00" in name:
        # each would not survive to_edges then from_edges: a comment line, a byte-order mark the
        # reader drops, a NUL that makes the file binary
        raise HierarchyError(
            f"{where}: invalid node name {_quote(name)}; a name may not begin with '# ' (in an edge list "
            "that starts a comment line) or U+FEFF (a byte-order mark), nor contain NUL; rename the node")
    return name


class _Edges:
    """Collects parent->child edges, rejecting self-loops and second parents as they arrive."""

    def __init__(self) -> None:
        self.parent_of: dict[str, str] = {}
        self._where: dict = {}  # child -> where its edge came from: a message, or (label, line number, line)
        self.nodes: dict[str, None] = {}  # every node, in order of first appearance

    def where_of(self, child: str) -> str:
        """Where the edge of child came from, for a message."""
        w = self._where[child]
        return w if isinstance(w, str) else _line_place(*w)

    def add(self, parent: str, child: str, where) -> None:
        """Add one edge (where: a message, or (label, line number, line) rendered only for an error)."""
        place = where if isinstance(where, str) else _LazyPlace(where)
        _check_name(parent, place)
        _check_name(child, place)
        if parent == child:
            raise HierarchyError(f"{place}: self-loop, node {_quote(child)} is its own parent")
        old = self.parent_of.get(child)
        if old is not None:
            if old == parent:
                return  # duplicate edge: tolerated (see module docstring)
            raise HierarchyError(
                f"{place}: node {_quote(child)} has two parents, {_quote(old)} ({self.where_of(child)}) and "
                f"{_quote(parent)}; a tree gives each node exactly one parent")
        self.parent_of[child] = parent
        self._where[child] = where
        self.nodes.setdefault(parent)
        self.nodes.setdefault(child)


def _line_place(label: str, lineno: int, line: str) -> str:
    """'<file>, line N '<line>'' for a message."""
    return f"{label}, line {lineno} {_quote(line)}"


class _LazyPlace:
    """A (label, line number, line) place that is formatted only when a message uses it."""

    def __init__(self, place) -> None:
        self.place = place

    def __str__(self) -> str:
        return _line_place(*self.place)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _is_comment(line: str) -> bool:
    """True for an edge-list comment line (module docstring): '#' first, then a space, nothing, or no tab."""
    rest = line.lstrip()
    return rest.startswith("#") and (rest[1:2] in ("", " ") or "\t" not in rest)


def _parse_edges(text: str, label: str) -> _Edges:
    """Parse an edge list (see the module docstring for the format)."""
    edges = _Edges()
    for lineno, line in _lines(text):
        if not line.strip() or _is_comment(line):
            continue
        fields = [f.strip() for f in line.split("\t")] if "\t" in line else line.split()
        where = f"{label}, line {lineno}"
        if len(fields) != 2 or not all(fields):
            hint = "" if "\t" in line else "; names containing spaces need a tab between parent and child"
            raise HierarchyError(
                f"{where}: malformed line, expected 2 fields 'parent child' but got {len(fields)}: "
                f"{_quote(line)}{hint}")
        edges.add(fields[0], fields[1], (label, lineno, line))
    return edges


def _parse_classes(classes, what: str = "classes") -> tuple[list[str], list[str]]:
    """Turn a class list, path or file into (names, where each came from)."""
    if isinstance(classes, (str, os.PathLike)) or hasattr(classes, "read"):
        text, label = _read_text(classes, what)
        names, wheres = [], []
        for lineno, line in _lines(text):
            if line.strip():
                names.append(line.strip())
                wheres.append(f"{label}, line {lineno}")
        return names, wheres
    try:
        names = list(classes)
    except TypeError:
        raise TypeError(
            f"classes must be a list of names, a path or an open file, got {type(classes).__name__}") from None
    return names, [f"classes[{i}]" for i in range(len(names))]


# ----------------------------------------------------------------------------- the tree
class Hierarchy:
    """A rooted tree whose leaves are the classes, with LCA-height distances between classes."""

    def __init__(self, parent_of: Mapping[str, str], classes=None) -> None:
        """Build from a child -> parent mapping; same as ``Hierarchy.from_parents``."""
        edges = _Edges()
        for child, parent in parent_of.items():
            edges.add(parent, child, f"entry {_quote(child)}: {_quote(parent)}")
        self._build(edges, classes, label="parent mapping")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_parents(cls, parent_of: Mapping[str, str], classes=None) -> "Hierarchy":
        """Build from a mapping child -> parent (classes: list/path/file, default the sorted leaves)."""
        return cls(parent_of, classes)

    @classmethod
    def from_edges(cls, source, classes=None) -> "Hierarchy":
        """Build from an edge-list path or open file (classes: list/path/file, default the sorted leaves)."""
        text, label = _read_text(source, "edge list")
        return cls._new(_parse_edges(text, label), classes, label)

    @classmethod
    def from_nested(cls, obj, classes=None) -> "Hierarchy":
        """Build from nested dicts {name: {child: ...}} (leaf: {}, None or a name in a list), JSON text or path."""
        label = "nested hierarchy"
        if isinstance(obj, (str, os.PathLike)):
            if isinstance(obj, str) and obj.lstrip().startswith(("{", "[")):
                text = obj
            else:
                text, label = _read_text(obj, "JSON")
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise HierarchyError(
                    f"{label}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
            except RecursionError:  # json.loads recurses once per nesting level
                raise HierarchyError(
                    f"{label}: the JSON is nested too deeply for Python's JSON parser (about "
                    f"{sys.getrecursionlimit()} levels); write a deep tree as an edge list "
                    "('parent<TAB>child' lines, Hierarchy.from_edges)") from None
        if not isinstance(obj, Mapping):
            raise HierarchyError(
                f"{label}: the top level must be a dict {{root: {{child: ...}}}}, got {type(obj).__name__}")
        edges = _Edges()
        stack = [(None, name, sub) for name, sub in reversed(list(obj.items()))]
        while stack:
            parent, name, sub = stack.pop()
            where = f"{label}, node {_quote(name)}"
            _check_name(name, where)
            if parent is None:
                edges.nodes.setdefault(name)
            else:
                edges.add(parent, name, f"{label}, under {_quote(parent)}")
            if sub is None:
                continue
            if isinstance(sub, Mapping):
                stack.extend((name, child, grand) for child, grand in reversed(list(sub.items())))
            elif isinstance(sub, (list, tuple)):
                for item in reversed(sub):
                    if isinstance(item, Mapping):
                        stack.extend((name, child, grand) for child, grand in reversed(list(item.items())))
                    else:
                        stack.append((name, item, None))
            else:
                raise HierarchyError(
                    f"{where}: children must be a dict, a list of leaf names or None (a leaf), "
                    f"got {type(sub).__name__}")
        return cls._new(edges, classes, label)

    @classmethod
    def from_wordnet(cls, wnids, wordnet=None, *, collapse: bool = True) -> "Hierarchy":
        """Build the tree of WordNet noun ids ``n########`` from WordNet's data.noun (rule: haframe_ext.wordnet)."""
        from .wordnet import from_wordnet  # imported here: wordnet.py imports this module

        return from_wordnet(wnids, wordnet, collapse=collapse)

    @classmethod
    def builtin(cls, name: str) -> "Hierarchy":
        """Load a bundled benchmark hierarchy: 'cifar100', 'fgvc_aircraft', 'inat19' or 'tiered_imagenet_h'."""
        if name not in BUILTIN_NAMES:
            raise HierarchyError(f"unknown builtin hierarchy {_quote(name)}; valid names: {', '.join(BUILTIN_NAMES)}")
        folder = resources.files(__package__).joinpath("_hierarchies")
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
            raise ValueError(f"a random hierarchy needs num_classes >= 2 and max_children >= 2, got {K}, {max_children}")
        rng = np.random.default_rng(seed)
        edges = _Edges()
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
    def _new(cls, edges: _Edges, classes, label: str) -> "Hierarchy":
        """Create an instance from collected edges without going through __init__."""
        self = cls.__new__(cls)
        self._build(edges, classes, label)
        return self

    # ------------------------------------------------------------------ validation and indexing
    def _build(self, edges: _Edges, classes, label: str) -> None:
        """Validate the tree and the classes, then index nodes, depths and heights."""
        parent_of = edges.parent_of
        if not parent_of:
            raise HierarchyError(f"{label}: the hierarchy is empty (no edges); give at least one 'parent child' edge")
        self._check_acyclic(edges)
        roots = [n for n in edges.nodes if n not in parent_of]
        if len(roots) != 1:
            raise HierarchyError(
                f"{label}: the hierarchy has {len(roots)} roots ({_listed(roots)}); a tree needs exactly one, "
                "so add a common parent above them")
        children: dict[str, list[str]] = {n: [] for n in edges.nodes}
        for child, parent in parent_of.items():
            children[parent].append(child)
        order = [roots[0]]  # breadth-first
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

        leaves = [n for n in order if not children[n]]
        if classes is None:
            names, wheres = sorted(leaves), None
        else:
            names, wheres = _parse_classes(classes)
            self._check_classes(names, wheres, children, leaves)

        self._name = None
        self._root = roots[0]
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
    def _check_acyclic(edges: _Edges) -> None:
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
    def _check_classes(names, wheres, children, leaves) -> None:
        """Raise on duplicate, unknown or internal-node classes and on leaves missing from the classes."""
        if not names:
            raise HierarchyError("the class list is empty; give one class (a leaf name) per line")
        seen: dict[str, str] = {}
        for name, where in zip(names, wheres):
            if not isinstance(name, str):
                raise HierarchyError(f"{where}: class names must be strings, got {type(name).__name__} {_quote(name)}")
            if name in seen:
                raise HierarchyError(f"{where}: duplicate class {_quote(name)} (first at {seen[name]}); list each class once")
            seen[name] = where
            if name not in children:
                raise HierarchyError(
                    f"{where}: unknown class {_quote(name)}, not a node of the hierarchy; check the spelling")
            if children[name]:
                raise HierarchyError(
                    f"{where}: class {_quote(name)} is not a leaf (it has children {_listed(children[name])}); "
                    "classes must be the leaves of the tree")
        missing = [leaf for leaf in leaves if leaf not in seen]
        if missing:
            raise HierarchyError(
                f"{len(missing)} leaves are not in the class list ({_listed(missing)}); every leaf must be "
                "a class: add them to the classes or remove their edges")

    # ------------------------------------------------------------------ queries
    def _idx(self, node: str) -> int:
        """Index of a node, raising a HierarchyError for an unknown name."""
        try:
            return self._index[node]
        except (KeyError, TypeError):
            raise HierarchyError(f"unknown node {_quote(node)}; not in this hierarchy") from None

    @property
    def classes(self) -> list[str]:
        """The class names in label order (a copy)."""
        return list(self._classes)

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
        text = "".join(f"{self._order[self._parent_idx[i]]}\t{self._order[i]}\n" for i in range(1, len(self._order)))
        self._write(path, text)

    def to_classes(self, path) -> None:
        """Write the class names in label order, one per line, to a path or text file."""
        self._write(path, "".join(f"{c}\n" for c in self._classes))

    @staticmethod
    def _write(path, text: str) -> None:
        """Write text to a path (UTF-8) or to an open text file."""
        if hasattr(path, "write"):
            path.write(text)
        else:
            with open(path, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)

    def __len__(self) -> int:
        return self.num_classes

    def __repr__(self) -> str:
        name = f"{self._name!r}, " if self._name else ""
        return (f"Hierarchy({name}num_classes={self.num_classes}, nodes={len(self._order)}, "
                f"height={self.height}, root={self._root!r}, convention={self._convention!r})")


# ----------------------------------------------------------------------------- distance matrices
def _read_csv(path) -> np.ndarray:
    """Read a comma-separated numeric matrix, skipping one optional header line."""
    text, label = _read_text(path, "distance CSV")
    rows: list[list[float]] = []
    first = True
    for lineno, line in _lines(text):
        if not line.strip():
            continue
        try:
            rows.append([float(f) for f in line.split(",")])
        except ValueError:
            if first:
                first = False
                continue  # the first non-blank line may be a header
            raise HierarchyError(f"{label}, line {lineno}: non-numeric value in {_quote(line)}") from None
        first = False
        if len(rows[-1]) != len(rows[0]):
            raise HierarchyError(
                f"{label}, line {lineno}: {len(rows[-1])} values but the first row has {len(rows[0])}; "
                "every row of a distance matrix needs K values")
    if not rows:
        raise HierarchyError(f"{label}: no numeric rows; expected K lines of K comma-separated distances")
    return np.array(rows, dtype=np.float64)


def _fmt(v) -> str:
    """Format one matrix entry for a message (integers without a decimal point)."""
    v = v.item() if hasattr(v, "item") else v
    return str(int(v)) if isinstance(v, float) and v.is_integer() else repr(v)


_INT64_MAX = int(np.iinfo(np.int64).max)
_FLOAT_EXACT_INT = 2.0 ** 53  # float64 integers up to this are exact, so the int64 cast loses nothing


def _ragged_message(x, exc: Exception) -> str:
    """Error message for an input numpy cannot turn into an array, naming the first row of another length."""
    try:
        lengths = [len(row) for row in x]
    except TypeError:  # not a sequence of sequences
        lengths = []
    for i, n in enumerate(lengths):
        if n != lengths[0]:
            return (f"distance matrix must be square (K, K), but its rows have different lengths: row {i} "
                    f"has {n} entries and row 0 has {lengths[0]}; expected K rows of K numbers")
    return (f"distance matrix must be square (K, K) of numbers, but numpy cannot make an array of it "
            f"({exc}); expected K rows of K numbers")


def as_distance_matrix(x) -> np.ndarray:
    """Validate class distances and return them as a new [K, K] array, int64 if all integer-valued else float64.

    Accepts a Hierarchy, a numpy array (or nested list), a torch tensor, or a path to a ``.npy``
    (loaded without pickle) or ``.csv`` (comma-separated, optional header line) file.  Float
    matrices may be asymmetric or off the zero diagonal by rounding (1e-12 of the largest
    distance); they are then symmetrised and the diagonal set to 0.  Integer-valued floats
    become int64 only up to 2**53 (where float64 integers are exact); larger ones stay float64.
    Unsigned integers above the int64 maximum are refused rather than wrapped.
    """
    if isinstance(x, Hierarchy):
        return x.distances()
    if isinstance(x, (str, os.PathLike)):
        path = os.fspath(x)
        ext = os.path.splitext(path)[1].lower()
        if ext == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                raise  # the path itself is wrong, as for a .csv file: the OS error says so
            except (ValueError, EOFError, OSError) as exc:  # empty, truncated, pickled or not .npy at all
                raise HierarchyError(
                    f"distance file {_quote(path)}: not a readable .npy array; cannot load without pickle "
                    f"({type(exc).__name__}: {str(exc) or 'no data'}); write the [K, K] matrix with "
                    "numpy.save(path, d)") from None
        elif ext == ".csv":
            arr = _read_csv(path)
        else:
            raise HierarchyError(f"distance file {_quote(path)}: unknown extension {_quote(ext)}; use a .npy or .csv file")
    elif type(x).__module__.startswith("torch"):
        t = x.detach().cpu()
        arr = (t.double() if t.is_floating_point() else t).numpy()
    else:
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as exc:  # ragged nested lists: "inhomogeneous shape"
            raise HierarchyError(_ragged_message(x, exc)) from None

    if arr.dtype.kind not in "iuf":
        raise HierarchyError(f"distance matrix must be numeric (integers or floats), got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise HierarchyError(f"distance matrix must be square 2-D (K, K), got shape {arr.shape}")
    K = arr.shape[0]
    if K < 2:
        raise HierarchyError(f"distance matrix must have at least 2 classes, got K={K}")
    is_float = arr.dtype.kind == "f"
    if arr.dtype.kind == "u" and arr.max() > _INT64_MAX:  # would wrap to a negative int64
        i, j = np.argwhere(arr > _INT64_MAX)[0]
        raise HierarchyError(
            f"distance matrix entry d[{i},{j}]={_fmt(arr[i, j])} is too large: {arr.dtype} distances must "
            f"be at most {_INT64_MAX} (the int64 maximum); rescale the distances")
    d = arr.astype(np.float64 if is_float else np.int64)  # a copy
    if is_float:
        bad = np.argwhere(~np.isfinite(d))
        if len(bad):
            i, j = bad[0]
            raise HierarchyError(
                f"distance matrix is not finite: d[{i},{j}]={d[i, j]} (NaN/Inf); every entry must be a number")
        tol = 1e-12 * max(float(np.abs(d).max()), 1.0)
    else:
        tol = 0
    bad = np.argwhere((np.abs(d - d.T) > tol) if is_float else (d != d.T))  # d - d.T may wrap for int64
    if len(bad):
        i, j = bad[0]
        raise HierarchyError(
            f"distance matrix is not symmetric: d[{i},{j}]={_fmt(d[i, j])} but d[{j},{i}]={_fmt(d[j, i])}")
    bad = np.flatnonzero(np.abs(np.diagonal(d)) > tol)
    if len(bad):
        i = bad[0]
        raise HierarchyError(
            f"distance matrix has a non-zero diagonal: d[{i},{i}]={_fmt(d[i, i])}; "
            "a class is at distance 0 from itself")
    bad = np.argwhere(d < 0)
    if len(bad):
        i, j = bad[0]
        raise HierarchyError(
            f"distance matrix has a negative entry: d[{i},{j}]={_fmt(d[i, j])}; distances must be >= 0")
    if is_float:
        # Halve before adding: (d + d.T) / 2 overflows to inf near the float64 maximum.  Symmetric
        # entries are kept bit for bit; the others get a mean that is the same for (i, j) and (j, i).
        d = np.where(d == d.T, d, 0.5 * d + 0.5 * d.T)
        np.fill_diagonal(d, 0.0)
        # int64 only where every value is an integer that float64 holds exactly (|v| <= 2**53):
        # beyond that the cast could overflow or the values were rounded anyway, so keep float64.
        if d.max() <= _FLOAT_EXACT_INT and np.array_equal(d, np.round(d)):
            d = d.astype(np.int64)
    return d
