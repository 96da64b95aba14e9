"""The class vectors of HAFrame's constructors: their argument checks, s_min resolved, and the weight of the dense,
tree and ETF routes."""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import numpy as np
import torch

from .factorization import check_dim, dim_error, factorize, normalise_rows, rotate
from .profile import Profile
from .similarity import (PSD_RTOL, check_gamma, eigenvalues, exact_s_min, grid_s_min, kernel_matrix,
                         similarity_from_kernel)

__all__ = ["check_dtype", "check_s_min_value", "check_gamma_resolves", "check_tree_options", "dense_weight",
           "tree_s_min", "tree_weight", "etf_weight"]

_EXACT_MAX_BYTES = 2 << 30  # the dense node-space factor of an exact tree frame may take at most this


def check_gamma_resolves(gamma: float, d_min: float, d_max: float) -> None:
    """Refuse a gamma so small that exp(-gamma d / d_max) rounds to 1 for the closest classes (s_min would be NaN)."""
    if d_max > 0 and d_min > 0 and math.exp(-gamma * d_min / d_max) == 1.0:
        raise ValueError(f"gamma={gamma:g} is so small that exp(-gamma d / d_max) rounds to 1 for the closest classes "
                         f"(d={d_min:g}, d_max={d_max:g}): every class would get the same vector; use gamma >= 1e-6 "
                         "(the paper uses 1 to 5)")


def check_dtype(dtype) -> None:
    """A frame's dtype must be a floating-point torch dtype (its rows are unit vectors)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError("dtype must be a floating-point torch dtype (torch.float32, torch.float64, ...), "
                        f"got {dtype!r}")


def check_s_min_value(s_min) -> float:
    """A user-given s_min as a finite float < 1."""
    try:
        s = float(s_min)
    except (TypeError, ValueError):
        raise ValueError(f"s_min must be 'exact', 'grid' or a number, got {s_min!r}") from None
    if not math.isfinite(s) or s >= 1:
        raise ValueError(f"s_min must be a finite number < 1, got {s_min!r}")
    return s


def check_tree_options(gamma: float, approximate, s_min, dim, K: int, directions, profile) -> None:
    """Refuse a profile or node directions that the chosen route of HAFrame.from_hierarchy would not use."""
    if profile is not None and (not isinstance(profile, Profile) or profile.gamma != gamma):
        raise ValueError(f"profile must be a frame.profile.Profile built with gamma={gamma:g}, got {profile!r}")
    if profile is not None and (approximate == "truncate" or (isinstance(s_min, str) and s_min == "grid")):
        raise ValueError("a profile applies to the tree routes only: use approximate=True or False and "
                         "s_min='exact' or a number")
    if directions is not None and not (approximate is True and dim is not None and int(dim) < K):
        raise ValueError("directions apply to the projected frame only: pass dim < K with approximate=True")


def dense_weight(d: np.ndarray, gamma: float, s_min, dim, seed: int,
                 approximate) -> Tuple[np.ndarray, np.ndarray, float, bool]:
    """(W [K, dim], S [K, K], s_min, exact) of the frame for a distance matrix d [K, K] (HAFrame.from_distances)."""
    off = d[~np.eye(len(d), dtype=bool)]
    if off.size:
        check_gamma_resolves(check_gamma(gamma), float(off[off > 0].min()) if (off > 0).any() else 0.0,
                             float(off.max()))
    E = kernel_matrix(d, gamma)
    dim = check_dim(dim, len(d))
    if isinstance(s_min, str):
        if s_min == "exact":
            s = exact_s_min(d, gamma)
        elif s_min == "grid":
            s = grid_s_min(d, gamma)
        else:
            raise ValueError(f"s_min must be 'exact', 'grid' or a number, got {s_min!r}")
        S = similarity_from_kernel(E, s)
    else:
        s = check_s_min_value(s_min)
        S = similarity_from_kernel(E, s)
        eig = eigenvalues(S)  # all eigenvalues: the subset driver fails on degenerate spectra
        lam, top = float(eig[0]), float(eig[-1])
        if lam < -PSD_RTOL * top:
            raise ValueError(
                f"s_min={s} makes the similarity matrix not positive semi-definite (smallest eigenvalue "
                f"{lam:.3g}); the most negative admissible value for gamma={gamma} is "
                f"{exact_s_min(d, gamma):.6f} (exact_s_min): use s_min='exact' or a value >= it")
    W, exact = factorize(S, dim, seed, approximate)
    return W, S, s, exact


def tree_s_min(s_min, s_exact: float, gamma: float) -> float:
    """The s_min of a tree frame: s_exact for "exact", else the given number, refused below s_exact."""
    if isinstance(s_min, str):
        if s_min != "exact":
            raise ValueError(f"s_min must be 'exact', 'grid' or a number, got {s_min!r}")
        return s_exact
    s = check_s_min_value(s_min)
    if s < s_exact - 1e-12:  # the admissible values are exactly [s_exact, 1)
        raise ValueError(
            f"s_min={s} makes the similarity matrix not positive semi-definite; the most negative "
            f"admissible value for gamma={gamma} is {s_exact:.6f} (exact_s_min): use s_min='exact' or a "
            "value >= it")
    return s


def tree_weight(tree, kernel: Union[float, Profile], s: float, dim: int, K: int, seed: int, approximate,
                directions: Optional[np.ndarray]) -> np.ndarray:
    """W [K, dim] of a tree frame: exact (dim >= K, from the dense node-space factor) or projected (dim < K)."""
    if dim >= K:
        if 8 * K * tree.num_nodes > _EXACT_MAX_BYTES:
            raise MemoryError(
                f"an exact frame for K={K} classes needs a dense {K} x {tree.num_nodes} factor "
                f"({8 * K * tree.num_nodes / 2**30:.1f} GiB); pass dim < K with approximate=True")
        Wn = tree.dense_frame(kernel, s)  # [K, n], exact
        R = np.linalg.qr(Wn.T, mode="r")  # Wn = R^T Q^T: R^T [K, K] has the same Gram matrix
        return normalise_rows(rotate(R.T[:, :min(K, R.shape[0])], dim, seed), "the frame")
    if not approximate:
        raise dim_error(dim, K, K)
    return tree.projected_frame(kernel, s, dim, seed, directions=directions)


def etf_weight(K: int, dim: int, seed: int, approximate, S: Optional[np.ndarray]) -> Tuple[np.ndarray, bool]:
    """(W [K, dim], exact) of a K-class simplex ETF; S: its [K, K] similarity, or None above the dense limit."""
    dense = S is not None
    exact = False
    if dim >= K or approximate == "truncate" or (dense and dim == K - 1):  # S has rank K - 1: exact in K - 1
        if not dense:
            raise MemoryError(f"an exact {K}-class ETF in dim >= K needs K x K = {K * K * 8 / 2**30:.1f} GiB; "
                              "pass dim < K with approximate=True (a Gaussian projection)")
        W, exact = factorize(S, dim, seed, approximate)
    elif not approximate:
        raise dim_error(dim, K, K - 1)
    else:  # the ETF is the centred identity, scaled: its projection is a Gaussian [K, dim] minus its mean row
        G = np.random.default_rng(seed).standard_normal((K, dim))
        W = normalise_rows(G - G.mean(axis=0, keepdims=True), f"the projection into dim={dim}")
    return W, exact
