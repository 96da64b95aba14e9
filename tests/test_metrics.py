"""Tests for haframe_ext.metrics: top-1, mistake severity, HierDist@k, CRM, neural collapse, seed summaries."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from haframe_ext.frame import HAFrame
from haframe_ext.hierarchy import Hierarchy
from haframe_ext.metrics import StreamingEvaluator, crm, evaluate, format_table, neural_collapse, summarize_seeds

# root -> A -> {a0, a1};  root -> B -> {b0, b1}
TOY_D = np.array([[0, 1, 2, 2], [1, 0, 2, 2], [2, 2, 0, 1], [2, 2, 1, 0]])
# sample 0: y=0, ranking 0,2,3,1  -> correct;        top-2 {0, 2}: (0 + 2) / 2 = 1
# sample 1: y=1, ranking 2,3,0,1  -> d[1, 2] = 2;    top-2 {2, 3}: (2 + 2) / 2 = 2
# sample 2: y=3, ranking 2,3,1,0  -> d[3, 2] = 1;    top-2 {2, 3}: (1 + 0) / 2 = 0.5
LOGITS = torch.tensor([[4.0, 1.0, 3.0, 2.0], [2.0, 1.0, 4.0, 3.0], [1.0, 2.0, 4.0, 3.0]])
TARGET = torch.tensor([0, 1, 3])


def naive(logits, target, d, ks):
    """Loop implementation of evaluate, for cross-checking."""
    d = np.asarray(d)
    rank = np.argsort(-logits.numpy(), axis=1, kind="stable")
    y = target.numpy()
    mistakes = [d[t, r[0]] for t, r in zip(y, rank) if r[0] != t]
    out = {"top1": 100.0 * np.mean(rank[:, 0] == y), "mistake_severity": np.mean(mistakes) if mistakes else 0.0}
    for k in ks:
        out[f"hierdist@{k}"] = np.mean([d[t, r[:k]].mean() for t, r in zip(y, rank)])
    return out


# ----------------------------------------------------------------------------- evaluate
def scalars(d: dict) -> dict:
    """The scalar metrics of an evaluate result (pytest.approx compares no nested lists)."""
    return {k: v for k, v in d.items() if not isinstance(v, list)}


def test_evaluate_hand_case():
    out = evaluate(LOGITS, TARGET, TOY_D, ks=(1, 2, 4))
    want = {"top1": 100 / 3, "mistake_severity": 1.5, "hierdist@1": 1.0, "hierdist@2": 3.5 / 3, "num_samples": 3}
    assert {k: out[k] for k in want} == pytest.approx(want)
    assert out["hierdist@4"] == pytest.approx(5 / 4)  # k == K: every row of d sums to 5
    assert out["severity_histogram"] == [1, 1]  # mistakes at distance 2 (sample 1) and 1 (sample 2)
    assert "hier_f1" not in out and "level_accuracy" not in out  # a matrix has no tree
    with pytest.raises(ValueError, match=r"ks \[5\] exceed the K=4 classes"):
        evaluate(LOGITS, TARGET, TOY_D, ks=(1, 2, 5))
    assert "hierdist@5" not in evaluate(LOGITS, TARGET, TOY_D)  # the default ks stop at K


def test_no_mistakes_gives_zero_severity():
    out = evaluate(torch.eye(4), torch.arange(4), TOY_D, ks=(1,))
    assert out["top1"] == 100.0 and out["mistake_severity"] == 0.0 and out["hierdist@1"] == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_evaluate_matches_loop(dtype):
    d = Hierarchy.builtin("cifar100").distances()
    g = torch.Generator().manual_seed(0)
    logits = torch.rand(200, 100, generator=g).argsort(dim=1).float()  # distinct integers: no ties in any dtype
    target = torch.randint(0, 100, (200,), generator=g)
    target[:50] = logits[:50].argmax(1)  # some correct predictions
    out = evaluate(logits.to(dtype), target, d)
    ref = naive(logits, target, d, (1, 5, 20))
    for key, value in ref.items():
        assert out[key] == pytest.approx(value, rel=1e-12), key
    assert out["hierdist@1"] == pytest.approx(out["mistake_severity"] * (1 - out["top1"] / 100))


def test_distances_from_a_hierarchy():
    h = Hierarchy.from_parents({"A": "root", "B": "root", "a0": "A", "a1": "A", "b0": "B", "b1": "B"})
    by_tree, by_matrix = evaluate(LOGITS, TARGET, h, ks=(2,)), evaluate(LOGITS, TARGET, TOY_D, ks=(2,))
    assert {k: by_tree[k] for k in by_matrix} == by_matrix
    assert by_tree["level_accuracy"] == [2 / 3, 1 / 3]  # sample 2 shares B with its prediction


@pytest.mark.parametrize("logits,target,match", [
    (torch.zeros(4), torch.zeros(4, dtype=torch.long), r"logits must be a 2-D tensor"),
    (torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), r"logits have 5 classes but the distance matrix has K=4"),
    (torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), r"target must be 1-D with 3 entries"),
    (torch.zeros(3, 4), torch.zeros(3), r"integer class indices"),
    (torch.zeros(3, 4), torch.tensor([0, 4, 1]), r"labels must lie in \[0, 3\].*\[0, 4\]"),
    (torch.zeros(3, 4), torch.tensor([0, -1, 1]), r"labels must lie in \[0, 3\]"),
    (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), r"no samples"),
])
def test_evaluate_errors(logits, target, match):
    with pytest.raises(ValueError, match=match):
        evaluate(logits, target, TOY_D)


def test_bad_ks():
    with pytest.raises(ValueError, match="ks must be positive integers"):
        StreamingEvaluator(TOY_D, ks=(0, 1))


# ----------------------------------------------------------------------------- streaming and CRM
def test_streaming_equals_one_shot_and_state_sums():
    d = Hierarchy.builtin("fgvc_aircraft").distances()
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(90, 100, generator=g), torch.randint(0, 100, (90,), generator=g)
    full = evaluate(logits, target, d, crm=True)
    ev = StreamingEvaluator(d, crm=True)
    for i in range(0, 90, 32):
        ev.update(logits[i:i + 32], target[i:i + 32])
    assert scalars(ev.compute()) == pytest.approx(scalars(full), rel=1e-12)
    assert ev.compute()["severity_histogram"] == full["severity_histogram"]
    # two "ranks" each see half; summing their state tensors (an all_reduce) gives the full result
    ranks = [StreamingEvaluator(d, crm=True) for _ in range(2)]
    ranks[0].update(logits[:45], target[:45])
    ranks[1].update(logits[45:], target[45:])
    total = ranks[0].state_tensor() + ranks[1].state_tensor()
    assert total.dtype == torch.float64 and total.dim() == 1 and total.numel() == ranks[0].state_size
    merged = StreamingEvaluator(d, crm=True)
    merged.load_state_tensor(total)
    assert scalars(merged.compute()) == pytest.approx(scalars(full), rel=1e-12)
    ranks[0].merge(ranks[1])
    assert scalars(ranks[0].compute()) == pytest.approx(scalars(full), rel=1e-12)
    with pytest.raises(ValueError, match="same distances, ks and crm"):
        ranks[0].merge(StreamingEvaluator(d, ks=(1,), crm=True))
    with pytest.raises(ValueError, match=f"1-D tensor of {merged.state_size} sums"):
        merged.load_state_tensor(torch.zeros(3))
    merged.reset()
    with pytest.raises(ValueError, match="no samples"):
        merged.compute()


def test_crm_hand_case():
    probs = torch.tensor([[0.4, 0.0, 0.35, 0.25]], dtype=torch.float64)
    # risk_k = sum_j d[k, j] p_j = [1.2, 1.6, 1.05, 1.15]: CRM picks class 2, arg-max picks class 0
    scores = crm(probs, TOY_D)
    torch.testing.assert_close(scores, -torch.tensor([[1.2, 1.6, 1.05, 1.15]], dtype=torch.float64))
    assert int(scores.argmax()) == 2
    with pytest.raises(ValueError, match="probs have K=3 classes"):
        crm(torch.ones(1, 3) / 3, TOY_D)


def test_crm_metrics_in_evaluator():
    probs = torch.tensor([[0.4, 0.0, 0.35, 0.25], [0.1, 0.7, 0.1, 0.1]])
    logits, target = probs.log(), torch.tensor([2, 1])
    out = evaluate(logits, target, TOY_D, ks=(1, 2), crm=True)
    assert out["top1"] == 50.0 and out["crm_top1"] == 100.0
    assert out["crm_mistake_severity"] == 0.0
    reranked = evaluate(crm(torch.softmax(logits.double(), 1), TOY_D), target, TOY_D, ks=(1, 2))
    for key, value in reranked.items():
        if key not in ("num_samples", "ece", "mce"):  # calibration is of the plain softmax only
            assert out[f"crm_{key}"] == pytest.approx(value)


# ----------------------------------------------------------------------------- neural collapse
def test_perfect_collapse_on_an_etf():
    f = HAFrame.etf(5, dim=7, dtype=torch.float64)
    labels = torch.arange(5).repeat(3)
    out = neural_collapse(3.0 * f.weight[labels], labels, f.weight, f.similarity)
    assert set(out) == {"angular_collapse_avg", "angular_collapse_std", "self_duality", "nc1"}
    for value in out.values():
        assert value == pytest.approx(0.0, abs=1e-12)


def test_collapse_to_a_haframe():
    f = HAFrame.from_hierarchy("fgvc_aircraft", 2.0, dtype=torch.float64)
    labels = torch.arange(100).repeat(2)
    out = neural_collapse(f.weight[labels], labels, f.weight, f.similarity)
    assert out["angular_collapse_avg"] == pytest.approx(0.0, abs=1e-12)
    assert out["nc1"] == pytest.approx(0.0, abs=1e-12)
    # the HAFrame's vectors do not sum to 0, so centring the means moves them away from W
    W = f.weight
    M = W - W.mean(0)
    assert out["self_duality"] == pytest.approx(float((W / W.norm() - M / M.norm()).norm()))


def test_collapse_hand_case():
    weight, S = torch.eye(2), torch.eye(2)
    features = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]])
    out = neural_collapse(features, torch.tensor([0, 0, 1, 1]), weight, S)
    assert out["angular_collapse_avg"] == pytest.approx(0.0, abs=1e-12)
    assert out["nc1"] == pytest.approx(0.01 / 0.5)
    assert out["self_duality"] == pytest.approx(math.sqrt(2 - math.sqrt(2)))


def test_collapse_uses_only_present_classes():
    f = HAFrame.etf(6, dtype=torch.float64)
    labels = torch.tensor([0, 2, 4, 4])
    out = neural_collapse(f.weight[labels], labels, f.weight, f.similarity)
    assert out["angular_collapse_avg"] == pytest.approx(0.0, abs=1e-12)
    sub = f.similarity[[0, 2, 4]][:, [0, 2, 4]]
    noisy = neural_collapse(f.weight[labels] + 0.1, labels, f.weight, f.similarity)
    assert noisy["angular_collapse_avg"] > 0 and sub.shape == (3, 3)


@pytest.mark.parametrize("max_block", [1 << 22, 7, 1])
def test_angular_collapse_matches_the_pairwise_definition(max_block):
    """Mean and population std over pairs i < j of |cos(mu_i, mu_j) - S_ij|, also when done in row blocks."""
    from haframe_ext.metrics import collapse as M

    g = torch.Generator().manual_seed(0)
    f = HAFrame.from_hierarchy("cifar100", 2.0, dtype=torch.float64)
    labels = torch.randint(0, 100, (600,), generator=g)
    feats = f.weight[labels] + 0.3 * torch.randn(600, 100, generator=g, dtype=torch.float64)
    present = torch.unique(labels)
    means = torch.stack([feats[labels == c].mean(0) for c in present])
    unit = means / means.norm(dim=1, keepdim=True)
    i, j = torch.triu_indices(len(present), len(present), offset=1)
    gap = ((unit[i] * unit[j]).sum(1) - f.similarity[present[i], present[j]]).abs()
    got = M._pair_gap_stats(unit, f.similarity[present][:, present], max_block=max_block)
    assert got[0] == pytest.approx(float(gap.mean()), rel=1e-12)
    assert got[1] == pytest.approx(float(gap.std(unbiased=False)), rel=1e-9)
    out = neural_collapse(feats, labels, f.weight, f.similarity)
    assert out["angular_collapse_avg"] == pytest.approx(float(gap.mean()), rel=1e-12)
    assert out["angular_collapse_std"] == pytest.approx(float(gap.std(unbiased=False)), rel=1e-9)


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]), torch.eye(2), torch.eye(2)),
     r"weight must be a \[K, d\] tensor with d=3"),
    ((torch.zeros(4, 2), torch.tensor([0, 1, 0, 2]), torch.eye(2), torch.eye(2)), r"labels must lie in \[0, 1\]"),
    ((torch.ones(2, 2), torch.tensor([1, 1]), torch.eye(2), torch.eye(2)), r"at least 2 classes"),
    ((torch.ones(2, 2), torch.tensor([0, 1]), torch.eye(2), torch.eye(3)), r"similarity must be \[K, K\]"),
])
def test_collapse_errors(args, match):
    with pytest.raises(ValueError, match=match):
        neural_collapse(*args)


# ----------------------------------------------------------------------------- seeds and tables
def test_summarize_seeds():
    runs = [{"top1": 70.0, "method": "x"}, {"top1": 72.0}, {"top1": 74.0}]
    out = summarize_seeds(runs)
    assert set(out) == {"top1"}
    half = scipy.stats.t.ppf(0.975, 2) * 2.0 / math.sqrt(3)
    assert out["top1"] == pytest.approx({"mean": 72.0, "ci95": half, "n": 3})
    assert summarize_seeds([{"top1": 70.0}])["top1"] == {"mean": 70.0, "ci95": 0.0, "n": 1}
    with pytest.raises(ValueError, match="run 1 has no 'top1'"):
        summarize_seeds([{"top1": 1.0}, {"x": 2.0}])
    with pytest.raises(ValueError, match="at least one run"):
        summarize_seeds([])


def test_format_table():
    rows = {
        "HAFrame": summarize_seeds([{"top1": 77.5, "hierdist@1": 1.0}, {"top1": 77.9, "hierdist@1": 1.1}]),
        "CE": {"top1": {"mean": 77.71, "ci95": 0.2319, "n": 5}},
    }
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split(" | ")[0].strip() == "method" and "hierdist@1" in lines[0]
    assert "77.71 +/- 0.2319" in lines[3] and lines[3].rstrip().endswith("-")
    assert lines[2].startswith("HAFrame") and "77.70 +/- " in lines[2]
    assert len({len(line) for line in lines[:3]}) == 1  # aligned columns
