"""The per-sample pieces of the hierarchical metrics, from the tree: ranked classes with a fixed tie rule, each
label's distance profile, HOPS, calibration bins and temperature scaling.

A label's *distance profile* is the sorted row ``d[y, :]`` held as groups: the distinct distances from y in
ascending order (group 0 is y itself, at distance 0) and how many classes lie at each.  On a tree, group r
is the set of classes whose lowest common ancestor with y is y's r-th branching ancestor, so a profile
costs O(depth) per label and the K-long row is never formed.  The definitions of every key are in
:mod:`haframe_ext.metrics`.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch

__all__ = ["DEFAULT_COMPARE_METRICS", "CALIBRATION_BINS", "ranked", "TreeProfiles", "dense_profiles",
           "ideal_positions", "hops_scores", "top_confidence", "calibration_sums", "calibration_errors",
           "fit_temperature"]

# the metrics `haframe compare` shows unless told otherwise (keys of the evaluate dict)
DEFAULT_COMPARE_METRICS = ("top1", "mistake_severity", "hierdist@1", "hierdist@5", "hierdist@20", "best@5",
                           "hprecision@5", "ece", "hier_f1")

CALIBRATION_BINS = 15  # equal-width bins of (0, 1] for ECE and MCE


def ranked(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k best classes of each row of scores [N, K], best first, as long [N, k].

    Tie rule: among equal scores the lowest class index comes first (the order of a stable descending
    sort).  torch.topk alone does not promise this, so ties are settled here: inside the top k by a stable
    sort of the k winners, and at the k-th place, in the rows where a tie straddles it, by index.
    """
    K = scores.shape[1]
    if k >= K:
        return torch.sort(scores, dim=1, descending=True, stable=True).indices
    vals, idx = scores.topk(k + 1, dim=1)  # [N, k + 1] best first
    idx = idx[:, :k].sort(dim=1).values  # the winners by ascending index
    straddle = (vals[:, k] == vals[:, k - 1]).nonzero()[:, 0]  # rows whose k-th place is tied with the next
    if len(straddle):
        sub = scores[straddle]
        thr = vals[straddle, k - 1:k]  # [R, 1] the k-th best score
        above, tie = sub > thr, sub == thr
        need = k - above.sum(dim=1, keepdim=True)  # how many of the tied classes make the cut
        chosen = above | (tie & (tie.cumsum(dim=1) <= need))  # exactly k per row, lowest tied indices first
        idx[straddle] = chosen.nonzero()[:, 1].view(-1, k)
    order = torch.sort(scores.gather(1, idx), dim=1, descending=True, stable=True).indices
    return idx.gather(1, order)


class TreeProfiles:
    """Distance profiles, class depths and LCA depths of a tree's labels (O(nodes) once, O(depth) per label)."""

    def __init__(self, tree) -> None:
        """tree: a TreeOperator (parent, depth, level, class_idx, lca)."""
        self.tree = tree
        parent = tree.parent
        count = np.zeros(tree.num_nodes, dtype=np.int64)  # classes under each node
        np.add.at(count, tree.class_idx, 1)
        # breadth-first order: each depth is one contiguous slice, summed into its parents deepest first
        bounds = np.searchsorted(tree.depth, np.arange(int(tree.depth.max()) + 2))
        for L in range(len(bounds) - 2, 0, -1):
            nodes = np.arange(bounds[L], bounds[L + 1])
            np.add.at(count, parent[nodes], count[nodes])
        self.count = count
        self.max_depth = int(tree.depth[tree.class_idx].max())  # D, the depth every class is padded to

    def profiles(self, labels: np.ndarray, scale: float) -> Tuple[np.ndarray, np.ndarray]:
        """(values [u, G] ascending distances / scale, inf-padded; counts [u, G], 0-padded) of labels [u]."""
        t = self.tree
        cur = t.class_idx[np.asarray(labels, dtype=np.int64)]
        vals, cnts = [np.zeros(len(cur))], [self.count[cur]]  # group 0: the label itself
        while True:
            up = t.parent[cur]
            live = up >= 0
            if not live.any():
                break
            a = np.where(live, up, 0)
            vals.append(np.where(live, t.level[a] / scale, np.inf))
            cnts.append(np.where(live, self.count[a] - self.count[cur], 0))
            cur = np.where(live, up, cur)
        vals, cnts = np.stack(vals, axis=1), np.stack(cnts, axis=1)
        # single-child ancestors give empty groups: move them to the end, keeping the ascending order
        order = np.argsort(cnts == 0, axis=1, kind="stable")
        vals, cnts = np.take_along_axis(vals, order, 1), np.take_along_axis(cnts, order, 1)
        vals[cnts == 0] = np.inf
        return vals, cnts

    def lca_depths(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """depth(LCA(i, j)) for class-label arrays i and j [P] (the class's own depth where i == j)."""
        t = self.tree
        return t.depth[t.lca(t.class_idx[i], t.class_idx[j])]

    def class_depths(self, labels: np.ndarray) -> np.ndarray:
        """depth of each class label [P]."""
        return self.tree.depth[self.tree.class_idx[labels]]


def dense_profiles(d: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(values [u, G], counts [u, G]) of labels [u] from a dense distance matrix d [K, K] (padded as TreeProfiles)."""
    rows = [np.unique(d[y], return_counts=True) for y in np.asarray(labels, dtype=np.int64)]
    G = max(len(v) for v, _ in rows)
    vals = np.full((len(rows), G), np.inf)
    cnts = np.zeros((len(rows), G), dtype=np.int64)
    for r, (v, c) in enumerate(rows):
        vals[r, :len(v)], cnts[r, :len(c)] = v, c
    return vals, cnts


def ideal_positions(cnts: np.ndarray, kmax: int) -> Tuple[np.ndarray, np.ndarray]:
    """(rank [u, kmax], weight [u, kmax]): the group and the HOPS weight of the first kmax places of each
    label's ideal ranking, from profile counts [u, G].

    The place j in group r (the m-th of its n_r classes, groups 0..R) weighs
    ``2^-r - (m / n_r)(2^-r - b_r)``: it falls linearly from 2^-r towards b_r = 2^-(r+1) inside group r,
    to 0 inside the last group, and stays 1 inside group 0 (Sani & Anand, HOPS's weights).
    """
    cum = np.cumsum(cnts, axis=1)  # [u, G]
    j = np.arange(kmax)
    rank = np.stack([np.searchsorted(c, j, side="right") for c in cum])  # [u, kmax]
    start = np.take_along_axis(cum - cnts, rank, 1)
    n = np.take_along_axis(cnts, rank, 1)
    last = (cnts > 0).sum(axis=1, keepdims=True) - 1  # R
    top = np.exp2(-rank.astype(np.float64))
    bottom = np.where(rank == last, 0.0, np.where(rank == 0, 1.0, top / 2))
    return rank, top - (j - start) / n * (top - bottom)


def hops_scores(rank: np.ndarray, weight: np.ndarray, obtained: np.ndarray, k: int) -> np.ndarray:
    """HOPS@k of each sample [N] from its ideal ranks and weights [N, >= k] and the ranks of its predictions [N, >= k].

    The Hierarchically Ordered Preference Score (D. Sani and S. Anand, "Hier-COS: Making Deep Features
    Hierarchy-aware via Composition of Orthogonal Subspaces", CVPR 2026, arXiv:2503.07853) compares the
    ranking of the classes with the one the tree implies.  A class's rank for label y is the dense rank of
    d[y, c] (0 for y, 1 for its nearest relatives, ...); the ideal ranking lists the ranks ascending, e_j,
    the prediction's ranking has o_j = the rank of its j-th class, and each ideal place has a weight w_j
    (``ideal_positions``).  Over the first k places,

        HOPS@k = clip(1 - sum_j w_j |e_j - o_j| / sum_j w_j |e_j - e_{k-1-j}|, 0, 1),

    the denominator being the ideal top k in reverse order.  Where it is 0 (k = 1) the score is 1 if the
    predictions hold the ideal ranks, else 0 (HOPS@1 is top-1 on a tree).  The weights and the normalisation
    follow the authors' released analysis code (the repository Depanshu-Sani/Hier-COS), read for the
    definition only.
    """
    e, w, o = rank[:, :k], weight[:, :k], obtained[:, :k]
    num = (w * np.abs(e - o)).sum(axis=1)
    den = (w * np.abs(e - e[:, ::-1])).sum(axis=1)
    safe = np.where(den > 0, den, 1.0)
    return np.where(den > 0, np.clip(1.0 - num / safe, 0.0, 1.0), (num == 0).astype(np.float64))


def top_confidence(logits: torch.Tensor, temperatures=(1.0,)) -> list:
    """The largest softmax(logits / T) of each row for each T, float64 [N] each from logits [N, K]:
    1 / sum_j exp((z_j - max z) / T), with the shifted logits formed once."""
    z = logits.to(torch.float64)
    shifted = z - z.max(dim=1, keepdim=True).values  # [N, K] <= 0
    return [1.0 / (shifted / t if t != 1.0 else shifted).exp().sum(dim=1) for t in temperatures]


def calibration_sums(conf: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Per bin of the top-1 confidence: [count, sum of confidences, number correct], float64 [3 * BINS].

    conf [N] the top-1 softmax confidences, correct [N] bool; bin b holds confidences in (b / BINS, (b + 1) / BINS].
    """
    conf = conf.to(torch.float64)
    edges = torch.linspace(0, 1, CALIBRATION_BINS + 1, dtype=torch.float64, device=conf.device)[1:-1]
    b = torch.bucketize(conf, edges)  # (lo, hi] bins
    out = torch.zeros(3, CALIBRATION_BINS, dtype=torch.float64, device=conf.device)
    out[0].index_add_(0, b, torch.ones_like(conf))
    out[1].index_add_(0, b, conf)
    out[2].index_add_(0, b, correct.to(device=conf.device, dtype=torch.float64))
    return out.reshape(-1)


def calibration_errors(sums) -> Tuple[float, float]:
    """(ECE, MCE) from calibration_sums added over batches: sum_b n_b/N |acc_b - conf_b|, max_b |acc_b - conf_b|."""
    n, conf, correct = np.asarray(sums, dtype=np.float64).reshape(3, CALIBRATION_BINS)
    gap = np.abs(correct - conf)  # n_b |acc_b - conf_b|
    seen = n > 0
    ece = float(gap.sum() / n.sum())
    mce = float((gap[seen] / n[seen]).max()) if seen.any() else 0.0
    return ece, mce


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T > 0 minimising the mean NLL of softmax(logits / T) on logits [N, K], target [N]
    (LBFGS on log T, float64; Guo et al., ICML 2017)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError("temperature scaling needs validation logits [N, K] with N >= 1")
    if not torch.isfinite(logits).all():
        raise ValueError("temperature scaling needs finite validation logits; these hold NaN or Inf")
    z = logits.detach().to(torch.float64)
    y = target.to(device=z.device, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature scaling diverged (T = {t}); the validation logits may be degenerate")
    return t
