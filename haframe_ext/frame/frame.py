"""Hierarchy-aware frames: fixed classifiers whose unit class vectors have the target similarity as Gram matrix.

For a tree the exact frame is a sparse factor plus a rank-one term in node space
(``haframe_ext.hierarchy.tree``); for a distance matrix it comes from the eigendecomposition of S
(``haframe_ext.frame.factorization``).  With ``dim >= K`` it is compressed to K dimensions and rotated
into ``dim``; the Gram matrix is S to rounding.  With ``dim < K`` no exact frame exists:
``approximate=True`` projects the exact frame with a seeded Gaussian and renormalises the rows,
which keeps every class apart; ``approximate="truncate"`` keeps the top eigenvectors of S
instead, which merges the finest classes at small dim (it warns when it does).  Every
approximate frame reports its separation margin and Gram error (``frame.approximation``,
``haframe_ext.frame.quality``).  Above ``DENSE_MAX_K`` classes a frame built from a tree holds no
K x K matrix: rows of S come from the tree on demand.  The simplex ETF is the special case
``S = (K I - J) / (K - 1)``.  S and s_min: ``haframe_ext.frame.similarity``.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import numpy as np
import torch

from ..files import atomic_write, content_digest
from .factorization import check_approximate, check_dim, dim_error, factorize, normalise_rows, rotate
from .profile import Profile
from .quality import NEAR_TWIN, measure, sampled_pairs
from ..hierarchy.edges import HierarchyError
from ..hierarchy.hierarchy import BUILTIN_NAMES, Hierarchy, as_distance_matrix
from ..sizes import DENSE_MAX_K
from .similarity import (PSD_RTOL, check_gamma, check_two_classes, eigenvalues, etf_similarity, exact_s_min,
                         grid_s_min, kernel_matrix, min_eigenvalue, similarity_from_kernel, similarity_matrix)

__all__ = ["HAFrame"]

_EXACT_MAX_BYTES = 2 << 30  # the dense node-space factor of an exact tree frame may take at most this
_FORMAT = "haframe_ext.HAFrame"


class HAFrame:
    """A fixed classifier frame: unit class vectors (rows of ``weight``) whose Gram matrix is the target similarity."""

    def __init__(self, weight: torch.Tensor, similarity, *, s_min: float, gamma=None, distances=None,
                 hierarchy=None, etf: bool = False, profile: Optional[Profile] = None) -> None:
        """Wrap a frame: weight [K, dim]; similarity [K, K] (float64 copy kept), or None with a hierarchy or etf;
        profile: the kernel in place of exp(-gamma d / d_max) (frame.profile), with its own gamma."""
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
        if profile is not None and not isinstance(profile, Profile):
            raise TypeError(f"profile must be a frame.profile.Profile, got {type(profile).__name__}")
        self.profile = profile
        self.gamma = profile.gamma if profile is not None else None if gamma is None else float(gamma)
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
        approximate = check_approximate(approximate)
        _check_dtype(dtype)
        off = d[~np.eye(len(d), dtype=bool)]
        if off.size:
            _check_gamma_resolves(check_gamma(gamma), float(off[off > 0].min()) if (off > 0).any() else 0.0,
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
            s = _check_s_min_value(s_min)
            S = similarity_from_kernel(E, s)
            eig = eigenvalues(S)  # all eigenvalues: the subset driver fails on degenerate spectra
            lam, top = float(eig[0]), float(eig[-1])
            if lam < -PSD_RTOL * top:
                raise ValueError(
                    f"s_min={s} makes the similarity matrix not positive semi-definite (smallest eigenvalue "
                    f"{lam:.3g}); the most negative admissible value for gamma={gamma} is "
                    f"{exact_s_min(d, gamma):.6f} (exact_s_min): use s_min='exact' or a value >= it")
        W, exact = factorize(S, dim, seed, approximate)
        frame = cls(torch.as_tensor(W, dtype=dtype), S, s_min=s, gamma=check_gamma(gamma), distances=d)
        frame._check_classes_apart()
        if not exact:
            frame._measure(W, "truncate" if approximate == "truncate" else "projection", seed)
        return frame

    @classmethod
    def from_hierarchy(cls, h, gamma: float, s_min="exact", dim=None, seed: int = 0,
                       dtype: torch.dtype = torch.float32, approximate=False, directions=None,
                       profile: Optional[Profile] = None) -> "HAFrame":
        """Build the frame for a Hierarchy (or a builtin name) from its tree, with no K x K work when dim < K.

        s_min: "exact" (O(nodes)), "grid" (the paper's search; dense, K <= DENSE_MAX_K) or a float >= the
        exact value.  dim: default K; with dim >= K the frame is exact (K <= DENSE_MAX_K x 2 or so, as
        memory allows), with dim < K pass approximate=True (Gaussian projection) or "truncate".
        directions: for the projection, [nodes, dim] unit node directions in place of the Gaussian
        (``align.aligned_frame`` builds them from class-mean features).
        profile: a :class:`~haframe_ext.frame.profile.Profile` (with this gamma) as the kernel of S in place of
        exp(-gamma d / d_max); tree routes only (not with "truncate" or s_min="grid").
        """
        if isinstance(h, str) and h in BUILTIN_NAMES:
            h = Hierarchy.builtin(h)
        if not isinstance(h, Hierarchy):
            raise TypeError(f"from_hierarchy needs a Hierarchy or a builtin name, got {h!r}; "
                            "use from_distances for a distance matrix")
        g = check_gamma(gamma)
        approximate = check_approximate(approximate)
        _check_dtype(dtype)
        check_two_classes(h)
        tree, K = h.tree, h.num_classes
        if profile is not None and (not isinstance(profile, Profile) or profile.gamma != g):
            raise ValueError(f"profile must be a frame.profile.Profile built with gamma={g:g}, got {profile!r}")
        if profile is not None and (approximate == "truncate" or (isinstance(s_min, str) and s_min == "grid")):
            raise ValueError("a profile applies to the tree routes only: use approximate=True or False and "
                             "s_min='exact' or a number")
        k = g if profile is None else profile  # the kernel: gamma, or the profile's
        if directions is not None and not (approximate is True and dim is not None and int(dim) < K):
            raise ValueError("directions apply to the projected frame only: pass dim < K with approximate=True")
        if approximate == "truncate" or (isinstance(s_min, str) and s_min == "grid"):
            if K > DENSE_MAX_K:
                raise ValueError(f"{'truncation' if approximate == 'truncate' else 's_min=grid'} needs the dense "
                                 f"K x K similarity, and K={K} > {DENSE_MAX_K}; use approximate=True and s_min='exact'")
            frame = cls.from_distances(h.distances(), g, s_min=s_min, dim=dim, seed=seed, dtype=dtype,
                                       approximate=approximate)
            frame.hierarchy = h
            return frame
        if profile is None and dim == K - 1 and K <= DENSE_MAX_K and (s_min == "exact" or
                                                                     s_min == tree.exact_s_min(g)):
            # S has rank K - 1 at the exact s_min: an exact frame exists in K - 1 dimensions
            frame = cls.from_distances(h.distances(), g, s_min="exact", dim=dim, seed=seed, dtype=dtype)
            frame.hierarchy = h
            return frame
        if dim is None and K > DENSE_MAX_K:
            _missing_dim(K)
        dim = check_dim(dim, K)
        _check_gamma_resolves(g, float(tree.d_min), float(tree.d_max))
        s_exact = tree.exact_s_min(k)
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
            Wn = tree.dense_frame(k, s)  # [K, n], exact
            R = np.linalg.qr(Wn.T, mode="r")  # Wn = R^T Q^T: R^T [K, K] has the same Gram matrix
            W = normalise_rows(rotate(R.T[:, :min(K, R.shape[0])], dim, seed), "the frame")
        elif not approximate:
            raise dim_error(dim, K, K)
        else:
            W = tree.projected_frame(k, s, dim, seed, directions=directions)
        d = h.distances() if K <= DENSE_MAX_K else None  # [K, K], kept only up to DENSE_MAX_K classes
        S = None if d is None else similarity_matrix(d, k, s)
        frame = cls(torch.as_tensor(W, dtype=dtype), S, s_min=s, gamma=g, distances=d, hierarchy=h, profile=profile)
        frame._check_classes_apart()
        if dim < K:
            frame._measure(W, "projection" if directions is None else "aligned projection", seed)
        return frame

    @classmethod
    def etf(cls, K: int, dim=None, seed: int = 0, dtype: torch.dtype = torch.float32,
            approximate=False) -> "HAFrame":
        """A K-class simplex ETF (S = (K I - J) / (K - 1)); dim < K needs approximate (True: projection)."""
        if isinstance(K, bool) or int(K) != K or K < 2:
            raise ValueError(f"a simplex ETF needs an integer K >= 2 classes, got {K!r}")
        K = int(K)
        approximate = check_approximate(approximate)
        _check_dtype(dtype)
        if dim is None and K > DENSE_MAX_K:
            _missing_dim(K)
        dim = check_dim(dim, K)
        dense = K <= DENSE_MAX_K
        S = etf_similarity(K) if dense else None
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
        frame = cls(torch.as_tensor(W, dtype=dtype), S, s_min=-1.0 / (K - 1), etf=True)
        if not exact:
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
    def kernel(self):
        """What the tree routes take for gamma: the profile when there is one, else gamma."""
        return self.gamma if self.profile is None else self.profile

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
        return torch.from_numpy(self.hierarchy.tree.similarity_rows(self.kernel, self.s_min, rows))

    def similarity_block(self, rows, cols) -> torch.Tensor:
        """S[rows][:, cols] in float64 [len(rows), len(cols)], from the stored matrix or from the tree."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1, 1)
        cols = np.asarray(cols, dtype=np.int64).reshape(1, -1)
        return torch.from_numpy(np.ascontiguousarray(self._pair_targets(rows, cols)))

    def _pair_targets(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """S[i, j] for class-index arrays (broadcast), float64."""
        if self._similarity64 is not None:
            return self._similarity64[i, j]
        if self.hierarchy is None:
            return np.where(i == j, 1.0, -1.0 / (self.num_classes - 1))
        tree = self.hierarchy.tree
        return tree.similarity_from_distances(self.kernel, self.s_min, tree.pair_distances(i, j))

    def _exact_margin(self) -> float:
        """1 - max_{j != k} S[j, k]: the separation margin of the exact frame."""
        if self._similarity64 is not None:
            S = self._similarity64
            return float(1.0 - (S - 2 * np.eye(len(S))).max())
        if self.hierarchy is None:
            return 1.0 + 1.0 / (self.num_classes - 1)
        tree = self.hierarchy.tree
        return float(1.0 - tree.similarity_from_distances(self.kernel, self.s_min, np.array([tree.d_min]))[0])

    def _check_classes_apart(self) -> None:
        """Refuse an exact frame that gives two classes the same vector, and warn when its closest pair has a target
        cosine above NEAR_TWIN (as the approximate frames warn): such classes cannot be told apart."""
        margin = self._exact_margin()
        if margin >= 1.0 - NEAR_TWIN:
            return
        pair = ""
        if self._similarity64 is not None:
            S = self._similarity64
            i, j = divmod(int(np.argmax(S - 2 * np.eye(len(S)))), len(S))
            pair = f" (classes {i} and {j}, at distance {self.distances[i, j]:g})" if self.distances is not None \
                else f" (classes {i} and {j})"
        why = (f"the closest classes{pair} have target cosine {1.0 - margin:.6g} with gamma={self.gamma:g} and "
               f"s_min={self.s_min:.6g}")
        fix = ("raise gamma, and check the distances: a distance of 0 between two classes, or distances that break "
               "the triangle inequality (s_min becomes 1), leave no room between classes")
        if margin <= 1e-9:
            raise ValueError(f"{why}: their class vectors are identical and they cannot be told apart; {fix}")
        warnings.warn(f"{why} (> {NEAR_TWIN}): they cannot be told apart; {fix}", RuntimeWarning, stacklevel=3)

    def _measure(self, W: np.ndarray, method: str, seed: int) -> None:  # W: [K, dim] float64, unit rows
        """Record how well an approximate frame keeps S (``frame.approximation``; haframe_ext.frame.quality)."""
        tree = None if self.hierarchy is None else self.hierarchy.tree
        self.approximation = measure(W, self._pair_targets, self._exact_margin(), tree, method, seed)

    def gram_error(self) -> float:
        """max |W W^T - S|: over every pair up to DENSE_MAX_K classes, else over sampled pairs (float64)."""
        W = self.weight.detach().cpu().double().numpy()
        if self._similarity64 is not None:
            return float(np.abs(W @ W.T - self._similarity64).max())
        i, j, cos = sampled_pairs(W, None if self.hierarchy is None else self.hierarchy.tree, 0)
        off = float(np.abs(cos - self._pair_targets(i, j)).max())
        return max(off, float(np.abs(np.einsum("kd,kd->k", W, W) - 1.0).max()))  # and the diagonal

    def diagnostics(self) -> dict:
        """Summary of the frame: sizes, gamma, s_min, Gram error, off-diagonal similarity range, min eigenvalue of S."""
        out = {"K": self.num_classes, "dim": self.dim, "gamma": self.gamma, "s_min": self.s_min,
               "gram_error": self.gram_error()}
        if self.profile is not None:
            out["profile"] = self.profile.state()
        S = self._similarity64
        if S is not None:
            off = S[~np.eye(len(S), dtype=bool)]
            out.update(min_offdiag_similarity=float(off.min()), max_offdiag_similarity=float(off.max()),
                       min_eigenvalue=min_eigenvalue(S))
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
        state = {
            "format": _FORMAT,
            "version": 3 if self.profile is None else 4,
            "weight": self.weight.detach().cpu(),
            "similarity": None if large else torch.from_numpy(self._similarity64),
            "s_min": self.s_min,
            "gamma": self.gamma,
            "distances": None if self.distances is None else torch.from_numpy(self.distances),
            "hierarchy": None if self.hierarchy is None else _hierarchy_state(self.hierarchy),
            "approximation": self.approximation,
            "etf": self.etf_frame,
        }
        if self.profile is not None:  # version 4: older readers refuse the file instead of ignoring the kernel
            state["profile"] = self.profile.state()
        state = dict(state, digest=content_digest(state))  # load() checks the content against it
        if isinstance(path, (str, os.PathLike)):  # a full disk keeps the earlier file (temp file, then rename)
            atomic_write(path, lambda f: torch.save(state, f))
        else:
            torch.save(state, path)

    @classmethod
    def load(cls, path, map_location="cpu") -> "HAFrame":
        """Load a frame written by save() (no pickle: torch.load with weights_only=True).

        A missing file raises ``FileNotFoundError``; a file that is not a readable torch file (text,
        garbage, truncated), is refused by weights-only loading (a pickled global such as
        ``posix.system``: nothing in it is run) or is not a saved HAFrame raises
        :class:`~haframe_ext.hierarchy.HierarchyError` (a ``ValueError``) naming the file.
        """
        from ..safe_load import describe_torch_load_error

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
        if state.get("version") not in (1, 2, 3, 4):
            raise HierarchyError(f"{str(path)!r}: unsupported HAFrame file version {state.get('version')!r}; "
                                 "upgrade haframe_ext to read it")
        if state.get("version", 0) >= 3 and content_digest({k: v for k, v in state.items() if k != "digest"}) != \
                state.get("digest"):
            raise HierarchyError(f"{str(path)!r} is corrupted: its content does not match the digest written with it")
        try:
            dist = state["distances"]
            hier = state.get("hierarchy")
            frame = cls(state["weight"], state["similarity"], s_min=state["s_min"], gamma=state["gamma"],
                        distances=None if dist is None else dist.numpy(),
                        hierarchy=None if hier is None else _hierarchy_from_state(hier),
                        etf=bool(state.get("etf", False)),
                        profile=None if state.get("profile") is None else Profile.from_state(state["profile"]))
            frame.approximation = state.get("approximation")
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            raise HierarchyError(f"{str(path)!r} is an incomplete or malformed HAFrame file "
                                 f"({type(exc).__name__}: {exc})") from None
        try:
            frame._check_consistent()
        except (ValueError, TypeError) as exc:
            raise HierarchyError(f"{str(path)!r} is an inconsistent HAFrame file ({exc})") from None
        return frame

    def _check_consistent(self) -> None:
        """Raise ValueError unless the parts of a loaded frame agree: gamma and s_min in range, finite unit rows,
        distances [K, K], the similarity equal to the one its hierarchy or distances give, and (exact frames) the
        Gram matrix of the rows equal to it."""
        K = self.num_classes
        if not self.weight.is_floating_point() or not bool(torch.isfinite(self.weight).all()):
            raise ValueError("the weight is not a finite floating-point matrix")
        if self.gamma is not None:
            check_gamma(self.gamma)
        _check_s_min_value(self.s_min)
        if self.s_min < -1.0:
            raise ValueError(f"s_min={self.s_min} is below -1")
        if self.distances is not None and self.distances.shape != (K, K):
            raise ValueError(f"the distances are {self.distances.shape} for K={K} classes")
        eps = float(torch.finfo(self.weight.dtype).eps)
        norms = self.weight.detach().double().norm(dim=1)
        if float((norms - 1).abs().max()) > max(1e-6, 100 * eps):
            raise ValueError("the class vectors are not unit vectors")
        source = self.hierarchy.distances() if self.hierarchy is not None and K <= DENSE_MAX_K else self.distances
        if self._similarity64 is not None and source is not None and self.gamma is not None:
            if float(np.abs(similarity_matrix(source, self.kernel, self.s_min) - self._similarity64).max()) > 1e-9:
                raise ValueError("the similarity is not the one its hierarchy (or distances), gamma and s_min give: "
                                 "a reordered class list, or an edited matrix")
        if self.approximation is None and self.gram_error() > max(1e-6, 1000 * eps):
            raise ValueError("the Gram matrix of the class vectors is not the frame's similarity")

    def __repr__(self) -> str:
        gamma = "None" if self.gamma is None else f"{self.gamma:g}"
        approx = "" if self.approximation is None else f", approximate={self.approximation['method']!r}"
        if self.profile is not None:
            gamma += f", profile weight {self.profile.weight:g}"
        return (f"HAFrame(K={self.num_classes}, dim={self.dim}, gamma={gamma}, s_min={self.s_min:.6f}, "
                f"dtype={self.weight.dtype}, device={self.weight.device}{approx})")


def _missing_dim(K: int):
    """Raise for a large hierarchy without dim."""
    raise ValueError(f"K={K} classes is above {DENSE_MAX_K}: give dim (e.g. dim=512 with approximate=True); "
                     f"an exact frame would be K x K")


def _check_gamma_resolves(gamma: float, d_min: float, d_max: float) -> None:
    """Refuse a gamma so small that exp(-gamma d / d_max) rounds to 1 for the closest classes (s_min would be NaN)."""
    if d_max > 0 and d_min > 0 and math.exp(-gamma * d_min / d_max) == 1.0:
        raise ValueError(f"gamma={gamma:g} is so small that exp(-gamma d / d_max) rounds to 1 for the closest classes "
                         f"(d={d_min:g}, d_max={d_max:g}): every class would get the same vector; use gamma >= 1e-6 "
                         "(the paper uses 1 to 5)")


def _check_dtype(dtype) -> None:
    """A frame's dtype must be a floating-point torch dtype (its rows are unit vectors)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError("dtype must be a floating-point torch dtype (torch.float32, torch.float64, ...), "
                        f"got {dtype!r}")


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
    return {"nodes": h.nodes, "parent": torch.from_numpy(h.tree.parent.copy()), "classes": h.classes,
            "convention": h.convention}


def _hierarchy_from_state(state: dict) -> Hierarchy:
    """The inverse of _hierarchy_state."""
    nodes, parent = state["nodes"], state["parent"].tolist()
    h = Hierarchy.from_parents({nodes[i]: nodes[p] for i, p in enumerate(parent) if p >= 0}, state["classes"])
    return h.with_convention(state["convention"])
