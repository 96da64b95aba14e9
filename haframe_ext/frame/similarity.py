"""The target similarity of a frame, S = (1 - s_min) exp(-gamma d / d_max) + s_min, and its s_min.

``s_min`` is the most negative value keeping S positive semi-definite.  Writing
``S(s) = E + s (J - E)`` (J all ones, ``E = exp(-gamma d / d_max)``), the boundary is
``s_min = -1 / lambda_max`` of the generalized symmetric problem ``(J - E) v = lambda E v``, whose
one nonzero eigenvalue gives ``s_min = -1 / (1^T E^-1 1 - 1)`` (``exact_s_min``): one Cholesky solve
for a distance matrix, an O(nodes) recursion for a tree.  The paper's code instead scans a
100-point grid and stops short of it (``grid_s_min``, kept for reproduction).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import scipy.linalg

from ..hierarchy.edges import HierarchyError
from ..hierarchy.hierarchy import Hierarchy, as_distance_matrix
from .profile import Profile

__all__ = ["similarity_matrix", "exact_s_min", "grid_s_min", "etf_similarity", "check_gamma", "check_kernel",
           "kernel_matrix", "similarity_from_kernel", "eigenvalues", "min_eigenvalue", "check_two_classes", "PSD_RTOL"]

PSD_RTOL = 1e-9  # a user-given s_min is rejected when lambda_min(S) < -PSD_RTOL * lambda_max(S)
_GRID_ZERO = 1e-6  # the paper code treats eigenvalues with |lambda| below this as 0


def check_gamma(gamma) -> float:
    """Return gamma as a float, or raise if it is not a finite positive number (a bool or a string is not one)."""
    if isinstance(gamma, (bool, str, bytes)) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"gamma must be a number, got {type(gamma).__name__} {gamma!r:.40}")
    g = float(gamma)
    if not math.isfinite(g) or g <= 0:
        raise ValueError(f"gamma must be a finite number > 0 (the paper uses 1 to 5), got {gamma!r}")
    return g


def check_kernel(gamma):
    """gamma as check_gamma returns it, or a :class:`~haframe_ext.frame.profile.Profile` as it is."""
    return gamma if isinstance(gamma, Profile) else check_gamma(gamma)


def kernel_matrix(d, gamma) -> np.ndarray:
    """E = exp(-gamma d / d_max) in float64, [K, K]; with a Profile for gamma, the profile's kernel."""
    d = as_distance_matrix(d).astype(np.float64)
    g = check_kernel(gamma)
    d_max = d.max()
    if d_max == 0:
        raise ValueError("all distances are 0, so the classes cannot be told apart; d_max must be > 0")
    return g(d, d_max) if isinstance(g, Profile) else np.exp(-g * d / d_max)


def similarity_from_kernel(E: np.ndarray, s_min: float) -> np.ndarray:  # E: [K, K]
    """S = (1 - s_min) E + s_min with the diagonal set to exactly 1."""
    S = (1.0 - s_min) * E + s_min
    np.fill_diagonal(S, 1.0)
    return S


def eigenvalues(S: np.ndarray) -> np.ndarray:  # S: [K, K]
    """All eigenvalues of a symmetric matrix, ascending, float64 [K].

    numpy's eigvalsh (LAPACK dsyevd, divide and conquer) handles highly degenerate spectra (such as
    flat hierarchies: one eigenvalue repeated K - 1 times) where the subset driver dsyevr can fail
    with "Internal Error."; should it ever fail to converge, the QR driver dsyev is tried as well.
    """
    try:
        return np.linalg.eigvalsh(S)
    except np.linalg.LinAlgError:
        return scipy.linalg.eigh(S, eigvals_only=True, driver="ev")


def min_eigenvalue(S: np.ndarray) -> float:  # S: [K, K]
    """Smallest eigenvalue of a symmetric matrix."""
    try:
        return float(scipy.linalg.eigh(S, eigvals_only=True, subset_by_index=[0, 0])[0])
    except np.linalg.LinAlgError:  # dsyevr can fail on degenerate spectra: use the full decomposition
        return float(eigenvalues(S)[0])


def similarity_matrix(d, gamma: float, s_min: float) -> np.ndarray:
    """Target similarity S = (1 - s_min) exp(-gamma d / d_max) + s_min, float64 [K, K], diagonal exactly 1."""
    s = float(s_min)
    if not math.isfinite(s):
        raise ValueError(f"s_min must be a finite number, got {s_min!r}")
    return similarity_from_kernel(kernel_matrix(d, gamma), s)


def etf_similarity(K: int) -> np.ndarray:
    """Gram matrix of a K-class simplex ETF, (K I - J) / (K - 1), float64 [K, K]."""
    if int(K) != K or K < 2:
        raise ValueError(f"a simplex ETF needs an integer K >= 2 classes, got {K!r}")
    K = int(K)
    return (K * np.eye(K) - np.ones((K, K))) / (K - 1)


def _bisect_s_min(E: np.ndarray, iters: int = 60) -> float:  # E: [K, K]
    """Lowest s in [-1, 1] with S(s) = E + s (J - E) PSD, by bisection (lambda_min(S(s)) is concave in s)."""
    K = len(E)
    A = np.ones_like(E) - E
    tol = 1e-10 * K
    if min_eigenvalue(E - A) >= -tol:
        return -1.0
    lo, hi = -1.0, 1.0  # S(-1) is not PSD; S(1) = J is
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if min_eigenvalue(E + mid * A) >= -tol:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-13:
            break
    return hi


def exact_s_min(d, gamma: float) -> float:
    """Most negative s_min keeping S PSD: -1 / (1^T E^-1 1 - 1), clipped to >= -1.

    d: a Hierarchy (O(nodes) recursion up the tree, its own convention) or anything
    as_distance_matrix accepts (one Cholesky solve of E).  E is positive definite for tree
    (ultrametric) distances with distinct classes.  Where it is not (two classes at distance 0,
    or distances that are not of negative type), the lowest s in [-1, 1] with S(s) PSD is found
    by bisection on lambda_min(S(s)) instead (that value can be positive when E itself is
    indefinite; S(1) = J is always PSD).
    """
    if isinstance(d, Hierarchy):
        check_two_classes(d)
        return d.tree.exact_s_min(check_kernel(gamma))
    E = kernel_matrix(d, gamma)
    try:
        L = scipy.linalg.cholesky(E, lower=True)
    except np.linalg.LinAlgError:
        return _bisect_s_min(E)
    pivots = np.diagonal(L) ** 2
    if pivots.min() <= 1e-10 * pivots.max():  # numerically singular: the solve would be noise
        return _bisect_s_min(E)
    ones = np.ones(len(E))
    q = float(ones @ scipy.linalg.cho_solve((L, True), ones))
    return -1.0 if q <= 1.0 else max(-1.0 / (q - 1.0), -1.0)


def grid_s_min(d, gamma: float, num: int = 100, exhaustive: bool = False) -> float:
    """The paper code's s_min: the most negative of np.linspace(-1/(K-1), -1, num) whose S is PSD.

    PSD here follows the paper: eigenvalues with |lambda| < 1e-6 count as 0.  The admissible
    values of s form an interval (lambda_min(S(s)) is concave in s and S(1) = J is PSD), so
    the admissible candidates are a prefix of the grid and a binary search over it returns
    exactly what the full scan does.  ``exhaustive=True`` runs the literal scan instead (one
    full eigendecomposition per candidate: about 30 s for K = 1010).
    """
    E = kernel_matrix(d, gamma)
    K = len(E)
    candidates = np.linspace(-1.0 / (K - 1), -1.0, int(num))
    if exhaustive:
        best = None
        for s in candidates:
            lam = np.linalg.eigvalsh(similarity_from_kernel(E, s))
            lam[np.abs(lam) < _GRID_ZERO] = 0.0
            if (lam >= 0).all():
                best = float(s)
    else:
        def admissible(i: int) -> bool:
            return min_eigenvalue(similarity_from_kernel(E, candidates[i])) > -_GRID_ZERO

        best = None
        if admissible(0):
            lo, hi = 0, len(candidates)  # candidates[lo] admissible; candidates[hi:] are not (hi may be past the end)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if admissible(mid):
                    lo = mid
                else:
                    hi = mid
            best = float(candidates[lo])
    if best is None:
        raise ValueError(
            f"no grid candidate in [-1/(K-1), -1] gives a PSD similarity for gamma={gamma}; "
            "use exact_s_min, which also covers s_min > -1/(K-1)")
    return best


def check_two_classes(h: Hierarchy) -> None:
    """Raise a HierarchyError for a hierarchy with fewer than 2 classes (no distances to build a frame from)."""
    if h.num_classes < 2:
        raise HierarchyError(f"a frame needs at least 2 classes, but the hierarchy has {h.num_classes}")
