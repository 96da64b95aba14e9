"""The HAFrame loss: the fused native op (CPU/CUDA) behind autograd, and its plain-PyTorch reference.

Definition (per row b, with h = features[b], y = target[b], z = weight @ h):

    loss_b = (1 - alpha) * (logsumexp(z) - z[y]) + alpha * sum_k (cos(w_k, h) - S[k, y]) ** 2

with ``S = similarity`` when given, else ``weight @ weight.T`` (the two agree for a frame,
whose rows are unit vectors).  Rows whose target equals ``ignore_index`` contribute 0 and
are not counted by ``reduction="mean"``.

Zero-norm rows: when ``||h|| <= EPS`` every cosine is taken as 0, so the cosine term is
``sum_k S[k, y] ** 2`` and it contributes no gradient (the cross entropy still does).
NaN or Inf in a row gives a NaN loss for that row (and for the reduced loss), never an error.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ._native import native_available

__all__ = ["haframe_loss", "reference_loss", "paper_loss", "EPS", "fused_loss_rows"]

EPS = 1e-8  # norm below which a feature row counts as zero (see module docstring)
_REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- input checks
def _check_args(features, weight, target, alpha, reduction, ignore_index, similarity) -> None:
    """Raise a clear error for bad shapes, dtypes, devices, labels or alpha (before any kernel)."""
    if not isinstance(features, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("features and weight must be torch.Tensor")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if features.dim() != 2:
        raise ValueError(f"features must be 2-D (B, d), got shape {tuple(features.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (K, d), got shape {tuple(weight.shape)}")
    B, d = features.shape
    K = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(
            f"weight is (K={K}, d={weight.shape[1]}) but features have d={d}: "
            "the frame's dimension must equal the feature dimension")
    if K < 1:
        raise ValueError("weight must have at least one class row")
    if features.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"features and weight must be floating point (float16/bfloat16/float32/float64), "
            f"got {features.dtype} and {weight.dtype}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"target must hold integer class indices (e.g. torch.long), got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != B:
        raise ValueError(f"target must be 1-D with one label per row (B={B}), got shape {tuple(target.shape)}")
    if features.device != weight.device or features.device != target.device:
        raise ValueError(
            f"features ({features.device}), weight ({weight.device}) and target ({target.device}) "
            "must be on the same device")
    if similarity is not None:
        if similarity.shape != (K, K):
            raise ValueError(f"similarity must be (K, K) = ({K}, {K}), got {tuple(similarity.shape)}")
        if similarity.device != features.device:
            raise ValueError(f"similarity is on {similarity.device}, features on {features.device}")
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"alpha must be a number in [0, 1], got {alpha!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if B > 0:
        bad = ((target < 0) | (target >= K)) & (target != ignore_index)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"target[{i}] = {int(target[i])} is not a class index: labels must be in [0, {K}) "
                f"or equal ignore_index={ignore_index}")


def _reduce(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply 'mean' (over non-ignored rows), 'sum' or 'none' to per-row losses."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().to(rows.dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- reference
def reference_loss(features, weight, target, alpha=0.4, reduction="mean", ignore_index=-100, *,
                   similarity=None):
    """Plain-PyTorch HAFrame loss (autograd for features and weight); the ground truth for every kernel."""
    _check_args(features, weight, target, alpha, reduction, ignore_index, similarity)
    acc = _acc_dtype(features.dtype)
    h = features.to(acc)  # [B, d]
    w = weight.to(acc)  # [K, d]
    S = w @ w.T if similarity is None else similarity.to(acc)  # [K, K]
    valid = target != ignore_index  # [B]
    y = torch.where(valid, target, 0).long()  # [B]
    logits = h @ w.T  # [B, K]
    ce = torch.logsumexp(logits, dim=1) - logits.gather(1, y[:, None]).squeeze(1)
    n = torch.linalg.vector_norm(h, dim=1)  # [B]
    wn = torch.linalg.vector_norm(w, dim=1).clamp_min(EPS)  # [K]
    nonzero = n > EPS
    cos = logits / (torch.where(nonzero, n, 1.0)[:, None] * wn[None, :])
    cos = torch.where(nonzero[:, None], cos, 0.0)
    target_sim = S.index_select(1, y).T  # [B, K]: row b is S[:, y_b]
    lcos = ((cos - target_sim) ** 2).sum(dim=1)
    rows = torch.where(valid, (1.0 - alpha) * ce + alpha * lcos, 0.0)
    return _reduce(rows, valid, reduction)


def paper_loss(features, weight, target, alpha=0.4, *, similarity=None):
    """The paper code's formulation: CE plus a per-class loop of cosine_similarity, summed, / batch size."""
    S = weight @ weight.T if similarity is None else similarity
    ce = F.cross_entropy(features @ weight.T, target)
    lcos = features.new_zeros(())
    for k in range(weight.shape[0]):
        cos_k = F.cosine_similarity(features, weight[k][None, :], dim=1)
        lcos = lcos + ((cos_k - S[k, target]) ** 2).sum()
    return (1.0 - alpha) * ce + alpha * lcos / features.shape[0]
