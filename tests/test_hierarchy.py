"""Tests for haframe_ext.hierarchy: tree loading and validation, tree distances (both conventions), distance-matrix input."""

import io
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from haframe_ext.hierarchy import BUILTIN_NAMES, Hierarchy, HierarchyError, as_distance_matrix

DATA = resources.files("haframe_ext").joinpath("_hierarchies")
PUBLISHED = Path(__file__).parent / "data"  # the published distance matrices, test data only

# root -> A -> {a1, a2};  root -> B -> {b1, B2 -> {b2, b3}}   (unbalanced: leaves at depth 2 and 3)
TOY_EDGES = "root A\nroot B\nA a1\nA a2\nB b1\nB B2\nB2 b2\nB2 b3\n"
TOY_CLASSES = ["a1", "a2", "b1", "b2", "b3"]
TOY_D = np.array([  # published convention: D - depth(LCA), D = 3
    [0, 2, 3, 3, 3],
    [2, 0, 3, 3, 3],
    [3, 3, 0, 2, 2],
    [3, 3, 2, 0, 1],
    [3, 3, 2, 1, 0],
])


TOY_D_HEIGHT = TOY_D.copy()  # height convention: A's longest downward path is 1
TOY_D_HEIGHT[0, 1] = TOY_D_HEIGHT[1, 0] = 1


def reference(name):
    """The published distance matrix of a builtin (test data)."""
    return np.load(PUBLISHED / f"{name}_reference_distances.npy", allow_pickle=False)


def toy():
    """The small unbalanced tree above."""
    return Hierarchy.from_edges(io.StringIO(TOY_EDGES))


# ----------------------------------------------------------------------------- builtins
@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_tree_distances_equal_published_matrix(name):
    h = Hierarchy.builtin(name)
    d = h.distances()
    assert d.dtype == np.int64 and h.convention == "published"
    np.testing.assert_array_equal(d, reference(name))  # every pair, tieredImageNet-H (unbalanced) included


def test_tiered_height_convention_differs_on_a_quarter_of_pairs():
    h = Hierarchy.builtin("tiered_imagenet_h")
    assert not h.is_balanced and h.max_depth == 12
    agree = (h.distances(convention="height") == reference("tiered_imagenet_h")).mean()
    assert 0.70 < agree < 0.76
    np.testing.assert_array_equal(h.with_convention("height").distances(), h.distances(convention="height"))


def test_conventions_on_the_toy_tree():
    h = toy()
    np.testing.assert_array_equal(h.distances(), TOY_D)
    np.testing.assert_array_equal(h.distances(convention="height"), TOY_D_HEIGHT)
    hh = h.with_convention("height")
    assert hh.convention == "height" and h.convention == "published"
    np.testing.assert_array_equal(hh.distances(), TOY_D_HEIGHT)
    assert h.lca_height("A") == 2 and hh.lca_height("A") == 1 and h.lca_height("a1") == 0
    with pytest.raises(HierarchyError, match="unknown distance convention 'lca'.*published, height"):
        h.distances(convention="lca")


@pytest.mark.parametrize("name,K,height", [
    ("cifar100", 100, 5), ("fgvc_aircraft", 100, 3), ("inat19", 1010, 7), ("tiered_imagenet_h", 608, 12)])
def test_builtin_sizes_and_class_order(name, K, height):
    h = Hierarchy.builtin(name)
    assert (h.num_classes, len(h), h.height) == (K, K, height)
    lines = DATA.joinpath(f"{name}_classes.txt").read_text(encoding="utf-8").splitlines()
    assert h.classes == lines
    assert name in repr(h)


def test_cifar100_is_in_dataset_label_order():
    classes = Hierarchy.builtin("cifar100").classes
    assert classes[0] == "apple" and classes[1] == "aquarium_fish" and classes[-1] == "worm"


def test_fgvc_names_with_spaces():
    h = Hierarchy.builtin("fgvc_aircraft")
    assert "f-Boeing 777" in h.ancestors("v-777-300")


def test_unknown_builtin_lists_valid_names():
    assert BUILTIN_NAMES == ("cifar100", "fgvc_aircraft", "inat19", "tiered_imagenet_h")
    with pytest.raises(HierarchyError, match="unknown builtin hierarchy 'imagenet'.*cifar100, fgvc_aircraft"):
        Hierarchy.builtin("imagenet")


def test_distances_returns_a_copy():
    h = toy()
    h.distances()[0, 1] = 99
    assert h.distances()[0, 1] == 2


# ----------------------------------------------------------------------------- tree queries
def test_toy_queries():
    h = toy()
    assert h.classes == TOY_CLASSES and h.num_classes == 5 and h.root == "root"
    assert h.height == 3
    assert h.parent("b2") == "B2" and h.parent("root") is None
    assert h.children("B") == ["b1", "B2"]
    assert [h.depth(n) for n in ("root", "A", "a1", "b3")] == [0, 1, 2, 3]
    assert [h.node_height(n) for n in ("root", "A", "B", "B2", "b1")] == [3, 1, 2, 1, 0]
    assert h.ancestors("b3") == ["B2", "B", "root"]
    assert h.lca("b2", "b3") == "B2" and h.lca("b1", "b3") == "B" and h.lca("a1", "b1") == "root"
    assert h.lca("B2", "b3") == "B2"
    assert h.is_leaf("a1") and not h.is_leaf("B")
    assert h.nodes[0] == "root" and len(h.nodes) == 9
    np.testing.assert_array_equal(h.distances(), TOY_D)
    assert "num_classes=5" in repr(h)


def test_unknown_node_query():
    with pytest.raises(HierarchyError, match="unknown node 'zz'"):
        toy().depth("zz")


def test_formats_agree():
    tsv = "# a comment\r\n\r\nroot\tA\r\nroot\tB\r\nA\ta1\nA\ta2\nB\tb1\nB\tB2\nB2\tb2\nB2\tb3\nA\ta1\n"
    nested = {"root": {"A": ["a1", "a2"], "B": {"b1": None, "B2": {"b2": {}, "b3": {}}}}}
    parents = {"A": "root", "B": "root", "a1": "A", "a2": "A", "b1": "B", "B2": "B", "b2": "B2", "b3": "B2"}
    for h in [Hierarchy.from_edges(io.StringIO(tsv)),  # tabs, CRLF, comment, blank line, repeated edge
              Hierarchy.from_edges(io.BytesIO(TOY_EDGES.encode())),
              Hierarchy.from_nested(nested),
              Hierarchy.from_nested(json.dumps(nested)),
              Hierarchy.from_parents(parents),
              Hierarchy(parents)]:
        assert h.classes == TOY_CLASSES
        np.testing.assert_array_equal(h.distances(), TOY_D)


def test_paths_and_class_files(tmp_path):
    (tmp_path / "t.txt").write_text(TOY_EDGES)
    (tmp_path / "c.txt").write_text("b3\nb2\nb1\na2\na1\n")
    (tmp_path / "t.json").write_text(json.dumps({"root": {"A": ["a1", "a2"], "B": {"b1": None, "B2": ["b2", "b3"]}}}))
    h = Hierarchy.from_edges(tmp_path / "t.txt", tmp_path / "c.txt")
    assert h.classes == ["b3", "b2", "b1", "a2", "a1"]
    np.testing.assert_array_equal(h.distances(), TOY_D[::-1, ::-1])
    assert Hierarchy.from_edges(str(tmp_path / "t.txt"), ["a2", "a1", "b1", "b2", "b3"]).distances()[0, 1] == 2
    np.testing.assert_array_equal(Hierarchy.from_nested(tmp_path / "t.json").distances(), TOY_D)


def test_to_edges_round_trip(tmp_path):
    h = Hierarchy.builtin("fgvc_aircraft")  # names with spaces
    h.to_edges(tmp_path / "e.tsv")
    h.to_classes(tmp_path / "c.txt")
    back = Hierarchy.from_edges(tmp_path / "e.tsv", tmp_path / "c.txt")
    assert back.classes == h.classes
    np.testing.assert_array_equal(back.distances(), h.distances())
    buf = io.StringIO()
    toy().to_edges(buf)
    assert buf.getvalue().splitlines()[0] == "root\tA"


@st.composite
def random_parents(draw):
    """A random tree as child -> parent, node i's parent drawn from nodes 0..i-1."""
    n = draw(st.integers(2, 25))
    return {f"n{i}": f"n{draw(st.integers(0, i - 1))}" for i in range(1, n)}


@settings(max_examples=60, deadline=None)
@given(random_parents())
def test_random_trees(parents):
    h = Hierarchy.from_parents(parents)
    d = h.distances()
    D = max(h.depth(c) for c in h.classes)  # published convention by brute force: D - depth(LCA)
    expected = np.array([[0 if a == b else D - h.depth(h.lca(a, b)) for b in h.classes] for a in h.classes])
    np.testing.assert_array_equal(d, expected)
    heights = np.array([[h.node_height(h.lca(a, b)) for b in h.classes] for a in h.classes])
    np.testing.assert_array_equal(h.distances(convention="height"), heights)
    # LCA heights form an ultrametric: d[i, k] <= max(d[i, j], d[j, k])
    assert (d[:, None, :] <= np.maximum(d[:, :, None], d[None, :, :])).all()
    buf = io.StringIO()
    h.to_edges(buf)
    buf.seek(0)
    np.testing.assert_array_equal(Hierarchy.from_edges(buf, h.classes).distances(), d)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("text,match", [
    ("", r"empty"),
    ("# only a comment\n\n", r"empty"),
    ("root A\nroot B extra\n", r"line 2: malformed line, expected 2 fields.*got 3: 'root B extra'"),
    ("root\tA\nA\ta1\ta2\n", r"line 2: malformed line.*got 3"),
    ("root\tA\nA\t\n", r"line 2: malformed line.*got 2"),
    ("root A\nA A\n", r"line 2.*self-loop, node 'A' is its own parent"),
    ("root A\nx y\ny z\nz x\n", r"cycle in the hierarchy: 'y' -> 'z' -> 'x' -> 'y' \(.*line 2 'x y'.*line 4 'z x'\)"),
    ("root A\nroot B\nA c\nB c\n", r"line 4 'B c': node 'c' has two parents, 'A' \(.*line 3 'A c'\) and 'B'"),
    ("r1 a\nr2 b\nr3 c\n", r"3 roots \('r1', 'r2', 'r3'\).*exactly one"),
])
def test_edge_list_errors(text, match):
    with pytest.raises(HierarchyError, match=match):
        Hierarchy.from_edges(io.StringIO(text))


@pytest.mark.parametrize("data,match", [
    (b"root A\n\xff\xfe\x80garbage\n", r"not UTF-8"),
    (b"root A\n\x00\x01\x02\x03", r"NUL bytes.*binary"),
])
def test_binary_garbage(tmp_path, data, match):
    path = tmp_path / "garbage.bin"
    path.write_bytes(data)
    with pytest.raises(HierarchyError, match=match):
        Hierarchy.from_edges(path)
    with pytest.raises(HierarchyError, match=match):
        Hierarchy.from_edges(io.BytesIO(data))
    with open(path, encoding="utf-8") as fh, pytest.raises(HierarchyError, match=match):
        Hierarchy.from_edges(fh)  # a text-mode file raises while reading


@pytest.mark.parametrize("classes,match", [
    ("a1\na2\nb1\na1\nb2\nb3\n", r"line 4: duplicate class 'a1' \(first at .*line 1\)"),
    ("a1\na2\nb1\nb2\nb3\nzz\n", r"line 6: unknown class 'zz', not a node"),
    ("a1\na2\nb1\nB2\n", r"line 4: class 'B2' is not a leaf \(it has children 'b2', 'b3'\)"),
    ("a1\na2\nb1\nb2\n", r"1 leaves are not in the class list \('b3'\)"),
    ("\n", r"class list is empty"),
])
def test_class_errors(classes, match):
    with pytest.raises(HierarchyError, match=match):
        Hierarchy.from_edges(io.StringIO(TOY_EDGES), io.StringIO(classes))


def test_class_list_errors_name_the_index():
    with pytest.raises(HierarchyError, match=r"classes\[2\]: duplicate class 'a1'"):
        Hierarchy.from_edges(io.StringIO(TOY_EDGES), ["a1", "a2", "a1"])


@pytest.mark.parametrize("obj,match", [
    ({"root": {"A": 3}}, r"children must be a dict, a list of leaf names or None"),
    ([1, 2], r"top level must be a dict"),
    ("{not json", r"invalid JSON"),
    ({"root": None}, r"empty"),
    ({"r1": ["a"], "r2": ["b"]}, r"2 roots"),
    ({"root": {"A": ["x"], "B": ["x"]}}, r"'x' has two parents, 'A'.* and 'B'"),
])
def test_nested_errors(obj, match):
    with pytest.raises(HierarchyError, match=match):
        Hierarchy.from_nested(obj)


def test_bad_names():
    with pytest.raises(HierarchyError, match="invalid node name 'a\\\\tb'"):
        Hierarchy.from_parents({"a\tb": "root"})
    with pytest.raises(HierarchyError, match="node names must be strings"):
        Hierarchy.from_parents({1: "root"})


# ----------------------------------------------------------------------------- distance matrices
def test_as_distance_matrix_inputs(tmp_path):
    np.save(tmp_path / "d.npy", TOY_D.astype(np.int8))
    (tmp_path / "d.csv").write_text("\n".join(",".join(map(str, r)) for r in TOY_D) + "\n")
    (tmp_path / "h.csv").write_text("a1,a2,b1,b2,b3\n" + "\n".join(",".join(f"{v:.1f}" for v in r) for r in TOY_D))
    for x in [toy(), TOY_D, TOY_D.tolist(), TOY_D.astype(float), torch.tensor(TOY_D, dtype=torch.float32),
              tmp_path / "d.npy", str(tmp_path / "d.csv"), tmp_path / "h.csv"]:
        d = as_distance_matrix(x)
        assert d.dtype == np.int64
        np.testing.assert_array_equal(d, TOY_D)
    half = as_distance_matrix(TOY_D / 2)
    assert half.dtype == np.float64 and half[0, 1] == 1.0


def _with(d, i, j, v):
    """d with entry (i, j) replaced by v."""
    d = np.array(d, dtype=float)
    d[i, j] = v
    return d


@pytest.mark.parametrize("x,match", [
    (np.zeros((3, 4)), r"must be square 2-D \(K, K\), got shape \(3, 4\)"),
    (np.zeros(4), r"must be square 2-D"),
    (np.zeros((1, 1)), r"at least 2 classes"),
    (_with(TOY_D, 0, 1, np.nan), r"not finite: d\[0,1\]=nan"),
    (_with(TOY_D, 2, 3, np.inf), r"not finite: d\[2,3\]=inf"),
    (_with(TOY_D, 3, 4, 5), r"not symmetric: d\[3,4\]=5 but d\[4,3\]=1"),
    (_with(TOY_D, 1, 1, 2), r"non-zero diagonal: d\[1,1\]=2"),
    (np.array([[0, -1], [-1, 0]]), r"negative entry: d\[0,1\]=-1"),
    (np.array([["a", "b"], ["c", "d"]]), r"must be numeric"),
])
def test_distance_matrix_errors(x, match):
    with pytest.raises(HierarchyError, match=match):
        as_distance_matrix(x)


def test_distance_file_errors(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(HierarchyError, match="cannot load without pickle"):
        as_distance_matrix(tmp_path / "obj.npy")
    (tmp_path / "bad.csv").write_text("0,1\n1,x\n")
    with pytest.raises(HierarchyError, match="line 2: non-numeric"):
        as_distance_matrix(tmp_path / "bad.csv")
    (tmp_path / "ragged.csv").write_text("0,1,2\n1,0\n")
    with pytest.raises(HierarchyError, match="line 2: 2 values but the first row has 3"):
        as_distance_matrix(tmp_path / "ragged.csv")
    (tmp_path / "d.txt").write_text("0,1\n1,0\n")
    with pytest.raises(HierarchyError, match="unknown extension '.txt'"):
        as_distance_matrix(tmp_path / "d.txt")
