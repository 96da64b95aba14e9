"""Tests for haframe_ext.hierarchy.edges: reading edge lists, class files and nested JSON, the name rules, and quoting.

Bad input of every kind (RELIABILITY.md section 1) must raise ``HierarchyError`` (a ``ValueError``)
whose message names the problem; no other exception may escape, and no message echoes a huge input whole.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from haframe_ext.hierarchy import Hierarchy, HierarchyError, as_distance_matrix
from helpers import FAST, trees
from helpers import edge_text as _edge_text
from helpers import raises_hierarchy_error as _raises


@FAST
@given(trees(max_k=200, styles=("plain", "spaces")), st.data())
def test_two_parents_is_reported(tree, data):
    parent_of, _ = tree
    child = data.draw(st.sampled_from(sorted(parent_of)))
    other = data.draw(st.sampled_from(sorted(set(parent_of) | set(parent_of.values()))))
    assume(other not in (parent_of[child], child))
    text = _edge_text(parent_of) + f"{other}\t{child}\n"
    msg = _raises(lambda: Hierarchy.from_edges(io.StringIO(text)), "two parents", repr(child))
    assert repr(other) in msg and repr(parent_of[child]) in msg
    # a repeated identical edge is not an error (documented): same tree
    dup = _edge_text(parent_of) + f"{parent_of[child]}\t{child}\n"
    np.testing.assert_array_equal(Hierarchy.from_edges(io.StringIO(dup)).distances(),
                                  Hierarchy.from_parents(parent_of).distances())


@pytest.mark.parametrize("text", ["", "\n", "\n\n\n", "   \t  \n", "# a comment\n# another\n", "\ufeff"])
def test_empty_edge_files(tmp_path, text):
    path = tmp_path / "empty.tsv"
    path.write_text(text, encoding="utf-8")
    _raises(lambda: Hierarchy.from_edges(path), "empty")
    _raises(lambda: Hierarchy.from_edges(io.StringIO(text)), "empty")


@pytest.mark.parametrize("line,key", [
    ("lonely", "malformed line"),
    ("a b c", "malformed line"),
    ("a\tb\tc", "malformed line"),
    ("a\t", "malformed line"),
    ("\tb", "malformed line"),
])
def test_malformed_lines(line, key):
    _raises(lambda: Hierarchy.from_edges(io.StringIO(f"r\tx\n{line}\n")), key, "line 2")


@settings(deadline=None, max_examples=150)
@given(st.binary(min_size=0, max_size=400))
def test_random_bytes_give_a_hierarchy_error_or_a_valid_tree(data):
    """Binary garbage: either HierarchyError or (if it happens to parse) a valid tree; nothing else."""
    for source in (io.BytesIO(data),):
        try:
            h = Hierarchy.from_edges(source)
        except HierarchyError as exc:
            assert type(exc) is HierarchyError and str(exc).strip()
        else:
            d = h.distances()
            assert d.shape == (h.num_classes, h.num_classes) and (np.diagonal(d) == 0).all()
    try:
        h = Hierarchy.from_edges(io.StringIO("r\ta\nr\tb\n"), io.BytesIO(data))
    except HierarchyError as exc:
        assert str(exc).strip()
    else:
        assert sorted(h.classes) == ["a", "b"]


@settings(deadline=None, max_examples=50)
@given(st.binary(min_size=0, max_size=200), st.binary(min_size=0, max_size=200))
def test_bytes_with_nul_or_invalid_utf8_are_named(before, after):
    nul = before + b"\x00" + after
    msg = _raises(lambda: Hierarchy.from_edges(io.BytesIO(nul)))
    try:
        nul.decode("utf-8")
    except UnicodeDecodeError:
        assert "not UTF-8" in msg or "NUL bytes" in msg
    else:
        assert "NUL bytes" in msg
    bad = before + b"\xff" + after  # 0xff never occurs in UTF-8
    msg = _raises(lambda: Hierarchy.from_edges(io.BytesIO(bad)))
    assert "not UTF-8" in msg or "NUL bytes" in msg


def test_binary_file_on_disk_and_in_text_mode(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)) * 4)
    _raises(lambda: Hierarchy.from_edges(path), "not UTF-8")
    with open(path, encoding="utf-8") as fh:
        _raises(lambda: Hierarchy.from_edges(fh), "not UTF-8")
    nul = tmp_path / "nul.tsv"
    nul.write_bytes(b"r\ta\n\x00\x00")
    _raises(lambda: Hierarchy.from_edges(nul), "NUL")


def test_missing_file_is_an_os_error_naming_the_path(tmp_path):
    """A path that does not exist is not malformed input: the standard FileNotFoundError, with the path."""
    missing = tmp_path / "nope.tsv"
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        Hierarchy.from_edges(missing)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        as_distance_matrix(tmp_path / "nope.csv")


def test_nested_json_garbage():
    _raises(lambda: Hierarchy.from_nested("{" * 5), "invalid JSON")
    _raises(lambda: Hierarchy.from_nested('{"r": {"a": 1.5}}'), "children must be")
    _raises(lambda: Hierarchy.from_nested('{"r": [["x"]]}'), "node names must be strings")


# --------------------------------------------------------------------- comment rule, deep nesting, quoting (section 22)
_HASH_NAMES = st.text(alphabet="#ab x-", min_size=1, max_size=6).map(str.strip).filter(
    lambda s: s and not s.startswith("# "))


@settings(max_examples=100, deadline=None)
@given(st.lists(_HASH_NAMES, min_size=3, max_size=8, unique=True))
def test_names_beginning_with_hash_survive_to_edges(names):
    # item 5: a chain of '#...' nodes with a second leaf under the root, written and read back
    parent_of = {names[i]: names[i - 1] for i in range(1, len(names))}
    parent_of["leaf"] = names[0]
    h = Hierarchy.from_parents(parent_of)
    buf = io.StringIO()
    h.to_edges(buf)
    back = Hierarchy.from_edges(io.BytesIO(buf.getvalue().encode()))
    assert sorted(back.nodes) == sorted(h.nodes) and back.classes == h.classes
    np.testing.assert_array_equal(back.distances(), h.distances())


def test_hash_tag_edge_is_read_and_comments_still_skipped():
    text = ("# a comment\n#\n#comment without a tab\n  # indented comment\twith a tab\n"
            "#tag\tchild\nroot\t#tag\nroot\tz\n")
    h = Hierarchy.from_edges(io.StringIO(text))
    assert h.parent("child") == "#tag" and h.parent("#tag") == "root" and len(h.nodes) == 4


@pytest.mark.parametrize("name", ["# x", "\ufeffr", "a\x00b"], ids=["hash-space", "bom", "nul"])
def test_names_a_file_cannot_carry_back_are_refused(name):
    with pytest.raises(HierarchyError, match="invalid node name"):
        Hierarchy.from_parents({name: "root", "y": "root"})
    with pytest.raises(HierarchyError, match="invalid node name"):
        Hierarchy.from_parents({"x": name, "y": name})


@pytest.mark.parametrize("text", ['{"a": ' * 5000 + "{}" + "}" * 5000, '{"r": ' + "[" * 5000 + "]" * 5000 + "}"],
                         ids=["dicts", "lists"])
def test_deeply_nested_json_is_a_hierarchy_error(text):
    # item 13: json.loads recurses once per level of dicts or lists
    with pytest.raises(HierarchyError, match="nested too deeply"):
        Hierarchy.from_nested(text)


def test_deep_python_nesting_builds_and_deep_lists_are_quoted_short():
    deep = {}
    node = deep
    for i in range(5000):
        node[f"n{i}"] = {}
        node = node[f"n{i}"]
    node["leaf"] = None
    node["leaf2"] = None
    h = Hierarchy.from_nested(deep)
    assert h.depth("leaf") == 5000
    bad = []
    for _ in range(5000):
        bad = [bad]
    with pytest.raises(HierarchyError) as info:  # a list where a leaf name belongs: repr must not recurse
        Hierarchy.from_nested({"r": [bad, "b"]})
    assert len(str(info.value)) < 400


_BIG = "x" * 50_000_000


@pytest.mark.parametrize("make,key", [
    (lambda: Hierarchy.from_edges(io.StringIO("r\ta\nr\tb\n" + _BIG + "\n")), "malformed line"),
    (lambda: Hierarchy.from_edges(io.StringIO("r\ta\n" + "a b " + _BIG + "\n")), "malformed line"),
    (lambda: Hierarchy.from_edges(io.StringIO("r\ta\nr\tb\n"), classes=["a", _BIG]), "unknown class"),
    (lambda: Hierarchy.from_edges(io.StringIO("r\ta\nr\tb\n"), classes=["a", "b", "c" * 10_000]), "unknown class"),
    (lambda: Hierarchy.from_edges(io.StringIO(f"r\ta\n{_BIG}\ta\n")), "two parents"),
    (lambda: Hierarchy.from_parents({_BIG + " ": "r"}), "invalid node name"),
    (lambda: Hierarchy.from_parents({"a": "r", "b": "r"}).depth(_BIG), "unknown node"),
    (lambda: Hierarchy.builtin(_BIG), "unknown builtin"),
    (lambda: Hierarchy.builtin("cifar100").with_convention(_BIG), "unknown distance convention"),
], ids=["edge-line", "space-line", "class", "class-10k", "two-parents", "name", "node", "builtin", "convention"])
def test_a_50mb_input_is_quoted_short(make, key):
    # item 17: every quoted input is cut to ~80 characters and its length named
    with pytest.raises(HierarchyError) as info:
        make()
    msg = str(info.value)
    assert key in msg and len(msg) < 800, msg[:1000]


# ----------------------------------------------------------------------------- issue 22 items 8 and 9
@pytest.mark.parametrize("classes", [{"x", "y", "z", "w"}, frozenset({"x", "y", "z", "w"}),
                                     {"w": 0, "x": 1, "y": 2, "z": 3}, {"x": 1, "w": 0, "z": 3, "y": 2}.keys()])
def test_unordered_or_mapped_class_lists_are_refused(classes):
    """Issue 22 item 8: a set's order changes per process and a mapping's indices would be dropped (class_to_idx
    relabelled): both are refused, naming the fix; a list in the same order builds."""
    nested = {"root": {"a": ["x", "y"], "b": ["z", "w"]}}
    with pytest.raises(TypeError, match="list of names in label order.*pass a list"):
        Hierarchy.from_nested(nested, classes=classes)
    assert Hierarchy.from_nested(nested, classes=["w", "x", "y", "z"]).classes == ["w", "x", "y", "z"]


def test_duplicate_json_keys_are_refused(tmp_path):
    """Issue 22 item 9: json keeps the last of two equal keys, so a subtree (and its classes) vanished."""
    text = '{"root": {"a": ["x", "y"], "a": ["z"]}}'
    with pytest.raises(HierarchyError, match="the key 'a' appears twice in one JSON object"):
        Hierarchy.from_nested(text)
    (tmp_path / "t.json").write_text(text)
    with pytest.raises(HierarchyError, match=r"t\.json.*the key 'a' appears twice"):
        Hierarchy.from_nested(tmp_path / "t.json")
