"""Evaluation metrics: top-1, mistake severity, HierDist@k, the hierarchical metrics of the published codebases,
calibration, CRM re-ranking (neural-collapse diagnostics: :mod:`.collapse`; seed summaries: :mod:`.summary`).

Keys of ``evaluate`` (d the class distances, d_max the largest, ``top_j`` the j-th ranked class, ``sim = 1 -
d / d_max``, k in ``ks``; ties in the scores go to the lowest class index, as a stable descending sort):

- ``top1``: percentage of samples with top_1 == y.
- ``mistake_severity``: mean of d[y, top_1] over the mistakes; 0.0 when there are none (an empty mean,
  reported as 0 so that summaries over seeds stay finite).
- ``hierdist@k``: mean over samples of the mean of d[y, top_j] over j <= k.
- ``best@k`` ("Making Better Mistakes", MBM): mean over samples of min_{j<=k} d[y, top_j].
- ``mistakes@k`` (MBM): mean of d[y, top_j] over j <= k and over the samples whose top_1 is wrong (0.0 if none).
- ``hprecision@k`` (MBM): sum over samples of sum_{j<=k} sim[y, top_j], divided by the sum over samples of
  the k largest values of sim[y, :] (each sample's own row; the MBM code divides by the best values over
  all K rows whatever the batch holds, a slip not copied here).
- ``hmap@k`` (MBM): mean of hprecision@k' over k' = 1..k.
- ``hops@k`` (Sani & Anand, "Hier-COS", CVPR 2026, arXiv:2503.07853): the Hierarchically Ordered Preference
  Score in [0, 1], mean over samples; see :func:`haframe_ext.metrics.hierarchical.hops_scores`.  ``hops@K`` (K in
  ks) is the paper's HOPS over the whole ranking.
- ``ece`` / ``mce``: expected / maximum calibration error of the top-1 softmax confidence over 15
  equal-width bins of (0, 1] (fractions, not percent); ``calibrated_ece`` / ``calibrated_mce`` and
  ``temperature`` as well when a temperature T != 1 is given (then CRM uses softmax(logits / T)).
- ``hier_precision`` / ``hier_recall`` / ``hier_f1`` (Kiritchenko et al.; micro-averaged): with A(c) the
  tree nodes from the root's child down to class c, sum |A(top_1) & A(y)| / sum |A(top_1)|, the same over
  sum |A(y)|, and 2PR / (P + R).  Hierarchy input only.
- ``severity_histogram``: list, entry h - 1 = the number of top-1 mistakes at distance (LCA height) h, for
  h = 1..d_max.  Integer distances with d_max <= ``HISTOGRAM_MAX_BINS`` only.
- ``level_accuracy``: list, entry l - 1 = the fraction of samples whose top_1 shares y's ancestor at depth
  l, l = 1..D (classes padded down to the deepest class's depth D, as the published convention does, so
  the last entry is top-1 as a fraction).  Hierarchy input only.
- ``crm_*``: the ranking metrics again after conditional risk minimisation re-ranking (``crm``).

k must not exceed K (the default ks are those of ``DEFAULT_KS`` up to K).  Every distances argument accepts
whatever ``hierarchy.as_distance_matrix`` does, and a :class:`~haframe_ext.hierarchy.Hierarchy` is used through
its tree (``Hierarchy.tree``: LCA queries for the pairs a metric needs, a label's distance profile from its
ancestors, tree sums for CRM), so no K x K matrix is formed at any K; the distances follow the hierarchy's
convention.  Sums are kept in units of d_max, so distances up to the float64 maximum neither overflow nor lose
the answer.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np
import torch

from .hierarchical import (CALIBRATION_BINS, calibration_errors, calibration_sums, hops_scores, ideal_positions,
                           ranked, top_confidence)
from .inputs import ClassDistances, check_labels
from ..hierarchy.hierarchy import DistanceSource

__all__ = ["evaluate", "StreamingEvaluator", "crm", "check_labels", "DEFAULT_KS", "HISTOGRAM_MAX_BINS"]

DEFAULT_KS = (1, 5, 20)  # the k of the @k metrics when none are given (those up to K)
HISTOGRAM_MAX_BINS = 4096  # the most distance values severity_histogram lists (integer distances only)
_CHUNK_ENTRIES = 1 << 22  # rows per internal chunk: at most this many scores at once


def crm(probs: torch.Tensor, distances: DistanceSource) -> torch.Tensor:
    """Conditional-risk-minimisation scores, float64 [N, K]: -sum_j d[k, j] p_j (Karthik et al., ICLR 2021).

    argmax = least risk; ties (e.g. equally risky classes) are broken as torch.topk/argmax break
    them.  Computed in float64 in units of d_max and scaled back, so huge distances do not overflow;
    a Hierarchy is used through tree sums, O(N nodes) with no K x K matrix.

    Args:
        probs: class probabilities [N, K].
        distances: a Hierarchy (its tree, under its convention) or a [K, K] distance matrix (as_distance_matrix).

    Returns:
        The scores, float64 [N, K] on probs' device.

    Raises:
        ValueError: probs not 2-D, or K different from the distances'.
    """
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise ValueError("probs must be a 2-D tensor [N, K] of class probabilities")
    d = ClassDistances(distances, HISTOGRAM_MAX_BINS)
    if d.num_classes != probs.shape[1]:
        raise ValueError(f"probs have K={probs.shape[1]} classes but the distances are for K={d.num_classes}")
    return d.expected(probs) * -d.scale


class StreamingEvaluator:
    """Accumulates the sums behind ``evaluate`` batch by batch (no logits kept) in one all-reducible tensor."""

    def __init__(self, distances: DistanceSource, ks: Optional[Iterable[int]] = None, crm: bool = False,
                 temperature: float = 1.0) -> None:
        """An empty evaluator for these distances and options.

        Args:
            distances: a Hierarchy (tree queries, no K x K matrix) or anything as_distance_matrix takes.
            ks: the k of the @k metrics (1 <= k <= K); default DEFAULT_KS up to K.
            crm: add the metrics of the CRM re-ranking (``crm_*``).
            temperature: T > 0 of the calibrated metrics and of CRM's softmax.

        Raises:
            ValueError: ks not positive integers or above K, or a temperature that is not finite and > 0.
        """
        self._d = ClassDistances(distances, HISTOGRAM_MAX_BINS)
        self.num_classes = self._d.num_classes
        ks = tuple(k for k in DEFAULT_KS if k <= self.num_classes) if ks is None else tuple(ks)
        for k in ks:
            if isinstance(k, bool) or int(k) != k or k < 1:
                raise ValueError(f"ks must be positive integers, got {ks!r}")
        too_big = sorted({int(k) for k in ks if k > self.num_classes})
        if too_big:
            raise ValueError(f"ks {too_big} exceed the K={self.num_classes} classes; give k <= {self.num_classes}")
        self.ks = tuple(sorted({int(k) for k in ks}))
        if not self.ks:
            raise ValueError("ks must hold at least one k")
        self.crm = bool(crm)
        temperature = float(temperature)
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        self.temperature = temperature
        self._tree = self._d.profiles_of  # TreeProfiles, or None for a distance matrix
        self._layout = self._block_layout()
        self._state = None  # [state_size] float64 sums, on the device of the first batch

    # one block of sums per ranking (plain, then CRM), each distance sum in units of d_max; then the calibration
    # bins (at T = 1, and at the temperature where it is not 1)
    def _block_layout(self) -> Dict[str, Tuple[int, int]]:
        """name -> (offset, length) of the sums in one ranking block."""
        nk, kmax = len(self.ks), max(self.ks)
        tree = self._tree is not None
        sizes = [("n", 1), ("correct", 1), ("severity", 1), ("hierdist", nk), ("best", nk), ("mistakes", nk),
                 ("hops", nk), ("hp_num", kmax), ("hp_den", kmax), ("histogram", self._d.histogram_bins),
                 ("hier", 3 if tree else 0), ("levels", self._tree.max_depth + 1 if tree else 0)]
        layout, at = {}, 0
        for name, size in sizes:
            layout[name] = (at, size)
            at += size
        return layout

    @property
    def _block(self) -> int:
        return sum(size for _, size in self._layout.values())

    @property
    def _calibrations(self) -> int:
        return 1 if self.temperature == 1.0 else 2

    @property
    def state_size(self) -> int:
        """Length of state_tensor()."""
        return self._block * (2 if self.crm else 1) + 3 * CALIBRATION_BINS * self._calibrations

    def reset(self) -> None:
        """Forget all accumulated batches."""
        self._state = None

    def _sums(self, scores: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(one block of sums [block], the top-1 classes [N]) of a batch ranked by scores [N, K], labels target [N]."""
        ks, kmax = self.ks, max(self.ks)
        top = ranked(scores, kmax)  # [N, kmax]
        dk = self._d.pairs(target[:, None].expand_as(top), top).cpu().numpy()  # [N, kmax] d[y, top_j] / d_max
        y, pred = target.cpu().numpy(), top[:, 0].cpu().numpy()
        correct = pred == y
        labels, inverse = np.unique(y, return_inverse=True)
        vals, cnts = self._d.profiles(labels)  # [u, G]
        rank, weight = ideal_positions(cnts, kmax)  # [u, kmax] each label's ideal ranking
        obtained = np.empty(dk.shape, dtype=np.int64)  # group of each prediction in its label's profile
        for u in range(len(labels)):
            rows = np.flatnonzero(inverse == u)
            obtained[rows] = np.searchsorted(vals[u], dk[rows])
        ideal_d = np.take_along_axis(vals, rank, 1)[inverse]  # [N, kmax] the k smallest d[y, :], ascending
        rank, weight = rank[inverse], weight[inverse]
        block = np.zeros(self._block)

        def put(name, value):
            at, size = self._layout[name]
            block[at:at + size] = value

        put("n", len(y))
        put("correct", correct.sum())
        put("severity", dk[:, 0].sum())  # d[y, y] = 0, so this sums over the mistakes only
        put("hierdist", [dk[:, :k].mean(axis=1).sum() for k in ks])
        put("best", [dk[:, :k].min(axis=1).sum() for k in ks])
        put("mistakes", [dk[~correct, :k].sum() for k in ks])
        put("hops", [hops_scores(rank, weight, obtained, k).sum() for k in ks])
        put("hp_num", np.cumsum((1.0 - dk).sum(axis=0)))
        put("hp_den", np.cumsum((1.0 - ideal_d).sum(axis=0)))
        if self._d.histogram_bins:
            h = np.rint(dk[~correct, 0] * self._d.scale).astype(np.int64)  # integer distances 1..d_max
            put("histogram", np.bincount(h - 1, minlength=self._d.histogram_bins))
        if self._tree is not None:
            common = self._tree.lca_depths(y, pred)  # |A(pred) & A(y)| (the class's depth where pred == y)
            put("hier", [common.sum(), self._tree.class_depths(pred).sum(), self._tree.class_depths(y).sum()])
            shared = np.where(correct, self._tree.max_depth, common)  # deepest level whose ancestor is shared
            put("levels", np.bincount(shared, minlength=self._tree.max_depth + 1))
        return torch.from_numpy(block), top[:, 0]

    @staticmethod
    def _check_rankable(logits: torch.Tensor) -> None:
        """Refuse rows that cannot be ranked or turned into probabilities (NaN, +Inf, or only -Inf), naming them."""
        if bool(torch.isfinite(logits).all()):
            return
        bad = torch.isnan(logits).any(dim=1) | torch.isposinf(logits).any(dim=1) | torch.isneginf(logits).all(dim=1)
        if bool(bad.any()):
            rows = bad.nonzero()[:, 0].tolist()
            shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            raise ValueError(f"logits hold NaN, +Inf or only -Inf in {len(rows)} of {logits.shape[0]} rows (rows "
                             f"{shown}): they cannot be ranked, and nothing of this batch was added; fix the model's "
                             "output or drop those rows")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: logits [N, K], target [N] integer labels (processed in chunks of rows).

        Args:
            logits: scores [N, K] (any real dtype; ties go to the lower class index).
            target: integer labels [N] in [0, K).

        Raises:
            ValueError: bad shapes or labels, or rows of NaN, +Inf or only -Inf (nothing of the batch is added).
        """
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            got = getattr(logits, "shape", type(logits).__name__)
            raise ValueError(f"logits must be a 2-D tensor [N, K], got {got}")
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits have {logits.shape[1]} classes but the distance matrix has K={self.num_classes}")
        target = check_labels(target, logits.shape[0], self.num_classes, logits.device)
        if logits.shape[0] == 0:
            return
        logits = logits.detach()
        self._check_rankable(logits)
        rows = max(1, _CHUNK_ENTRIES // self.num_classes)
        T = self.temperature
        total = None
        for a in range(0, logits.shape[0], rows):
            z, y = logits[a:a + rows], target[a:a + rows]
            plain, pred = self._sums(z, y)
            correct = pred.to(y.device) == y
            parts = [plain]
            if self.crm:
                z64 = z.to(torch.float64)
                probs = torch.softmax(z64 / T if T != 1.0 else z64, dim=1)
                parts.append(self._sums(-self._d.expected(probs), y)[0])
            temperatures = (1.0,) if T == 1.0 else (1.0, T)
            parts += [calibration_sums(conf, correct).cpu() for conf in top_confidence(z, temperatures)]
            batch = torch.cat(parts)
            total = batch if total is None else total + batch
        total = total.to(logits.device)
        self._state = total if self._state is None else self._state + total.to(self._state.device)

    def state_tensor(self) -> torch.Tensor:
        """The accumulated sums as a 1-D float64 tensor (a copy); sum it across ranks, then load_state_tensor.

        Returns:
            The sums [state_size], float64, on the device of the first batch (zeros on the CPU before any).
        """
        if self._state is None:
            return torch.zeros(self.state_size, dtype=torch.float64)
        return self._state.clone()

    def load_state_tensor(self, t: torch.Tensor) -> None:
        """Replace the accumulated sums by t (e.g. after a distributed all_reduce of state_tensor()).

        Args:
            t: sums [state_size] of an evaluator with the same distances, ks, crm and temperature (copied).

        Raises:
            ValueError: t not a 1-D tensor of state_size entries.
        """
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != self.state_size:
            raise ValueError(
                f"state must be a 1-D tensor of {self.state_size} sums (from state_tensor() of an evaluator "
                f"with the same distances, ks, crm and temperature), got {getattr(t, 'shape', type(t).__name__)}")
        self._state = t.detach().to(torch.float64).clone()

    def merge(self, other: "StreamingEvaluator") -> None:
        """Add the sums of another evaluator with the same distances, ks, crm flag and temperature.

        Args:
            other: the evaluator whose batches are added to this one's (it is left as it is).

        Raises:
            ValueError: an evaluator built with other distances, ks, crm flag or temperature.
        """
        if (other.state_size != self.state_size or other.ks != self.ks or other._d.key != self._d.key
                or other.temperature != self.temperature):
            raise ValueError("can only merge evaluators built with the same distances, ks and crm flag "
                             "(and temperature)")
        if other._state is not None:
            self.load_state_tensor(self.state_tensor().to(other._state.device) + other._state)

    def _block_metrics(self, v: np.ndarray, prefix: str) -> dict:
        """The metrics of one ranking block of sums v [block]."""
        def get(name):
            at, size = self._layout[name]
            return v[at:at + size]

        scale, ks = self._d.scale, self.ks
        n, correct = float(get("n")[0]), float(get("correct")[0])
        mistakes = n - correct
        out = {f"{prefix}top1": 100.0 * correct / n,
               f"{prefix}mistake_severity": float(get("severity")[0]) / mistakes * scale if mistakes > 0 else 0.0}
        hp = get("hp_num") / get("hp_den")  # hprecision@k' for k' = 1..kmax
        for i, k in enumerate(ks):
            out[f"{prefix}hierdist@{k}"] = get("hierdist")[i] / n * scale
        for i, k in enumerate(ks):
            out[f"{prefix}best@{k}"] = get("best")[i] / n * scale
            out[f"{prefix}mistakes@{k}"] = get("mistakes")[i] / (mistakes * k) * scale if mistakes > 0 else 0.0
            out[f"{prefix}hprecision@{k}"] = float(hp[k - 1])
            out[f"{prefix}hmap@{k}"] = float(hp[:k].mean())
            out[f"{prefix}hops@{k}"] = get("hops")[i] / n
        if self._tree is not None:
            common, predicted, true = get("hier")
            p, r = common / predicted, common / true
            out.update({f"{prefix}hier_precision": p, f"{prefix}hier_recall": r,
                        f"{prefix}hier_f1": 2 * p * r / (p + r) if p + r > 0 else 0.0})
        if self._d.histogram_bins:
            out[f"{prefix}severity_histogram"] = [int(round(c)) for c in get("histogram")]
        if self._tree is not None:
            shared = get("levels")  # samples by the deepest depth whose ancestor top_1 shares
            out[f"{prefix}level_accuracy"] = [float(shared[lvl:].sum() / n) for lvl in range(1, len(shared))]
        return {key: float(val) if isinstance(val, (np.floating, float)) else val for key, val in out.items()}

    def compute(self) -> Dict[str, Any]:
        """The metrics of everything added so far (see the module docstring).

        Returns:
            metric name -> value (floats; severity_histogram and level_accuracy are lists), and num_samples.

        Raises:
            ValueError: no samples added.
        """
        if self._state is None or float(self._state[0]) == 0:
            raise ValueError("no samples to evaluate: call update(logits, target) first")
        values = self._state.cpu().numpy()
        B = self._block
        out = self._block_metrics(values[:B], "")
        if self.crm:
            out.update(self._block_metrics(values[B:2 * B], "crm_"))
        at = B * (2 if self.crm else 1)
        out["ece"], out["mce"] = calibration_errors(values[at:at + 3 * CALIBRATION_BINS])
        if self.temperature != 1.0:
            at += 3 * CALIBRATION_BINS
            out["calibrated_ece"], out["calibrated_mce"] = calibration_errors(values[at:at + 3 * CALIBRATION_BINS])
            out["temperature"] = self.temperature
        out["num_samples"] = int(round(values[0]))
        return out


def evaluate(logits: torch.Tensor, target: torch.Tensor, distances: DistanceSource,
             ks: Optional[Iterable[int]] = None, crm: bool = False, temperature: float = 1.0) -> Dict[str, Any]:
    """Every metric of the module docstring for logits [N, K] and target [N] (ks: the k of the @k metrics, <= K;
    default DEFAULT_KS up to K).

    Args:
        logits: scores [N, K].
        target: integer labels [N] in [0, K).
        distances: a Hierarchy (tree queries) or anything as_distance_matrix takes.
        ks: the k of the @k metrics (1 <= k <= K); default DEFAULT_KS up to K.
        crm: add the metrics of the CRM re-ranking (``crm_*``).
        temperature: T > 0 of the calibrated metrics and of CRM's softmax.

    Returns:
        metric name -> value, as StreamingEvaluator.compute gives them.
    """
    ev = StreamingEvaluator(distances, ks, crm=crm, temperature=temperature)
    ev.update(logits, target)
    return ev.compute()
