"""A projected frame whose node directions follow the data (docs/design.md 2d).

Below K dimensions the frame is the exact tree factor times one direction per tree node
(``Tree.projected_frame``). A Gaussian draws those directions at random, so the backbone must learn to
send every class to a direction unrelated to its inputs; at d << K that is what makes a frozen frame train
slower than a learned classifier. Here each node's direction is instead its offset from its parent in the
whitened class means of the untrained model's features: the frame keeps the tree's cosines as well as the
Gaussian does (whitening spreads the offsets over all d directions), and each class vector starts where
the network already puts that class. The kernel of the target similarity can follow the same class means
(``frame.profile``): the frame then separates the tree's levels as far as the features do.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple, Union

import numpy as np
import torch

from .frame import HAFrame
from .profile import FRAME_PROFILES, PROFILE_WEIGHT, Profile, fitted_profile
from ..hierarchy.hierarchy import Hierarchy

__all__ = ["ALIGN_MAX_SAMPLES", "FRAME_DIRECTIONS", "align_model_frame", "aligned_frame", "class_feature_means",
           "node_directions"]

ALIGN_MAX_SAMPLES = 1 << 18  # training samples read to align a frame: a few per class at 10^5 classes
FRAME_DIRECTIONS = ("features", "gaussian")  # TrainConfig.frame_directions


def class_feature_means(features: Callable[[torch.Tensor], torch.Tensor],
                        batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                        max_samples: int = ALIGN_MAX_SAMPLES) -> Tuple[np.ndarray, np.ndarray]:
    """(sums [K, d] float64, counts [K]) of ``features(x)`` per label over the batches, up to max_samples.

    Sums rather than means, so that processes can add theirs before dividing; ``features`` runs under no_grad.
    """
    sums: Optional[torch.Tensor] = None
    counts = torch.zeros(num_classes, dtype=torch.float64)
    seen = 0
    with torch.no_grad():
        for x, y in batches:
            if seen >= max_samples:
                break
            take = min(len(y), max_samples - seen)
            f = features(x[:take]).detach().to("cpu", torch.float64)  # [b, d]
            y = y[:take].to("cpu", torch.long)
            if sums is None:
                sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64)
            sums.index_add_(0, y, f)
            counts += torch.bincount(y, minlength=num_classes).double()
            seen += take
    if sums is None:
        raise ValueError("no training samples to align the frame to")
    return sums.numpy(), counts.numpy()


def _whitened(means: np.ndarray, seen: np.ndarray) -> np.ndarray:  # means: [K, d]
    """Class means centred and whitened over the seen classes, rescaled to their mean row norm."""
    c = means - means[seen].mean(axis=0)
    _, sv, vt = np.linalg.svd(c[seen], full_matrices=False)
    if sv.size == 0 or sv[0] <= 0:
        return c
    P = vt.T @ np.diag(1.0 / np.maximum(sv, sv[0] * 1e-3)) @ vt  # [d, d]
    w = c @ P
    norm = np.linalg.norm(w[seen], axis=1).mean()
    return w * (np.linalg.norm(c[seen], axis=1).mean() / norm if norm > 0 else 1.0)


def node_directions(hierarchy: Hierarchy, sums: np.ndarray, counts: np.ndarray, seed: int = 0,
                    whiten: bool = True) -> np.ndarray:
    """Unit node directions [nodes, d]: each node's whitened mean minus its parent's.

    sums [K, d] and counts [K] as :func:`class_feature_means` gives them. A node's mean is the mean of the
    class means under it that have samples; the root, and nodes with no seen class or a zero offset, get a
    seeded Gaussian direction. ``whiten=False`` takes the offsets of the raw class means (their directions
    crowd into the few that the features vary in: a larger Gram error, kept for the study in bench/).
    """
    tree = hierarchy.tree
    K, d = sums.shape
    if K != hierarchy.num_classes or counts.shape != (K,):
        raise ValueError(f"sums must be [K, d] and counts [K] with K = {hierarchy.num_classes}, got "
                         f"{tuple(sums.shape)} and {tuple(counts.shape)}")
    seen = counts > 0
    if not seen.any():
        raise ValueError("no class has a sample: cannot align the frame")
    means = np.where(seen[:, None], sums / np.maximum(counts, 1.0)[:, None], 0.0)
    w = np.where(seen[:, None], _whitened(means, seen) if whiten else means, 0.0)
    A = tree.ancestry  # [K, nodes]
    per_node = np.asarray(A.T @ seen.astype(np.float64)).ravel()  # seen classes under each node
    node_mean = (A.T @ w) / np.maximum(per_node, 1.0)[:, None]  # [nodes, d]
    offset = node_mean.copy()
    offset[1:] -= node_mean[tree.parent[1:]]
    norm = np.linalg.norm(offset, axis=1)
    ok = (per_node > 0) & (norm > 1e-12 * max(float(norm.max()), 1e-300))
    ok[0] = False  # the root's offset is zero by definition
    out = np.random.default_rng([int(seed), 0xA11C]).standard_normal((tree.num_nodes, d))
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    out[ok] = offset[ok] / norm[ok, None]
    return out


def aligned_frame(hierarchy: Hierarchy, sums: np.ndarray, counts: np.ndarray, gamma: float,
                  s_min: Union[str, float] = "exact", seed: int = 0, dtype: torch.dtype = torch.float32, *,
                  directions: str = "features", profile: str = "features",
                  profile_weight: float = PROFILE_WEIGHT) -> HAFrame:
    """The projected HAFrame in d = sums.shape[1] < K dimensions that follows the class means.

    Args:
        hierarchy: the class tree (K classes).
        sums: [K, d] float64, per-class sums of features (:func:`class_feature_means`).
        counts: [K], the samples behind each row of ``sums`` (0: a class without samples).
        gamma: the kernel's sharpness, > 0.
        s_min: "exact" (the most negative admissible value) or a number >= it.
        seed: seeds the Gaussian directions (the root's, unseen nodes', or all with directions="gaussian").
        dtype: the frame's floating dtype.
        directions: "features" (:func:`node_directions`) or "gaussian" (the seeded projection).
        profile: "features" (the kernel of S blends :func:`~haframe_ext.frame.profile.fitted_profile` of the class
            means into exp(-gamma d / d_max); docs/design.md 2e) or "exp" (the paper's kernel).
        profile_weight: the fitted table's share of the kernel, in [0, 1].

    Returns:
        An :class:`HAFrame` with weight [K, d] (unit rows) and ``approximation`` filled in.

    Raises:
        ValueError: d >= K, malformed sums or counts, no sample at all, or an unknown option.
    """
    K, d = sums.shape
    if d >= hierarchy.num_classes:
        raise ValueError(f"an aligned frame is a projection: dim {d} must be below K = {hierarchy.num_classes} "
                         "(at dim >= K the frame is exact and needs no directions)")
    for name, value, valid in (("directions", directions, FRAME_DIRECTIONS), ("profile", profile, FRAME_PROFILES)):
        if value not in valid:
            raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}")
    dirs = node_directions(hierarchy, sums, counts, seed) if directions == "features" else None
    kernel = (Profile(gamma, *fitted_profile(hierarchy, sums, counts), weight=profile_weight)
              if profile == "features" else None)
    return HAFrame.from_hierarchy(hierarchy, gamma, s_min=s_min, dim=d, seed=seed, dtype=dtype, approximate=True,
                                  directions=dirs, profile=kernel)


def align_model_frame(model: torch.nn.Module, hierarchy: Hierarchy,
                      batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], gamma: float,
                      s_min: Union[str, float] = "exact", seed: int = 0, max_samples: int = ALIGN_MAX_SAMPLES, *,
                      directions: str = "features", profile: str = "features",
                      profile_weight: float = PROFILE_WEIGHT) -> HAFrame:
    """Replace the fixed frame of an untrained ``HAFrameModel`` (backbone, transform, classifier) by the frame
    aligned to its own features on ``batches`` of (inputs, labels) (:func:`aligned_frame`). The classifier (and so
    every loss sharing it) gets the new frame through ``load_state_dict``.

    Args:
        model: an ``HAFrameModel`` whose classifier is a ``FixedFrameClassifier`` [K, d] with d < K.
        hierarchy: the class tree (K classes, the classifier's order).
        batches: (inputs [b, ...], labels [b] int64) pairs, e.g. a DataLoader over the training set.
        gamma: the kernel's sharpness, > 0.
        s_min: "exact" or a number >= the exact value.
        seed: seeds the Gaussian directions where the data gives none.
        max_samples: read at most this many samples from ``batches``.
        directions: "features" or "gaussian" (:func:`aligned_frame`).
        profile: "features" or "exp" (:func:`aligned_frame`).
        profile_weight: the fitted table's share of the kernel, in [0, 1].

    Returns:
        The new frame; the classifier holds its weight [K, d] and, up to DENSE_MAX_K classes, its similarity [K, K].
    """
    cl = model.classifier
    device = cl.weight.device
    was_training = model.training
    model.eval()
    try:
        sums, counts = class_feature_means(lambda x: model.transform(model.backbone(x.to(device))), batches,
                                           cl.weight.shape[0], max_samples)
    finally:
        model.train(was_training)
    frame = aligned_frame(hierarchy, sums, counts, gamma, s_min=s_min, seed=seed, dtype=cl.weight.dtype,
                          directions=directions, profile=profile, profile_weight=profile_weight)
    state = cl.state_dict()
    state["weight"] = frame.weight.to(device)
    if state.get("similarity") is not None:  # the cosine term's target [K, K] (up to DENSE_MAX_K classes)
        state["similarity"] = frame.similarity.to(device=device, dtype=state["similarity"].dtype)
    cl.load_state_dict(state)
    return frame
