"""The frame's kernel by hierarchical distance, and a profile fitted to the class-mean features (docs/design.md 2e).

The paper's target similarity is ``S = (1 - s_min) k(d) + s_min`` with the kernel ``k(d) = exp(-gamma d / d_max)``.
Below K dimensions a projected frame carries a Gram error of about ``1 / sqrt(dim)`` on every pair, and on a deep
tree the exponential spends almost none of the cosine range on the coarse levels, where most class pairs differ
(WordNet's artifact subtree at gamma 0.7: 0.06 between the top two levels, against a Gram error of 0.05 at dim
256). A :class:`Profile` blends the exponential with a table ``m(d)`` taken from the data: the mean cosine of the
centred class means over the class pairs at each distance, made nonincreasing (:func:`fitted_profile`), so that
the frame separates the levels the features separate.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np

from ..hierarchy.hierarchy import Hierarchy

__all__ = ["FRAME_PROFILES", "PROFILE_WEIGHT", "Profile", "fitted_profile"]

FRAME_PROFILES = ("features", "exp")  # TrainConfig.frame_profile
PROFILE_WEIGHT = 0.8  # the fitted table's share of the kernel; the rest, exp(-gamma d / d_max), keeps every level apart


class Profile:
    """The kernel ``k(d) = (1 - weight) exp(-gamma d / d_max) + weight m(d)``, with ``m`` linear between the
    table's (levels [m], values [m]) points: ``m(0) = 1``, nonincreasing, ``m(d_max) = 0``."""

    def __init__(self, gamma: float, levels, values, weight: float = PROFILE_WEIGHT) -> None:
        levels = np.asarray(levels, dtype=np.float64).reshape(-1)
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if levels.shape != values.shape or levels.size < 2:
            raise ValueError(f"a profile needs matching levels and values with >= 2 points, got {levels.size} and "
                             f"{values.size}")
        if not (np.isfinite(levels).all() and np.isfinite(values).all()):
            raise ValueError("a profile's levels and values must be finite")
        if levels[0] != 0 or values[0] != 1 or (np.diff(levels) <= 0).any():
            raise ValueError("a profile starts at level 0 with value 1 and its levels increase")
        if (np.diff(values) > 0).any() or values[-1] < 0:
            raise ValueError("a profile's values must be nonincreasing and >= 0 (the frame's tree factor needs it)")
        w = float(weight)
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"a profile's weight must be in [0, 1], got {weight!r}")
        g = float(gamma)
        if not (math.isfinite(g) and g > 0):
            raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
        self.gamma, self.levels, self.values, self.weight = g, levels, values, w

    def __call__(self, d, d_max: float) -> np.ndarray:
        """k at distances d (any shape), float64; d_max is the hierarchy's largest distance."""
        d = np.asarray(d, dtype=np.float64)
        return (1.0 - self.weight) * np.exp(-self.gamma * d / float(d_max)) + self.weight * np.interp(
            d, self.levels, self.values)

    def state(self) -> dict:
        """A plain dict of numbers and lists (for HAFrame.save and checkpoints)."""
        return {"gamma": self.gamma, "levels": self.levels.tolist(), "values": self.values.tolist(),
                "weight": self.weight}

    @classmethod
    def from_state(cls, state: dict) -> "Profile":
        """The profile of :meth:`state`."""
        return cls(state["gamma"], state["levels"], state["values"], state["weight"])

    def __eq__(self, other) -> bool:
        return (isinstance(other, Profile) and self.gamma == other.gamma and self.weight == other.weight
                and np.array_equal(self.levels, other.levels) and np.array_equal(self.values, other.values))

    def __repr__(self) -> str:
        table = ", ".join(f"{lv:g}: {v:.3f}" for lv, v in zip(self.levels, self.values))
        return f"Profile(gamma={self.gamma:g}, weight={self.weight:g}, m={{{table}}})"


def _nonincreasing(y: np.ndarray, w: np.ndarray) -> np.ndarray:  # y, w: [m]
    """The weighted least-squares nonincreasing fit to y (pool adjacent violators)."""
    blocks = []  # [mean, weight, length]
    for v, wt in zip(y.tolist(), w.tolist()):
        blocks.append([v, wt, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.repeat([b[0] for b in blocks], [b[2] for b in blocks])


def fitted_profile(hierarchy: Hierarchy, sums: np.ndarray, counts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(levels, values): the table ``m`` of a :class:`Profile` from class-mean features.

    sums [K, d] and counts [K] as ``align.class_feature_means`` gives them. For each distance level, the mean
    cosine of the centred class means over all pairs of seen classes whose lowest common ancestor sits at that
    level (exact, from per-node sums of the unit means: O(nnz(A) d) time, O(nodes) memory beyond the means, no
    pair loop), made nonincreasing in the
    distance (weighted by the pair counts) and rescaled so that the largest distance maps to 0. Level 0 maps to 1.
    """
    tree = hierarchy.tree
    K = hierarchy.num_classes
    if sums.shape[0] != K or counts.shape != (K,):
        raise ValueError(f"sums must be [K, d] and counts [K] with K = {K}, got {tuple(sums.shape)} and "
                         f"{tuple(counts.shape)}")
    seen = counts > 0
    if seen.sum() < 2:
        raise ValueError("fewer than two classes have samples: no class pair to fit a profile to")
    m = np.where(seen[:, None], sums / np.maximum(counts, 1.0)[:, None], 0.0)
    m[seen] -= m[seen].mean(axis=0)
    norm = np.linalg.norm(m, axis=1, keepdims=True)
    u = np.where(seen[:, None] & (norm > 0), m / np.where(norm > 0, norm, 1.0), 0.0)  # [K, d] unit rows
    A = tree.ancestry  # [K, nodes]
    n = np.asarray(A.T @ seen.astype(np.float64)).ravel()  # seen classes under each node
    sq = np.zeros(tree.num_nodes)  # |sum of the unit means under each node|^2, 64 feature columns at a time
    for c in range(0, u.shape[1], 64):
        part = np.asarray(A.T @ u[:, c:c + 64])  # [nodes, <= 64]
        sq += (part * part).sum(axis=1)
    child_sq, child_n2, own = np.zeros(tree.num_nodes), np.zeros(tree.num_nodes), np.zeros(tree.num_nodes)
    np.add.at(child_sq, tree.parent[1:], sq[1:])
    np.add.at(child_n2, tree.parent[1:], n[1:] ** 2)
    np.add.at(own, tree.class_idx[seen], 1.0)  # a class's pair with itself, at its own node
    own_sq = np.zeros(tree.num_nodes)
    np.add.at(own_sq, tree.class_idx[seen], (u[seen] ** 2).sum(axis=1))
    pair_sum = sq - child_sq - own_sq  # sum of cos over ordered pairs (a != b) whose LCA is the node
    pair_n = n ** 2 - child_n2 - own  # number of those pairs
    has = pair_n > 0.5
    levels = np.unique(tree.level[has]).astype(np.float64)
    idx = np.searchsorted(levels, tree.level[has])
    weight = np.bincount(idx, weights=pair_n[has], minlength=len(levels))
    cos = np.clip(_nonincreasing(np.bincount(idx, weights=pair_sum[has], minlength=len(levels)) / weight, weight),
                  -1.0, 1.0)
    lo = cos[-1]
    values = (cos - lo) / (1.0 - lo) if lo < 1.0 else np.zeros_like(cos)
    if levels[-1] < tree.d_max:  # no seen pair at the largest distance: it still maps to 0
        levels, values = np.append(levels, tree.d_max), np.append(values, 0.0)
    values[-1] = 0.0
    return np.concatenate([[0.0], levels]), np.concatenate([[1.0], values])
