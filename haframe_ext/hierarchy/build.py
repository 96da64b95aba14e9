"""A hierarchy's input before it is indexed: cycles, the root and the class list checked, inner-node classes lifted to
leaves; the edges of a seeded random tree and the bundled trees' files."""

from __future__ import annotations

import io
import unicodedata
from importlib import resources
from typing import Iterable, Mapping

import numpy as np

from .edges import EdgeSet, HierarchyError, listed, quote
from ..sizes import available_memory

__all__ = ["children_of", "check_acyclic", "single_root", "check_classes", "lift_inner_classes", "random_edges",
           "builtin_files"]

_RANDOM_BYTES_PER_CLASS = 2048  # memory of Hierarchy.random per class (measured: about 720 bytes, then its tree)


def children_of(nodes: Iterable[str], parent_of: Mapping[str, str]) -> dict[str, list[str]]:
    """node -> its children, in the order of their edges, for every node in nodes."""
    children: dict[str, list[str]] = {n: [] for n in nodes}
    for child, parent in parent_of.items():
        children[parent].append(child)
    return children


def check_acyclic(edges: EdgeSet) -> None:
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


def single_root(edges: EdgeSet, label: str) -> str:
    """The one node without a parent, or raise naming the roots found."""
    roots = [n for n in edges.nodes if n not in edges.parent_of]
    if len(roots) != 1:
        raise HierarchyError(
            f"{label}: the hierarchy has {len(roots)} roots ({listed(roots)}); a tree needs exactly one, "
            "so add a common parent above them")
    return roots[0]


def _first_spelling(name: str, seen: Mapping[str, str], spelled: dict[str, str]) -> str:
    """The class listed before whose name is ``name`` in other Unicode code points (NFC), else ``name``.

    spelled: NFC form -> the first non-ASCII name with it (ASCII text is its own NFC form), updated here."""
    if not name.isascii():
        key = unicodedata.normalize("NFC", name)
        first = spelled.setdefault(key, name)
        if first == name and key != name and key in seen:
            first = key  # its composed spelling was listed before
        return first
    return spelled.get(name, name) if spelled else name


def check_classes(names, wheres, children: Mapping[str, list], internal_classes: str) -> None:
    """Raise on duplicate, unknown or (under 'error') inner-node classes and on leaves missing from the classes."""
    if not names:
        raise HierarchyError("the class list is empty; give one class (a leaf name) per line")
    seen: dict[str, str] = {}
    spelled: dict[str, str] = {}
    for name, where in zip(names, wheres):
        if not isinstance(name, str):
            raise HierarchyError(f"{where}: class names must be strings, got {type(name).__name__} {quote(name)}")
        if name in seen:
            raise HierarchyError(f"{where}: duplicate class {quote(name)} (first at {seen[name]}); "
                                 "list each class once")
        seen[name] = where
        first = _first_spelling(name, seen, spelled)
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


def lift_inner_classes(parent_of: Mapping[str, str], root: str, renamed: Mapping[str, str], where_of: dict,
                       children: Mapping) -> tuple[dict[str, str], str]:
    """(parent_of, root) with each inner-node class c a leaf, first child of its node renamed ``renamed[c]``."""
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


def random_edges(K: int, seed: int, max_children: int) -> EdgeSet:
    """The edges of a seeded random unbalanced tree with K leaves 'c0', 'c1', ... (Hierarchy.random)."""
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
    return edges


def builtin_files(name: str) -> tuple[io.BytesIO, io.BytesIO]:
    """(edge list, class list) of a bundled hierarchy as named in-memory files (Hierarchy.builtin checks the name)."""
    folder = resources.files("haframe_ext").joinpath("_hierarchies")
    edges = io.BytesIO(folder.joinpath(f"{name}.tsv").read_bytes())
    edges.name = f"{name}.tsv"
    classes = io.BytesIO(folder.joinpath(f"{name}_classes.txt").read_bytes())
    classes.name = f"{name}_classes.txt"
    return edges, classes
