"""Hierarchy-aware frames: the target similarity S, its most negative admissible s_min, and the factorization W W^T = S.

With distances d (d_max = d.max()) and ``E = exp(-gamma d / d_max)``:

    S = (1 - s_min) * E + s_min          (diagonal exactly 1)

``s_min`` is the most negative value keeping S positive semi-definite.  Writing
``S(s) = E + s (J - E)`` (J all ones), the boundary is ``s_min = -1 / lambda_max`` of the
generalized symmetric problem ``(J - E) v = lambda E v``, whose one nonzero eigenvalue gives
``s_min = -1 / (1^T E^-1 1 - 1)`` (``exact_s_min``): one Cholesky solve for a distance matrix,
an O(nodes) recursion for a tree.  The paper's code instead scans a 100-point grid and stops
short of it (``grid_s_min``, kept for reproduction).

Frames.  For a tree the exact frame is a sparse factor plus a rank-one term in node space
(``haframe_ext.tree``); for a distance matrix it is ``diag(sqrt(lam)) Q^T`` from the
eigendecomposition of S.  With ``dim >= K`` it is compressed to K dimensions and rotated by a
seeded random orthonormal matrix into ``dim``; the Gram matrix is S to rounding.  With
``dim < K`` no exact frame exists: ``approximate=True`` projects the exact frame with a seeded
Gaussian and renormalises the rows (Johnson-Lindenstrauss), which keeps every class apart;
``approximate="truncate"`` keeps the top eigenvectors of S instead, which merges the
finest classes at small dim (it warns when it does).  Every approximate frame reports its
separation margin and Gram error (``frame.approximation``).  Above ``DENSE_MAX_K`` classes a
frame built from a tree holds no K x K matrix: rows of S come from the tree on demand.
The simplex ETF is the special case ``S = (K I - J) / (K - 1)``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg
import torch

from .hierarchy import BUILTIN_NAMES, Hierarchy, HierarchyError, as_distance_matrix

__all__ = ["HAFrame", "similarity_matrix", "exact_s_min", "grid_s_min", "etf_similarity", "DENSE_MAX_K"]

DENSE_MAX_K = 4096  # above this many classes a tree frame keeps no K x K similarity or distance matrix
_NEAR_TWIN = 0.99  # two class vectors with a cosine above this count as merged
_EXACT_MAX_BYTES = 2 << 30  # the dense node-space factor of an exact tree frame may take at most this
_SAMPLED_PAIRS = 200_000  # random class pairs behind the sampled Gram error of a large frame
_NEIGHBOURS = 16  # tree neighbours per class checked for the separation margin of a large frame

_PSD_RTOL = 1e-9  # a user-given s_min is rejected when lambda_min(S) < -_PSD_RTOL * lambda_max(S)
_GRID_ZERO = 1e-6  # the paper code treats eigenvalues with |lambda| below this as 0
_FORMAT = "haframe_ext.HAFrame"


# ----------------------------------------------------------------------------- similarity and s_min
def _check_gamma(gamma) -> float:
    """Return gamma as a float, or raise if it is not a finite positive number."""
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        raise TypeError(f"gamma must be a number, got {type(gamma).__name__}") from None
    if not math.isfinite(g) or g <= 0:
        raise ValueError(f"gamma must be a finite number > 0 (the paper uses 1 to 5), got {gamma!r}")
    return g


def _kernel(d, gamma) -> np.ndarray:
    """E = exp(-gamma d / d_max) in float64, [K, K]."""
    d = as_distance_matrix(d).astype(np.float64)
    g = _check_gamma(gamma)
    d_max = d.max()
    if d_max == 0:
        raise ValueError("all distances are 0, so the classes cannot be told apart; d_max must be > 0")
    return np.exp(-g * d / d_max)


def _similarity_from_kernel(E: np.ndarray, s_min: float) -> np.ndarray:  # E: [K, K]
    """S = (1 - s_min) E + s_min with the diagonal set to exactly 1."""
    S = (1.0 - s_min) * E + s_min
    np.fill_diagonal(S, 1.0)
    return S


def _eigvalsh(S: np.ndarray) -> np.ndarray:  # S: [K, K]
    """All eigenvalues of a symmetric matrix, ascending, float64 [K].

    numpy's eigvalsh (LAPACK dsyevd, divide and conquer) handles highly degenerate spectra (such as
    flat hierarchies: one eigenvalue repeated K - 1 times) where the subset driver dsyevr can fail
    with "Internal Error."; should it ever fail to converge, the QR driver dsyev is tried as well.
    """
    try:
        return np.linalg.eigvalsh(S)
    except np.linalg.LinAlgError:
        return scipy.linalg.eigh(S, eigvals_only=True, driver="ev")


def _min_eig(S: np.ndarray) -> float:  # S: [K, K]
    """Smallest eigenvalue of a symmetric matrix."""
    try:
        return float(scipy.linalg.eigh(S, eigvals_only=True, subset_by_index=[0, 0])[0])
    except np.linalg.LinAlgError:  # dsyevr can fail on degenerate spectra: use the full decomposition
        return float(_eigvalsh(S)[0])


def similarity_matrix(d, gamma: float, s_min: float) -> np.ndarray:
    """Target similarity S = (1 - s_min) exp(-gamma d / d_max) + s_min, float64 [K, K], diagonal exactly 1."""
    s = float(s_min)
    if not math.isfinite(s):
        raise ValueError(f"s_min must be a finite number, got {s_min!r}")
    return _similarity_from_kernel(_kernel(d, gamma), s)


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
    if _min_eig(E - A) >= -tol:
        return -1.0
    lo, hi = -1.0, 1.0  # S(-1) is not PSD; S(1) = J is
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if _min_eig(E + mid * A) >= -tol:
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
        _check_two_classes(d)
        return d.tree.exact_s_min(_check_gamma(gamma))
    E = _kernel(d, gamma)
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
    E = _kernel(d, gamma)
    K = len(E)
    candidates = np.linspace(-1.0 / (K - 1), -1.0, int(num))
    if exhaustive:
        best = None
        for s in candidates:
            lam = np.linalg.eigvalsh(_similarity_from_kernel(E, s))
            lam[np.abs(lam) < _GRID_ZERO] = 0.0
            if (lam >= 0).all():
                best = float(s)
    else:
        def admissible(i: int) -> bool:
            return _min_eig(_similarity_from_kernel(E, candidates[i])) > -_GRID_ZERO

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


# ----------------------------------------------------------------------------- factorization
def _random_orthonormal(dim: int, r: int, seed: int) -> np.ndarray:
    """Seeded [dim, r] matrix with orthonormal columns (QR of a Gaussian, signs fixed so R has a positive diagonal)."""
    rng = np.random.default_rng(seed)
    q, R = np.linalg.qr(rng.standard_normal((dim, r)))
    signs = np.sign(np.diagonal(R))
    signs[signs == 0] = 1.0
    return q * signs


def _check_dim(dim, K: int) -> int:
    """dim as an int (K when None), or raise if it is not a positive integer or the [K, dim] weight cannot fit."""
    dim = K if dim is None else dim
    if isinstance(dim, bool) or int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    dim = int(dim)
    need = 8 * K * min(dim, max(K, 1)) + 4 * K * dim  # float64 factor + the float32 weight
    avail = _available_memory()
    if avail is not None and need > avail:
        raise MemoryError(
            f"a frame of K={K} classes in dim={dim} needs about {need / 2**30:.1f} GiB, but about "
            f"{avail / 2**30:.1f} GiB is available; choose dim <= {max(1, avail // (12 * K))}")
    return dim


def _available_memory():
    """Bytes of memory available to this process (None when unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _dim_error(dim: int, K: int, exact_dim: int) -> ValueError:
    """The error for dim < K without approximate."""
    return ValueError(
        f"dim={dim} is smaller than K={K}: an exact frame needs dim >= {exact_dim}; pass approximate=True for a "
        "Gaussian projection of the exact frame (every class kept apart), or approximate='truncate' for the "
        "best rank-dim approximation (merges close classes)")


def _normalise_rows(W: np.ndarray, what: str) -> np.ndarray:
    """W with unit rows, or raise when a row vanished."""
    norms = np.linalg.norm(W, axis=1)
    if norms.min() <= 1e-12:
        raise ValueError(f"{what}: some class vectors vanish; use a larger dim")
    return W / norms[:, None]


def _rotate(W0: np.ndarray, dim: int, seed: int) -> np.ndarray:  # W0: [K, r], r <= dim
    """W0's rows rotated by a seeded random orthonormal matrix into dim dimensions, [K, dim]."""
    return W0 @ _random_orthonormal(dim, W0.shape[1], seed).T


def _project(W0: np.ndarray, dim: int, seed: int) -> np.ndarray:  # W0: [K, r]
    """W0 times a seeded Gaussian [r, dim], rows renormalised (Johnson-Lindenstrauss), [K, dim]."""
    G = np.random.default_rng(seed).standard_normal((W0.shape[1], dim))
    return _normalise_rows(W0 @ G, f"the projection into dim={dim}")


def _factorize(S: np.ndarray, dim: int, seed: int, approximate) -> np.ndarray:  # S: [K, K]
    """Unit rows W [K, dim] with W W^T = S (approximately when dim < K), from the eigendecomposition of S."""
    K = len(S)
    lam, Q = np.linalg.eigh(S)  # ascending
    lam = np.clip(lam, 0.0, None)  # tiny negatives from rounding (a singular S at s_min)
    W0 = Q * np.sqrt(lam)[None, :]  # [K, K], rows have Gram S
    if dim >= K:
        return _normalise_rows(_rotate(W0, dim, seed), "the frame")
    if not approximate:
        raise _dim_error(dim, K, int((lam > 1e-10 * lam[-1]).sum()))
    if approximate == "truncate":
        return _normalise_rows(_rotate(W0[:, -dim:], dim, seed), f"the rank-{dim} approximation")
    return _project(W0, dim, seed)


def _check_approximate(approximate):
    """approximate as False, True (Gaussian projection) or 'truncate'."""
    if approximate in (False, True, "truncate", "projection"):
        return True if approximate == "projection" else approximate
    raise ValueError(f"approximate must be False, True (projection) or 'truncate', got {approximate!r}")


# ----------------------------------------------------------------------------- quality of a frame
def _sampled_pairs(W: np.ndarray, tree, seed: int):
    """Class pairs close in the tree plus random pairs, with their cosines: (i [P], j [P], cos [P]).

    Close pairs are neighbours within _NEIGHBOURS places in breadth-first leaf order (siblings and
    cousins are adjacent there); their cosines come from shifted views, with no gathered copy.
    """
    K = len(W)
    order = np.argsort(tree.class_idx, kind="stable") if tree is not None else np.arange(K)
    Wo = W[order]
    i, j, cos = [], [], []
    for o in range(1, min(_NEIGHBOURS, K - 1) + 1):
        i.append(order[:-o])
        j.append(order[o:])
        cos.append(np.einsum("pd,pd->p", Wo[:-o], Wo[o:]))
    rng = np.random.default_rng(seed)
    ri, rj = rng.integers(0, K, _SAMPLED_PAIRS), rng.integers(0, K, _SAMPLED_PAIRS)
    keep = ri != rj
    ri, rj = ri[keep], rj[keep]
    i.append(ri)
    j.append(rj)
    cos.append(np.einsum("pd,pd->p", W[ri], W[rj]))
    return np.concatenate(i), np.concatenate(j), np.concatenate(cos)


def _max_offdiag(W: np.ndarray) -> float:
    """max_{j != k} w_j . w_k over every pair, in row blocks ([block, K] at a time)."""
    K = len(W)
    best = -np.inf
    block = max(1, (1 << 24) // K)
    for a in range(0, K, block):
        G = W[a:a + block] @ W.T
        G[np.arange(G.shape[0]), np.arange(a, a + G.shape[0])] = -np.inf
        best = max(best, float(G.max()))
    return best


# ----------------------------------------------------------------------------- the frame
class HAFrame:
    """A fixed classifier frame: unit class vectors (rows of ``weight``) whose Gram matrix is the target similarity."""

    def __init__(self, weight: torch.Tensor, similarity, *, s_min: float, gamma=None, distances=None,
                 hierarchy=None, etf: bool = False) -> None:
        """Wrap a frame: weight [K, dim]; similarity [K, K] (float64 copy kept), or None with a hierarchy or etf."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("weight must be a 2-D torch.Tensor [K, dim]")
        K = weight.shape[0]
        if hierarchy is not None and not isinstance(hierarchy, Hierarchy):
            raise TypeError(f"hierarchy must be a Hierarchy, got {type(hierarchy).__name__}")
        if hierarchy is not None and hierarchy.num_classes != K:
            raise ValueError(f"the hierarchy has {hierarchy.num_classes} classes but weight has {K} rows")
        if similarity is None:
            if not etf and (hierarchy is None or gamma is None):
                raise ValueError("a frame needs its similarity [K, K], or a hierarchy and gamma to compute it")
            S = None
        else:
            S = (similarity.detach().cpu().double().numpy() if isinstance(similarity, torch.Tensor)
                 else np.asarray(similarity, dtype=np.float64)).copy()
            if S.shape != (K, K):
                raise ValueError(
                    f"similarity must be [K, K] = [{K}, {K}] to match weight {tuple(weight.shape)}, got {S.shape}")
        self.weight = weight  # [K, dim]
        self._similarity64 = S  # [K, K] float64, or None (rows from the hierarchy)
        self.similarity = None if S is None else torch.as_tensor(S, dtype=weight.dtype, device=weight.device)
        self.s_min = float(s_min)
        self.gamma = None if gamma is None else float(gamma)
        self.hierarchy = hierarchy
        self.etf_frame = bool(etf)  # a simplex ETF: S has a closed form
        self.distances = None if distances is None else as_distance_matrix(distances)  # [K, K]
        self.approximation = None  # for frames with dim < K: how far W W^T is from S (see _measure)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_distances(cls, d, gamma: float, s_min="exact", dim=None, seed: int = 0,
                       dtype: torch.dtype = torch.float32, approximate=False) -> "HAFrame":
        """Build the frame for distances d (anything as_distance_matrix accepts); s_min: "exact", "grid" or a float.

        approximate: False (dim >= K), True (dim < K: Gaussian projection of the exact frame) or
        "truncate" (dim < K: top eigenvectors; merges close classes).
        """
        d = as_distance_matrix(d)
        approximate = _check_approximate(approximate)
        E = _kernel(d, gamma)
        dim = _check_dim(dim, len(d))
        if isinstance(s_min, str):
            if s_min == "exact":
                s = exact_s_min(d, gamma)
            elif s_min == "grid":
                s = grid_s_min(d, gamma)
            else:
                raise ValueError(f"s_min must be 'exact', 'grid' or a number, got {s_min!r}")
            S = _similarity_from_kernel(E, s)
        else:
            s = _check_s_min_value(s_min)
            S = _similarity_from_kernel(E, s)
            eig = _eigvalsh(S)  # all eigenvalues: the subset driver fails on degenerate spectra
            lam, top = float(eig[0]), float(eig[-1])
            if lam < -_PSD_RTOL * top:
                raise ValueError(
                    f"s_min={s} makes the similarity matrix not positive semi-definite (smallest eigenvalue "
                    f"{lam:.3g}); the most negative admissible value for gamma={gamma} is "
                    f"{exact_s_min(d, gamma):.6f} (exact_s_min): use s_min='exact' or a value >= it")
        W = _factorize(S, dim, seed, approximate)
        frame = cls(torch.as_tensor(W, dtype=dtype), S, s_min=s, gamma=_check_gamma(gamma), distances=d)
        if dim < len(d):
            frame._measure(W, "truncate" if approximate == "truncate" else "projection", seed)
        return frame

    @classmethod
    def from_hierarchy(cls, h, gamma: float, s_min="exact", dim=None, seed: int = 0,
                       dtype: torch.dtype = torch.float32, approximate=False) -> "HAFrame":
        """Build the frame for a Hierarchy (or a builtin name) from its tree, with no K x K work when dim < K.

        s_min: "exact" (O(nodes)), "grid" (the paper's search; dense, K <= DENSE_MAX_K) or a float >= the
        exact value.  dim: default K; with dim >= K the frame is exact (K <= DENSE_MAX_K x 2 or so, as
        memory allows), with dim < K pass approximate=True (Gaussian projection) or "truncate".
        """
        if isinstance(h, str) and h in BUILTIN_NAMES:
            h = Hierarchy.builtin(h)
        if not isinstance(h, Hierarchy):
            raise TypeError(f"from_hierarchy needs a Hierarchy or a builtin name, got {h!r}; "
                            "use from_distances for a distance matrix")
        g = _check_gamma(gamma)
        approximate = _check_approximate(approximate)
        _check_two_classes(h)
        tree, K = h.tree, h.num_classes
        if approximate == "truncate" or (isinstance(s_min, str) and s_min == "grid"):
            if K > DENSE_MAX_K:
                raise ValueError(f"{'truncation' if approximate == 'truncate' else 's_min=grid'} needs the dense "
                                 f"K x K similarity, and K={K} > {DENSE_MAX_K}; use approximate=True and s_min='exact'")
            frame = cls.from_distances(h.distances(), g, s_min=s_min, dim=dim, seed=seed, dtype=dtype,
                                       approximate=approximate)
            frame.hierarchy = h
            return frame
        if dim is None and K > DENSE_MAX_K:
            _missing_dim(K)
        dim = _check_dim(dim, K)
        s_exact = tree.exact_s_min(g)
        if isinstance(s_min, str):
            if s_min != "exact":
                raise ValueError(f"s_min must be 'exact', 'grid' or a number, got {s_min!r}")
            s = s_exact
        else:
            s = _check_s_min_value(s_min)
            if s < s_exact - 1e-12:  # the admissible values are exactly [s_exact, 1)
                raise ValueError(
                    f"s_min={s} makes the similarity matrix not positive semi-definite; the most negative "
                    f"admissible value for gamma={gamma} is {s_exact:.6f} (exact_s_min): use s_min='exact' or a "
                    "value >= it")
        if dim >= K:
            if 8 * K * tree.num_nodes > _EXACT_MAX_BYTES:
                raise MemoryError(
                    f"an exact frame for K={K} classes needs a dense {K} x {tree.num_nodes} factor "
                    f"({8 * K * tree.num_nodes / 2**30:.1f} GiB); pass dim < K with approximate=True")
            Wn = tree.dense_frame(g, s)  # [K, n], exact
            R = np.linalg.qr(Wn.T, mode="r")  # Wn = R^T Q^T: R^T [K, K] has the same Gram matrix
            W = _normalise_rows(_rotate(R.T[:, :min(K, R.shape[0])], dim, seed), "the frame")
        elif not approximate:
            raise _dim_error(dim, K, K)
        else:
            W = tree.projected_frame(g, s, dim, seed)
        dense = K <= DENSE_MAX_K
        S = similarity_matrix(h.distances(), g, s) if dense else None
        frame = cls(torch.as_tensor(W, dtype=dtype), S, s_min=s, gamma=g,
                    distances=h.distances() if dense else None, hierarchy=h)
        if dim < K:
            frame._measure(W, "projection", seed)
        return frame

    @classmethod
    def etf(cls, K: int, dim=None, seed: int = 0, dtype: torch.dtype = torch.float32,
            approximate=False) -> "HAFrame":
        """A K-class simplex ETF (S = (K I - J) / (K - 1)); dim < K needs approximate (True: projection)."""
        if isinstance(K, bool) or int(K) != K or K < 2:
            raise ValueError(f"a simplex ETF needs an integer K >= 2 classes, got {K!r}")
        K = int(K)
        approximate = _check_approximate(approximate)
        if dim is None and K > DENSE_MAX_K:
            _missing_dim(K)
        dim = _check_dim(dim, K)
        dense = K <= DENSE_MAX_K
        S = etf_similarity(K) if dense else None
        if dim >= K or approximate == "truncate":
            if not dense:
                raise MemoryError(f"an exact {K}-class ETF in dim >= K needs K x K = {K * K * 8 / 2**30:.1f} GiB; "
                                  "pass dim < K with approximate=True (a Gaussian projection)")
            W = _factorize(S, dim, seed, approximate)
        elif not approximate:
            raise _dim_error(dim, K, K - 1)
        else:  # the ETF is the centred identity, scaled: its projection is a Gaussian [K, dim] minus its mean row
            G = np.random.default_rng(seed).standard_normal((K, dim))
            W = _normalise_rows(G - G.mean(axis=0, keepdims=True), f"the projection into dim={dim}")
        frame = cls(torch.as_tensor(W, dtype=dtype), S, s_min=-1.0 / (K - 1), etf=True)
        if dim < K:
            frame._measure(W, "truncate" if approximate == "truncate" else "projection", seed)
        return frame

    # ------------------------------------------------------------------ properties
    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        """Dimension of the class vectors."""
        return self.weight.shape[1]

    @property
    def convention(self):
        """The distance convention of the hierarchy this frame was built from (None for a distance matrix or an ETF)."""
        return None if self.hierarchy is None else self.hierarchy.convention

    def similarity_rows(self, rows) -> torch.Tensor:
        """S[rows, :] in float64 [len(rows), K], from the stored matrix or computed from the tree."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self._similarity64 is not None:
            return torch.from_numpy(self._similarity64[rows])
        if self.hierarchy is None:  # a large ETF
            K = self.num_classes
            out = np.full((len(rows), K), -1.0 / (K - 1))
            out[np.arange(len(rows)), rows] = 1.0
            return torch.from_numpy(out)
        return torch.from_numpy(self.hierarchy.tree.similarity_rows(self.gamma, self.s_min, rows))

    def similarity_block(self, rows, cols) -> torch.Tensor:
        """S[rows][:, cols] in float64 [len(rows), len(cols)], from the stored matrix or from the tree."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1, 1)
        cols = np.asarray(cols, dtype=np.int64).reshape(1, -1)
        return torch.from_numpy(np.ascontiguousarray(self._pair_targets(rows, cols)))

    def _pair_targets(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """S[i, j] for class pairs, float64 [P]."""
        if self._similarity64 is not None:
            return self._similarity64[i, j]
        if self.hierarchy is None:
            return np.where(i == j, 1.0, -1.0 / (self.num_classes - 1))
        tree = self.hierarchy.tree
        return tree.similarity_from_distances(self.gamma, self.s_min, tree.pair_distances(i, j))

    def _exact_margin(self) -> float:
        """1 - max_{j != k} S[j, k]: the separation margin of the exact frame."""
        if self._similarity64 is not None:
            S = self._similarity64
            return float(1.0 - (S - 2 * np.eye(len(S))).max())
        if self.hierarchy is None:
            return 1.0 + 1.0 / (self.num_classes - 1)
        tree = self.hierarchy.tree
        return float(1.0 - tree.similarity_from_distances(self.gamma, self.s_min, np.array([tree.d_min]))[0])

    def _measure(self, W: np.ndarray, method: str, seed: int) -> None:  # W: [K, dim] float64, unit rows
        """Record how well an approximate frame keeps S: margins, Gram error over (sampled) pairs, near twins."""
        K = len(W)
        if K <= DENSE_MAX_K:
            max_cos, scope = _max_offdiag(W), "all pairs"
            G = W @ W.T
            S = self._similarity64 if self._similarity64 is not None else None
            err = np.abs(G - S)[~np.eye(K, dtype=bool)] if S is not None else np.abs(G - self._dense_similarity())
            twins = int(((G - 2 * np.eye(K)) > _NEAR_TWIN).any(axis=1).sum())
        else:
            i, j, cos = _sampled_pairs(W, None if self.hierarchy is None else self.hierarchy.tree, seed)
            err = np.abs(cos - self._pair_targets(i, j))
            max_cos, scope = float(cos.max()), f"{len(i)} tree-neighbour and random pairs"
            twins = int(len(np.unique(np.concatenate([i[cos > _NEAR_TWIN], j[cos > _NEAR_TWIN]]))))
        self.approximation = {
            "method": method,
            "margin": 1.0 - max_cos,
            "exact_margin": self._exact_margin(),
            "gram_error_mean": float(err.mean()),
            "gram_error_max": float(err.max()),
            "near_twins": twins,
            "pairs": scope,
        }
        if twins:
            warnings.warn(
                f"the {method} frame in dim={W.shape[1]} gives {twins} of {K} classes a near-twin (cos > "
                f"{_NEAR_TWIN}): those classes cannot be told apart; use a larger dim"
                + (" or approximate=True (projection)" if method == "truncate" else ""), RuntimeWarning, stacklevel=3)

    def _dense_similarity(self) -> np.ndarray:
        """S as a dense float64 [K, K] (small K only)."""
        return self.similarity_rows(np.arange(self.num_classes)).numpy()

    def gram_error(self) -> float:
        """max |W W^T - S|: over every pair up to DENSE_MAX_K classes, else over sampled pairs (float64)."""
        W = self.weight.detach().cpu().double().numpy()
        if self._similarity64 is not None:
            return float(np.abs(W @ W.T - self._similarity64).max())
        i, j, cos = _sampled_pairs(W, None if self.hierarchy is None else self.hierarchy.tree, 0)
        off = float(np.abs(cos - self._pair_targets(i, j)).max())
        return max(off, float(np.abs(np.einsum("kd,kd->k", W, W) - 1.0).max()))  # and the diagonal

    def diagnostics(self) -> dict:
        """Summary of the frame: sizes, gamma, s_min, Gram error, off-diagonal similarity range, min eigenvalue of S."""
        out = {"K": self.num_classes, "dim": self.dim, "gamma": self.gamma, "s_min": self.s_min,
               "gram_error": self.gram_error()}
        S = self._similarity64
        if S is not None:
            off = S[~np.eye(len(S), dtype=bool)]
            out.update(min_offdiag_similarity=float(off.min()), max_offdiag_similarity=float(off.max()),
                       min_eigenvalue=_min_eig(S))
        else:
            out.update(max_offdiag_similarity=1.0 - self._exact_margin())
        if self.convention is not None:
            out["convention"] = self.convention
        if self.approximation is not None:
            out["approximation"] = dict(self.approximation)
        return out

    # ------------------------------------------------------------------ copies and files
    def to(self, device=None, dtype=None) -> "HAFrame":
        """A copy with weight and similarity on device (and in dtype, if given)."""
        out = HAFrame.__new__(HAFrame)
        out.__dict__.update(self.__dict__)
        out.weight = self.weight.to(device=device, dtype=dtype, copy=True)
        out.similarity = None if self.similarity is None else self.similarity.to(device=device, dtype=dtype, copy=True)
        out._similarity64 = None if self._similarity64 is None else self._similarity64.copy()
        out.distances = None if self.distances is None else self.distances.copy()
        out.approximation = None if self.approximation is None else dict(self.approximation)
        return out

    def save(self, path) -> None:
        """Save as a plain dict of tensors, numbers and strings (loadable with torch.load(weights_only=True)).

        A frame over DENSE_MAX_K classes stores its hierarchy (parents, names, classes, convention)
        instead of any K x K matrix.
        """
        large = self._similarity64 is None
        torch.save({
            "format": _FORMAT,
            "version": 2,
            "weight": self.weight.detach().cpu(),
            "similarity": None if large else torch.from_numpy(self._similarity64),
            "s_min": self.s_min,
            "gamma": self.gamma,
            "distances": None if self.distances is None else torch.from_numpy(self.distances),
            "hierarchy": None if self.hierarchy is None else _hierarchy_state(self.hierarchy),
            "approximation": self.approximation,
            "etf": self.etf_frame,
        }, path)

    @classmethod
    def load(cls, path, map_location="cpu") -> "HAFrame":
        """Load a frame written by save() (no pickle: torch.load with weights_only=True).

        A missing file raises ``FileNotFoundError``; a file that is not a readable torch file (text,
        garbage, truncated), is refused by weights-only loading (a pickled global such as
        ``posix.system``: nothing in it is run) or is not a saved HAFrame raises
        :class:`~haframe_ext.hierarchy.HierarchyError` (a ``ValueError``) naming the file.
        """
        import os

        from .safe_load import describe_torch_load_error
        from .hierarchy import HierarchyError

        if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
            raise FileNotFoundError(2, "HAFrame file not found", str(path))
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except Exception as exc:  # text (KeyError), garbage, truncated zip, a refused global, ...
            reason, unsafe = describe_torch_load_error(exc)  # without torch's "weights_only=False" advice
            what = ("is not a safe torch file (refused by weights_only loading" if unsafe
                    else "is not a readable HAFrame file (corrupted, truncated or not a torch file")
            raise HierarchyError(f"{str(path)!r} {what}: {reason})") from None
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise HierarchyError(
                f"{str(path)!r} is not a saved HAFrame (no format={_FORMAT!r} entry); write it with HAFrame.save")
        if state.get("version") not in (1, 2):
            raise HierarchyError(f"{str(path)!r}: unsupported HAFrame file version {state.get('version')!r}; "
                                 "upgrade haframe_ext to read it")
        try:
            dist = state["distances"]
            hier = state.get("hierarchy")
            frame = cls(state["weight"], state["similarity"], s_min=state["s_min"], gamma=state["gamma"],
                        distances=None if dist is None else dist.numpy(),
                        hierarchy=None if hier is None else _hierarchy_from_state(hier),
                        etf=bool(state.get("etf", False)))
            frame.approximation = state.get("approximation")
            return frame
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            raise HierarchyError(f"{str(path)!r} is an incomplete or malformed HAFrame file "
                                 f"({type(exc).__name__}: {exc})") from None

    def __repr__(self) -> str:
        gamma = "None" if self.gamma is None else f"{self.gamma:g}"
        approx = "" if self.approximation is None else f", approximate={self.approximation['method']!r}"
        return (f"HAFrame(K={self.num_classes}, dim={self.dim}, gamma={gamma}, s_min={self.s_min:.6f}, "
                f"dtype={self.weight.dtype}, device={self.weight.device}{approx})")


def _check_two_classes(h: Hierarchy) -> None:
    """Raise a HierarchyError for a hierarchy with fewer than 2 classes (no distances to build a frame from)."""
    if h.num_classes < 2:
        raise HierarchyError(f"a frame needs at least 2 classes, but the hierarchy has {h.num_classes}")


def _missing_dim(K: int):
    """Raise for a large hierarchy without dim."""
    raise ValueError(f"K={K} classes is above {DENSE_MAX_K}: give dim (e.g. dim=512 with approximate=True); "
                     f"an exact frame would be K x K")


def _check_s_min_value(s_min) -> float:
    """A user-given s_min as a finite float < 1."""
    try:
        s = float(s_min)
    except (TypeError, ValueError):
        raise ValueError(f"s_min must be 'exact', 'grid' or a number, got {s_min!r}") from None
    if not math.isfinite(s) or s >= 1:
        raise ValueError(f"s_min must be a finite number < 1, got {s_min!r}")
    return s


def _hierarchy_state(h: Hierarchy) -> dict:
    """A hierarchy as plain tensors and strings (weights_only-loadable)."""
    return {"nodes": h.nodes, "parent": torch.from_numpy(h._parent_idx.copy()), "classes": h.classes,
            "convention": h.convention}


def _hierarchy_from_state(state: dict) -> Hierarchy:
    """The inverse of _hierarchy_state."""
    nodes, parent = state["nodes"], state["parent"].tolist()
    h = Hierarchy.from_parents({nodes[i]: nodes[p] for i, p in enumerate(parent) if p >= 0}, state["classes"])
    return h.with_convention(state["convention"])
