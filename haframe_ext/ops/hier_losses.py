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

import numpy as np
import torch

from ..hierarchy.hierarchy import Hierarchy
from .hier_autograd import linear_loss, logits_loss
from .hier_autograd import NATIVE as _NATIVE  # noqa: F401  (hier_losses._NATIVE: whether the native op is built)
from .hier_rows import reference_hier_op
from .hier_spec import KINDS, check_float, check_reduction, make_spec
from .hier_spec import Spec as _Spec  # noqa: F401  (hier_losses._Spec: the per-row input of a loss kind)

__all__ = ["hxe_loss", "soft_label_loss", "linear_hierarchical_loss", "HXELoss", "SoftLabelLoss",
           "LinearHierarchicalLoss", "reference_hier_op", "KINDS"]
# the plain-PyTorch formulas: hier_rows; argument checks and the per-row input: hier_spec; autograd and the native
# op: hier_autograd


# ----------------------------------------------------------------------------- the loss of given logits
def hxe_loss(logits, target, hierarchy, alpha=0.1, normalize=True, reduction="mean"):
    """Hierarchical cross-entropy of logits [B, K] and labels target [B] on a Hierarchy's tree (module docstring)."""
    K = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() else 0
    spec = make_spec("hxe", K, hierarchy, alpha=alpha, normalize=normalize)
    return logits_loss(logits, target, spec, reduction)


def soft_label_loss(logits, target, hierarchy, beta=10.0, reduction="mean"):
    """Soft-label cross-entropy of logits [B, K]: targets softmax(-beta d[y] / d_max) from a Hierarchy or a [K, K]
    distance matrix (small K) (module docstring)."""
    K = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() else 0
    spec = make_spec("soft-labels", K, hierarchy, beta=beta)
    return logits_loss(logits, target, spec, reduction)


# ----------------------------------------------------------------------------- the fused linear form
def linear_hierarchical_loss(features, weight, target, hierarchy=None, kind="cross-entropy", *, alpha=0.1,
                             normalize=True, beta=10.0, bias=None, reduction="mean", backend="auto"):
    """CE, HXE or soft-label loss of the logits ``features [B, d] @ weight [K, d].T + bias [K]``, never B x K at once.

    Gradients flow to features, weight and bias (a trainable classifier). backend: "auto" (native when
    built), "native" or "reference" (the chunked plain-PyTorch path).
    """
    check_float("features", features, 2, "[B, d]")
    check_float("weight", weight, 2, "[K, d]")
    spec = make_spec(kind, weight.shape[0], hierarchy, alpha=alpha, normalize=normalize, beta=beta)
    return linear_loss(features, weight, target, spec, bias, reduction, backend)


# ----------------------------------------------------------------------------- modules
class HXELoss(torch.nn.Module):
    """Hierarchical cross-entropy of logits (hxe_loss), its tree and weights fixed at construction."""

    def __init__(self, hierarchy, alpha=0.1, normalize=True, reduction="mean"):
        super().__init__()
        self.spec = make_spec("hxe", hierarchy.num_classes if isinstance(hierarchy, Hierarchy) else -1, hierarchy,
                               alpha=alpha, normalize=normalize)
        self.reduction = reduction
        check_reduction(reduction)

    def forward(self, logits, target):  # logits [B, K], target [B]
        return logits_loss(logits, target, self.spec, self.reduction)


class SoftLabelLoss(torch.nn.Module):
    """Soft-label cross-entropy of logits (soft_label_loss), its targets fixed at construction."""

    def __init__(self, hierarchy, beta=10.0, reduction="mean"):
        super().__init__()
        K = hierarchy.num_classes if isinstance(hierarchy, Hierarchy) else int(np.shape(hierarchy)[0])
        self.spec = make_spec("soft-labels", K, hierarchy, beta=beta)
        self.reduction = reduction
        check_reduction(reduction)

    def forward(self, logits, target):  # logits [B, K], target [B]
        return logits_loss(logits, target, self.spec, self.reduction)


class LinearHierarchicalLoss(torch.nn.Module):
    """A trainable linear classifier fused with CE, HXE or soft labels (linear_hierarchical_loss)."""

    def __init__(self, in_features: int, hierarchy, kind="cross-entropy", *, num_classes=None, alpha=0.1,
                 normalize=True, beta=10.0, bias=True, reduction="mean", backend="auto"):
        super().__init__()
        K = num_classes if num_classes is not None else (
            hierarchy.num_classes if isinstance(hierarchy, Hierarchy) else int(np.shape(hierarchy)[0]))
        self.spec = make_spec(kind, K, hierarchy, alpha=alpha, normalize=normalize, beta=beta)
        self.linear = torch.nn.Linear(in_features, K, bias=bias)
        self.reduction, self.backend = reduction, backend
        check_reduction(reduction)

    @property
    def weight(self):
        return self.linear.weight

    def logits(self, features):  # features [B, d] -> [B, K]
        """The classifier's logits (for prediction; the loss never builds them whole)."""
        return self.linear(features)

    def forward(self, features, target):  # features [B, d], target [B]
        check_float("features", features, 2, "[B, d]")
        return linear_loss(features, self.linear.weight, target, self.spec, self.linear.bias, self.reduction,
                       self.backend)
