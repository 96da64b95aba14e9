"""Tests for haframe_ext.hierarchy: tree loading and validation, tree distances (both conventions),
distance-matrix input; random trees up to K = 2000 against a brute-force LCA height, cycles, roots and class
lists (RELIABILITY.md sections 1-2); classes at inner nodes, their derived names, and bundled digests."""

import io
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from haframe_ext import HAFrame
from haframe_ext.hierarchy import BUILTIN_NAMES, Hierarchy, HierarchyError, as_distance_matrix
from helpers import FAST, trees
from helpers import edge_text as _edge_text
from helpers import node_name as _name
from helpers import raises_hierarchy_error as _raises
from helpers import tree_parents as _build

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
    ("a1\na2\nb1\nB2\n", r"2 leaves are not in the class list \('b2', 'b3'\)"),
    ("a1\na2\nb1\nb2\n", r"1 leaves are not in the class list \('b3'\)"),
    ("\n", r"class list is empty"),
])
@pytest.mark.parametrize("policy", ["leaf", "error"])
def test_class_errors(classes, match, policy):
    if policy == "error" and "B2" in classes:
        match = r"line 4: class 'B2' is not a leaf \(it has children 'b2', 'b3'\)"
    with pytest.raises(HierarchyError, match=match):
        Hierarchy.from_edges(io.StringIO(TOY_EDGES), io.StringIO(classes), internal_classes=policy)


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


# ----------------------------------------------------------------------------- random valid trees against a brute force
# RELIABILITY.md sections 1 and 2: trees drawn by helpers.trees (K up to 2000) against an ancestor walk and the
# "split" construction written here, independent of the package (the LCA of two leaves is the node where their
# paths split, so every pair of leaves under two different children of a node v is at distance height(v)).
def _children(parent_of):
    kids: dict[str, list[str]] = {}
    for c, p in parent_of.items():
        kids.setdefault(p, []).append(c)
        kids.setdefault(c, [])
    return kids


def _root(parent_of):
    (root,) = {p for p in parent_of.values() if p not in parent_of}
    return root


def _heights(parent_of):
    """Longest downward path to a leaf, for every node (iterative post-order)."""
    kids = _children(parent_of)
    height: dict[str, int] = {}
    stack = [(_root(parent_of), False)]
    while stack:
        node, done = stack.pop()
        if done:
            height[node] = max((height[c] + 1 for c in kids[node]), default=0)
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in kids[node])
    return height


def _chain(parent_of, node):
    """node, its parent, ..., the root."""
    out = [node]
    while out[-1] in parent_of:
        out.append(parent_of[out[-1]])
    return out


def brute_lca_height(parent_of, heights, a, b):
    """Height of LCA(a, b) by walking a's ancestors until one is also an ancestor of b."""
    up_b = set(_chain(parent_of, b))
    for node in _chain(parent_of, a):
        if node in up_b:
            return heights[node]
    raise AssertionError("no common ancestor")


def brute_split_distances(parent_of, classes, heights):
    """Full [K, K] LCA heights by the split construction (independent of the package)."""
    kids = _children(parent_of)
    col = {c: i for i, c in enumerate(classes)}
    leaves_under: dict[str, list[int]] = {}
    stack = [(_root(parent_of), False)]
    D = np.full((len(classes), len(classes)), -1, dtype=np.int64)
    while stack:
        node, done = stack.pop()
        if not done:
            stack.append((node, True))
            stack.extend((c, False) for c in kids[node])
            continue
        if not kids[node]:
            leaves_under[node] = [col[node]]
            continue
        groups = [leaves_under.pop(c) for c in kids[node]]
        if len(groups) <= 6:  # pairs of child subtrees
            for x in range(len(groups)):
                for y in range(x + 1, len(groups)):
                    gx, gy = np.array(groups[x]), np.array(groups[y])
                    D[np.ix_(gx, gy)] = heights[node]
                    D[np.ix_(gy, gx)] = heights[node]
        else:  # many children: one masked block write (leaves in different child subtrees)
            idx = np.array([i for g in groups for i in g])
            gid = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
            block = D[np.ix_(idx, idx)]
            block[gid[:, None] != gid[None, :]] = heights[node]
            D[np.ix_(idx, idx)] = block
        leaves_under[node] = [i for g in groups for i in g]
    np.fill_diagonal(D, 0)
    assert (D >= 0).all()
    return D


def _published_levels(parent_of, classes):
    """Per node, the distance it gives as an LCA under the published convention: D - depth (0 at leaves)."""
    depth = {n: len(_chain(parent_of, n)) - 1 for n in set(parent_of) | set(parent_of.values())}
    inner = set(parent_of.values())
    D = max(depth[c] for c in classes)
    return {n: (D - depth[n]) if n in inner else 0 for n in depth}


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(trees(), st.randoms(use_true_random=False))
def test_distances_match_brute_force_lca_height(tree, rnd):
    parent_of, classes = tree
    h = Hierarchy.from_parents(parent_of, classes)
    d = h.distances()
    K = len(classes)
    assert d.shape == (K, K) and d.dtype == np.int64 and h.classes == classes
    heights = _heights(parent_of)
    levels = _published_levels(parent_of, classes)
    np.testing.assert_array_equal(d, brute_split_distances(parent_of, classes, levels))
    dh = h.distances(convention="height")
    np.testing.assert_array_equal(dh, brute_split_distances(parent_of, classes, heights))
    # ancestor walk: every pair for small K, a random sample (plus the first row) for large K
    if K <= 60:
        pairs = [(i, j) for i in range(K) for j in range(K)]
    else:
        pairs = [(rnd.randrange(K), rnd.randrange(K)) for _ in range(400)] + [(0, j) for j in range(K)]
    for i, j in pairs:
        assert d[i, j] == brute_lca_height(parent_of, levels, classes[i], classes[j]), (i, j)
        assert dh[i, j] == brute_lca_height(parent_of, heights, classes[i], classes[j]), (i, j)
    assert h.height == heights[_root(parent_of)]


@pytest.mark.parametrize("kind,K", [("balanced", 2000), ("star", 2000), ("random", 2000), ("caterpillar", 400),
                                    ("random", 2), ("star", 2)])
def test_extreme_sizes_match_brute_force(kind, K):
    """The largest trees of each kind (and the smallest), deterministically, whatever hypothesis draws."""
    rng = np.random.default_rng(K)
    ids = _build(kind, K, rng)
    parent_of = {_name(c, "spaces"): _name(p, "spaces") for c, p in ids.items()}
    kids = set(parent_of.values())
    classes = [c for c in parent_of if c not in kids]
    h = Hierarchy.from_parents(parent_of, classes)
    for convention, levels in (("published", _published_levels(parent_of, classes)),
                               ("height", _heights(parent_of))):
        d = h.distances(convention=convention)
        np.testing.assert_array_equal(d, brute_split_distances(parent_of, classes, levels))
        for i in range(0, len(classes), max(1, len(classes) // 50)):
            for j in range(0, len(classes), max(1, len(classes) // 50)):
                assert d[i, j] == brute_lca_height(parent_of, levels, classes[i], classes[j])


@FAST
@given(trees(max_k=150), st.randoms(use_true_random=False))
def test_depth_lca_ancestors_are_consistent(tree, rnd):
    parent_of, classes = tree
    h = Hierarchy.from_parents(parent_of, classes)
    heights = _heights(parent_of)
    root = _root(parent_of)
    assert h.root == root and h.parent(root) is None and h.depth(root) == 0 and h.ancestors(root) == []
    assert sorted(h.nodes) == sorted(set(parent_of) | {root})
    for node in h.nodes:
        anc = h.ancestors(node)
        assert anc == _chain(parent_of, node)[1:]
        assert h.depth(node) == len(anc)
        assert h.node_height(node) == heights[node]
        assert h.is_leaf(node) == (node not in set(parent_of.values()))
        if node != root:
            assert h.parent(node) == parent_of[node] == anc[0] and anc[-1] == root
            assert node in h.children(parent_of[node])
    nodes = h.nodes
    for _ in range(200):
        a, b = rnd.choice(nodes), rnd.choice(nodes)
        c = h.lca(a, b)
        assert c == h.lca(b, a)
        up_a, up_b = [a] + h.ancestors(a), [b] + h.ancestors(b)
        assert c in up_a and c in up_b
        # lowest: no child of c is an ancestor-or-self of both
        assert not any(k in up_a and k in up_b for k in h.children(c))
        assert h.depth(c) <= min(h.depth(a), h.depth(b))
        assert h.lca(a, a) == a
    d, dh = h.distances(), h.distances(convention="height")
    D = max(h.depth(c) for c in classes)
    for _ in range(100):
        i, j = rnd.randrange(len(classes)), rnd.randrange(len(classes))
        lca = h.lca(classes[i], classes[j])
        assert dh[i, j] == h.node_height(lca)
        assert d[i, j] == (0 if i == j else D - h.depth(lca)) == h.lca_height(lca)


@FAST
@given(trees(max_k=400))
def test_to_edges_from_edges_round_trip(tree):
    parent_of, classes = tree
    h = Hierarchy.from_parents(parent_of, classes)
    edges, cls = io.StringIO(), io.StringIO()
    h.to_edges(edges)
    h.to_classes(cls)
    back = Hierarchy.from_edges(io.BytesIO(edges.getvalue().encode()), io.BytesIO(cls.getvalue().encode()))
    assert back.classes == h.classes and back.root == h.root
    assert sorted(back.nodes) == sorted(h.nodes)
    assert all(back.parent(n) == h.parent(n) for n in h.nodes)
    np.testing.assert_array_equal(back.distances(), h.distances())
    # the default class order (sorted leaves) also survives the round trip
    again = Hierarchy.from_edges(io.StringIO(edges.getvalue()))
    assert again.classes == sorted(classes)


def test_round_trip_through_files_with_very_long_and_numeric_names(tmp_path):
    long_a, long_b = "a" * 100_000, "9" * 5_000  # a 100k-character name; a "huge number" is just a name
    h = Hierarchy.from_parents({long_a: "root", long_b: "root", "1e400": long_a, "-0": long_a})
    h.to_edges(tmp_path / "e.tsv")
    h.to_classes(tmp_path / "c.txt")
    back = Hierarchy.from_edges(tmp_path / "e.tsv", tmp_path / "c.txt")
    assert back.classes == h.classes == sorted(["1e400", "-0", long_b])
    np.testing.assert_array_equal(back.distances(), [[0, 1, 2], [1, 0, 2], [2, 2, 0]])


def test_two_leaf_and_single_class_trees():
    h = Hierarchy.from_edges(io.StringIO("r a\nr b\n"))
    np.testing.assert_array_equal(h.distances(), [[0, 1], [1, 0]])
    one = Hierarchy.from_edges(io.StringIO("r a\n"))  # K=1 is a tree; a frame for it is refused below
    np.testing.assert_array_equal(one.distances(), [[0]])
    with pytest.raises(HierarchyError, match="at least 2 classes"):
        HAFrame.from_hierarchy(one, gamma=1.0)



# ----------------------------------------------------------------------------- malformed trees and class lists
# Every case: exactly HierarchyError with a message naming the problem.
@FAST
@given(trees(max_k=200, styles=("plain", "spaces")), st.data())
def test_cycle_is_reported(tree, data):
    parent_of, _ = tree
    root = _root(parent_of)
    node = data.draw(st.sampled_from(sorted(parent_of)))
    bad = dict(parent_of)
    bad[root] = node  # the root gets a descendant as parent: a cycle through the root
    msg = _raises(lambda: Hierarchy.from_edges(io.StringIO(_edge_text(bad))), "cycle")
    assert repr(root) in msg
    # a separate 3-cycle next to a valid tree is found as well
    extra = _edge_text(parent_of) + "x1\tx2\nx2\tx3\nx3\tx1\n"
    _raises(lambda: Hierarchy.from_edges(io.StringIO(extra)), "cycle", "'x1'")
    _raises(lambda: Hierarchy.from_parents({**parent_of, "self": "self"}), "self-loop")


@FAST
@given(trees(max_k=200), st.integers(1, 4))
def test_several_roots_is_reported(tree, extra):
    parent_of, _ = tree
    text = _edge_text(parent_of) + "".join(f"other root {i}\tstray leaf {i}\n" for i in range(extra))
    _raises(lambda: Hierarchy.from_edges(io.StringIO(text)), f"{extra + 1} roots", "exactly one")


@FAST
@given(trees(max_k=200, styles=("plain", "spaces", "unicode")), st.data())
def test_bad_class_lists_are_reported(tree, data):
    parent_of, classes = tree
    text = _edge_text(parent_of)
    internal = sorted(set(parent_of.values()))

    def load(cls_lines):
        return lambda: Hierarchy.from_edges(io.StringIO(text), io.StringIO("".join(f"{c}\n" for c in cls_lines)),
                                            internal_classes="error")

    i = data.draw(st.integers(0, len(classes) - 1))
    _raises(load(classes + ["no such class"]), "unknown class", "'no such class'")
    _raises(load(classes[: i + 1] + [classes[i]] + classes[i + 1:]), "duplicate class", repr(classes[i]))
    node = data.draw(st.sampled_from(internal))
    _raises(load(classes + [node]), "not a leaf", repr(node))
    _raises(load(classes[:i] + classes[i + 1:]), "not in the class list", repr(classes[i]))
    for empty in ["", "\n\n", "   \n\t\n"]:
        _raises(lambda: Hierarchy.from_edges(io.StringIO(text), io.StringIO(empty)), "class list is empty")


# ----------------------------------------------------------------------------- classes at inner nodes
# A class c at an inner node becomes a leaf, the first child of its node, which is renamed c:node; so with
# ancestors counted from the node itself, d[i, j] = level(LCA(i, j)) on the ORIGINAL tree for every i != j.
BUNDLED_DIGESTS = {  # Hierarchy.builtin(name).distance_digest(): lifting inner classes must leave these alone
    "cifar100": "4da583c627a77e96cde9725e6a7b3fab6f1c8a7dc88dcb49e5439625e999c0de",
    "fgvc_aircraft": "f8860e7014551ad6cfb59d8041a2d7d89f3319e4ea97440d7e517d7b7b243621",
    "inat19": "9ae9918455776bc513e680078d6cc41aae4a6c90dd9f537113ef109f4a22465b",
    "tiered_imagenet_h": "86aba95a29068311300f185cc31c66bda1cc8f308cb2597b1bcaa1112014e704",
}


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_bundled_digests_are_unchanged(name):
    h = Hierarchy.builtin(name)
    assert h.distance_digest() == BUNDLED_DIGESTS[name] and h.inner_classes == []


@pytest.mark.parametrize("classes", [
    ["a1", "B2", "a2", "b1", "b2", "b3"],  # one inner class
    ["root", "a1", "a2", "b1", "b2", "b3"],  # the root is a class
    ["B", "B2", "a1", "a2", "b1", "b2", "b3", "A", "root"],  # nested: B above B2, and every inner node
])
def test_inner_classes_on_the_toy_tree(classes):
    h = Hierarchy.from_edges(io.StringIO(TOY_EDGES), classes)
    inner = [c for c in classes if c in ("root", "A", "B", "B2")]
    assert h.inner_classes == inner and h.classes == classes
    for c in inner:
        node = c + ":node"
        assert h.is_leaf(c) and h.parent(c) == node and h.children(node)[0] == c
    assert all(h.is_leaf(c) for c in classes) and h.max_depth == 3  # D is the deepest original leaf
    d, col = h.distances(), {c: i for i, c in enumerate(classes)}
    depth = {"root": 0, "A": 1, "B": 1, "B2": 2}
    for c in inner:  # one step below the node it stood for: D - depth(node) to every descendant
        for x in TOY_CLASSES:
            if x in h.nodes and c in [a.removesuffix(":node") for a in h.ancestors(x)]:
                assert d[col[c], col[x]] == d[col[x], col[c]] == 3 - depth[c]


def test_inner_class_formats_agree():
    nested = {"root": {"A": ["a1", "a2"], "B": {"b1": None, "B2": {"b2": {}, "b3": {}}}}}
    parents = {"A": "root", "B": "root", "a1": "A", "a2": "A", "b1": "B", "B2": "B", "b2": "B2", "b3": "B2"}
    classes = ["B2", *TOY_CLASSES]
    built = [Hierarchy.from_edges(io.StringIO(TOY_EDGES), classes), Hierarchy.from_nested(nested, classes),
             Hierarchy.from_parents(parents, classes), Hierarchy(parents, classes)]
    assert len({h.distance_digest() for h in built}) == 1 and len({tuple(h.nodes) for h in built}) == 1
    np.testing.assert_array_equal(built[0].distances()[0], [0, 3, 3, 2, 1, 1])


@pytest.mark.parametrize("extra_edges,classes,keys", [  # B2:node a listed class; B2:node an inner node
    ("root B2:node\n", ["B2", "B2:node", *TOY_CLASSES], ["class 'B2:node' (classes[1])", "classes[0]: class 'B2'"]),
    ("root B2:node\nB2:node x\n", [*TOY_CLASSES, "x", "B2"], ["classes[6]", "node 'B2:node' of the hierarchy"]),
])
def test_a_derived_name_that_is_taken_is_refused(extra_edges, classes, keys):
    _raises(lambda: Hierarchy.from_edges(io.StringIO(TOY_EDGES + extra_edges), classes),
            "is an inner node, which is renamed 'B2:node'", "has that name already", *keys)


def test_internal_classes_error_and_bad_policy():
    _raises(lambda: Hierarchy.from_edges(io.StringIO(TOY_EDGES), ["B2", *TOY_CLASSES], internal_classes="error"),
            "class 'B2' is not a leaf", "internal_classes='leaf'")
    for bad in ("leaves", None, 1):
        _raises(lambda: Hierarchy.from_parents({"a": "r", "b": "r"}, internal_classes=bad),
                "unknown internal_classes", "valid: leaf, error")


@pytest.mark.parametrize("first,second", [  # composed vs decomposed; the Angstrom and Kelvin signs (either order)
    ("caf\u00e9", "cafe\u0301"), ("cafe\u0301", "caf\u00e9"), ("\u212b", "\u00c5"), ("K", "\u212a"),
    ("\u212a", "K")])
def test_one_class_in_two_spellings_is_refused(first, second):
    parents = {first: "r", second: "r", "x": "r"}
    _raises(lambda: Hierarchy.from_parents(parents, [first, "x", second]), "classes[2]",
            "spelled with other Unicode code points", "(classes[0])")


def _with_inner_classes(tree, data):
    """(parent_of, classes) of a helpers.trees tree with some inner nodes added to the classes at random places."""
    parent_of, classes = tree
    inner = sorted(set(parent_of.values()))
    chosen = data.draw(st.lists(st.sampled_from(inner), unique=True, max_size=min(len(inner), 12)))
    classes = list(classes)
    for c in chosen:
        classes.insert(data.draw(st.integers(0, len(classes))), c)
    return parent_of, classes


@FAST
@given(trees(max_k=120, styles=("plain", "spaces", "unicode")), st.data())
def test_random_trees_with_inner_classes(tree, data):
    parent_of, classes = _with_inner_classes(tree, data)
    h = Hierarchy.from_parents(parent_of, classes)
    inner = [c for c in classes if c in set(parent_of.values())]
    assert h.classes == classes and h.inner_classes == inner
    assert len(h.nodes) == len(set(parent_of) | set(parent_of.values())) + len(inner)
    t = h.tree  # the public arrays the losses and metrics read: every class is a leaf, parents come first
    assert np.bincount(t.parent[1:], minlength=t.num_nodes)[t.class_idx].max() == 0
    assert (t.parent[1:] < np.arange(1, t.num_nodes)).all() and (t.level[t.class_idx] == 0).all()
    K = len(classes)
    pairs = [(i, j) for i in range(K) for j in range(K) if i != j]
    if len(pairs) > 800:
        pairs = data.draw(st.permutations(pairs))[:800]
    for convention, levels in (("published", _published_levels(parent_of, [c for c in classes if c not in inner])),
                               ("height", _heights(parent_of))):
        d = h.distances(convention)
        assert (np.diag(d) == 0).all()
        for i, j in pairs:  # on the original tree, counting a node as its own ancestor
            assert d[i, j] == brute_lca_height(parent_of, levels, classes[i], classes[j]), (convention, i, j)
        np.testing.assert_array_equal(h.with_convention(convention).tree.pair_distances(
            np.array([i for i, _ in pairs], dtype=np.int64), np.array([j for _, j in pairs], dtype=np.int64)),
            [d[i, j] for i, j in pairs])
    # the written tree (every class a leaf now) rebuilds the same hierarchy, and so does a frame's state
    edges = io.StringIO()
    h.to_edges(edges)
    back = Hierarchy.from_edges(io.StringIO(edges.getvalue()), classes)
    assert back.distance_digest() == h.distance_digest() and back.nodes == h.nodes and back.inner_classes == []
    again = Hierarchy.from_parents({n: h.parent(n) for n in h.nodes[1:]}, classes)
    assert again.distance_digest() == h.distance_digest()
    if inner:
        _raises(lambda: Hierarchy.from_parents(parent_of, classes, internal_classes="error"), "not a leaf")


def test_frame_of_a_tree_with_inner_classes_round_trips(tmp_path):
    h = Hierarchy.from_edges(io.StringIO(TOY_EDGES), ["B", "root", *TOY_CLASSES, "B2"])
    frame = HAFrame.from_hierarchy(h, gamma=3.0)
    d = h.distances()
    E = np.exp(-3.0 * d / d.max())
    S = (1 - frame.s_min) * E + frame.s_min
    np.fill_diagonal(S, 1.0)
    W = frame.weight.double().numpy()
    np.testing.assert_allclose(W @ W.T, S, atol=1e-5)
    frame.save(tmp_path / "f.pt")
    back = HAFrame.load(tmp_path / "f.pt")
    assert back.hierarchy.distance_digest() == h.distance_digest() and back.hierarchy.classes == h.classes


def test_cli_counts_inner_classes_of_an_edge_list(tmp_path, capsys):
    from haframe_ext import cli

    (tmp_path / "t.tsv").write_text(TOY_EDGES)
    (tmp_path / "c.txt").write_text("\n".join(["B", *TOY_CLASSES, "B2"]) + "\n")
    argv = ["hierarchy", str(tmp_path / "t.tsv"), "--classes", str(tmp_path / "c.txt")]
    assert cli.main(argv + ["--out", str(tmp_path / "out.tsv")]) == 0
    printed = capsys.readouterr().out
    assert "classes at inner nodes     2 (each a leaf below its node, renamed '<class>:node')" in printed
    assert "WordNet" not in printed.split("\n", 1)[1]  # no hypernym row for an edge list
    h = Hierarchy.from_edges(tmp_path / "t.tsv", tmp_path / "c.txt")
    assert Hierarchy.from_edges(tmp_path / "out.tsv", tmp_path / "c.txt").distance_digest() == h.distance_digest()
    assert cli.main(argv + ["--internal-classes", "error"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("haframe: error:") and "class 'B' is not a leaf" in err and err.count("\n") == 1
