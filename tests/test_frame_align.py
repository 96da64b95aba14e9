"""haframe_ext.frame.align: node directions from class-mean features against a loop-by-node reference, the
aligned frame's geometry, the model hook, and the trainer's --frame-directions (docs/design.md 2d)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from haframe_ext.training.config import TrainConfig
from haframe_ext.frame import HAFrame
from haframe_ext.frame.align import align_model_frame, aligned_frame, class_feature_means, node_directions
from haframe_ext.hierarchy import Hierarchy
from haframe_ext.training.models import build_frame, build_model
from haframe_ext.nn import HAFrameLoss
from haframe_ext.train import train


def _tree_means(h: Hierarchy, d: int, seed: int = 0, decay: float = 0.6) -> np.ndarray:
    """Class means [K, d] built as the synthetic task builds prototypes: sums of node offsets down each path."""
    tree = h.tree
    rng = np.random.default_rng(seed)
    off = rng.standard_normal((tree.num_nodes, d)) * decay ** tree.depth[:, None]
    off[0] = 0
    A = tree.ancestry.toarray()  # [K, nodes]
    return A @ off


def _reference_directions(h: Hierarchy, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The definition, node by node, in float64 (nan where the Gaussian fallback applies)."""
    tree = h.tree
    seen = counts > 0
    means = sums[seen] / counts[seen, None]
    c = means - means.mean(0)
    u, sv, vt = np.linalg.svd(c, full_matrices=False)
    P = vt.T @ np.diag(1 / np.maximum(sv, sv[0] * 1e-3)) @ vt
    w = np.zeros_like(sums)
    w[seen] = c @ P * (np.linalg.norm(c, axis=1).mean() / np.linalg.norm(c @ P, axis=1).mean())
    A = tree.ancestry.toarray().astype(bool)
    node_mean = np.zeros((tree.num_nodes, sums.shape[1]))
    for v in range(tree.num_nodes):
        under = A[:, v] & seen
        if under.any():
            node_mean[v] = w[under].mean(0)
    out = np.full_like(node_mean, np.nan)
    for v in range(1, tree.num_nodes):
        if (A[:, v] & seen).any():
            o = node_mean[v] - node_mean[tree.parent[v]]
            if np.linalg.norm(o) > 1e-9:
                out[v] = o / np.linalg.norm(o)
    return out


@pytest.mark.parametrize("hier", ["cifar100", "random"])
@pytest.mark.parametrize("unseen", [0, 7])
def test_node_directions_match_the_definition(hier, unseen):
    h = Hierarchy.builtin("cifar100") if hier == "cifar100" else Hierarchy.random(300, seed=3)
    K, d = h.num_classes, 11
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 5, K).astype(float)
    counts[rng.choice(K, unseen, replace=False)] = 0
    sums = (_tree_means(h, d) + 0.1 * rng.standard_normal((K, d))) * counts[:, None]
    got = node_directions(h, sums, counts, seed=5)
    ref = _reference_directions(h, sums, counts)
    assert got.shape == (h.tree.num_nodes, d)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-12)
    data = ~np.isnan(ref[:, 0])
    assert data.sum() >= 0.8 * h.tree.num_nodes  # not the root, unseen leaves, or an only child (a zero offset)
    np.testing.assert_allclose(got[data], ref[data], atol=1e-9)
    again = node_directions(h, sums, counts, seed=5)
    np.testing.assert_array_equal(got, again)  # the Gaussian fallback (root, unseen leaves) is seeded
    if unseen:
        assert not np.array_equal(got[~data], node_directions(h, sums, counts, seed=6)[~data])


def test_aligned_frame_keeps_the_tree_cosines_and_follows_the_class_means():
    h = Hierarchy.random(2000, seed=2)
    K, d = h.num_classes, 48
    means = _tree_means(h, d, seed=4)
    counts = np.full(K, 3.0)
    al = aligned_frame(h, means * 3, counts, gamma=1.5, seed=0)
    ga = HAFrame.from_hierarchy(h, 1.5, dim=d, seed=0, approximate=True)
    assert al.weight.shape == (K, d) and al.weight.dtype == torch.float32
    np.testing.assert_allclose(al.weight.double().norm(dim=1).numpy(), 1.0, atol=1e-6)
    a, g = al.approximation, ga.approximation
    assert a["method"] == "aligned projection" and g["method"] == "projection"
    assert a["gram_error_mean"] <= 1.25 * g["gram_error_mean"]  # as faithful to S as a Gaussian projection
    assert a["near_twins"] == 0

    def agreement(W):  # mean cosine of each class vector with its (centred) class mean
        c = means - means.mean(0)
        c = c / np.linalg.norm(c, axis=1, keepdims=True)
        return float((W.double().numpy() * c).sum(1).mean())

    # not equal to the class means (the whitening and the tree's weights intervene), but far closer than chance
    assert agreement(al.weight) > 0.3 > 0.05 > abs(agreement(ga.weight))


def test_aligned_frame_refuses_what_it_cannot_build():
    h = Hierarchy.builtin("cifar100")
    with pytest.raises(ValueError, match="dim 100 must be below K = 100"):
        aligned_frame(h, np.ones((100, 100)), np.ones(100), gamma=2.0)
    with pytest.raises(ValueError, match=r"sums must be \[K, d\] and counts \[K\] with K = 100"):
        node_directions(h, np.ones((99, 8)), np.ones(99))
    with pytest.raises(ValueError, match="no class has a sample"):
        node_directions(h, np.zeros((100, 8)), np.zeros(100))
    with pytest.raises(ValueError, match="directions must be"):
        HAFrame.from_hierarchy(h, 2.0, dim=8, approximate=True, directions=np.ones((3, 8)))
    with pytest.raises(ValueError, match="projected frame only"):
        HAFrame.from_hierarchy(h, 2.0, dim=100, directions=np.ones((h.tree.num_nodes, 100)))


def test_class_feature_means_sums_per_label_up_to_max_samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g)
    y = torch.randint(0, 6, (50,), generator=g)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 50, 8)]
    sums, counts = class_feature_means(lambda t: 2 * t, batches, 6)
    ref = torch.zeros(6, 4, dtype=torch.float64).index_add_(0, y, 2 * x.double())
    np.testing.assert_allclose(sums, ref.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(counts, np.bincount(y.numpy(), minlength=6))
    sums, counts = class_feature_means(lambda t: t, batches, 6, max_samples=13)
    assert counts.sum() == 13
    np.testing.assert_allclose(sums, torch.zeros(6, 4, dtype=torch.float64).index_add_(0, y[:13], x[:13].double()),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="no training samples"):
        class_feature_means(lambda t: t, [], 6)


def test_align_model_frame_replaces_the_shared_frame_and_leaves_the_rng_alone():
    h = Hierarchy.random(400, seed=1)
    frame = build_frame("haframe", 400, hierarchy=h, gamma=1.5, dim=24)
    model = build_model("haframe", "mlp", 400, frame, hierarchy=h, feature_dim=24, in_dim=8, hidden=16)
    loss = HAFrameLoss(model.classifier)
    model.train()
    x = torch.randn(1200, 8)
    y = torch.arange(1200) % 400
    before = model.classifier.weight.clone()
    state = torch.get_rng_state()
    new = align_model_frame(model, h, [(x[i:i + 256], y[i:i + 256]) for i in range(0, 1200, 256)], gamma=1.5)
    assert torch.equal(torch.get_rng_state(), state) and model.training
    W = model.classifier.weight
    assert not torch.allclose(W, before) and torch.equal(W, new.weight)
    assert loss.weight is W  # the loss reads the shared classifier
    if model.classifier.gram is not None:
        torch.testing.assert_close(model.classifier.gram, W.T @ W)
    h_feat = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda f: HAFrameLoss(model.classifier.double(), backend="reference")(
        f, torch.tensor([0, 1, 2, 3, 399])), (h_feat,))


def _cfg(tmp_path, name, **kw):
    return TrainConfig.from_dict(dict(dict(
        out=str(tmp_path / name), hierarchy="random:600", feature_dim=16, n_per_class=3, eval_samples=300,
        input_dim=8, hidden=16, epochs=2, batch_size=128, eval_batch_size=256, progress=False, tensorboard=False,
        gamma=1.5), **kw))


def test_trainer_aligns_by_default_below_k_checks_the_field_and_resumes_to_the_same_run(tmp_path):
    from haframe_ext.training.checkpoint import CheckpointError

    with pytest.raises(ValueError, match=r"frame_directions must be one of features, gaussian.*--frame-directions"):
        _cfg(tmp_path, "bad", frame_directions="pca").validate()
    full = train(_cfg(tmp_path, "full"))
    assert full["frame"]["approximation"]["method"] == "aligned projection"
    train(_cfg(tmp_path, "cut", stop_after_epochs=1))
    with pytest.raises(CheckpointError, match="frame_directions"):
        train(_cfg(tmp_path, "cut", resume=True, frame_directions="gaussian"))
    resumed = train(_cfg(tmp_path, "cut", resume=True))
    assert resumed["frame"] == full["frame"]
    assert resumed["test"] == full["test"]
    gauss = train(_cfg(tmp_path, "gauss", frame_directions="gaussian"))
    assert gauss["frame"]["approximation"]["method"] == "projection"
    assert gauss["test"] != full["test"]


def test_checkpoint_frame_directions_rule():
    from haframe_ext.training.config import checkpoint_frame_directions as rule

    assert rule({"method": "haframe", "feature_dim": 16}, 600) == "gaussian"  # written before the field
    assert rule({"method": "haframe-ce", "feature_dim": 16, "frame_directions": "features"}, 600) == "features"
    assert rule({"method": "haframe", "feature_dim": 600, "frame_directions": "features"}, 600) is None  # exact
    assert rule({"method": "haframe", "feature_dim": None}, 600) is None
    assert rule({"method": "etf", "feature_dim": 16}, 600) is None
    assert rule({"method": "haframe", "feature_dim": 16, "distances": "d.npy"}, 600) is None
