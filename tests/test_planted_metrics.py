"""Metrics and distance digests against brute force, so that a silently missing or merged figure fails (issue 24).

HierDist@k is recomputed here from a sort of the logits and distances from the tree's parent links
(``helpers.brute_tree_distances``); evaluators over different distances must refuse to merge; the tree's distance
digest must differ whenever the distances it stands for differ (two conventions of one unbalanced tree, another
class order) and agree for the same tree rebuilt under other node names.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from haframe_ext.hierarchy import Hierarchy
from haframe_ext.metrics import StreamingEvaluator, evaluate
from helpers import brute_tree_distances


def brute_metrics(logits: torch.Tensor, target: torch.Tensor, d: np.ndarray, ks) -> dict:
    """top1, mistake severity and hierdist@k by sorting each row of logits [N, K] (no ties) in float64."""
    L, y = logits.double().numpy(), target.numpy()
    order = np.argsort(-L, axis=1, kind="stable")  # [N, K] best class first
    dk = d[y[:, None], order]  # [N, K]
    wrong = order[:, 0] != y
    out = {"top1": 100.0 * (~wrong).mean(), "mistake_severity": dk[wrong, 0].mean() if wrong.any() else 0.0}
    out.update({f"hierdist@{k}": dk[:, :k].mean(axis=1).mean() for k in ks})
    out["num_samples"] = len(y)
    return out


def random_batch(N: int, K: int, seed: int):
    """float64 logits [N, K] without ties and labels [N], a fifth of them predicted right."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, K, generator=g, dtype=torch.float64)
    target = torch.randint(0, K, (N,), generator=g)
    target[: N // 5] = logits[: N // 5].argmax(1)
    return logits, target


def tree_and_matrix(K: int, seed: int):
    """A random K-class Hierarchy and its brute-force published distances."""
    h = Hierarchy.random(K, seed=seed)
    return h, brute_tree_distances(h, "published")


# ----------------------------------------------------------------------------- HierDist@K
@pytest.mark.parametrize("source", ["matrix", "tree"])
@pytest.mark.parametrize("K,ks", [(2, (1, 2)), (5, (1, 5)), (13, (13, 1, 4)), (13, (13,))])
def test_hierdist_at_k_equals_k_is_reported_and_right(source, K, ks):
    """Every k of ks is reported, k == K included (the mean distance from the label to all classes), and each value
    equals the brute force."""
    h, d = tree_and_matrix(K, seed=K)
    logits, target = random_batch(64, K, seed=1)
    out = evaluate(logits, target, h if source == "tree" else d, ks=ks)
    want = brute_metrics(logits, target, d, ks)
    assert {k for k in out if k.startswith("hierdist@")} == {f"hierdist@{k}" for k in ks}
    assert {k: out[k] for k in want} == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert out[f"hierdist@{K}"] == pytest.approx(d[target.numpy()].mean(), rel=1e-12)


@pytest.mark.parametrize("K", [6, 40])
def test_streaming_batches_and_crm_equal_the_brute_force(K):
    """Batches streamed one by one, and the CRM block (ranked by -sum_j d[k, j] p_j), against the brute force."""
    h, d = tree_and_matrix(K, seed=3)
    logits, target = random_batch(90, K, seed=2)
    ev = StreamingEvaluator(h, ks=(1, 3, K), crm=True)
    for a in range(0, 90, 32):
        ev.update(logits[a:a + 32], target[a:a + 32])
    out = ev.compute()
    risk = torch.softmax(logits, 1).numpy() @ d.T  # [N, K] expected distance of predicting each class
    want = brute_metrics(logits, target, d, (1, 3, K))
    want.update({f"crm_{k}": v for k, v in brute_metrics(torch.from_numpy(-risk), target, d, (1, 3, K)).items()
                 if k != "num_samples"})
    assert {k: out[k] for k in want} == pytest.approx(want, rel=1e-10, abs=1e-12)


# ----------------------------------------------------------------------------- merging evaluators
def merge_pairs():
    """(name, first distances, second distances): the same K, d_max and ks, different distances."""
    h, d = tree_and_matrix(12, seed=9)  # d_max 3, d[2, 3] = 2
    edited = d.copy()
    edited[2, 3] = edited[3, 2] = 1.0
    unbalanced = Hierarchy.random(60, seed=1)
    return [("matrix, one entry changed", d, edited),
            ("two conventions of one tree", unbalanced, unbalanced.with_convention("height")),
            ("two trees of one height", Hierarchy.random(12, seed=6), Hierarchy.random(12, seed=8)),
            ("a matrix scaled by two factors", 0.5 * d, 0.25 * d)]


@pytest.mark.parametrize("case", range(4))
def test_evaluators_over_different_distances_do_not_merge(case):
    """Merging sums taken over different distances would average unrelated figures: refused, whatever the kind."""
    _, a, b = merge_pairs()[case]
    K = a.num_classes if isinstance(a, Hierarchy) else len(a)
    logits, target = random_batch(20, K, seed=case)
    ea, eb = StreamingEvaluator(a, ks=(1, 2)), StreamingEvaluator(b, ks=(1, 2))
    ea.update(logits, target)
    eb.update(logits, target)
    with pytest.raises(ValueError, match="same distances"):
        ea.merge(eb)


@pytest.mark.parametrize("source", ["matrix", "tree"])
def test_evaluators_over_equal_distances_merge_into_the_whole(source):
    """Two evaluators over equal content (separately built objects) merge into the brute force of all batches."""
    h, d = tree_and_matrix(15, seed=9)
    again = Hierarchy.random(15, seed=9) if source == "tree" else d.copy()
    logits, target = random_batch(50, 15, seed=4)
    ea, eb = StreamingEvaluator(h if source == "tree" else d, ks=(1, 15)), StreamingEvaluator(again, ks=(1, 15))
    ea.update(logits[:30], target[:30])
    eb.update(logits[30:], target[30:])
    ea.merge(eb)
    want = brute_metrics(logits, target, d, (1, 15))
    assert {k: v for k, v in ea.compute().items() if k in want} == pytest.approx(want, rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------- the tree's distance digest
def renamed(h: Hierarchy, prefix: str) -> Hierarchy:
    """The same tree and class order under other node names."""
    name = {n: f"{prefix}{i}" for i, n in enumerate(h.nodes)}
    parents = {name[n]: name[h.parent(n)] for n in h.nodes if h.parent(n) is not None}
    return Hierarchy.from_parents(parents, [name[c] for c in h.classes])


def digest_family():
    """Hierarchies whose distances are equal in some pairs and differ in others."""
    out = []
    for seed in (1, 2):
        h = Hierarchy.random(40, seed=seed)
        out += [h, h.with_convention("height"), renamed(h, "x"),
                Hierarchy.from_parents({n: h.parent(n) for n in h.nodes if h.parent(n) is not None},
                                       list(reversed(h.classes)))]
    balanced = Hierarchy.from_parents({f"c{i}": f"g{i // 3}" for i in range(9)} | {f"g{j}": "r" for j in range(3)})
    return out + [balanced, balanced.with_convention("height")]


def test_distance_digest_differs_exactly_when_the_distances_do():
    """Different distances (conventions of an unbalanced tree, another class order, another tree) give different
    digests; equal distances of the same tree (renamed nodes; both conventions of a balanced tree) the same one."""
    family = digest_family()
    dist = [brute_tree_distances(h, h.convention) for h in family]
    dig = [h.distance_digest() for h in family]
    assert not np.array_equal(dist[0], dist[1])  # the first tree is unbalanced: its conventions differ
    for a in range(len(family)):
        for b in range(a + 1, len(family)):
            same = dist[a].shape == dist[b].shape and np.array_equal(dist[a], dist[b])
            assert (dig[a] == dig[b]) == same, (a, b, same)
