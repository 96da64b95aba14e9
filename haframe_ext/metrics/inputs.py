"""The metrics' inputs: class distances in units of d_max from a dense matrix or a tree (pair lookups, label
profiles, CRM's expected costs), and label tensors checked against K."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .hierarchical import TreeProfiles, dense_profiles
from ..hierarchy.hierarchy import Hierarchy, as_distance_matrix

__all__ = ["ClassDistances", "check_labels"]


class ClassDistances:
    """Class distances divided by d_max, from a dense matrix or a tree: pair lookups and CRM expected costs."""

    def __init__(self, distances, max_bins: int) -> None:
        """distances: a Hierarchy (its tree) or anything as_distance_matrix takes; max_bins: the most integer
        distance values that get a severity_histogram bin each."""
        if isinstance(distances, Hierarchy):
            self.tree, self.dense = distances.tree, None
            self.num_classes, self.scale = distances.num_classes, distances.tree.d_max
            t = distances.tree
            self.key = ("tree", hashlib.sha256(t.parent.tobytes() + t.level.tobytes() + t.class_idx.tobytes()).digest())
            self.profiles_of = TreeProfiles(t)
            integer = True
        else:
            d = as_distance_matrix(distances)  # [K, K] int64 when integer-valued
            integer = d.dtype.kind == "i"
            d = d.astype(np.float64)
            self.tree, self.num_classes = None, d.shape[0]
            self.scale = float(d.max()) or 1.0
            self.dense = d / self.scale
            self.key = ("dense", self.scale, self.dense.tobytes())  # the scale too: d and 2 d share self.dense
            self.profiles_of = None
        # severity_histogram bins: one per integer distance 1..d_max, where that list is short enough
        self.histogram_bins = int(self.scale) if integer and self.scale <= max_bins else 0
        self._on: dict = {}  # device -> [K, K] float64 tensor

    def profiles(self, labels: np.ndarray):
        """(values [u, G] ascending distances / d_max, inf-padded; counts [u, G]) of labels [u]: each sorted row."""
        if self.profiles_of is not None:
            return self.profiles_of.profiles(labels, self.scale)
        return dense_profiles(self.dense, labels)

    def _dense_on(self, device) -> torch.Tensor:
        """The scaled dense matrix on device (cached)."""
        key = str(device)
        if key not in self._on:
            self._on[key] = torch.as_tensor(self.dense, device=device)
        return self._on[key]

    def pairs(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """d[i, j] / d_max for label tensors of one shape, float64 on their device."""
        if self.tree is None:
            return self._dense_on(i.device)[i, j]
        d = self.tree.pair_distances(i.cpu().numpy(), j.cpu().numpy()) / self.scale
        return torch.from_numpy(d).to(i.device)

    def expected(self, probs: torch.Tensor) -> torch.Tensor:
        """sum_j d[k, j] p_j / d_max for probs [N, K], float64 [N, K] on probs' device."""
        p = probs.detach().to(torch.float64)
        if self.tree is None:
            return p @ self._dense_on(p.device).T
        return torch.from_numpy(self.tree.expected_distances(p.cpu().numpy()) / self.scale).to(p.device)


def check_labels(target, n: int, K: int, device, what: str = "target") -> torch.Tensor:
    """Return target on device after checking it is an integer [N] tensor with values in [0, K)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dim() != 1 or target.shape[0] != n:
        raise ValueError(f"{what} must be 1-D with {n} entries (one per row), got shape {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer class indices, got dtype {target.dtype}")
    if n and (int(target.min()) < 0 or int(target.max()) >= K):
        raise ValueError(
            f"{what} labels must lie in [0, {K - 1}] for K={K} classes, got values in "
            f"[{int(target.min())}, {int(target.max())}]")
    return target.to(device=device, dtype=torch.long)
