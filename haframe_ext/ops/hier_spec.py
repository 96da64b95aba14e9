"""The hierarchical losses' arguments: checks of tensors, labels and numbers, and what a row of each loss kind needs
(the op's kind, the depth-first class order, the label paths and their weights)."""

from __future__ import annotations

import math
import numbers
import weakref

import numpy as np
import torch

from ..hierarchy.hierarchy import Hierarchy
from ..hierarchy.ranges import ranges_of
from .hier_rows import KIND_SOFT, KIND_TELESCOPING

__all__ = ["KINDS", "Spec", "make_spec", "check_reduction", "check_target", "check_float"]

KINDS = ("cross-entropy", "hxe", "soft-labels")
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- argument checks
def _nonneg(name: str, value) -> float:
    """A finite non-negative real number, or a one-line ValueError naming the problem."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value.detach())
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}; pass a non-negative number")
    return value


def check_reduction(reduction) -> int:
    """The op's code of a reduction name ('none' 0, 'mean' 1, 'sum' 2), or a ValueError naming the valid ones."""
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {tuple(_REDUCTIONS)}, got {reduction!r}")
    return _REDUCTIONS[reduction]


def check_target(target, B: int, K: int) -> torch.Tensor:
    """target as int64 [B], labels checked to lie in [0, K)."""
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool \
            or target.is_complex():
        raise TypeError(f"target must be a tensor of integer class indices (e.g. torch.long), got {target!r:.60}")
    if target.dim() != 1 or target.shape[0] != B:
        raise ValueError(f"target must be 1-D with one label per row (B={B}), got shape {tuple(target.shape)}")
    target = target.long()
    if B:
        bad = (target < 0) | (target >= K)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"target[{i}] = {int(target[i])} is not a class index: labels must be in [0, {K})")
    return target


def check_float(name: str, t, dims: int, shape_text: str) -> None:
    """Raise unless t is a floating-point tensor with dims dimensions (shape_text: their names, e.g. '[B, d]')."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_text}, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be floating point (float16/bfloat16/float32/float64), got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {shape_text}, got shape {tuple(t.shape)}")


# ----------------------------------------------------------------------------- what a row needs
class Spec:
    """The per-row input of a loss kind: the op's kind, the depth-first order, and how to build label paths."""

    def __init__(self, kind: str, K: int, hierarchy=None, *, alpha=0.1, normalize=True, beta=10.0):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.name, self.K, self.ranges, self.node_value, self.dense_q = kind, K, None, None, None  # ranges: HierRanges
        self._node_value = {}  # device -> node_value as a tensor
        self.op_kind = KIND_SOFT if kind == "soft-labels" else KIND_TELESCOPING
        if kind == "cross-entropy":
            return
        if kind == "hxe":
            alpha = _nonneg("alpha", alpha)
            if not isinstance(hierarchy, Hierarchy):
                raise ValueError("HXE needs a tree (a Hierarchy): a distance matrix does not give the ancestors "
                                 "p(v) sums over; build one with Hierarchy.from_edges / from_parents / builtin")
            r = self.ranges = self._ranges(hierarchy, K)
            w = np.exp(-alpha * r.depth.astype(np.float64))  # [n]
            self.node_value = w / w.sum() if normalize else w
        else:
            beta = _nonneg("beta", beta)
            if isinstance(hierarchy, Hierarchy):
                r = self.ranges = self._ranges(hierarchy, K)
                d_max = hierarchy.tree.d_max
                self.node_value = np.exp(-beta * r.level / d_max)  # [n], 1 at the leaves (level 0)
            else:
                from ..hierarchy.distance_matrix import read_distance_matrix
                from ..sizes import DENSE_MAX_K

                if hierarchy is None:
                    raise ValueError("soft labels need a Hierarchy or a [K, K] distance matrix, got None")
                d = np.asarray(read_distance_matrix(hierarchy), dtype=np.float64)
                if d.shape != (K, K):
                    raise ValueError(f"the distance matrix is {d.shape} but there are K={K} classes")
                if K > DENSE_MAX_K:
                    raise ValueError(f"a [K, K] distance matrix at K={K} > {DENSE_MAX_K}: pass a Hierarchy instead, "
                                     "whose tree gives the soft targets without a K x K matrix")
                q = -beta * d / max(float(d.max()), 1e-300)
                q = np.exp(q - q.max(axis=1, keepdims=True))
                self.dense_q = torch.as_tensor(q / q.sum(axis=1, keepdims=True))  # [K, K] float64
                self.op_kind = None  # dense targets: the plain-PyTorch path only

    @staticmethod
    def _ranges(hierarchy: Hierarchy, K: int):
        if hierarchy.num_classes != K:
            raise ValueError(f"the hierarchy has {hierarchy.num_classes} classes but the logits/weight have K={K}")
        return ranges_of(hierarchy)

    def order(self, device):
        """[K] int64 label at each depth-first position, or None for the identity (cross-entropy, dense targets)."""
        if self.ranges is None or self.ranges.identity_order:
            return None
        return self.ranges.tensors(device)["order"]

    def paths(self, target: torch.Tensor):
        """(start, end, value) [B, P] of each row's label path (see HierRanges.paths)."""
        if self.node_value is None:  # cross-entropy: root [0, K) weight 0, then the label, weight 1
            B = target.shape[0]
            start = torch.stack([torch.zeros_like(target), target], 1)
            end = torch.stack([torch.full_like(target, self.K), target + 1], 1)
            value = torch.tensor([0.0, 1.0], dtype=torch.float64, device=target.device).expand(B, 2).contiguous()
            return start, end, value
        key = str(target.device)
        if key not in self._node_value:
            self._node_value[key] = torch.as_tensor(self.node_value).to(target.device)
        return self.ranges.paths(target, self._node_value[key])


_SPECS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tree operator -> {arguments: Spec}


def make_spec(kind, K, hierarchy, alpha=0.1, normalize=True, beta=10.0) -> Spec:
    """The Spec of these arguments, reused across calls for a Hierarchy (a tree's weights cost O(nodes))."""
    if not isinstance(hierarchy, Hierarchy) or isinstance(alpha, torch.Tensor) or isinstance(beta, torch.Tensor):
        return Spec(kind, K, hierarchy, alpha=alpha, normalize=normalize, beta=beta)
    try:
        key = (kind, K, alpha, bool(normalize), beta)
        hash(key)
    except TypeError:
        return Spec(kind, K, hierarchy, alpha=alpha, normalize=normalize, beta=beta)
    cache = _SPECS.setdefault(hierarchy.tree, {})
    if key not in cache:
        if len(cache) > 16:
            cache.clear()
        cache[key] = Spec(kind, K, hierarchy, alpha=alpha, normalize=normalize, beta=beta)
    return cache[key]
