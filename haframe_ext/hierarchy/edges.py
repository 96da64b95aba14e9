"""Reading hierarchy input: text decoding, the edge-list and class-file formats, node-name rules, messages.

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

import json
import os
import reprlib
import sys
from typing import AbstractSet as Set, Iterable, Mapping

__all__ = ["HierarchyError", "EdgeSet", "parse_edges", "parse_classes", "parse_nested", "read_text", "quote", "listed",
           "check_name", "no_duplicate_keys", "numbered_lines", "write_text"]

_MAX_LISTED = 8  # names listed in one error message before "..."
_MAX_QUOTED = 80  # characters of one quoted input kept in an error message


def quote(value, limit: int = _MAX_QUOTED) -> str:
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


def listed(names: Iterable) -> str:
    """Format names for an error message, at most _MAX_LISTED of them."""
    names = list(names)
    shown = ", ".join(quote(n) for n in names[:_MAX_LISTED])
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


def read_text(source, what: str) -> tuple[str, str]:
    """Read a path or an open (text or binary) file; return (text, label for error messages)."""
    if isinstance(source, (str, os.PathLike)):
        label = f"{what} file {quote(os.fspath(source))}"
        with open(source, "rb") as fh:
            return _decode(fh.read(), label), label
    if hasattr(source, "read"):
        label = f"{what} file {quote(getattr(source, 'name', '<stream>'))}"
        try:
            data = source.read()
        except UnicodeDecodeError as exc:
            raise HierarchyError(
                f"{label}: not UTF-8 text (undecodable byte at offset {exc.start}); "
                "expected a UTF-8 text file") from None
        return _decode(data, label), label
    raise TypeError(f"{what} source must be a path or an open file, got {type(source).__name__}")


def numbered_lines(text: str):
    """Yield (line number, line without its trailing CR/LF) for every line of text."""
    for lineno, raw in enumerate(text.split("\n"), 1):
        yield lineno, raw.rstrip("\r\n")


def check_name(name, where: str) -> str:
    """Return name if it is usable as a node name, else raise naming the place it came from."""
    if not isinstance(name, str):
        raise HierarchyError(f"{where}: node names must be strings, got {type(name).__name__} {quote(name)}")
    if not name or name != name.strip() or "\t" in name or "\r" in name or "\n" in name:
        raise HierarchyError(
            f"{where}: invalid node name {quote(name)}; names must be non-empty, contain no tab or "
            "newline, and not begin or end with whitespace")
    if name.startswith(("# ", "\ufeff")) or "\x00" in name:
        # each would not survive to_edges then from_edges: a comment line, a byte-order mark the
        # reader drops, a NUL that makes the file binary
        raise HierarchyError(
            f"{where}: invalid node name {quote(name)}; a name may not begin with '# ' (in an edge list "
            "that starts a comment line) or U+FEFF (a byte-order mark), nor contain NUL; rename the node")
    return name


class EdgeSet:
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
        check_name(parent, place)
        check_name(child, place)
        if parent == child:
            raise HierarchyError(f"{place}: self-loop, node {quote(child)} is its own parent")
        old = self.parent_of.get(child)
        if old is not None:
            if old == parent:
                return  # duplicate edge: tolerated (see module docstring)
            raise HierarchyError(
                f"{place}: node {quote(child)} has two parents, {quote(old)} ({self.where_of(child)}) and "
                f"{quote(parent)}; a tree gives each node exactly one parent")
        self.parent_of[child] = parent
        self._where[child] = where
        self.nodes.setdefault(parent)
        self.nodes.setdefault(child)


def _line_place(label: str, lineno: int, line: str) -> str:
    """'<file>, line N '<line>'' for a message."""
    return f"{label}, line {lineno} {quote(line)}"


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


def parse_edges(text: str, label: str) -> EdgeSet:
    """Parse an edge list (see the module docstring for the format)."""
    edges = EdgeSet()
    for lineno, line in numbered_lines(text):
        if not line.strip() or _is_comment(line):
            continue
        fields = [f.strip() for f in line.split("\t")] if "\t" in line else line.split()
        where = f"{label}, line {lineno}"
        if len(fields) != 2 or not all(fields):
            hint = "" if "\t" in line else "; names containing spaces need a tab between parent and child"
            raise HierarchyError(
                f"{where}: malformed line, expected 2 fields 'parent child' but got {len(fields)}: "
                f"{quote(line)}{hint}")
        edges.add(fields[0], fields[1], (label, lineno, line))
    return edges


def parse_classes(classes, what: str = "classes") -> tuple[list[str], list[str]]:
    """Turn a class list, path or file into (names, where each came from)."""
    if isinstance(classes, (str, os.PathLike)) or hasattr(classes, "read"):
        text, label = read_text(classes, what)
        names, wheres = [], []
        for lineno, line in numbered_lines(text):
            if line.strip():
                names.append(line.strip())
                wheres.append(f"{label}, line {lineno}")
        return names, wheres
    if isinstance(classes, (Set, Mapping)):  # a set's order changes per process; a mapping's indices would be lost
        raise TypeError(f"classes must be a list of names in label order, a path or an open file, got a "
                        f"{type(classes).__name__}, whose order is not the labels': pass a list (for a mapping "
                        "name -> index: sorted(mapping, key=mapping.get))")
    try:
        names = list(classes)
    except TypeError:
        raise TypeError(
            f"classes must be a list of names, a path or an open file, got {type(classes).__name__}") from None
    return names, [f"classes[{i}]" for i in range(len(names))]


def no_duplicate_keys(pairs):
    """``json.loads``'s ``object_pairs_hook`` that refuses a key given twice in one object (json keeps the last, so
    the first would vanish without a word)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {quote(key)} appears twice in one JSON object: give each name once")
        out[key] = value
    return out


def parse_nested(obj) -> tuple["EdgeSet", str]:
    """Parse nested dicts {name: {child: ...}} (leaf: {}, None or a name in a list), JSON text or a JSON path."""

    label = "nested hierarchy"
    if isinstance(obj, (str, os.PathLike)):
        if isinstance(obj, str) and obj.lstrip().startswith(("{", "[")):
            text = obj
        else:
            text, label = read_text(obj, "JSON")
        try:
            obj = json.loads(text, object_pairs_hook=no_duplicate_keys)
        except json.JSONDecodeError as exc:
            raise HierarchyError(
                f"{label}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        except ValueError as exc:  # a duplicate key
            raise HierarchyError(f"{label}: {exc}") from None
        except RecursionError:  # json.loads recurses once per nesting level
            raise HierarchyError(
                f"{label}: the JSON is nested too deeply for Python's JSON parser (about "
                f"{sys.getrecursionlimit()} levels); write a deep tree as an edge list "
                "('parent<TAB>child' lines, Hierarchy.from_edges)") from None
    if not isinstance(obj, Mapping):
        raise HierarchyError(
            f"{label}: the top level must be a dict {{root: {{child: ...}}}}, got {type(obj).__name__}")
    edges = EdgeSet()
    stack = [(None, name, sub) for name, sub in reversed(list(obj.items()))]
    while stack:
        parent, name, sub = stack.pop()
        where = f"{label}, node {quote(name)}"
        check_name(name, where)
        if parent is None:
            edges.nodes.setdefault(name)
        else:
            edges.add(parent, name, f"{label}, under {quote(parent)}")
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

    return edges, label


def write_text(path, text: str) -> None:
    """Write text to a path (UTF-8, '\\n' line ends; atomically, so a full disk keeps the old file) or to an open
    text file."""
    if hasattr(path, "write"):
        path.write(text)
    else:
        from ..files import atomic_write_text  # the package's one temp-file writer

        atomic_write_text(text, path)
