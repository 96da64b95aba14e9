"""Hierarchy-aware frames: the target similarity S, its most negative admissible s_min, and the factorization W W^T = S.

With distances d (d_max = d.max()) and ``E = exp(-gamma d / d_max)``:

    S = (1 - s_min) * E + s_min          (diagonal exactly 1)

``s_min`` is the most negative value keeping S positive semi-definite.  Writing
``S(s) = E + s (J - E)`` (J all ones), the boundary is ``s_min = -1 / lambda_max`` of the
generalized symmetric problem ``(J - E) v = lambda E v`` (``exact_s_min``).  The paper's
code instead scans a 100-point grid and stops short of it (``grid_s_min``, kept for
reproduction).  A frame is then ``W0 = diag(sqrt(lam)) Q^T`` from ``S = Q diag(lam) Q^T``,
rotated by a seeded random orthonormal matrix into ``dim >= K`` dimensions; the simplex ETF
is the special case ``S = (K I - J) / (K - 1)``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch

from .hierarchy import BUILTIN_NAMES, Hierarchy, as_distance_matrix

__all__ = ["HAFrame", "similarity_matrix", "exact_s_min", "grid_s_min", "etf_similarity"]

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
    """Most negative s_min keeping S PSD: -1/lambda_max of (J - E) v = lambda E v, clipped to >= -1.

    E is positive definite for tree (ultrametric) distances with distinct classes.  Where it is
    not (two classes at distance 0, or distances that are not of negative type), the
    generalized problem is ill-posed, and the lowest s in [-1, 1] with S(s) PSD is
    found by bisection on lambda_min(S(s)) instead (that value can be positive when E itself is
    indefinite; S(1) = J is always PSD).
    """
    E = _kernel(d, gamma)
    K = len(E)
    if _min_eig(E) <= 1e-10:  # singular or indefinite (e.g. two classes at distance 0): no Cholesky of E
        return _bisect_s_min(E)
    A = np.ones_like(E) - E
    try:
        lam_max = scipy.linalg.eigh(A, E, eigvals_only=True, subset_by_index=[K - 1, K - 1])[0]
    except np.linalg.LinAlgError:
        try:  # the subset driver can fail on degenerate spectra; the full (divide and conquer) one is robust
            lam_max = scipy.linalg.eigh(A, E, eigvals_only=True, driver="gvd")[-1]
        except np.linalg.LinAlgError:
            return _bisect_s_min(E)
    if lam_max <= 0:
        return -1.0
    return max(-1.0 / float(lam_max), -1.0)


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


def _factorize(S: np.ndarray, dim, seed: int, approximate: bool) -> np.ndarray:  # S: [K, K]
    """Unit rows W [K, dim] with W W^T = S (or its best rank-dim approximation when approximate), float64."""
    K = len(S)
    dim = K if dim is None else dim
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    dim = int(dim)
    lam, Q = np.linalg.eigh(S)  # ascending
    lam = np.clip(lam, 0.0, None)
    if dim < K:
        if not approximate:
            rank = int((lam > 1e-10 * lam[-1]).sum())
            raise ValueError(
                f"dim={dim} is smaller than K={K}: an exact frame needs dim >= K; pass approximate=True "
                f"for the best rank-{dim} approximation (exact when dim >= rank(S) = {rank})")
        lam, Q = lam[-dim:], Q[:, -dim:]
    W0 = np.sqrt(lam)[:, None] * Q.T  # [r, K], columns have Gram S
    U = _random_orthonormal(dim, W0.shape[0], seed)  # [dim, r]
    W = (U @ W0).T  # [K, dim]
    norms = np.linalg.norm(W, axis=1)
    if norms.min() <= 1e-12:
        raise ValueError(f"dim={dim} is too small: some class vectors vanish in the rank-{dim} approximation")
    return W / norms[:, None]


# ----------------------------------------------------------------------------- the frame
class HAFrame:
    """A fixed classifier frame: unit class vectors (rows of ``weight``) whose Gram matrix is the target similarity."""

    def __init__(self, weight: torch.Tensor, similarity, *, s_min: float, gamma=None, distances=None) -> None:
        """Wrap an existing frame; weight [K, dim], similarity [K, K] (kept in float64 for gram_error)."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("weight must be a 2-D torch.Tensor [K, dim]")
        S = (similarity.detach().cpu().double().numpy() if isinstance(similarity, torch.Tensor)
             else np.asarray(similarity, dtype=np.float64)).copy()
        K = weight.shape[0]
        if S.shape != (K, K):
            raise ValueError(
                f"similarity must be [K, K] = [{K}, {K}] to match weight {tuple(weight.shape)}, got {S.shape}")
        self.weight = weight  # [K, dim]
        self._similarity64 = S  # [K, K] float64
        self.similarity = torch.as_tensor(S, dtype=weight.dtype, device=weight.device)  # [K, K]
        self.s_min = float(s_min)
        self.gamma = None if gamma is None else float(gamma)
        self.distances = None if distances is None else as_distance_matrix(distances)  # [K, K]

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_distances(cls, d, gamma: float, s_min="exact", dim=None, seed: int = 0,
                       dtype: torch.dtype = torch.float32, approximate: bool = False) -> "HAFrame":
        """Build the frame for distances d (anything as_distance_matrix accepts); s_min: "exact", "grid" or a float."""
        d = as_distance_matrix(d)
        E = _kernel(d, gamma)
        if isinstance(s_min, str):
            if s_min == "exact":
                s = exact_s_min(d, gamma)
            elif s_min == "grid":
                s = grid_s_min(d, gamma)
            else:
                raise ValueError(f"s_min must be 'exact', 'grid' or a number, got {s_min!r}")
            S = _similarity_from_kernel(E, s)
        else:
            s = float(s_min)
            if not math.isfinite(s) or s >= 1:
                raise ValueError(f"s_min must be a finite number < 1, got {s_min!r}")
            S = _similarity_from_kernel(E, s)
            eig = _eigvalsh(S)  # all eigenvalues: the subset driver fails on degenerate spectra
            lam, top = float(eig[0]), float(eig[-1])
            if lam < -_PSD_RTOL * top:
                raise ValueError(
                    f"s_min={s} makes the similarity matrix not positive semi-definite (smallest eigenvalue "
                    f"{lam:.3g}); the most negative admissible value for gamma={gamma} is "
                    f"{exact_s_min(d, gamma):.6f} (exact_s_min): use s_min='exact' or a value >= it")
        W = _factorize(S, dim, seed, approximate)
        return cls(torch.as_tensor(W, dtype=dtype), S, s_min=s, gamma=_check_gamma(gamma), distances=d)

    @classmethod
    def from_hierarchy(cls, h, gamma: float, **kw) -> "HAFrame":
        """Build the frame for a Hierarchy (or a builtin name); keyword arguments as from_distances."""
        if isinstance(h, str) and h in BUILTIN_NAMES:
            h = Hierarchy.builtin(h)
        if not isinstance(h, Hierarchy):
            raise TypeError(f"from_hierarchy needs a Hierarchy or a builtin name, got {h!r}; "
                            "use from_distances for a distance matrix")
        return cls.from_distances(h.distances(), gamma, **kw)

    @classmethod
    def etf(cls, K: int, dim=None, seed: int = 0, dtype: torch.dtype = torch.float32) -> "HAFrame":
        """A K-class simplex ETF (S = (K I - J) / (K - 1)), factorized the same way as a hierarchy-aware frame."""
        S = etf_similarity(K)
        W = _factorize(S, dim, seed, approximate=False)
        return cls(torch.as_tensor(W, dtype=dtype), S, s_min=-1.0 / (int(K) - 1))

    # ------------------------------------------------------------------ properties
    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        """Dimension of the class vectors."""
        return self.weight.shape[1]

    def gram_error(self) -> float:
        """max |W W^T - S|, computed in float64 from the stored weight."""
        W = self.weight.detach().cpu().double().numpy()
        return float(np.abs(W @ W.T - self._similarity64).max())

    def diagnostics(self) -> dict:
        """Summary of the frame: sizes, gamma, s_min, Gram error, off-diagonal similarity range, min eigenvalue of S."""
        S = self._similarity64
        off = S[~np.eye(len(S), dtype=bool)]
        return {
            "K": self.num_classes,
            "dim": self.dim,
            "gamma": self.gamma,
            "s_min": self.s_min,
            "gram_error": self.gram_error(),
            "min_offdiag_similarity": float(off.min()),
            "max_offdiag_similarity": float(off.max()),
            "min_eigenvalue": _min_eig(S),
        }

    # ------------------------------------------------------------------ copies and files
    def to(self, device=None, dtype=None) -> "HAFrame":
        """A copy with weight and similarity on device (and in dtype, if given)."""
        out = HAFrame.__new__(HAFrame)
        out.__dict__.update(self.__dict__)
        out.weight = self.weight.to(device=device, dtype=dtype, copy=True)
        out.similarity = self.similarity.to(device=device, dtype=dtype, copy=True)
        out._similarity64 = self._similarity64.copy()
        out.distances = None if self.distances is None else self.distances.copy()
        return out

    def save(self, path) -> None:
        """Save as a plain dict of tensors, numbers and strings (loadable with torch.load(weights_only=True))."""
        torch.save({
            "format": _FORMAT,
            "version": 1,
            "weight": self.weight.detach().cpu(),
            "similarity": torch.from_numpy(self._similarity64),
            "s_min": self.s_min,
            "gamma": self.gamma,
            "distances": None if self.distances is None else torch.from_numpy(self.distances),
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

        from .data import describe_torch_load_error
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
        if state.get("version") != 1:
            raise HierarchyError(f"{str(path)!r}: unsupported HAFrame file version {state.get('version')!r}; "
                                 "upgrade haframe_ext to read it")
        try:
            dist = state["distances"]
            return cls(state["weight"], state["similarity"], s_min=state["s_min"], gamma=state["gamma"],
                       distances=None if dist is None else dist.numpy())
        except (KeyError, TypeError, AttributeError) as exc:
            raise HierarchyError(f"{str(path)!r} is an incomplete or malformed HAFrame file "
                                 f"({type(exc).__name__}: {exc})") from None

    def __repr__(self) -> str:
        gamma = "None" if self.gamma is None else f"{self.gamma:g}"
        return (f"HAFrame(K={self.num_classes}, dim={self.dim}, gamma={gamma}, s_min={self.s_min:.6f}, "
                f"dtype={self.weight.dtype}, device={self.weight.device})")
