"""haframe_ext.frame.profile: the kernel fitted to class-mean features against a pair-loop reference, frames built
with it (exact and projected, saved and loaded), and the trainer's --frame-profile (docs/design.md 2e)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from haframe_ext.frame import HAFrame
from haframe_ext.frame.align import aligned_frame
from haframe_ext.frame.profile import PROFILE_WEIGHT, Profile, _nonincreasing, fitted_profile
from haframe_ext.frame.similarity import exact_s_min, similarity_matrix
from haframe_ext.hierarchy import Hierarchy
from haframe_ext.hierarchy.edges import HierarchyError
from haframe_ext.train import train
from haframe_ext.training.config import TrainConfig


def _tree_means(h: Hierarchy, d: int, seed: int = 0, decay: float = 0.6) -> np.ndarray:
    """Class means [K, d]: sums of node offsets down each path, offsets shrinking with depth."""
    tree = h.tree
    off = np.random.default_rng(seed).standard_normal((tree.num_nodes, d)) * decay ** tree.depth[:, None]
    off[0] = 0
    return tree.ancestry.toarray() @ off


def _reference_nonincreasing(y, w):
    """The weighted isotonic (nonincreasing) fit by its min-max formula: f_i = min_{j<=i} max_{k>=i} mean(y[j..k])."""
    n = len(y)
    av = lambda j, k: float(np.dot(y[j:k + 1], w[j:k + 1]) / w[j:k + 1].sum())  # noqa: E731
    return np.array([min(max(av(j, k) for k in range(i, n)) for j in range(i + 1)) for i in range(n)])


def _reference_profile(h: Hierarchy, sums: np.ndarray, counts: np.ndarray):
    """The definition over every pair of seen classes, from the dense distance matrix."""
    seen = counts > 0
    m = sums[seen] / counts[seen, None]
    m = m - m.mean(0)
    u = m / np.linalg.norm(m, axis=1, keepdims=True)
    D = h.distances()[np.ix_(seen, seen)]
    C = u @ u.T
    off = ~np.eye(len(u), dtype=bool)
    levels = np.unique(D[off])
    cos = np.array([C[off & (D == lv)].mean() for lv in levels])
    n = np.array([(off & (D == lv)).sum() for lv in levels], dtype=float)
    cos = _reference_nonincreasing(cos, n)
    values = (cos - cos[-1]) / (1 - cos[-1])
    if levels[-1] < h.tree.d_max:
        levels, values = np.append(levels, h.tree.d_max), np.append(values, 0.0)
    values[-1] = 0.0
    return np.concatenate([[0.0], levels]), np.concatenate([[1.0], values])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_nonincreasing_fit_matches_the_min_max_formula(seed):
    rng = np.random.default_rng(seed)
    y, w = rng.standard_normal(9), rng.uniform(0.1, 5.0, 9)
    got = _nonincreasing(y, w)
    np.testing.assert_allclose(got, _reference_nonincreasing(y, w), atol=1e-12)
    assert (np.diff(got) <= 1e-15).all()
    np.testing.assert_allclose(np.dot(got, w), np.dot(y, w))  # pooling keeps the weighted sum
    mono = np.sort(y)[::-1]
    np.testing.assert_array_equal(_nonincreasing(mono, w), mono)


@pytest.mark.parametrize("hier", ["cifar100", "random", "inner"])
@pytest.mark.parametrize("structured", [True, False])
def test_fitted_profile_matches_the_pair_loop(hier, structured):
    if hier == "cifar100":
        h = Hierarchy.builtin("cifar100")
    elif hier == "random":
        h = Hierarchy.random(300, seed=3)
    else:  # classes at inner nodes as well as leaves
        h = Hierarchy.from_parents({"a": "r", "b": "r", "a1": "a", "a2": "a", "b1": "b", "b2": "b", "b21": "b2",
                                    "b22": "b2"}, classes=["a", "a1", "a2", "b1", "b2", "b21", "b22"])
    K, d = h.num_classes, 12
    rng = np.random.default_rng(5)
    means = _tree_means(h, d, seed=1) if structured else rng.standard_normal((K, d))
    counts = rng.integers(1, 4, K).astype(float)
    counts[rng.choice(K, max(1, K // 10), replace=False)] = 0  # classes without samples are left out
    sums = means * counts[:, None]
    levels, values = fitted_profile(h, sums, counts)
    ref_levels, ref_values = _reference_profile(h, sums, counts)
    np.testing.assert_array_equal(levels, ref_levels)
    np.testing.assert_allclose(values, ref_values, atol=1e-10)
    assert values[0] == 1.0 and values[-1] == 0.0 and (np.diff(values) <= 1e-15).all()
    if structured and hier != "inner":  # coarse offsets dominate: the top level takes most of the range
        assert values[-2] > 0.2


def test_profile_refuses_what_no_frame_can_use():
    with pytest.raises(ValueError, match="nonincreasing and >= 0"):
        Profile(1.0, [0, 1, 2], [1.0, 0.2, 0.5])
    with pytest.raises(ValueError, match="starts at level 0 with value 1"):
        Profile(1.0, [1, 2], [1.0, 0.0])
    with pytest.raises(ValueError, match="matching levels and values"):
        Profile(1.0, [0, 1, 2], [1.0, 0.0])
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\]"):
        Profile(1.0, [0, 1], [1.0, 0.0], weight=1.5)
    with pytest.raises(ValueError, match="gamma must be"):
        Profile(float("nan"), [0, 1], [1.0, 0.0])
    h = Hierarchy.builtin("cifar100")
    p = Profile(2.0, [0, 5], [1.0, 0.0])
    with pytest.raises(ValueError, match="built with gamma=3"):
        HAFrame.from_hierarchy(h, 3.0, profile=p)
    with pytest.raises(ValueError, match="tree routes only"):
        HAFrame.from_hierarchy(h, 2.0, profile=p, s_min="grid")
    with pytest.raises(ValueError, match="fewer than two classes"):
        fitted_profile(h, np.ones((100, 4)), np.r_[1.0, np.zeros(99)])


@pytest.mark.parametrize("hier", ["cifar100", "random"])
def test_exact_frame_with_a_profile_has_the_profile_cosines(hier):
    h = Hierarchy.builtin("cifar100") if hier == "cifar100" else Hierarchy.random(150, seed=4)
    K = h.num_classes
    counts = np.full(K, 2.0)
    p = Profile(1.5, *fitted_profile(h, _tree_means(h, 10, seed=2) * 2, counts), weight=PROFILE_WEIGHT)
    frame = HAFrame.from_hierarchy(h, 1.5, profile=p, dtype=torch.float64)
    D = h.distances()
    s = exact_s_min(D, p)  # the dense route: one Cholesky solve of the kernel matrix
    assert frame.s_min == pytest.approx(s, abs=1e-9)
    S = similarity_matrix(D, p, frame.s_min)
    np.testing.assert_allclose(S, (1 - s) * p(D, D.max()) + s + np.eye(K) * (1 - ((1 - s) * p(0.0, D.max()) + s)),
                               atol=1e-12)
    assert np.linalg.eigvalsh(S)[0] > -1e-9
    W = frame.weight.numpy()
    np.testing.assert_allclose(W @ W.T, S, atol=1e-9)
    np.testing.assert_allclose(frame.similarity_rows([0, K - 1]).numpy(), S[[0, K - 1]], atol=1e-12)
    assert frame.diagnostics()["profile"] == p.state()
    # weight 0 is the paper's kernel, to the last bit
    zero = HAFrame.from_hierarchy(h, 1.5, profile=Profile(1.5, p.levels, p.values, weight=0.0), dtype=torch.float64)
    assert torch.equal(zero.weight, HAFrame.from_hierarchy(h, 1.5, dtype=torch.float64).weight)


def test_a_profile_frame_saves_loads_and_refuses_a_changed_profile():
    h = Hierarchy.random(600, seed=2)
    K, d = h.num_classes, 24
    means = _tree_means(h, d, seed=3)
    frame = aligned_frame(h, means * 2, np.full(K, 2.0), gamma=1.5)
    assert frame.profile is not None and frame.profile.weight == PROFILE_WEIGHT
    buf = io.BytesIO()
    frame.save(buf)
    buf.seek(0)
    back = HAFrame.load(buf)
    assert back.profile == frame.profile and torch.equal(back.weight, frame.weight)
    np.testing.assert_array_equal(back.similarity_rows([3]).numpy(), frame.similarity_rows([3]).numpy())
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["version"] == 4
    state["profile"]["weight"] = 0.5
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    with pytest.raises(HierarchyError, match="digest"):
        HAFrame.load(buf)
    plain = aligned_frame(h, means * 2, np.full(K, 2.0), gamma=1.5, profile="exp")
    assert plain.profile is None
    buf = io.BytesIO()
    plain.save(buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["version"] == 3  # readable by earlier releases


def test_the_profile_separates_the_levels_the_features_separate():
    h = Hierarchy.random(3000, seed=1)
    K, d = h.num_classes, 64
    means = _tree_means(h, d, seed=0, decay=0.4)
    counts = np.full(K, 3.0)
    prof = aligned_frame(h, means * 3, counts, gamma=1.0)
    plain = aligned_frame(h, means * 3, counts, gamma=1.0, profile="exp")
    tree = h.tree
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, K, (2, 40000))
    i, j = i[i != j], j[i != j]
    dist = tree.pair_distances(i, j)

    def step(frame):  # mean cosine of pairs under one top-level node minus pairs across the root
        W = frame.weight.double().numpy()
        c = (W[i] * W[j]).sum(1)
        return c[dist == dist.max() - 1].mean() - c[dist == dist.max()].mean()

    assert step(prof) > 2 * step(plain)
    with pytest.raises(ValueError, match="profile must be one of features, exp"):
        aligned_frame(h, means, counts, gamma=1.0, profile="pca")


def _cfg(tmp_path, name, **kw):
    return TrainConfig.from_dict(dict(dict(
        out=str(tmp_path / name), hierarchy="random:600", feature_dim=16, n_per_class=3, eval_samples=300,
        input_dim=8, hidden=16, epochs=2, batch_size=128, eval_batch_size=256, progress=False, tensorboard=False,
        gamma=1.5), **kw))


def test_trainer_follows_the_features_profile_by_default_and_resumes_to_the_same_run(tmp_path):
    from haframe_ext.training.checkpoint import CheckpointError

    with pytest.raises(ValueError, match=r"frame_profile must be one of features, exp.*--frame-profile"):
        _cfg(tmp_path, "bad", frame_profile="pca").validate()
    full = train(_cfg(tmp_path, "full"))
    assert full["frame"]["profile"]["weight"] == PROFILE_WEIGHT
    train(_cfg(tmp_path, "cut", stop_after_epochs=1))
    with pytest.raises(CheckpointError, match="frame_profile"):
        train(_cfg(tmp_path, "cut", resume=True, frame_profile="exp"))
    resumed = train(_cfg(tmp_path, "cut", resume=True))
    assert resumed["frame"] == full["frame"] and resumed["test"] == full["test"]
    plain = train(_cfg(tmp_path, "plain", frame_profile="exp"))
    assert "profile" not in plain["frame"] and plain["test"] != full["test"]
    # a Gaussian frame can still take its kernel from the features
    mixed = train(_cfg(tmp_path, "mixed", frame_directions="gaussian"))
    assert mixed["frame"]["approximation"]["method"] == "projection" and "profile" in mixed["frame"]
    with pytest.raises(ValueError, match=r"frame_profile_weight must be in \[0, 1\]"):
        _cfg(tmp_path, "bad", frame_profile_weight=1.5).validate()
    heavy = train(_cfg(tmp_path, "heavy", frame_profile_weight=1.0, stop_after_epochs=1))
    with pytest.raises(CheckpointError, match="frame_profile_weight"):
        train(_cfg(tmp_path, "heavy", resume=True))
    assert heavy["finished"] is False


def test_align_model_frame_gives_the_cosine_term_the_profile_target():
    from haframe_ext.frame.align import align_model_frame
    from haframe_ext.training.models import build_frame, build_model

    h = Hierarchy.random(400, seed=1)
    frame = build_frame("haframe", 400, hierarchy=h, gamma=1.5, dim=24)
    model = build_model("haframe", "mlp", 400, frame, hierarchy=h, feature_dim=24, in_dim=8, hidden=16)
    before = model.classifier.similarity.clone()  # K <= DENSE_MAX_K: the loss reads this [K, K] target
    x, y = torch.randn(1200, 8), torch.arange(1200) % 400
    new = align_model_frame(model, h, [(x[i:i + 256], y[i:i + 256]) for i in range(0, 1200, 256)], gamma=1.5)
    cl = model.classifier
    assert new.profile is not None
    torch.testing.assert_close(cl.similarity, new.similarity)
    assert not torch.allclose(cl.similarity, before)
    torch.testing.assert_close(cl.weight, new.weight)


def test_checkpoint_frame_profile_rule():
    from haframe_ext.training.config import checkpoint_frame_profile as rule
    from haframe_ext.training.config import checkpoint_profile_weight as weight

    assert weight({"method": "haframe", "feature_dim": 16, "frame_profile": "features"}, 600) == PROFILE_WEIGHT
    assert weight({"method": "haframe", "feature_dim": 16, "frame_profile": "features",
                   "frame_profile_weight": 1.0}, 600) == 1.0
    assert weight({"method": "haframe", "feature_dim": 16, "frame_profile": "exp",
                   "frame_profile_weight": 1.0}, 600) is None  # no fitted kernel: the weight means nothing

    assert rule({"method": "haframe", "feature_dim": 16}, 600) == "exp"  # written before the field
    assert rule({"method": "haframe", "feature_dim": 16, "frame_profile": "features"}, 600) == "features"
    assert rule({"method": "haframe", "feature_dim": 600, "frame_profile": "features"}, 600) is None  # exact
    assert rule({"method": "cross-entropy", "feature_dim": 16}, 600) is None
    assert rule({"method": "haframe", "feature_dim": 16, "distances": "d.npy"}, 600) is None
