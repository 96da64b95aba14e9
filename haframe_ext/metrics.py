"""Evaluation metrics: top-1, mistake severity, HierDist@k, CRM re-ranking, neural-collapse diagnostics, seed summaries.

Definitions (d the class distance matrix, y the label, pred the arg-max class):

- ``top1``: percentage of samples with pred == y.
- ``mistake_severity``: mean of d[y, pred] over the mistakes; 0.0 when there are no
  mistakes (an empty mean, reported as 0 so that summaries over seeds stay finite).
- ``hierdist@k``: mean over samples of the mean of d[y, c] over the k highest-scoring
  classes c (reported only for k <= K).
- ``crm_*``: the same after conditional risk minimisation re-ranking (``crm``).

Every distances argument accepts whatever ``hierarchy.as_distance_matrix`` does, and a
:class:`~haframe_ext.hierarchy.Hierarchy` is used through its tree (``Hierarchy.tree``: LCA
queries for the pairs a metric needs, tree sums for CRM), so no K x K matrix is formed at any K;
the distances follow the hierarchy's convention.  Sums are kept in units of d_max, so distances
up to the float64 maximum neither overflow nor lose the answer.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import scipy.stats
import torch

from .hierarchy import Hierarchy, as_distance_matrix
from .sizes import DENSE_MAX_K

__all__ = ["evaluate", "StreamingEvaluator", "crm", "neural_collapse", "summarize_seeds", "format_table"]



class _Distances:
    """Class distances divided by d_max, from a dense matrix or a tree: pair lookups and CRM expected costs."""

    def __init__(self, distances) -> None:
        if isinstance(distances, Hierarchy):
            self.tree, self.dense = distances.tree, None
            self.num_classes, self.scale = distances.num_classes, distances.tree.d_max
            t = distances.tree
            self.key = ("tree", hashlib.sha256(t.parent.tobytes() + t.level.tobytes() + t.class_idx.tobytes()).digest())
        else:
            d = as_distance_matrix(distances).astype(np.float64)  # [K, K]
            self.tree, self.num_classes = None, d.shape[0]
            self.scale = float(d.max()) or 1.0
            self.dense = d / self.scale
            self.key = ("dense", self.dense.tobytes())
        self._on: dict = {}  # device -> [K, K] float64 tensor

    def _dense_on(self, device) -> torch.Tensor:
        """The scaled dense matrix on device (cached)."""
        key = str(device)
        if key not in self._on:
            self._on[key] = torch.as_tensor(self.dense, device=device)
        return self._on[key]

    def pairs(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """d[i, j] / d_max for label tensors of one shape, float64 on their device."""
        if self.tree is None:
            return self._dense_on(i.device)[i, j]
        d = self.tree.pair_distances(i.cpu().numpy(), j.cpu().numpy()) / self.scale
        return torch.from_numpy(d).to(i.device)

    def expected(self, probs: torch.Tensor) -> torch.Tensor:
        """sum_j d[k, j] p_j / d_max for probs [N, K], float64 [N, K] on probs' device."""
        p = probs.detach().to(torch.float64)
        if self.tree is None:
            return p @ self._dense_on(p.device).T
        return torch.from_numpy(self.tree.expected_distances(p.cpu().numpy()) / self.scale).to(p.device)


def _check_labels(target, n: int, K: int, device, what: str = "target") -> torch.Tensor:
    """Return target on device after checking it is an integer [N] tensor with values in [0, K)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dim() != 1 or target.shape[0] != n:
        raise ValueError(f"{what} must be 1-D with {n} entries (one per row), got shape {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer class indices, got dtype {target.dtype}")
    if n and (int(target.min()) < 0 or int(target.max()) >= K):
        raise ValueError(
            f"{what} labels must lie in [0, {K - 1}] for K={K} classes, got values in "
            f"[{int(target.min())}, {int(target.max())}]")
    return target.to(device=device, dtype=torch.long)


def crm(probs: torch.Tensor, distances) -> torch.Tensor:
    """Conditional-risk-minimisation scores, float64 [N, K]: -sum_j d[k, j] p_j (Karthik et al., ICLR 2021).

    argmax = least risk; ties (e.g. equally risky classes) are broken as torch.topk/argmax break
    them.  Computed in float64 in units of d_max and scaled back, so huge distances do not overflow;
    a Hierarchy is used through tree sums, O(N nodes) with no K x K matrix.
    """
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise ValueError("probs must be a 2-D tensor [N, K] of class probabilities")
    d = _Distances(distances)
    if d.num_classes != probs.shape[1]:
        raise ValueError(f"probs have K={probs.shape[1]} classes but the distances are for K={d.num_classes}")
    return d.expected(probs) * -d.scale


class StreamingEvaluator:
    """Accumulates the sums behind ``evaluate`` batch by batch (no logits kept) in one all-reducible tensor."""

    def __init__(self, distances, ks: Iterable[int] = (1, 5, 20), crm: bool = False) -> None:
        """distances: a Hierarchy (tree queries) or as for as_distance_matrix; ks: the k of hierdist@k (k > K skipped); crm: add CRM metrics."""
        self._d = _Distances(distances)
        self.num_classes = self._d.num_classes
        ks = tuple(ks)
        for k in ks:
            if isinstance(k, bool) or int(k) != k or k < 1:
                raise ValueError(f"ks must be positive integers, got {ks!r}")
        self.ks = tuple(sorted({int(k) for k in ks if k <= self.num_classes}))
        self.crm = bool(crm)
        self._state = None  # [state_size] float64 sums, on the device of the first batch

    # layout of one block: [num samples, num correct, sum of d[y, pred], sum of hierdist@k for each k],
    # the distance sums in units of d_max
    @property
    def _block(self) -> int:
        return 3 + len(self.ks)

    @property
    def state_size(self) -> int:
        """Length of state_tensor()."""
        return self._block * (2 if self.crm else 1)

    def reset(self) -> None:
        """Forget all accumulated batches."""
        self._state = None

    def _sums(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One block of sums for a batch ranked by scores [N, K] with labels target [N]."""
        kmax = max(self.ks, default=1)
        top = scores.topk(kmax, dim=1).indices  # [N, kmax]
        dk = self._d.pairs(target[:, None].expand_as(top), top)  # [N, kmax] d[y, c] / d_max for the best classes c
        parts = [
            torch.tensor(float(target.shape[0]), dtype=torch.float64, device=dk.device),
            (top[:, 0] == target).sum().to(torch.float64),
            dk[:, 0].sum(),  # d[y, y] = 0, so this sums over the mistakes only
        ]
        parts += [dk[:, :k].mean(dim=1).sum() for k in self.ks]
        return torch.stack(parts)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: logits [N, K], target [N] integer labels."""
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            got = getattr(logits, "shape", type(logits).__name__)
            raise ValueError(f"logits must be a 2-D tensor [N, K], got {got}")
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits have {logits.shape[1]} classes but the distance matrix has K={self.num_classes}")
        target = _check_labels(target, logits.shape[0], self.num_classes, logits.device)
        if logits.shape[0] == 0:
            return
        logits = logits.detach()
        sums = [self._sums(logits, target)]
        if self.crm:
            probs = torch.softmax(logits.to(torch.float64), dim=1)
            sums.append(self._sums(-self._d.expected(probs), target))
        batch = torch.cat(sums)
        self._state = batch if self._state is None else self._state + batch.to(self._state.device)

    def state_tensor(self) -> torch.Tensor:
        """The accumulated sums as a 1-D float64 tensor (a copy); sum it across ranks, then load_state_tensor."""
        if self._state is None:
            return torch.zeros(self.state_size, dtype=torch.float64)
        return self._state.clone()

    def load_state_tensor(self, t: torch.Tensor) -> None:
        """Replace the accumulated sums by t (e.g. after a distributed all_reduce of state_tensor())."""
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != self.state_size:
            raise ValueError(
                f"state must be a 1-D tensor of {self.state_size} sums (from state_tensor() of an evaluator "
                f"with the same ks and crm), got {getattr(t, 'shape', type(t).__name__)}")
        self._state = t.detach().to(torch.float64).clone()

    def merge(self, other: "StreamingEvaluator") -> None:
        """Add the sums of another evaluator with the same distances, ks and crm flag."""
        if other.state_size != self.state_size or other.ks != self.ks or other._d.key != self._d.key:
            raise ValueError("can only merge evaluators built with the same distances, ks and crm flag")
        if other._state is not None:
            self.load_state_tensor(self.state_tensor().to(other._state.device) + other._state)

    def compute(self) -> dict:
        """The metrics of everything added so far (see the module docstring)."""
        if self._state is None or float(self._state[0]) == 0:
            raise ValueError("no samples to evaluate: call update(logits, target) first")
        values = self._state.cpu().tolist()
        scale = self._d.scale
        out = {}
        for prefix, start in [("", 0)] + ([("crm_", self._block)] if self.crm else []):
            n, correct, severity = values[start:start + 3]
            mistakes = n - correct
            out[f"{prefix}top1"] = 100.0 * correct / n
            out[f"{prefix}mistake_severity"] = severity / mistakes * scale if mistakes > 0 else 0.0
            for i, k in enumerate(self.ks):
                out[f"{prefix}hierdist@{k}"] = values[start + 3 + i] / n * scale
        out["num_samples"] = int(round(values[0]))
        return out


def evaluate(logits: torch.Tensor, target: torch.Tensor, distances, ks: Iterable[int] = (1, 5, 20),
             crm: bool = False) -> dict:
    """top1 (%), mistake_severity, hierdist@k (k <= K) and num_samples for logits [N, K] and target [N]."""
    ev = StreamingEvaluator(distances, ks, crm=crm)
    ev.update(logits, target)
    return ev.compute()


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


def neural_collapse(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, similarity,
                    max_classes: int = DENSE_MAX_K, seed: int = 0) -> dict:
    """Neural-collapse diagnostics of features [N, d], labels [N] against a frame weight [K, d] and its similarity.

    similarity: S [K, K] (tensor or array), or a frame with ``similarity_block(rows, cols)`` (an
    HAFrame, whose large-K rows come from its tree).  Over the classes present in labels, with
    class means mu_c and global feature mean mu_G: ``angular_collapse_avg`` / ``_std``: mean and
    population std over pairs i < j of |cos(mu_i, mu_j) - S_ij|, over every pair of present classes
    when there are at most ``max_classes`` of them, else over the pairs of a seeded sample of
    ``max_classes`` classes (then ``angular_collapse_classes`` says how many); ``self_duality``: ||W/||W||_F - M/||M||_F||_F with M the rows
    mu_c - mu_G and W the frame rows of the same classes; ``nc1``: tr(Sigma_W) / tr(Sigma_B),
    the within-class scatter (mean over samples of ||h - mu_y||^2) over the between-class
    scatter (mean over classes of ||mu_c - mu_G||^2); NaN when the class means coincide.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError("features must be a 2-D tensor [N, d]")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"weight must be a [K, d] tensor with d={features.shape[1]} (the feature dimension), "
            f"got {getattr(weight, 'shape', type(weight).__name__)}")
    K = weight.shape[0]
    h = features.detach().to(torch.float64)
    labels = _check_labels(labels, h.shape[0], K, h.device, "labels")
    if hasattr(similarity, "similarity_block"):
        if similarity.num_classes != K:
            raise ValueError(f"the frame has {similarity.num_classes} classes but weight has K={K}")
        block = similarity.similarity_block
    else:
        S = torch.as_tensor(similarity, dtype=torch.float64).to(h.device)
        if S.shape != (K, K):
            raise ValueError(f"similarity must be [K, K] = [{K}, {K}], got {tuple(S.shape)}")
        block = None
    present = torch.unique(labels)  # sorted class ids
    if present.numel() < 2:
        raise ValueError("neural_collapse needs samples of at least 2 classes")
    counts = torch.bincount(labels, minlength=K).to(torch.float64)
    sums = torch.zeros(K, h.shape[1], dtype=torch.float64, device=h.device).index_add_(0, labels, h)
    means = sums[present] / counts[present, None]  # [C, d]
    global_mean = h.mean(dim=0)  # [d]

    unit = means / means.norm(dim=1, keepdim=True)
    pick = torch.arange(len(present), device=h.device)
    if len(present) > max_classes:  # a seeded sample of classes: C^2 pairs would be too many
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(present), generator=g)[:max_classes].sort().values.to(h.device)
    chosen = present[pick]
    if block is not None:
        S_pick = block(chosen.cpu().numpy(), chosen.cpu().numpy()).to(h.device)
    else:
        S_pick = S[chosen][:, chosen]
    gap_mean, gap_std = _pair_gap_stats(unit[pick], S_pick)

    M = means - global_mean
    W = weight.detach().to(device=h.device, dtype=torch.float64)[present]
    self_duality = (W / W.norm() - M / M.norm()).norm()

    within = (h - means[torch.searchsorted(present, labels)]).pow(2).sum() / h.shape[0]
    between = M.pow(2).sum() / len(present)
    sampled = {"angular_collapse_classes": int(len(pick))} if len(pick) < len(present) else {}
    return {
        **sampled,
        "angular_collapse_avg": gap_mean,
        "angular_collapse_std": gap_std,
        "self_duality": float(self_duality),
        "nc1": float(within / between) if between > 0 else float("nan"),
    }


def summarize_seeds(runs: Sequence[Mapping]) -> dict:
    """Per metric over runs (e.g. seeds): {"mean", "ci95" (t-distribution half-width; 0 for one run), "n"}.

    Metrics are the numeric entries of the first run; other (e.g. string) entries are skipped.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("summarize_seeds needs at least one run")
    out = {}
    for key, first in runs[0].items():
        if isinstance(first, bool) or not isinstance(first, (int, float, np.number)):
            continue
        values = []
        for r, run in enumerate(runs):
            if key not in run:
                raise ValueError(f"run {r} has no {key!r}; every run must report the same metrics")
            values.append(float(run[key]))
        x = np.asarray(values)
        n = len(x)
        ci = float(scipy.stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        out[key] = {"mean": float(x.mean()), "ci95": ci, "n": n}
    return out


def format_table(rows: Mapping[str, Mapping], metrics: Sequence[str] | None = None,
                 digits: int = 2, ci_digits: int = 4) -> str:
    """A plain-text table, one row per method, cells like the paper's "77.71 +/- 0.2319" (from summarize_seeds)."""
    if metrics is None:
        metrics = list(dict.fromkeys(k for summary in rows.values() for k in summary))

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, Mapping):
            return f"{v['mean']:.{digits}f} +/- {v['ci95']:.{ci_digits}f}"
        return f"{float(v):.{digits}f}"

    table = [["method", *metrics]]
    table += [[str(method), *(cell(summary.get(m)) for m in metrics)] for method, summary in rows.items()]
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    lines = [" | ".join(s.ljust(w) if c == 0 else s.rjust(w) for c, (s, w) in enumerate(zip(r, widths))).rstrip()
             for r in table]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
