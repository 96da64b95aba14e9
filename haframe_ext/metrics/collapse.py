"""Neural-collapse diagnostics of features against a frame: angular collapse against S, self-duality, NC1."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Dict, Tuple, Union

import numpy as np
import torch

from ..sizes import DENSE_MAX_K
from .inputs import check_labels

if TYPE_CHECKING:
    from ..frame.frame import HAFrame

__all__ = ["neural_collapse"]


def _pair_gap_stats(unit: torch.Tensor, S: torch.Tensor, max_block: int = 1 << 22):
    """Mean and population std over pairs i < j of |unit_i . unit_j - S_ij|, for unit [C, d] and S [C, C],
    in row blocks of at most ``max_block`` entries (never the C(C-1)/2 x d pair products)."""
    C = unit.shape[0]
    rows = max(1, max_block // C)
    total, total_sq, n = 0.0, 0.0, 0
    col = torch.arange(C, device=unit.device)
    for r0 in range(0, C - 1, rows):
        r1 = min(C - 1, r0 + rows)
        gap = (unit[r0:r1] @ unit.T - S[r0:r1]).abs()  # [r, C]
        upper = col[None, :] > torch.arange(r0, r1, device=unit.device)[:, None]  # j > i
        g = gap[upper]
        total += float(g.sum())
        total_sq += float(g.square().sum())
        n += g.numel()
    mean = total / n
    return mean, math.sqrt(max(total_sq / n - mean * mean, 0.0))


def neural_collapse(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                    similarity: Union[torch.Tensor, np.ndarray, "HAFrame"], max_classes: int = DENSE_MAX_K,
                    seed: int = 0) -> Dict[str, float]:
    """Neural-collapse diagnostics of features [N, d], labels [N] against a frame weight [K, d] and its similarity.

    similarity: S [K, K] (tensor or array), or a frame with ``similarity_block(rows, cols)`` (an
    HAFrame, whose large-K rows come from its tree).  Over the classes present in labels, with
    class means mu_c and global feature mean mu_G: ``angular_collapse_avg`` / ``_std``: mean and
    population std over pairs i < j of |cos(mu_i, mu_j) - S_ij|, over every pair of present classes
    when there are at most ``max_classes`` of them, else over the pairs of a seeded sample of
    ``max_classes`` classes (then ``angular_collapse_classes`` says how many); ``self_duality``:
    ||W/||W||_F - M/||M||_F||_F with M the rows mu_c - mu_G and W the frame rows of the same classes;
    ``nc1``: tr(Sigma_W) / tr(Sigma_B), the within-class scatter (mean over samples of ||h - mu_y||^2) over the
    between-class scatter (mean over classes of ||mu_c - mu_G||^2); NaN when the class means coincide.

    Args:
        features: [N, d].
        labels: integer labels [N] in [0, K), of at least 2 classes.
        weight: the frame's rows [K, d].
        similarity: S [K, K], or a frame with ``similarity_block`` (an HAFrame).
        max_classes: the most classes whose pairs the angular collapse covers.
        seed: seed of the class sample beyond max_classes.

    Returns:
        angular_collapse_avg, angular_collapse_std, self_duality, nc1 (and angular_collapse_classes when sampled).

    Raises:
        ValueError: bad shapes or labels, a frame or S of another K, or fewer than 2 classes.
    """
    _check_shapes(features, weight)
    K = weight.shape[0]
    h = features.detach().to(torch.float64)
    labels = check_labels(labels, h.shape[0], K, h.device, "labels")
    block = _target_block(similarity, K, h.device)
    present = torch.unique(labels)  # sorted class ids
    if present.numel() < 2:
        raise ValueError("neural_collapse needs samples of at least 2 classes")
    counts = torch.bincount(labels, minlength=K).to(torch.float64)
    sums = torch.zeros(K, h.shape[1], dtype=torch.float64, device=h.device).index_add_(0, labels, h)
    means = sums[present] / counts[present, None]  # [C, d]
    global_mean = h.mean(dim=0)  # [d]
    gap_mean, gap_std, picked = _angular_collapse(means, present, block, max_classes, seed)

    M = means - global_mean
    W = weight.detach().to(device=h.device, dtype=torch.float64)[present]
    self_duality = (W / W.norm() - M / M.norm()).norm()

    within = (h - means[torch.searchsorted(present, labels)]).pow(2).sum() / h.shape[0]
    between = M.pow(2).sum() / len(present)
    sampled = {"angular_collapse_classes": picked} if picked < len(present) else {}
    return {
        **sampled,
        "angular_collapse_avg": gap_mean,
        "angular_collapse_std": gap_std,
        "self_duality": float(self_duality),
        "nc1": float(within / between) if between > 0 else float("nan"),
    }


def _check_shapes(features: torch.Tensor, weight: torch.Tensor) -> None:
    """Raise unless features is a tensor [N, d] and weight a tensor [K, d] of the same d."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError("features must be a 2-D tensor [N, d]")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"weight must be a [K, d] tensor with d={features.shape[1]} (the feature dimension), "
            f"got {getattr(weight, 'shape', type(weight).__name__)}")


def _target_block(similarity, K: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """classes [C] -> S[classes][:, classes] float64 on device, from a frame (``similarity_block``) or S [K, K]."""
    if hasattr(similarity, "similarity_block"):
        if similarity.num_classes != K:
            raise ValueError(f"the frame has {similarity.num_classes} classes but weight has K={K}")
        block = similarity.similarity_block
        return lambda chosen: block(chosen.cpu().numpy(), chosen.cpu().numpy()).to(device)
    S = torch.as_tensor(similarity, dtype=torch.float64).to(device)
    if S.shape != (K, K):
        raise ValueError(f"similarity must be [K, K] = [{K}, {K}], got {tuple(S.shape)}")
    return lambda chosen: S[chosen][:, chosen]


def _angular_collapse(means: torch.Tensor, present: torch.Tensor, block: Callable[[torch.Tensor], torch.Tensor],
                      max_classes: int, seed: int) -> Tuple[float, float, int]:
    """(mean, std, classes used) of |cos(mu_i, mu_j) - S_ij| over the pairs of the present classes' means [C, d],
    or of a seeded sample of max_classes of them."""
    unit = means / means.norm(dim=1, keepdim=True)
    pick = torch.arange(len(present), device=means.device)
    if len(present) > max_classes:  # a seeded sample of classes: C^2 pairs would be too many
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(present), generator=g)[:max_classes].sort().values.to(means.device)
    gap_mean, gap_std = _pair_gap_stats(unit[pick], block(present[pick]))
    return gap_mean, gap_std, int(len(pick))
