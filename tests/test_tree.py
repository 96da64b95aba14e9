"""Tests for haframe_ext.hierarchy.tree and the large-K paths built on it: every tree product against the dense path."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from haframe_ext.frame import DENSE_MAX_K, HAFrame, exact_s_min, similarity_matrix
from haframe_ext.hierarchy import BUILTIN_NAMES, Hierarchy
from haframe_ext.metrics import StreamingEvaluator, crm, evaluate, neural_collapse

TOL = 1e-12


def dense_kernel(h, gamma):
    """E = exp(-gamma d / d_max) from the dense distances."""
    d = h.distances().astype(float)
    return np.exp(-gamma * d / d.max())


def check_tree_against_dense(h, gamma, rng):
    """Every TreeOperator product equals its dense counterpart to TOL (relative to the result's scale)."""
    T, K = h.tree, h.num_classes
    d = h.distances().astype(float)
    np.testing.assert_array_equal(T.dense_distances(), d)
    assert T.d_max == d.max() and T.d_min == d[~np.eye(K, dtype=bool)].min()
    i, j = rng.integers(0, K, 300), rng.integers(0, K, 300)
    np.testing.assert_array_equal(T.pair_distances(i, j), d[i, j])
    E = dense_kernel(h, gamma)
    s = exact_s_min(h.distances(), gamma)
    assert T.exact_s_min(gamma) == pytest.approx(s, abs=1e-9)
    S = similarity_matrix(h.distances(), gamma, s)
    x = rng.standard_normal((K, 3))
    np.testing.assert_allclose(T.kernel_product(gamma, x), E @ x, atol=TOL * K)
    np.testing.assert_allclose(T.kernel_product(gamma, x[:, 0]), E @ x[:, 0], atol=TOL * K)
    np.testing.assert_allclose(T.similarity_product(gamma, s, x), S @ x, atol=TOL * K)
    rows = rng.integers(0, K, 4)
    np.testing.assert_allclose(T.similarity_rows(gamma, s, rows), S[rows], atol=TOL)
    P = rng.random((5, K))
    P /= P.sum(1, keepdims=True)
    np.testing.assert_allclose(T.expected_distances(P), P @ d, atol=TOL * d.max())
    W = T.dense_frame(gamma, s)
    np.testing.assert_allclose(W @ W.T, S, atol=1e-12)
    assert T.ones_quadratic(gamma) == pytest.approx(np.linalg.solve(E, np.ones(K)).sum(), rel=1e-9)


@pytest.mark.parametrize("name", BUILTIN_NAMES)
@pytest.mark.parametrize("convention", ["published", "height"])
def test_builtin_trees_against_dense(name, convention):
    h = Hierarchy.builtin(name).with_convention(convention)
    check_tree_against_dense(h, 3.0, np.random.default_rng(0))


@st.composite
def random_trees(draw):
    """A random tree (any shape: chains, stars, unbalanced) with 2..200 leaves, as a Hierarchy."""
    n = draw(st.integers(3, 260))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    parents = {f"v{i}": f"v{int(rng.integers(max(0, i - draw(st.sampled_from([1, 3, 50]))), i))}"
               for i in range(1, n)}
    return Hierarchy.from_parents(parents)


@settings(max_examples=40, deadline=None)
@given(random_trees(), st.sampled_from([0.5, 2.0, 5.0]), st.sampled_from(["published", "height"]))
def test_random_trees_against_dense(h, gamma, convention):
    h = h.with_convention(convention)
    if h.num_classes < 2:
        return
    check_tree_against_dense(h, gamma, np.random.default_rng(1))


@pytest.mark.parametrize("K", [2, 3, 2000])
def test_random_hierarchy_sizes_and_dense_agreement(K):
    h = Hierarchy.random(K, seed=K)
    assert h.num_classes == K and h.classes[:2] == ["c0", "c1"]
    if K == 2000:
        assert not h.is_balanced
        check_tree_against_dense(h, 2.0, np.random.default_rng(2))


# ----------------------------------------------------------------------------- frames
@pytest.mark.parametrize("name,gamma", [("cifar100", 2.0), ("fgvc_aircraft", 2.0), ("inat19", 5.0),
                                        ("tiered_imagenet_h", 3.0)])
def test_builtin_frames_from_the_tree(name, gamma):
    h = Hierarchy.builtin(name)
    f = HAFrame.from_hierarchy(h, gamma, dtype=torch.float64)
    assert f.s_min == pytest.approx(exact_s_min(h.distances(), gamma), abs=1e-9)
    assert torch.isfinite(f.weight).all()
    assert f.gram_error() < 1e-5 and f.convention == "published"
    if name == "tiered_imagenet_h":
        assert f.s_min == pytest.approx(-0.079478, abs=1e-6)


def test_projection_keeps_classes_apart_where_truncation_merges_them():
    h = Hierarchy.random(3000, seed=3)
    with pytest.warns(RuntimeWarning, match="near-twin"):
        t = HAFrame.from_hierarchy(h, 3.0, dim=32, approximate="truncate")
    p = HAFrame.from_hierarchy(h, 3.0, dim=32, approximate=True)
    assert t.approximation["near_twins"] > 100
    a = p.approximation
    assert a["near_twins"] == 0 and a["method"] == "projection" and a["pairs"] == "all pairs"
    assert a["margin"] > 0.3 * a["exact_margin"] > 0
    assert a["gram_error_mean"] < 0.2
    W = p.weight.double().numpy()
    G = W @ W.T
    np.fill_diagonal(G, -2)
    assert a["margin"] == pytest.approx(1 - G.max(), abs=1e-6)
    with pytest.raises(ValueError, match="dim=32 is smaller than K=3000.*approximate=True"):
        HAFrame.from_hierarchy(h, 3.0, dim=32)


def test_large_frame_holds_no_k_by_k_matrix(tmp_path):
    K = DENSE_MAX_K + 904
    h = Hierarchy.random(K, seed=5)
    f = HAFrame.from_hierarchy(h, 3.0, dim=48, approximate=True, dtype=torch.float64)
    assert f.similarity is None and f.distances is None and f.hierarchy is h
    assert f.approximation["pairs"].endswith("tree-neighbour and random pairs")
    assert f.approximation["margin"] > 0 and f.approximation["gram_error_mean"] < 0.2
    rows = np.array([0, 17, K - 1])
    ref = similarity_matrix(h.distances(), 3.0, f.s_min)[rows]  # dense here only to check
    np.testing.assert_allclose(f.similarity_rows(rows).numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(f.similarity_block(rows, rows).numpy(), ref[:, rows], atol=1e-12)
    f.save(tmp_path / "f.pt")
    state = torch.load(tmp_path / "f.pt", weights_only=True)
    assert state["similarity"] is None and state["distances"] is None
    sizes = [v.numel() for v in state.values() if isinstance(v, torch.Tensor)]
    assert max(sizes) < K * K / 10  # the weight and the parents, never K x K
    g = HAFrame.load(tmp_path / "f.pt")
    assert torch.equal(g.weight, f.weight) and g.s_min == f.s_min and g.approximation == f.approximation
    np.testing.assert_array_equal(g.hierarchy.tree.pair_distances(rows, rows[::-1]),
                                  h.tree.pair_distances(rows, rows[::-1]))


def test_large_etf_is_projected():
    f = HAFrame.etf(DENSE_MAX_K + 10, dim=32, approximate=True)
    assert f.similarity is None and f.approximation["near_twins"] == 0
    assert f.similarity_rows([0]).numpy()[0, :2] == pytest.approx([1.0, -1.0 / (DENSE_MAX_K + 9)])
    with pytest.raises(MemoryError, match="pass dim < K with approximate=True"):
        HAFrame.etf(DENSE_MAX_K + 10, dim=DENSE_MAX_K + 10)
    with pytest.raises(ValueError, match="give dim"):
        HAFrame.etf(DENSE_MAX_K + 10)


def test_absurd_dim_names_the_size():
    with pytest.raises(MemoryError, match=r"dim=1000000000 needs about .* GiB.*choose dim <="):
        HAFrame.from_hierarchy("cifar100", 2.0, dim=10**9)


def test_s_min_below_exact_is_refused_on_the_tree_path():
    h = Hierarchy.random(50, seed=1)
    s = exact_s_min(h, 2.0)
    HAFrame.from_hierarchy(h, 2.0, s_min=s + 0.01)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        HAFrame.from_hierarchy(h, 2.0, s_min=s - 0.01)


# ----------------------------------------------------------------------------- metrics through the tree
def test_metrics_through_the_tree_equal_dense():
    h = Hierarchy.random(1500, seed=7)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 1500, generator=g, dtype=torch.float64)
    target = torch.randint(0, 1500, (300,), generator=g)
    target[:60] = logits[:60].argmax(1)
    tree = evaluate(logits, target, h, ks=(1, 5, 20), crm=True)
    dense = evaluate(logits, target, h.distances(), ks=(1, 5, 20), crm=True)  # no tree: fewer keys
    dense = {k: v for k, v in dense.items() if not isinstance(v, list)}
    assert {k: tree[k] for k in dense} == pytest.approx(dense, rel=1e-12)
    probs = torch.softmax(logits, 1)
    torch.testing.assert_close(crm(probs, h), crm(probs, h.distances()), rtol=1e-12, atol=1e-12)
    ev = StreamingEvaluator(h, crm=True)
    for a in range(0, 300, 128):
        ev.update(logits[a:a + 128], target[a:a + 128])
    assert {k: v for k, v in ev.compute().items() if k in dense} == pytest.approx(dense, rel=1e-12)


def test_crm_with_huge_distances_does_not_overflow():
    d = np.array([[0.0, 1e300, 3e300], [1e300, 0.0, 2e300], [3e300, 2e300, 0.0]])
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1]], dtype=torch.float32)
    scores = crm(probs, d)
    assert torch.isfinite(scores).all()
    expected = -(probs.double() @ torch.tensor(d / 1e300)) * 1e300
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=0)
    assert scores.argmax(1).tolist() == [2, 0]  # least expected cost (float32 overflowed to -inf: always 0)
    out = evaluate(torch.log(probs), torch.tensor([0, 2]), d, ks=(1, 2), crm=True)
    assert np.isfinite(list(out.values())).all()


def test_neural_collapse_samples_classes_of_a_large_frame():
    h = Hierarchy.random(600, seed=2)
    f = HAFrame.from_hierarchy(h, 2.0, dtype=torch.float64)
    labels = torch.arange(600).repeat(2)
    full = neural_collapse(f.weight[labels], labels, f.weight, f.similarity)
    by_tree = neural_collapse(f.weight[labels], labels, f.weight, f)
    assert by_tree == pytest.approx(full, abs=1e-9)
    sampled = neural_collapse(f.weight[labels], labels, f.weight, f, max_classes=100)
    assert sampled["angular_collapse_classes"] == 100
    assert sampled["angular_collapse_avg"] < 1e-6  # the features sit on the frame


def test_cli_builds_a_projected_etf_above_the_dense_limit(capsys):
    """frame --etf K --dim d with K above DENSE_MAX_K needs K x d, not K x K (the CLI refused it)."""
    from haframe_ext.cli import main

    assert main(["frame", "--etf", str(DENSE_MAX_K + 100), "--dim", "16"]) == 0
    out = capsys.readouterr().out
    assert "projection" in out and "sampled pairs" in out
