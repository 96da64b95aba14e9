"""`haframe hierarchy` and its O(nodes) summary: sizes, depths, the convention's changed pairs, d_max, s_min."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haframe_ext import Hierarchy, cli
from haframe_ext.cli.report import convention_changes, hierarchy_summary


def brute_changes(h: Hierarchy) -> int:
    """Pairs i < j whose distance differs between the two conventions, from both K x K matrices."""
    a, b = h.distances("published"), h.distances("height")
    iu = np.triu_indices(h.num_classes, 1)
    return int((a[iu] != b[iu]).sum())


@st.composite
def random_trees(draw):
    """A child -> parent mapping of a random tree (node i > 0 below a node before it), with >= 2 leaves."""
    n = draw(st.integers(3, 60))
    parents = [draw(st.integers(0, i - 1)) for i in range(1, n)] + [0]  # the last: a second leaf, at depth 1
    return {f"v{i}": f"v{p}" for i, p in enumerate(parents, 1)}


@settings(max_examples=100, deadline=None)
@given(random_trees())
def test_changed_pairs_d_max_and_depths_match_brute_force(parent_of):
    h = Hierarchy.from_parents(parent_of)
    s = hierarchy_summary(h)
    assert s["pairs_changed"] == convention_changes(h) == brute_changes(h)
    assert s["d_max"] == h.distances().max()
    tall = hierarchy_summary(h.with_convention("height"))
    assert tall["convention"] == "height" and tall["d_max"] == h.distances("height").max()
    assert tall["pairs_changed"] == s["pairs_changed"]
    depths = [h.depth(c) for c in h.classes]
    assert (s["leaf_depth_min"], s["leaf_depth_max"], s["balanced"]) == (min(depths), max(depths),
                                                                          min(depths) == max(depths))
    assert s["classes"] == h.num_classes and s["nodes"] == len(h.nodes)


def test_tiered_imagenet_h_report(capsys):
    assert cli.main(["hierarchy", "tiered_imagenet_h", "--gamma", "3"]) == 0
    out = capsys.readouterr().out
    for line in ("classes K                  608", "nodes                      843",
                 "leaf depths                3 to 12", "balanced                   no",
                 "convention                 published (d = D - depth(LCA), D = 12",
                 "pairs 'height' changes     50383 of 184528 (27.30%)", "d_max                      12",
                 "s_min (gamma 3)            -0.079478 (exact)"):
        assert line in out, (line, out)
    h = Hierarchy.builtin("tiered_imagenet_h")
    assert brute_changes(h) == 50383


def test_height_convention_and_out(tmp_path, capsys):
    out = tmp_path / "edges.tsv"
    assert cli.main(["hierarchy", "tiered_imagenet_h", "--distance-convention", "height", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "convention                 height" in printed and "pairs 'published' changes  50383" in printed
    h = Hierarchy.builtin("tiered_imagenet_h")
    back = Hierarchy.from_edges(out, classes=h.classes)
    np.testing.assert_array_equal(back.distances(), h.distances())


def test_balanced_builtin_changes_nothing(capsys):
    assert cli.main(["hierarchy", "cifar100"]) == 0
    out = capsys.readouterr().out
    assert "balanced                   yes" in out and "changes     0 of 4950 (0.00%)" in out and "s_min" not in out


def test_edge_file_with_classes(tmp_path, capsys):
    (tmp_path / "t.tsv").write_text("r\tA\nA\ta1\nA\ta2\nr\tB\nB\tb1\nB\tB2\nB2\tb2\nB2\tb3\n")
    (tmp_path / "c.txt").write_text("b3\na1\na2\nb1\nb2\n")
    assert cli.main(["hierarchy", str(tmp_path / "t.tsv"), "--classes", str(tmp_path / "c.txt")]) == 0
    out = capsys.readouterr().out
    # D = 3: a1-a2 is 2 published, 1 height; b1-b2, b1-b3 are 2 under both; b2-b3 is 1 under both
    assert "classes K                  5" in out and "leaf depths                2 to 3" in out
    assert "changes     1 of 10 (10.00%)" in out and "d_max                      3" in out


def test_large_tree_without_a_k_by_k_matrix():
    # 120,000 classes: a K x K int64 matrix would need 115 GB, so only an O(nodes) summary can finish
    parent_of = {f"g{g}": ("root" if g % 3 else "mid") for g in range(300)}
    parent_of["mid"] = "root"
    parent_of.update({f"l{g}_{i}": f"g{g}" for g in range(300) for i in range(400)})
    s = hierarchy_summary(Hierarchy.from_parents(parent_of))
    under_root = sum(1 for g in range(300) if g % 3)  # their leaves are 1 from the bottom: published says 2
    assert s["pairs_changed"] == under_root * 400 * 399 // 2
    assert (s["classes"], s["leaf_depth_min"], s["leaf_depth_max"], s["d_max"]) == (120_000, 2, 3, 3)


def test_single_class(tmp_path, capsys):
    (tmp_path / "t.tsv").write_text("r\ta\n")
    assert cli.main(["hierarchy", str(tmp_path / "t.tsv")]) == 0
    out = capsys.readouterr().out
    assert "classes K                  1" in out and "0 of 0 (0.00%)" in out and "d_max                      0" in out


@pytest.mark.parametrize("argv,key", [
    (["hierarchy", "nope"], "unknown hierarchy 'nope'"),
    (["hierarchy"], "give a hierarchy"),
    (["hierarchy", "d.npy"], "is a distance matrix"),
    (["hierarchy", "cifar100", "--classes", "c.txt"], "classes file not found"),
    (["hierarchy", "cifar100", "--gamma", "-1"], "--gamma: must be a finite number > 0"),
    (["hierarchy", "cifar100", "--distance-convention", "deep"], "invalid choice"),
    (["hierarchy", "cifar100", "--out", "/nonexistent-dir/e.tsv"], "output folder does not exist"),
    (["hierarchy", "x" * 5000], "(5000 characters)"),
])
def test_mistakes_are_one_line(capsys, argv, key):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("haframe: error:") and key in err and err.count("\n") == 1 and len(err) < 400
