"""Unit class vectors with a given Gram matrix: eigen-factorization, seeded rotation, Gaussian projection, truncation.

With ``dim >= K`` a factor is rotated by a seeded random orthonormal matrix into ``dim`` (exact); with
``dim < K`` it is projected with a seeded Gaussian and its rows renormalised (Johnson-Lindenstrauss:
every class keeps its own direction), or truncated to the top eigenvectors (``"truncate"``, which
merges the finest classes at small dim).
"""

from __future__ import annotations

import numpy as np

from ..sizes import available_memory

__all__ = ["RANK_RTOL", "random_orthonormal", "factorize", "check_dim", "check_approximate", "dim_error",
           "normalise_rows", "rotate", "project"]

RANK_RTOL = 1e-10  # eigenvalues of S below this fraction of the largest count as 0 (rounding at a singular S)


def random_orthonormal(dim: int, r: int, seed: int) -> np.ndarray:
    """Seeded [dim, r] matrix with orthonormal columns (QR of a Gaussian, signs fixed so R has a positive diagonal)."""
    rng = np.random.default_rng(seed)
    q, R = np.linalg.qr(rng.standard_normal((dim, r)))
    signs = np.sign(np.diagonal(R))
    signs[signs == 0] = 1.0
    return q * signs


def check_dim(dim, K: int) -> int:
    """dim as an int (K when None), or raise if it is not a positive integer or the [K, dim] weight cannot fit."""
    dim = K if dim is None else dim
    if isinstance(dim, bool) or int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    dim = int(dim)
    r = min(dim, K)
    # the float64 factor [K, r]; the rotation [dim, r] with its QR's copies (3); the float64 rows [K, dim] and
    # their copy in the diagnostics (2); the float32 weight
    need = 8 * K * r + 24 * dim * r + 20 * K * dim
    avail = available_memory()
    if avail is not None and need > avail:
        fits = max(1, int(0.8 * avail - 8 * K * r) // (24 * r + 20 * K))  # with a margin for the rest
        raise MemoryError(
            f"a frame of K={K} classes in dim={dim} needs about {need / 2**30:.1f} GiB, but about "
            f"{avail / 2**30:.1f} GiB is available; choose dim <= {fits}")
    return dim


def dim_error(dim: int, K: int, exact_dim: int) -> ValueError:
    """The error for dim < K without approximate."""
    return ValueError(
        f"dim={dim} is smaller than K={K}: an exact frame needs dim >= {exact_dim}; pass approximate=True for a "
        "Gaussian projection of the exact frame (every class kept apart), or approximate='truncate' for the "
        "best rank-dim approximation (merges close classes)")


def normalise_rows(W: np.ndarray, what: str) -> np.ndarray:
    """W with unit rows, or raise when a row vanished."""
    norms = np.linalg.norm(W, axis=1)
    if norms.min() <= 1e-12:
        raise ValueError(f"{what}: some class vectors vanish; use a larger dim")
    return W / norms[:, None]


def rotate(W0: np.ndarray, dim: int, seed: int) -> np.ndarray:  # W0: [K, r], r <= dim
    """W0's rows rotated by a seeded random orthonormal matrix into dim dimensions, [K, dim]."""
    return W0 @ random_orthonormal(dim, W0.shape[1], seed).T


def project(W0: np.ndarray, dim: int, seed: int) -> np.ndarray:  # W0: [K, r]
    """W0 times a seeded Gaussian [r, dim], rows renormalised (Johnson-Lindenstrauss), [K, dim]."""
    G = np.random.default_rng(seed).standard_normal((W0.shape[1], dim))
    return normalise_rows(W0 @ G, f"the projection into dim={dim}")


def factorize(S: np.ndarray, dim: int, seed: int, approximate) -> tuple:  # S: [K, K]
    """(unit rows W [K, dim], exact): W W^T = S, exactly when dim >= rank(S) (K - 1 at the exact s_min: the
    eigenvalues left out are rounding), else approximately (``approximate``), from the eigendecomposition of S."""
    K = len(S)
    lam, Q = np.linalg.eigh(S)  # ascending
    lam = np.clip(lam, 0.0, None)  # tiny negatives from rounding (a singular S at s_min)
    W0 = Q * np.sqrt(lam)[None, :]  # [K, K], rows have Gram S
    if dim >= K:
        return normalise_rows(rotate(W0, dim, seed), "the frame"), True
    rank = int((lam > RANK_RTOL * lam[-1]).sum())
    if dim >= rank:  # the top dim eigenvectors span S: exact, whatever ``approximate`` says
        return normalise_rows(rotate(W0[:, -dim:], dim, seed), "the frame"), True
    if not approximate:
        raise dim_error(dim, K, rank)
    if approximate == "truncate":
        return normalise_rows(rotate(W0[:, -dim:], dim, seed), f"the rank-{dim} approximation"), False
    return project(W0, dim, seed), False


def check_approximate(approximate):
    """approximate as False, True (Gaussian projection) or 'truncate'."""
    if approximate in (False, True, "truncate", "projection"):
        return True if approximate == "projection" else approximate
    raise ValueError(f"approximate must be False, True (projection) or 'truncate', got {approximate!r}")
