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

import os
import warnings
from typing import IO, Optional, Union

import numpy as np
import torch

from .construct import (check_dtype, check_gamma_resolves, check_tree_options, dense_weight, etf_weight, tree_s_min,
                        tree_weight)
from .factorization import check_approximate, check_dim
from .frame_file import (FRAME_FORMAT, check_consistent, hierarchy_from_state, hierarchy_state, read_state,
                         write_state)
from .frame_queries import FrameQueries
from .profile import Profile
from .quality import NEAR_TWIN
from ..hierarchy.edges import HierarchyError
from ..hierarchy.hierarchy import BUILTIN_NAMES, DistanceSource, Hierarchy, as_distance_matrix
from ..sizes import DENSE_MAX_K
from .similarity import check_gamma, check_two_classes, etf_similarity, similarity_matrix

__all__ = ["HAFrame"]


class HAFrame(FrameQueries):
    """A fixed classifier frame: unit class vectors (rows of ``weight``) whose Gram matrix is the target similarity."""

    def __init__(self, weight: torch.Tensor, similarity: Union[torch.Tensor, np.ndarray, None], *, s_min: float,
                 gamma: Optional[float] = None, distances: Optional[DistanceSource] = None,
                 hierarchy: Optional[Hierarchy] = None, etf: bool = False, profile: Optional[Profile] = None) -> None:
        """Wrap a frame: weight [K, dim]; similarity [K, K] (float64 copy kept), or None with a hierarchy or etf;
        profile: the kernel in place of exp(-gamma d / d_max) (frame.profile), with its own gamma.

        Args:
            weight: the class vectors [K, dim] (kept as given).
            similarity: the target S [K, K] (a float64 copy is kept; ``similarity`` holds it in weight's dtype and
                device), or None: rows of S then come from the hierarchy, or the ETF's closed form.
            s_min: the frame's smallest similarity.
            gamma: the kernel's sharpness (None needs a similarity or etf; a profile brings its own).
            distances: the class distances [K, K] (anything as_distance_matrix takes), or None.
            hierarchy: the tree the frame was built from (K classes), or None.
            etf: whether the frame is a simplex ETF.
            profile: the kernel of S in place of exp(-gamma d / d_max), or None.

        Raises:
            ValueError: weight not 2-D, a similarity or hierarchy of another K, or no similarity, hierarchy and
                gamma, or etf.
            TypeError: a hierarchy that is not a Hierarchy, a profile that is not a Profile.
        """
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
    def from_distances(cls, d: DistanceSource, gamma: float, s_min: Union[str, float] = "exact",
                       dim: Optional[int] = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                       approximate: Union[bool, str] = False) -> "HAFrame":
        """Build the frame for distances d (anything as_distance_matrix accepts); s_min: "exact", "grid" or a float.

        Args:
            d: the class distances [K, K] (a matrix, a .npy / .csv path, or a Hierarchy: its distances).
            gamma: the kernel's sharpness > 0: E = exp(-gamma d / d_max).
            s_min: "exact" (the boundary of positive semi-definite S), "grid" (the paper code's search) or a
                number that keeps S positive semi-definite.
            dim: the dimension of the class vectors, default K; below rank(S) (K - 1 at the exact s_min) it needs
                approximate.
            seed: seed of the random rotation into dim (and of the projection).
            dtype: the weight's floating-point dtype.
            approximate: False (dim >= K), True (dim < K: Gaussian projection of the exact frame) or
                "truncate" (dim < K: top eigenvectors; merges close classes).

        Returns:
            The frame, with S [K, K] stored; an approximate one reports ``approximation`` (margin, Gram error).

        Raises:
            ValueError: a bad gamma, s_min or dim, an s_min that makes S indefinite, or classes S cannot separate.
            MemoryError: a weight that the memory cannot hold.
        """
        d = as_distance_matrix(d)
        approximate = check_approximate(approximate)
        check_dtype(dtype)
        W, S, s, exact = dense_weight(d, gamma, s_min, dim, seed, approximate)
        frame = cls(torch.as_tensor(W, dtype=dtype), S, s_min=s, gamma=check_gamma(gamma), distances=d)
        frame._check_classes_apart()
        if not exact:
            frame._measure(W, "truncate" if approximate == "truncate" else "projection", seed)
        return frame

    @classmethod
    def from_hierarchy(cls, h: Union[Hierarchy, str], gamma: float, s_min: Union[str, float] = "exact",
                       dim: Optional[int] = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                       approximate: Union[bool, str] = False, directions: Optional[np.ndarray] = None,
                       profile: Optional[Profile] = None) -> "HAFrame":
        """Build the frame for a Hierarchy (or a builtin name) from its tree, with no K x K work when dim < K.

        Args:
            h: the hierarchy, or a builtin name (Hierarchy.builtin); its convention gives the distances.
            gamma: the kernel's sharpness > 0: E = exp(-gamma d / d_max).
            s_min: "exact" (O(nodes)), "grid" (the paper's search; dense, K <= DENSE_MAX_K) or a float >= the
                exact value.
            dim: default K (above DENSE_MAX_K classes it must be given); with dim >= K the frame is exact
                (K <= DENSE_MAX_K x 2 or so, as memory allows), with dim < K pass approximate.
            seed: seed of the random rotation, or of the Gaussian projection.
            dtype: the weight's floating-point dtype.
            approximate: False (dim >= K), True (dim < K: Gaussian projection of the exact frame) or "truncate"
                (dim < K: top eigenvectors of the dense S).
            directions: for the projection, [nodes, dim] unit node directions in place of the Gaussian
                (``align.aligned_frame`` builds them from class-mean features).
            profile: a :class:`~haframe_ext.frame.profile.Profile` (with this gamma) as the kernel of S in place of
                exp(-gamma d / d_max); tree routes only (not with "truncate" or s_min="grid").

        Returns:
            The frame; S [K, K] is stored up to DENSE_MAX_K classes, above that its rows come from the tree.

        Raises:
            TypeError: h neither a Hierarchy nor a builtin name.
            ValueError: bad arguments, options the route cannot use, or an s_min below the exact value.
            MemoryError: a weight, or an exact frame's dense node-space factor, that the memory cannot hold.
        """
        if isinstance(h, str) and h in BUILTIN_NAMES:
            h = Hierarchy.builtin(h)
        if not isinstance(h, Hierarchy):
            raise TypeError(f"from_hierarchy needs a Hierarchy or a builtin name, got {h!r}; "
                            "use from_distances for a distance matrix")
        g = check_gamma(gamma)
        approximate = check_approximate(approximate)
        check_dtype(dtype)
        check_two_classes(h)
        tree, K = h.tree, h.num_classes
        check_tree_options(g, approximate, s_min, dim, K, directions, profile)
        frame = cls._dense_route(h, g, s_min, dim, seed, dtype, approximate, profile)
        if frame is not None:
            return frame
        k = g if profile is None else profile  # the kernel: gamma, or the profile's
        if dim is None and K > DENSE_MAX_K:
            _missing_dim(K)
        dim = check_dim(dim, K)
        check_gamma_resolves(g, float(tree.d_min), float(tree.d_max))
        s = tree_s_min(s_min, tree.exact_s_min(k), gamma)
        W = tree_weight(tree, k, s, dim, K, seed, approximate, directions)
        d = h.distances() if K <= DENSE_MAX_K else None  # [K, K], kept only up to DENSE_MAX_K classes
        S = None if d is None else similarity_matrix(d, k, s)
        frame = cls(torch.as_tensor(W, dtype=dtype), S, s_min=s, gamma=g, distances=d, hierarchy=h, profile=profile)
        frame._check_classes_apart()
        if dim < K:
            frame._measure(W, "projection" if directions is None else "aligned projection", seed)
        return frame

    @classmethod
    def _dense_route(cls, h: Hierarchy, g: float, s_min, dim, seed: int, dtype: torch.dtype, approximate,
                     profile: Optional[Profile]) -> Optional["HAFrame"]:
        """The frame of from_hierarchy built from the dense distances where its options need them (truncation,
        s_min="grid") or allow the exact frame in K - 1 dimensions; None on the tree routes."""
        K = h.num_classes
        if approximate == "truncate" or (isinstance(s_min, str) and s_min == "grid"):
            if K > DENSE_MAX_K:
                raise ValueError(f"{'truncation' if approximate == 'truncate' else 's_min=grid'} needs the dense "
                                 f"K x K similarity, and K={K} > {DENSE_MAX_K}; use approximate=True and s_min='exact'")
            frame = cls.from_distances(h.distances(), g, s_min=s_min, dim=dim, seed=seed, dtype=dtype,
                                       approximate=approximate)
            frame.hierarchy = h
            return frame
        if profile is None and dim == K - 1 and K <= DENSE_MAX_K and (s_min == "exact" or
                                                                     s_min == h.tree.exact_s_min(g)):
            # S has rank K - 1 at the exact s_min: an exact frame exists in K - 1 dimensions
            frame = cls.from_distances(h.distances(), g, s_min="exact", dim=dim, seed=seed, dtype=dtype)
            frame.hierarchy = h
            return frame
        return None

    @classmethod
    def etf(cls, K: int, dim: Optional[int] = None, seed: int = 0, dtype: torch.dtype = torch.float32,
            approximate: Union[bool, str] = False) -> "HAFrame":
        """A K-class simplex ETF (S = (K I - J) / (K - 1)); dim < K needs approximate (True: projection).

        Args:
            K: the number of classes, an integer >= 2.
            dim: default K (above DENSE_MAX_K classes it must be given); K - 1 is exact up to DENSE_MAX_K.
            seed: seed of the random rotation, or of the Gaussian projection.
            dtype: the weight's floating-point dtype.
            approximate: False, True (a Gaussian [K, dim] minus its mean row) or "truncate".

        Returns:
            The frame, s_min = -1 / (K - 1); S is stored up to DENSE_MAX_K classes.
        """
        if isinstance(K, bool) or int(K) != K or K < 2:
            raise ValueError(f"a simplex ETF needs an integer K >= 2 classes, got {K!r}")
        K = int(K)
        approximate = check_approximate(approximate)
        check_dtype(dtype)
        if dim is None and K > DENSE_MAX_K:
            _missing_dim(K)
        dim = check_dim(dim, K)
        S = etf_similarity(K) if K <= DENSE_MAX_K else None
        W, exact = etf_weight(K, dim, seed, approximate, S)
        frame = cls(torch.as_tensor(W, dtype=dtype), S, s_min=-1.0 / (K - 1), etf=True)
        if not exact:
            frame._measure(W, "truncate" if approximate == "truncate" else "projection", seed)
        return frame

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

    # ------------------------------------------------------------------ copies and files
    def to(self, device: Union[torch.device, str, None] = None, dtype: Optional[torch.dtype] = None) -> "HAFrame":
        """A copy with weight and similarity on device (and in dtype, if given).

        Args:
            device: where the copy's weight and similarity go; None keeps theirs.
            dtype: their floating-point dtype; None keeps theirs.

        Returns:
            A new frame (the float64 S, distances and approximation copied; the hierarchy shared).
        """
        out = HAFrame.__new__(HAFrame)
        out.__dict__.update(self.__dict__)
        out.weight = self.weight.to(device=device, dtype=dtype, copy=True)
        out.similarity = None if self.similarity is None else self.similarity.to(device=device, dtype=dtype, copy=True)
        out._similarity64 = None if self._similarity64 is None else self._similarity64.copy()
        out.distances = None if self.distances is None else self.distances.copy()
        out.approximation = None if self.approximation is None else dict(self.approximation)
        return out

    def save(self, path: Union[str, os.PathLike, IO[bytes]]) -> None:
        """Save as a plain dict of tensors, numbers and strings (loadable with torch.load(weights_only=True)).

        A frame over DENSE_MAX_K classes stores its hierarchy (parents, names, classes, convention)
        instead of any K x K matrix.

        Args:
            path: a path (written to a temp file, then renamed: a full disk keeps the earlier file) or an open
                binary file.
        """
        large = self._similarity64 is None
        state = {
            "format": FRAME_FORMAT,
            "version": 3 if self.profile is None else 4,
            "weight": self.weight.detach().cpu(),
            "similarity": None if large else torch.from_numpy(self._similarity64),
            "s_min": self.s_min,
            "gamma": self.gamma,
            "distances": None if self.distances is None else torch.from_numpy(self.distances),
            "hierarchy": None if self.hierarchy is None else hierarchy_state(self.hierarchy),
            "approximation": self.approximation,
            "etf": self.etf_frame,
        }
        if self.profile is not None:  # version 4: older readers refuse the file instead of ignoring the kernel
            state["profile"] = self.profile.state()
        write_state(state, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike, IO[bytes]],
             map_location: Union[str, torch.device] = "cpu") -> "HAFrame":
        """Load a frame written by save() (no pickle: torch.load with weights_only=True).

        Args:
            path: a path or an open binary file.
            map_location: where the tensors go, as for torch.load.

        Returns:
            The frame, its parts checked to agree (unit rows, S from its distances, Gram matrix of exact frames).

        Raises:
            FileNotFoundError: a missing file.
            HierarchyError: (a ``ValueError``) naming the file, for a file that is not a readable torch file (text,
                garbage, truncated), is refused by weights-only loading (a pickled global such as ``posix.system``:
                nothing in it is run), is not a saved HAFrame, or is corrupted or inconsistent.
        """
        state = read_state(path, map_location)
        try:
            dist = state["distances"]
            hier = state.get("hierarchy")
            frame = cls(state["weight"], state["similarity"], s_min=state["s_min"], gamma=state["gamma"],
                        distances=None if dist is None else dist.numpy(),
                        hierarchy=None if hier is None else hierarchy_from_state(hier),
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
        """Raise ValueError unless the parts of a loaded frame agree (frame_file.check_consistent); S is compared with
        the one the hierarchy's distances give up to DENSE_MAX_K classes, else with the stored distances."""
        dense_tree = self.hierarchy is not None and self.num_classes <= DENSE_MAX_K
        check_consistent(self.weight, self.gamma, self.s_min, self.distances, self._similarity64, self.kernel,
                         lambda: self.hierarchy.distances() if dense_tree else self.distances,
                         self.gram_error if self.approximation is None else None)

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
