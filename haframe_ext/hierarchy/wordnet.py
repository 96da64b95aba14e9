"""Class hierarchies of WordNet noun ids (ImageNet's ``n########``) read from WordNet's own database files.

**The database.**  WordNet's WNDB ``data.noun`` holds one synset per line::

    offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [ptr ...] | gloss

``w_cnt`` is two hexadecimal digits, ``p_cnt`` three decimal digits, and each pointer is four
fields ``symbol offset pos source/target``.  Lines beginning with a space are the licence
header.  An ImageNet class id is ``n`` followed by the synset's 8-digit offset.  The files are
those that Debian's ``wordnet-base`` installs under ``/usr/share/wordnet`` and that nltk keeps
under ``nltk_data/corpora/wordnet`` (a folder, or nltk's ``wordnet.zip``).

**The ids.**  A class id is ``n`` and the 8-digit offset (``n02084071``); ``N02084071`` and
WordNet's offset-pos form ``02084071-n`` are read as the same id, and the classes are named
``n########`` whichever way they were written.  An id given twice, in any spelling, is refused.

**The tree.**  WordNet is a graph: a synset may list several hypernyms (pointer ``@``); a synset
without one (an instance, such as a person or a place) has instance hypernyms (``@i``) instead.
Each synset keeps one of them, by the rule ``parent``:

- ``"first"`` (default): the first one listed, as the published ImageNet trees do;
- ``"deepest"``: the one with the longest hypernym path up to the top (the first such on a tie),
  so the class sits at its most specific depth.

Either way every id above a class in the tree is one of its WordNet ancestors.  Following these
parents from every class id up to the top gives a tree; ``Hierarchy.wordnet_info`` says which rule
was used, how many synsets are on the classes' paths and how many of those had several hypernyms.
Single-child chains are then collapsed by default (as in the published ImageNet isa trees): a node
that is not a class and has one child is removed and its child joined to its parent;
``collapse=False`` keeps them.  A class id that is an ancestor of another class id (ImageNet-21k
labels images at several levels: about 4,500 of its 21,843 classes) becomes a leaf of its own below
its node, renamed ``n########:node`` (``internal_classes="leaf"``, see :mod:`haframe_ext.hierarchy`);
``internal_classes="error"`` refuses it, naming both ids.  On the 1,000 ImageNet-1k ids these rules
give a tree of 1,371 edges, the size of the published ImageNet-1k isa tree.  Node names are the
ids ``n########``.
"""

from __future__ import annotations

import os
import re
import sys
import zipfile

from .edges import EdgeSet, HierarchyError, parse_classes, quote

__all__ = ["wordnet_edges", "find_wordnet", "read_synsets", "wordnet_search_paths", "PARENT_RULES"]

_WNID = re.compile(r"[nN](\d{8})\Z|(\d{8})-[nN]\Z", re.ASCII)  # n02084071, N02084071, 02084071-n
PARENT_RULES = ("first", "deepest")  # which hypernym a synset keeps (module docstring); the first is the default
_INSTALL = ("install it with 'apt-get install wordnet-base' (Debian/Ubuntu), or with "
            "python -c \"import nltk; nltk.download('wordnet')\", or pass wordnet=<folder holding data.noun>")


# ----------------------------------------------------------------------------- finding the database
def _nltk_dirs() -> list[str]:
    """The folders nltk searches for its data, in its order (NLTK_DATA first)."""
    dirs = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    dirs.append(os.path.expanduser("~/nltk_data"))
    for prefix in dict.fromkeys((sys.prefix, getattr(sys, "base_prefix", sys.prefix))):
        dirs += [os.path.join(prefix, "nltk_data"), os.path.join(prefix, "share", "nltk_data"),
                 os.path.join(prefix, "lib", "nltk_data")]
    dirs += ["/usr/share/nltk_data", "/usr/local/share/nltk_data", "/usr/lib/nltk_data",
             "/usr/local/lib/nltk_data"]
    if os.environ.get("APPDATA"):  # nltk's default on Windows
        dirs.append(os.path.join(os.environ["APPDATA"], "nltk_data"))
    return list(dict.fromkeys(dirs))


def wordnet_search_paths() -> list[str]:
    """Where ``from_wordnet`` looks for ``data.noun`` when no location is given, in order."""
    paths = []
    if os.environ.get("WNSEARCHDIR"):  # WordNet's own variables
        paths.append(os.environ["WNSEARCHDIR"])
    if os.environ.get("WNHOME"):
        paths.append(os.path.join(os.environ["WNHOME"], "dict"))
    paths += ["/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/local/WordNet-3.0/dict",
              "/opt/homebrew/share/wordnet", "/opt/local/share/WordNet-3.0/dict"]
    for d in _nltk_dirs():
        paths += [os.path.join(d, "corpora", "wordnet"), os.path.join(d, "corpora", "wordnet.zip")]
    return list(dict.fromkeys(paths))


def _data_noun_in(path: str):
    """The data.noun inside a folder, a zip, or path itself; None when there is none."""
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == "data.noun"]
        return (path, min(names, key=len)) if names else None
    if os.path.isdir(path):
        for sub in ("data.noun", os.path.join("dict", "data.noun")):
            if os.path.isfile(os.path.join(path, sub)):
                return os.path.join(path, sub)
        return None
    return path if os.path.isfile(path) else None


def find_wordnet(wordnet=None):
    """The WordNet noun database: a data.noun path, or (zip path, member); raise naming the places tried."""
    if wordnet is not None:
        found = _data_noun_in(os.fspath(wordnet))
        if found is None:
            raise HierarchyError(
                f"WordNet: no data.noun at {quote(os.fspath(wordnet))}; give the folder holding WordNet's "
                f"database files (data.noun), its data.noun, or nltk's wordnet.zip, or {_INSTALL}")
        return found
    tried = wordnet_search_paths()
    for path in tried:
        found = _data_noun_in(path)
        if found is not None:
            return found
    raise HierarchyError(f"WordNet not found (looked for data.noun in {', '.join(tried)}); {_INSTALL}")


def _read_bytes(found) -> tuple[bytes, str]:
    """(contents, label) of a data.noun path or a (zip, member) pair."""
    if isinstance(found, tuple):
        with zipfile.ZipFile(found[0]) as zf:
            return zf.read(found[1]), f"WordNet file {quote(found[0] + ':' + found[1])}"
    with open(found, "rb") as fh:
        return fh.read(), f"WordNet file {quote(found)}"


# ----------------------------------------------------------------------------- parsing
class _Synsets:
    """The synset lines of a data.noun, parsed only when asked for."""

    def __init__(self, data: bytes, label: str) -> None:
        self.label = label
        self.lines: dict[int, bytes] = {}
        for raw in data.split(b"\n"):
            if not raw.strip() or raw[:1] in (b" ", b"\t"):  # blank or licence header
                continue
            head = raw.split(b" ", 1)[0]
            if not (head.isascii() and head.isdigit()):
                raise HierarchyError(
                    f"{label}: line {quote(raw.decode('latin-1'))} does not begin with a synset offset; "
                    "expected WordNet's WNDB data.noun format")
            self.lines[int(head)] = raw
        if not self.lines:
            raise HierarchyError(f"{label}: no synset lines; expected WordNet's WNDB data.noun format")
        self._parsed: dict[int, tuple] = {}

    def get(self, offset: int):
        """(words, hypernym offsets in file order) of a synset, or None when the file has no such synset."""
        if offset in self._parsed:
            return self._parsed[offset]
        raw = self.lines.get(offset)
        if raw is None:
            return None
        self._parsed[offset] = out = self._parse(offset, raw)
        return out

    def _parse(self, offset: int, raw: bytes):
        """Parse one synset line into (words, its '@' hypernyms, or its '@i' ones when it has no '@')."""
        line = raw.decode("utf-8", errors="replace")
        fields = line.split(" | ", 1)[0].split()
        try:
            n_words = int(fields[3], 16)
            words = [w.replace("_", " ") for w in fields[4:4 + 2 * n_words:2]]
            at = 4 + 2 * n_words
            n_ptrs = int(fields[at])
            ptrs = fields[at + 1:at + 1 + 4 * n_ptrs]
            if len(words) != n_words or len(ptrs) != 4 * n_ptrs:
                raise IndexError
        except (IndexError, ValueError):
            raise HierarchyError(
                f"{self.label}: malformed synset line for n{offset:08d}: {quote(line)}; expected "
                "'offset lex_filenum ss_type w_cnt word lex_id ... p_cnt [ptr ...] | gloss'") from None
        hyper = [(sym, int(off)) for sym, off, pos in zip(ptrs[0::4], ptrs[1::4], ptrs[2::4])
                 if sym in ("@", "@i") and pos == "n" and off.isascii() and off.isdigit()]
        parents = [off for sym, off in hyper if sym == "@"]  # the hypernyms ...
        if not parents:
            parents = [off for sym, off in hyper if sym == "@i"]  # ... or else the instance hypernyms
        return words, list(dict.fromkeys(parents))


def read_synsets(wordnet=None) -> _Synsets:
    """Open the WordNet noun database (see find_wordnet) for lookups by offset."""
    data, label = _read_bytes(find_wordnet(wordnet))
    return _Synsets(data, label)


# ----------------------------------------------------------------------------- the tree
def _name(synsets: _Synsets, offset: int) -> str:
    """'n######## (first word)' for messages."""
    got = synsets.get(offset)
    return f"n{offset:08d}" + (f" ({got[0][0]})" if got and got[0] else "")


def wordnet_edges(wnids, wordnet=None, *, collapse: bool = True, parent: str = "first",
                  internal_classes: str = "leaf") -> tuple[EdgeSet, list, str, dict]:
    """(edges, class ids, label, info) of the tree of WordNet noun ids (module docstring), for ``from_wordnet``.

    wnids: ids as a list, or a path / open file with one id per line (spellings: module docstring).
    wordnet: a folder holding data.noun, a data.noun path or nltk's wordnet.zip (default: searched).
    collapse: remove non-class nodes with one child (default True).
    parent: 'first' or 'deepest', which hypernym a synset with several keeps (module docstring).
    internal_classes: 'error' refuses a class id above another one; 'leaf' leaves it to the Hierarchy.
    info: {'parent': the rule, 'synsets': synsets on the classes' paths to the top,
    'several_hypernyms': how many of those had more than one hypernym to choose from}.
    """
    if parent not in PARENT_RULES:
        raise HierarchyError(f"unknown WordNet parent rule {quote(parent)}; valid: {', '.join(PARENT_RULES)} "
                             "('first' keeps the first listed hypernym, as the published trees do)")
    ids, offsets, wheres = _read_ids(wnids)
    synsets = read_synsets(wordnet)
    hypernyms = _hypernyms_above(synsets, offsets, wheres)
    up = _longest_paths_up(synsets, hypernyms)  # also refuses a cycle, which would never reach a top
    if parent == "deepest":
        choose = {n: max(hs, key=lambda h: up[h]) if hs else None for n, hs in hypernyms.items()}  # first of ties
    else:
        choose = {n: hs[0] if hs else None for n, hs in hypernyms.items()}
    parent_of: dict[int, int] = {}  # chosen hypernym of every synset on a class's path to the top
    for off in offsets:
        node = off
        while node is not None and node not in parent_of:
            parent_of[node] = choose[node]
            node = choose[node]
    info = {"parent": parent, "synsets": len(parent_of),
            "several_hypernyms": sum(len(hypernyms[n]) > 1 for n in parent_of)}
    roots = {_top(parent_of, off) for off in offsets}
    if len(roots) > 1:
        raise HierarchyError(
            f"the class ids reach {len(roots)} different tops in {synsets.label} "
            f"({', '.join(_name(synsets, r) for r in sorted(roots)[:8])}); a tree needs one: "
            "the database lacks the hypernyms that join them")
    if internal_classes == "error":
        _refuse_classes_above_classes(synsets, parent_of, offsets)
    return _tree_edges(synsets, parent_of, set(offsets), collapse), ids, f"WordNet hierarchy of {len(ids)} ids", info


def _read_ids(wnids) -> tuple[list[str], list[int], list[str]]:
    """(canonical ids n########, synset offsets, where each came from), refusing bad and repeated ids."""
    raw, wheres = parse_classes(wnids, "WordNet id")
    if len(raw) < 2:
        raise HierarchyError(f"from_wordnet needs at least 2 class ids, got {len(raw)}")
    ids, offsets, seen = [], [], {}
    for wnid, where in zip(raw, wheres):
        m = _WNID.match(wnid.strip()) if isinstance(wnid, str) else None
        if m is None:
            raise HierarchyError(
                f"{where}: {quote(wnid)} is not a WordNet noun id; expected 'n' and the 8-digit synset "
                "offset, such as n01440764 (or 01440764-n)")
        off = int(m.group(1) or m.group(2))
        if off in seen:
            first, first_where = seen[off]
            same = (f"duplicate id {quote(wnid)}" if first == wnid
                    else f"{quote(wnid)} is the id {quote(first)} spelled another way, a duplicate")
            raise HierarchyError(f"{where}: {same} (first at {first_where}); list each class once")
        seen[off] = (wnid, where)
        ids.append(f"n{off:08d}")
        offsets.append(off)
    return ids, offsets, wheres


def _hypernyms_above(synsets: _Synsets, offsets: list, wheres: list) -> dict[int, list]:
    """synset -> its hypernyms, for every synset above the classes through any hypernym (the ancestor closure)."""
    hypernyms: dict[int, list] = {}
    for off, where in zip(offsets, wheres):
        stack = [(off, None)]  # (synset, the synset that named it as a hypernym)
        while stack:
            node, child = stack.pop()
            if node in hypernyms:
                continue
            got = synsets.get(node)
            if got is None:
                hint = "" if child is None else f", the hypernym of {_name(synsets, child)}"
                raise HierarchyError(
                    f"{where}: n{node:08d}{hint} is not a noun synset of {synsets.label}; check the id "
                    "(ImageNet ids are WordNet 3.0 noun offsets)")
            hypernyms[node] = got[1]
            stack.extend((h, node) for h in got[1])
    return hypernyms


def _longest_paths_up(synsets: _Synsets, hypernyms: dict) -> dict[int, int]:
    """synset -> the number of edges on its longest hypernym path to a top; raise on a cycle."""
    up: dict[int, int] = {}
    for start in hypernyms:
        stack, on_path = [start], set()
        while stack:
            node = stack[-1]
            if node in up:
                stack.pop()
                continue
            todo = [h for h in hypernyms[node] if h not in up]
            if node not in on_path and todo:  # first visit: its hypernyms go first
                on_path.add(node)
                cycle = next((h for h in todo if h in on_path), None)
                if cycle is not None:
                    raise HierarchyError(
                        f"{synsets.label}: the hypernyms above {_name(synsets, node)} form a cycle through "
                        f"{_name(synsets, cycle)}; the database is damaged, reinstall WordNet")
                stack.extend(todo)
                continue
            up[node] = 1 + max((up[h] for h in hypernyms[node]), default=-1)
            on_path.discard(node)
            stack.pop()
    return up


def _refuse_classes_above_classes(synsets: _Synsets, parent_of: dict, offsets: list) -> None:
    """Raise naming the first class id found above another class id on the chosen paths."""
    is_class = set(offsets)
    for off in offsets:
        p = parent_of[off]
        while p is not None:
            if p in is_class:
                raise HierarchyError(
                    f"class id {_name(synsets, p)} is an ancestor of class id {_name(synsets, off)} in "
                    "WordNet; classes must be leaves under internal_classes='error' (the default 'leaf' "
                    "gives the ancestor a leaf of its own), or remove one of them")
            p = parent_of[p]


def _tree_edges(synsets: _Synsets, parent_of: dict, is_class: set, collapse: bool) -> EdgeSet:
    """The edges of the chosen tree, single-child chains of non-class synsets removed when collapse is set."""
    n_children: dict[int, int] = {}
    for p in parent_of.values():
        if p is not None:
            n_children[p] = n_children.get(p, 0) + 1
    keep = (lambda n: True) if not collapse else (lambda n: n in is_class or n_children.get(n, 0) >= 2)
    edges = EdgeSet()
    for node in parent_of:
        if not keep(node):
            continue
        p = parent_of[node]
        while p is not None and not keep(p):
            p = parent_of[p]
        if p is not None:
            edges.add(f"n{p:08d}", f"n{node:08d}", f"{synsets.label}, n{node:08d}")
    return edges


def _top(parent: dict, node: int) -> int:
    """The top synset above node."""
    while parent[node] is not None:
        node = parent[node]
    return node
