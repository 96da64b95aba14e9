"""What a built frame answers: its sizes, rows and blocks of the target similarity S on demand (stored, from the
tree, or the ETF's closed form), its margin, Gram error and diagnostics."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch

from .profile import Profile
from .quality import measure, sampled_pairs
from .similarity import min_eigenvalue

__all__ = ["FrameQueries"]


class FrameQueries:
    """The queries of :class:`~haframe_ext.frame.HAFrame`, its base: they read the attributes HAFrame's constructor
    sets (``weight``, ``_similarity64``, ``hierarchy``, ``gamma``, ``profile``, ``s_min``, ``approximation``)."""

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        """Dimension of the class vectors."""
        return self.weight.shape[1]

    @property
    def kernel(self) -> Union[float, Profile, None]:
        """What the tree routes take for gamma: the profile when there is one, else gamma."""
        return self.gamma if self.profile is None else self.profile

    @property
    def convention(self) -> Optional[str]:
        """The distance convention of the hierarchy this frame was built from (None for a distance matrix or an ETF)."""
        return None if self.hierarchy is None else self.hierarchy.convention

    def similarity_rows(self, rows: Union[Sequence[int], np.ndarray]) -> torch.Tensor:
        """S[rows, :] in float64 [len(rows), K], from the stored matrix or computed from the tree.

        Args:
            rows: class indices [R] (any shape, flattened).

        Returns:
            S[rows, :], float64 [R, K] on the CPU (row r: the target cosines of class rows[r]).
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self._similarity64 is not None:
            return torch.from_numpy(self._similarity64[rows])
        if self.hierarchy is None:  # a large ETF
            K = self.num_classes
            out = np.full((len(rows), K), -1.0 / (K - 1))
            out[np.arange(len(rows)), rows] = 1.0
            return torch.from_numpy(out)
        return torch.from_numpy(self.hierarchy.tree.similarity_rows(self.kernel, self.s_min, rows))

    def similarity_block(self, rows: Union[Sequence[int], np.ndarray],
                         cols: Union[Sequence[int], np.ndarray]) -> torch.Tensor:
        """S[rows][:, cols] in float64 [len(rows), len(cols)], from the stored matrix or from the tree.

        Args:
            rows: class indices [R].
            cols: class indices [C].

        Returns:
            S[rows][:, cols], float64 [R, C] on the CPU; no [K, K] matrix is formed for a tree frame.
        """
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

    def _measure(self, W: np.ndarray, method: str, seed: int) -> None:  # W: [K, dim] float64, unit rows
        """Record how well an approximate frame keeps S (``frame.approximation``; haframe_ext.frame.quality)."""
        tree = None if self.hierarchy is None else self.hierarchy.tree
        self.approximation = measure(W, self._pair_targets, self._exact_margin(), tree, method, seed)

    def gram_error(self) -> float:
        """max |W W^T - S|: over every pair up to DENSE_MAX_K classes, else over sampled pairs (float64).

        Returns:
            The largest absolute difference (the diagonal, |w_k|^2 - 1, included).
        """
        W = self.weight.detach().cpu().double().numpy()
        if self._similarity64 is not None:
            return float(np.abs(W @ W.T - self._similarity64).max())
        i, j, cos = sampled_pairs(W, None if self.hierarchy is None else self.hierarchy.tree, 0)
        off = float(np.abs(cos - self._pair_targets(i, j)).max())
        return max(off, float(np.abs(np.einsum("kd,kd->k", W, W) - 1.0).max()))  # and the diagonal

    def diagnostics(self) -> Dict[str, Any]:
        """Summary of the frame: sizes, gamma, s_min, Gram error, off-diagonal similarity range, min eigenvalue of S.

        Returns:
            K, dim, gamma, s_min, gram_error; max_offdiag_similarity (and, with S stored, min_offdiag_similarity
            and min_eigenvalue); profile, convention and approximation where the frame has them.
        """
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
