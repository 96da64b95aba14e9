"""The field's baselines: hierarchical cross-entropy (HXE) and soft labels (Bertinetto et al., CVPR 2020), at any K.

With ``p = softmax(z)`` over the K classes and ``p(n)`` the sum of p over the classes under node n:

- **HXE**, label y with root path ``v_0, ..., v_L = y``:
  ``sum_{i=1..L} w(v_i) * -log(p(v_i) / p(v_{i-1}))``, ``w(v) = exp(-alpha depth(v))``, divided by
  ``sum over all nodes n of exp(-alpha depth(n))`` when ``normalize``.  Computed in log space
  (``log p(n) = logsumexp(z[classes under n]) - logsumexp(z)``), so no term underflows.
- **Soft labels**: target ``q_y(c) = softmax_c(-beta d[y, c] / d_max)`` (d under the hierarchy's
  convention), loss ``-sum_c q_y(c) log p_c``, gradient ``p - q_y`` (the KL form's).

Nothing K x K: the classes are ordered depth-first (haframe_ext.hierarchy.ranges), so the ancestors of a
label are L + 1 nested ranges and both losses and their logit gradients are piecewise constant over
the segments between them (the HXE gradient is ``exp(z_c - lse_i) D_i`` on segment i, with
``lse_i`` the logsumexp over range(v_i) and ``D_i = sum_{k <= i} c_k exp(lse_i - lse_k)``,
``c_k = w(v_{k+1}) - w(v_k)``).  Rows are processed in chunks; the fused linear form also never holds
the B x K logits, and returns gradients for the features, a trainable weight and the bias (native op
``haframe_ext::hier_loss`` on CPU/CUDA, the chunked plain-PyTorch path otherwise).  Cross-entropy is
the HXE of the two-node path root -> y with weight 1.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from ..hierarchy.hierarchy import DistanceSource, Hierarchy
from .hier_autograd import linear_loss, logits_loss
from .hier_autograd import NATIVE as _NATIVE  # noqa: F401  (hier_losses._NATIVE: whether the native op is built)
from .hier_rows import reference_hier_op
from .hier_spec import KINDS, check_float, check_reduction, make_spec
from .hier_spec import Spec as _Spec  # hier_losses._Spec: the per-row input of a loss kind (tests use it)

__all__ = ["hxe_loss", "soft_label_loss", "linear_hierarchical_loss", "HXELoss", "SoftLabelLoss",
           "LinearHierarchicalLoss", "reference_hier_op", "KINDS"]
# the plain-PyTorch formulas: hier_rows; argument checks and the per-row input: hier_spec; autograd and the native
# op: hier_autograd


# ----------------------------------------------------------------------------- the loss of given logits
def hxe_loss(logits: torch.Tensor, target: torch.Tensor, hierarchy: Hierarchy, alpha: Union[float, torch.Tensor] = 0.1,
             normalize: bool = True, reduction: str = "mean") -> torch.Tensor:
    """Hierarchical cross-entropy of logits [B, K] and labels target [B] on a Hierarchy's tree (module docstring).

    Args:
        logits: [B, K] floating point (float16/bfloat16/float32/float64), classes in label order.
        target: [B] integer labels in [0, K).
        hierarchy: the tree (a Hierarchy with K classes; a distance matrix has no ancestors to sum over).
        alpha: >= 0; the term of the node at depth l weighs exp(-alpha l).
        normalize: divide the weights by their sum over all nodes, as the published code does.
        reduction: "mean", "sum" or "none".

    Returns:
        The loss, float32 (float64 for float64 logits): a scalar, or [B] with reduction="none".

    Raises:
        ValueError, TypeError: a bad tensor, label, number or reduction, or a hierarchy that is not a tree of K classes.
    """
    K = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() else 0
    spec = make_spec("hxe", K, hierarchy, alpha=alpha, normalize=normalize)
    return logits_loss(logits, target, spec, reduction)


def soft_label_loss(logits: torch.Tensor, target: torch.Tensor, hierarchy: Union[Hierarchy, DistanceSource],
                    beta: Union[float, torch.Tensor] = 10.0, reduction: str = "mean") -> torch.Tensor:
    """Soft-label cross-entropy of logits [B, K]: targets softmax(-beta d[y] / d_max) from a Hierarchy or a [K, K]
    distance matrix (small K) (module docstring).

    Args:
        logits: [B, K] floating point, classes in label order.
        target: [B] integer labels in [0, K).
        hierarchy: a Hierarchy (its tree gives the targets at any K) or a [K, K] distance matrix (K <= DENSE_MAX_K).
        beta: >= 0; large values approach cross-entropy.
        reduction: "mean", "sum" or "none".

    Returns:
        The loss, float32 (float64 for float64 logits): a scalar, or [B] with reduction="none".

    Raises:
        ValueError, TypeError: a bad tensor, label, number or reduction, or distances that do not fit K.
    """
    K = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() else 0
    spec = make_spec("soft-labels", K, hierarchy, beta=beta)
    return logits_loss(logits, target, spec, reduction)


# ----------------------------------------------------------------------------- the fused linear form
def linear_hierarchical_loss(features: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                             hierarchy: Union[Hierarchy, DistanceSource, None] = None, kind: str = "cross-entropy", *,
                             alpha: Union[float, torch.Tensor] = 0.1, normalize: bool = True,
                             beta: Union[float, torch.Tensor] = 10.0, bias: Optional[torch.Tensor] = None,
                             reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """CE, HXE or soft-label loss of the logits ``features [B, d] @ weight [K, d].T + bias [K]``, never B x K at once.

    Gradients flow to features, weight and bias (a trainable classifier).

    Args:
        features: [B, d] floating point.
        weight: [K, d] floating point (cast to the features' dtype on the native path).
        target: [B] integer labels in [0, K).
        hierarchy: a Hierarchy (needed by "hxe"), a [K, K] distance matrix (soft labels, small K), or None for
            cross-entropy.
        kind: "cross-entropy", "hxe" or "soft-labels".
        alpha: HXE's depth weight exp(-alpha l), >= 0.
        normalize: HXE's weights divided by their sum over all nodes.
        beta: the soft labels' sharpness, >= 0.
        bias: [K] or None.
        reduction: "mean", "sum" or "none".
        backend: "auto" (native when built), "native" or "reference" (the chunked plain-PyTorch path; dense
            distance-matrix targets always take it).

    Returns:
        The loss, float32 (float64 for float64 features): a scalar, or [B] with reduction="none".

    Raises:
        ValueError, TypeError: bad tensors, labels, numbers, kind, reduction or backend.
        RuntimeError: backend="native" where the native op cannot run.
    """
    check_float("features", features, 2, "[B, d]")
    check_float("weight", weight, 2, "[K, d]")
    spec = make_spec(kind, weight.shape[0], hierarchy, alpha=alpha, normalize=normalize, beta=beta)
    return linear_loss(features, weight, target, spec, bias, reduction, backend)


# ----------------------------------------------------------------------------- modules
class _FixedSpecLoss(torch.nn.Module):
    """A loss of logits whose kind, tree and numbers (``self.spec``) and reduction are fixed at construction."""

    spec: _Spec
    reduction: str

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of a batch (hxe_loss or soft_label_loss, as constructed).

        Args:
            logits: [B, K] floating point.
            target: [B] integer labels in [0, K).

        Returns:
            The loss, float32 (float64 for float64 logits), reduced as constructed.
        """
        return logits_loss(logits, target, self.spec, self.reduction)


class HXELoss(_FixedSpecLoss):
    """Hierarchical cross-entropy of logits (hxe_loss), its tree and weights fixed at construction."""

    def __init__(self, hierarchy: Hierarchy, alpha: Union[float, torch.Tensor] = 0.1, normalize: bool = True,
                 reduction: str = "mean") -> None:
        """Fix the tree and the node weights (computed once, O(nodes)).

        Args:
            hierarchy: the tree, a Hierarchy.
            alpha: >= 0; the term of the node at depth l weighs exp(-alpha l).
            normalize: divide the weights by their sum over all nodes.
            reduction: "mean", "sum" or "none".
        """
        super().__init__()
        self.spec = make_spec("hxe", hierarchy.num_classes if isinstance(hierarchy, Hierarchy) else -1, hierarchy,
                              alpha=alpha, normalize=normalize)
        self.reduction = reduction
        check_reduction(reduction)



class SoftLabelLoss(_FixedSpecLoss):
    """Soft-label cross-entropy of logits (soft_label_loss), its targets fixed at construction."""

    def __init__(self, hierarchy: Union[Hierarchy, np.ndarray, torch.Tensor], beta: Union[float, torch.Tensor] = 10.0,
                 reduction: str = "mean") -> None:
        """Fix the targets: from the tree (any K) or a dense distance matrix's rows.

        Args:
            hierarchy: a Hierarchy, or a [K, K] distance matrix (K <= DENSE_MAX_K).
            beta: >= 0; the target of label y is softmax(-beta d[y] / d_max).
            reduction: "mean", "sum" or "none".
        """
        super().__init__()
        K = hierarchy.num_classes if isinstance(hierarchy, Hierarchy) else int(np.shape(hierarchy)[0])
        self.spec = make_spec("soft-labels", K, hierarchy, beta=beta)
        self.reduction = reduction
        check_reduction(reduction)


class LinearHierarchicalLoss(torch.nn.Module):
    """A trainable linear classifier fused with CE, HXE or soft labels (linear_hierarchical_loss)."""

    def __init__(self, in_features: int, hierarchy: Union[Hierarchy, np.ndarray, torch.Tensor, None],
                 kind: str = "cross-entropy", *, num_classes: Optional[int] = None,
                 alpha: Union[float, torch.Tensor] = 0.1, normalize: bool = True,
                 beta: Union[float, torch.Tensor] = 10.0, bias: bool = True, reduction: str = "mean",
                 backend: str = "auto") -> None:
        """A ``torch.nn.Linear(in_features, K)`` (submodule ``linear``) and the loss of its logits.

        Args:
            in_features: d, the feature dimension.
            hierarchy: a Hierarchy, a [K, K] distance matrix, or None (cross-entropy with num_classes).
            kind: "cross-entropy", "hxe" or "soft-labels".
            num_classes: K; default the hierarchy's (or the matrix's) class count.
            alpha: HXE's depth weight exp(-alpha l), >= 0.
            normalize: HXE's weights divided by their sum over all nodes.
            beta: the soft labels' sharpness, >= 0.
            bias: whether the classifier has a bias.
            reduction: "mean", "sum" or "none".
            backend: "auto", "native" or "reference", as for linear_hierarchical_loss.
        """
        super().__init__()
        K = num_classes if num_classes is not None else (
            hierarchy.num_classes if isinstance(hierarchy, Hierarchy) else int(np.shape(hierarchy)[0]))
        self.spec = make_spec(kind, K, hierarchy, alpha=alpha, normalize=normalize, beta=beta)
        self.linear = torch.nn.Linear(in_features, K, bias=bias)
        self.reduction, self.backend = reduction, backend
        check_reduction(reduction)

    @property
    def weight(self) -> torch.Tensor:
        """The classifier's weight [K, d] (a trainable parameter)."""
        return self.linear.weight

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier's logits (for prediction; the loss never builds them whole).

        Args:
            features: [B, d].

        Returns:
            The logits [B, K].
        """
        return self.linear(features)

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of the classifier's logits of features, chunk by chunk.

        Args:
            features: [B, d] floating point.
            target: [B] integer labels in [0, K).

        Returns:
            The loss, float32 (float64 for float64 features), reduced as constructed.
        """
        check_float("features", features, 2, "[B, d]")
        return linear_loss(features, self.linear.weight, target, self.spec, self.linear.bias, self.reduction,
                           self.backend)
