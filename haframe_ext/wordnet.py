"""Class hierarchies of WordNet noun ids (ImageNet's ``n########``) read from WordNet's own database files.

**The database.**  WordNet's WNDB ``data.noun`` holds one synset per line::

    offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [ptr ...] | gloss

``w_cnt`` is two hexadecimal digits, ``p_cnt`` three decimal digits, and each pointer is four
fields ``symbol offset pos source/target``.  Lines beginning with a space are the licence
header.  An ImageNet class id is ``n`` followed by the synset's 8-digit offset.  The files are
those that Debian's ``wordnet-base`` installs under ``/usr/share/wordnet`` and that nltk keeps
under ``nltk_data/corpora/wordnet`` (a folder, or nltk's ``wordnet.zip``).

**The tree.**  WordNet is a graph: a synset may list several hypernyms.  Each synset keeps its
FIRST listed hypernym (pointer ``@``); a synset without one (an instance, such as a person or a
place) keeps its first instance hypernym (``@i``).  Following these parents from every class id
up to the top gives a tree.  Single-child chains are then collapsed by default (as in the
published ImageNet isa trees): a node that is not a class and has one child is removed and its
child joined to its parent; ``collapse=False`` keeps them.  A class id that is an ancestor of
another class id is an error naming both (the classes must be the leaves).  On the 1,000
ImageNet-1k ids this rule gives a tree of 1,371 edges, the size of the published ImageNet-1k
isa tree.  Node names are the ids ``n########``.
"""

from __future__ import annotations

import os
import re
import sys
import zipfile

from .edges import EdgeSet, HierarchyError, parse_classes, quote

__all__ = ["wordnet_edges", "find_wordnet", "read_synsets", "wordnet_search_paths"]

_WNID = re.compile(r"n\d{8}\Z")
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
            if not head.isdigit():
                raise HierarchyError(
                    f"{label}: line {quote(raw.decode('latin-1'))} does not begin with a synset offset; "
                    "expected WordNet's WNDB data.noun format")
            self.lines[int(head)] = raw
        if not self.lines:
            raise HierarchyError(f"{label}: no synset lines; expected WordNet's WNDB data.noun format")
        self._parsed: dict[int, tuple] = {}

    def get(self, offset: int):
        """(words, parent offset or None) of a synset, or None when the file has no such synset."""
        if offset in self._parsed:
            return self._parsed[offset]
        raw = self.lines.get(offset)
        if raw is None:
            return None
        self._parsed[offset] = out = self._parse(offset, raw)
        return out

    def _parse(self, offset: int, raw: bytes):
        """Parse one synset line into (words, first hypernym offset or None)."""
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
                 if sym in ("@", "@i") and pos == "n" and off.isdigit()]
        first = next((off for sym, off in hyper if sym == "@"), None)  # the first hypernym ...
        if first is None:
            first = next((off for sym, off in hyper if sym == "@i"), None)  # ... or the first instance hypernym
        return words, first


def read_synsets(wordnet=None) -> _Synsets:
    """Open the WordNet noun database (see find_wordnet) for lookups by offset."""
    data, label = _read_bytes(find_wordnet(wordnet))
    return _Synsets(data, label)


# ----------------------------------------------------------------------------- the tree
def _name(synsets: _Synsets, offset: int) -> str:
    """'n######## (first word)' for messages."""
    got = synsets.get(offset)
    return f"n{offset:08d}" + (f" ({got[0][0]})" if got and got[0] else "")


def wordnet_edges(wnids, wordnet=None, *, collapse: bool = True) -> tuple[EdgeSet, list, str]:
    """(edges, class ids, label) of the tree of WordNet noun ids (module docstring), for ``Hierarchy.from_wordnet``.

    wnids: ids ``n########`` as a list, or a path / open file with one id per line.
    wordnet: a folder holding data.noun, a data.noun path or nltk's wordnet.zip (default: searched).
    collapse: remove non-class nodes with one child (default True).
    """
    ids, wheres = parse_classes(wnids, "WordNet id")
    if len(ids) < 2:
        raise HierarchyError(f"from_wordnet needs at least 2 class ids, got {len(ids)}")
    offsets, seen = [], {}
    for wnid, where in zip(ids, wheres):
        if not isinstance(wnid, str) or not _WNID.match(wnid):
            raise HierarchyError(
                f"{where}: {quote(wnid)} is not a WordNet noun id; expected 'n' and the 8-digit synset "
                "offset, such as n01440764")
        if wnid in seen:
            raise HierarchyError(f"{where}: duplicate id {wnid!r} (first at {seen[wnid]}); list each class once")
        seen[wnid] = where
        offsets.append(int(wnid[1:]))
    synsets = read_synsets(wordnet)

    parent: dict[int, int] = {}  # chosen hypernym of every synset on a path to the top
    for off, where in zip(offsets, wheres):
        node = off
        path = []
        while node is not None and node not in parent:
            got = synsets.get(node)
            if got is None:
                hint = "" if node == off else f", the hypernym of {_name(synsets, path[-1])}"
                raise HierarchyError(
                    f"{where}: n{node:08d}{hint} is not a noun synset of {synsets.label}; check the id "
                    "(ImageNet ids are WordNet 3.0 noun offsets)")
            path.append(node)
            parent[node] = got[1]
            node = got[1]
        if node is not None and node in path:  # earlier walks all end at a top, so a cycle shows here
            raise HierarchyError(
                f"{synsets.label}: the hypernyms above {_name(synsets, off)} form a cycle through "
                f"{_name(synsets, node)}; the database is damaged, reinstall WordNet")

    is_class = set(offsets)
    n_children: dict[int, int] = {}
    for child, p in parent.items():
        if p is not None:
            n_children[p] = n_children.get(p, 0) + 1
    for off in offsets:  # a class may not sit above another class
        p = parent[off]
        while p is not None:
            if p in is_class:
                raise HierarchyError(
                    f"class id {_name(synsets, p)} is an ancestor of class id {_name(synsets, off)} in "
                    "WordNet; classes must be leaves, so remove one of them (or build the tree with "
                    "Hierarchy.from_edges and give the ancestor a separate leaf)")
            p = parent[p]

    keep = (lambda n: True) if not collapse else (lambda n: n in is_class or n_children.get(n, 0) >= 2)
    edges = EdgeSet()
    for node in parent:
        if not keep(node):
            continue
        p = parent[node]
        while p is not None and not keep(p):
            p = parent[p]
        if p is not None:
            edges.add(f"n{p:08d}", f"n{node:08d}", f"{synsets.label}, n{node:08d}")
    roots = {_top(parent, off) for off in offsets}
    if len(roots) > 1:
        raise HierarchyError(
            f"the class ids reach {len(roots)} different tops in {synsets.label} "
            f"({', '.join(_name(synsets, r) for r in sorted(roots)[:8])}); a tree needs one: "
            "the database lacks the hypernyms that join them")
    return edges, ids, f"WordNet hierarchy of {len(ids)} ids"


def _top(parent: dict, node: int) -> int:
    """The top synset above node."""
    while parent[node] is not None:
        node = parent[node]
    return node
