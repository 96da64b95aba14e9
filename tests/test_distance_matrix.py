"""Tests for haframe_ext.hierarchy.distance_matrix: distance matrices given as arrays, tensors, lists, CSV and .npy
files.

Every malformed matrix or file must raise ``HierarchyError`` naming the problem (RELIABILITY.md section 2);
valid LCA matrices of random trees are accepted unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from haframe_ext.hierarchy import Hierarchy, HierarchyError, as_distance_matrix
from helpers import FAST, trees
from helpers import raises_hierarchy_error as _raises


@st.composite
def distance_matrices(draw):
    """A valid LCA-height matrix (int64) of a random small tree, sometimes as float or scaled."""
    parent_of, classes = draw(trees(max_k=40, styles=("plain",)))
    d = Hierarchy.from_parents(parent_of, classes).distances()
    assume(d.shape[0] >= 2)
    return d


@FAST
@given(distance_matrices(), st.sampled_from(["int", "float", "float32", "list", "half"]))
def test_valid_distance_matrices_are_accepted(d, form):
    x = {"int": d, "float": d.astype(float), "float32": d.astype(np.float32), "list": d.tolist(),
         "half": d / 2}[form]
    out = as_distance_matrix(x)
    np.testing.assert_array_equal(out, d if form != "half" else d / 2)
    assert out.dtype == (np.float64 if form == "half" and (d % 2).any() else np.int64)


@FAST
@given(distance_matrices(), st.data())
def test_corrupted_distance_matrices_are_reported(d, data):
    K = d.shape[0]
    i = data.draw(st.integers(0, K - 1))
    j = data.draw(st.integers(0, K - 1).filter(lambda v: v != i))
    f = d.astype(float)

    asym = f.copy()
    asym[i, j] += data.draw(st.floats(0.5, 1e6))
    _raises(lambda: as_distance_matrix(asym), "not symmetric", f"d[{i},{j}]")

    neg = f.copy()
    v = data.draw(st.floats(1e-9, 1e9))
    neg[i, j] = neg[j, i] = -v
    _raises(lambda: as_distance_matrix(neg), "negative entry")
    negi = d.copy()
    negi[i, j] = negi[j, i] = -1
    _raises(lambda: as_distance_matrix(negi), "negative entry", "=-1")

    for bad in [np.nan, np.inf, -np.inf]:
        nf = f.copy()
        nf[i, j] = bad
        _raises(lambda: as_distance_matrix(nf), "not finite", f"d[{i},{j}]")

    diag = f.copy()
    diag[i, i] = data.draw(st.floats(1e-3, 1e3))
    _raises(lambda: as_distance_matrix(diag), "non-zero diagonal", f"d[{i},{i}]")

    _raises(lambda: as_distance_matrix(f[:, :-1]), "square", str((K, K - 1)))
    _raises(lambda: as_distance_matrix(f[None]), "square")
    _raises(lambda: as_distance_matrix(f.ravel()), "square")


@pytest.mark.parametrize("x,key", [
    (np.zeros((1, 1)), "at least 2 classes"),
    (np.zeros((0, 0)), "at least 2 classes"),
    (np.zeros(()), "square"),
    (np.zeros((2, 2, 2)), "square"),
    (np.array([[0, 1j], [1j, 0]]), "numeric"),
    (np.array([[False, True], [True, False]]), "numeric"),
    (np.array([["0", "1"], ["1", "0"]]), "numeric"),
    (np.array([[0, 1], [1, 0]], dtype=object), "numeric"),
    (np.array([[0.0, np.nan], [np.nan, 0.0]]), "not finite"),
    (np.array([[0.0, np.inf], [np.inf, 0.0]]), "not finite"),
    (np.array([[0, -5], [-5, 0]], dtype=np.int8), "negative"),
    (np.array([[0, 3], [2, 0]], dtype=np.uint8), "not symmetric"),
])
def test_distance_matrix_edge_cases(x, key):
    _raises(lambda: as_distance_matrix(x), key)


def test_distance_matrix_torch_inputs():
    _raises(lambda: as_distance_matrix(torch.tensor([[0.0, float("nan")], [float("nan"), 0.0]])), "not finite")
    _raises(lambda: as_distance_matrix(torch.tensor([[0, 1], [2, 0]])), "not symmetric")
    _raises(lambda: as_distance_matrix(torch.zeros(3, 2)), "square")
    np.testing.assert_array_equal(as_distance_matrix(torch.tensor([[0, 2], [2, 0]], dtype=torch.bfloat16)),
                                  [[0, 2], [2, 0]])


@pytest.mark.parametrize("content,key", [
    (b"", "no numeric rows"),
    (b"a,b\n", "no numeric rows"),
    (b"\n\n", "no numeric rows"),
    (b"0,nan\nnan,0\n", "not finite"),
    (b"0,1e400\n1e400,0\n", "not finite"),  # a number too large for float64 parses as inf
    (b"0,-1\n-1,0\n", "negative"),
    (b"0,1\n2,0\n", "not symmetric"),
    (b"0,1,2\n1,0,3\n", "square"),
    (b"0,1\n1\n", "first row has 2"),
    (b"0\n", "at least 2 classes"),
    (b"0,1\n1,zero\n", "non-numeric"),
    (b"\xff\xfe\x00\x01", "not UTF-8"),
    (b"0,1\x00\n1,0\n", "NUL"),
])
def test_distance_csv_files(tmp_path, content, key):
    path = tmp_path / "d.csv"
    path.write_bytes(content)
    _raises(lambda: as_distance_matrix(path), key)


@pytest.mark.parametrize("make", ["truncated", "header_only", "random_bytes", "pickled_object"])
def test_distance_npy_files(tmp_path, make):
    path = tmp_path / "d.npy"
    np.save(path, np.array([[0, 1], [1, 0]]))
    raw = path.read_bytes()
    if make == "truncated":
        path.write_bytes(raw[:-5])
    elif make == "header_only":
        path.write_bytes(raw[:20])
    elif make == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(300))
    else:
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _raises(lambda: as_distance_matrix(path), "distance file", "d.npy")


def test_empty_npy_file_is_a_hierarchy_error(tmp_path):
    path = tmp_path / "empty.npy"
    path.write_bytes(b"")
    _raises(lambda: as_distance_matrix(path), "distance file")


def test_ragged_nested_list_is_a_hierarchy_error():
    _raises(lambda: as_distance_matrix([[0, 1], [1]]), "square")


@pytest.mark.parametrize("v", [1e19, 1e20, 1e308])
def test_huge_float_distances_are_kept_or_refused(v):
    x = np.array([[0.0, v], [v, 0.0]])
    try:
        out = as_distance_matrix(x)
    except HierarchyError as exc:
        assert "large" in str(exc) or "finite" in str(exc)
    else:
        assert (out >= 0).all() and float(out[0, 1]) == v


def test_huge_uint64_distance_is_named_as_given():
    big = np.iinfo(np.uint64).max
    msg = _raises(lambda: as_distance_matrix(np.array([[0, big], [big, 0]], dtype=np.uint64)))
    assert str(big) in msg


_BIG = "x" * 50_000_000


def test_a_50mb_csv_line_is_quoted_short(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n0,1\n1,0\n0," + _BIG + "\n")
    with pytest.raises(HierarchyError) as info:
        as_distance_matrix(str(path))
    assert "non-numeric value" in str(info.value) and "(50000002 characters)" in str(info.value)
    assert len(str(info.value)) < 800
