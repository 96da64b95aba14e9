"""Tests for the hierarchical metrics of evaluate (MBM's best/mistakes/hprecision/hmap, HOPS, calibration,
hierarchical P/R/F, severity by level) against a float64 brute force written from their definitions."""

import json
import math

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given
from hypothesis import strategies as st

from haframe_ext.cli import main
from haframe_ext.metrics.hierarchical import DEFAULT_COMPARE_METRICS, fit_temperature, ranked
from haframe_ext.hierarchy import BUILTIN_NAMES, Hierarchy
from haframe_ext.metrics import StreamingEvaluator, evaluate
from helpers import FAST, trees

# ----------------------------------------------------------------------------- the brute force
def hops_weights(expected: np.ndarray) -> np.ndarray:
    """Weights of the places of an ideal ranking whose ranks are expected [K] (ascending): inside each rank r the
    weights fall evenly from 2^-r towards the next smaller 2^-(r+1) (to 0 for the last rank, none for rank 0)."""
    e = 1.0 / np.power(2.0, expected)
    levels = np.unique(e)  # ascending: the last rank first
    w = np.zeros(len(e))
    for i, value in enumerate(levels):
        at = np.flatnonzero(e == value)
        if i == 0:
            towards = 0.0
        elif i < len(levels) - 1:
            towards = levels[i - 1]
        else:
            towards = 1.0
        w[at] = np.linspace(value, towards, len(at) + 1)[:-1]
    return w


def hops_one(d_row: np.ndarray, order: np.ndarray, k: int) -> float:
    """HOPS@k of one sample: its label's distances d_row [K], its classes best first order [K]."""
    rank_of = np.searchsorted(np.unique(d_row), d_row)  # dense rank of each class: 0 for the label
    expected = np.sort(rank_of)
    obtained = rank_of[order]
    worst = expected.copy()
    worst[:k] = expected[:k][::-1]
    w = hops_weights(expected)
    den = np.sum(w * np.abs(expected - worst))
    if k == 1:
        return float(obtained[0] == 0)
    return float(np.clip(1 - np.sum(w[:k] * np.abs(expected - obtained)[:k]) / den, 0, 1))


def padded_path(h: Hierarchy, c: str, D: int) -> list:
    """The nodes at depths 1..D on the way from the root to class c, the class repeated below its own depth."""
    path = [*reversed(h.ancestors(c))][1:] + [c]
    return path + [c] * (D - len(path))


def brute(logits: torch.Tensor, target: torch.Tensor, d: np.ndarray, ks, h: Hierarchy = None, T: float = 1.0):
    """Every key of evaluate, by loops in float64 from the definitions."""
    z = logits.double().numpy()
    y = target.numpy()
    N, K = z.shape
    order = np.argsort(-z, axis=1, kind="stable")  # ties: lowest index first
    dmax = d.max()
    sim = 1 - d / dmax
    pred = order[:, 0]
    wrong = pred != y
    out = {"top1": 100 * np.mean(~wrong),
           "mistake_severity": d[y[wrong], pred[wrong]].mean() if wrong.any() else 0.0}
    hp = {}
    for k in range(1, max(ks) + 1):
        num = sum(sim[y[i], order[i, :k]].sum() for i in range(N))
        den = sum(np.sort(sim[y[i]])[::-1][:k].sum() for i in range(N))
        hp[k] = num / den
    for k in ks:
        out[f"hierdist@{k}"] = np.mean([d[y[i], order[i, :k]].mean() for i in range(N)])
        out[f"best@{k}"] = np.mean([d[y[i], order[i, :k]].min() for i in range(N)])
        out[f"mistakes@{k}"] = (np.mean([d[y[i], order[i, :k]] for i in np.flatnonzero(wrong)])
                                if wrong.any() else 0.0)
        out[f"hprecision@{k}"] = hp[k]
        out[f"hmap@{k}"] = np.mean([hp[j] for j in range(1, k + 1)])
        out[f"hops@{k}"] = np.mean([hops_one(d[y[i]], order[i], k) for i in range(N)])
    out["severity_histogram"] = [int(np.sum(d[y[wrong], pred[wrong]] == v)) for v in range(1, int(dmax) + 1)]
    for prefix, temp in [("", 1.0)] + ([("calibrated_", T)] if T != 1.0 else []):
        p = torch.softmax(torch.from_numpy(z) / temp, dim=1).numpy()
        conf = p.max(axis=1)
        edges = np.linspace(0, 1, 16)
        ece, mce = 0.0, 0.0
        for b in range(15):
            inside = (conf > edges[b]) & (conf <= edges[b + 1]) if b else conf <= edges[1]
            if inside.any():
                gap = abs(np.mean(~wrong[inside]) - conf[inside].mean())
                ece += inside.sum() / N * gap
                mce = max(mce, gap)
        out[f"{prefix}ece"], out[f"{prefix}mce"] = ece, mce
    if h is not None:
        names = h.classes
        A = [set(padded_path(h, c, 0)) for c in names]
        inter = sum(len(A[y[i]] & A[pred[i]]) for i in range(N))
        P = inter / sum(len(A[pred[i]]) for i in range(N))
        R = inter / sum(len(A[y[i]]) for i in range(N))
        out.update(hier_precision=P, hier_recall=R, hier_f1=2 * P * R / (P + R) if P + R else 0.0)
        D = h.max_depth
        paths = [padded_path(h, c, D) for c in names]
        out["level_accuracy"] = [np.mean([paths[y[i]][lvl] == paths[pred[i]][lvl] for i in range(N)])
                                 for lvl in range(D)]
    return out


def assert_metrics_equal(got: dict, want: dict, tol: float = 1e-9) -> None:
    """Every key of want is in got with the same value (lists entry by entry) to tol."""
    for key, value in want.items():
        assert key in got, key
        if isinstance(value, list):
            assert len(got[key]) == len(value), key
            np.testing.assert_allclose(got[key], value, rtol=tol, atol=tol, err_msg=key)
        else:
            assert got[key] == pytest.approx(value, rel=tol, abs=tol), key


def some_logits(N: int, K: int, seed: int, ties: bool = False):
    """(logits [N, K], target [N]) with a fifth of the rows correct; ties: integer logits in 0..3."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randint(0, 4, (N, K), generator=g).double() if ties
              else torch.randn(N, K, generator=g, dtype=torch.float64))
    target = torch.randint(0, K, (N,), generator=g)
    target[:N // 5] = logits[:N // 5].argmax(1)
    return logits, target


# ----------------------------------------------------------------------------- every key against the brute force
@pytest.mark.parametrize("name", BUILTIN_NAMES)
@pytest.mark.parametrize("ties", [False, True])
def test_every_key_on_the_bundled_trees(name, ties):
    h = Hierarchy.builtin(name)
    K = h.num_classes
    logits, target = some_logits(40, K, seed=len(name), ties=ties)
    ks = (1, 2, 5, 20)
    got = evaluate(logits, target, h, ks=ks, temperature=1.7)
    assert_metrics_equal(got, brute(logits, target, h.distances(), ks, h, T=1.7))
    assert got["temperature"] == 1.7 and got["num_samples"] == 40


@FAST
@given(tree=trees(max_k=60, styles=("plain",)), seed=st.integers(0, 1000), ties=st.booleans(),
       convention=st.sampled_from(["published", "height"]))
def test_every_key_on_unbalanced_trees(tree, seed, ties, convention):
    parent_of, classes = tree
    h = Hierarchy.from_parents(parent_of, classes).with_convention(convention)
    K = h.num_classes
    logits, target = some_logits(12, K, seed, ties)
    ks = tuple(sorted({1, min(3, K), K}))
    got = evaluate(logits, target, h, ks=ks)
    assert_metrics_equal(got, brute(logits, target, h.distances(), ks, h))


def test_a_distance_matrix_gives_the_tree_keys_it_can():
    h = Hierarchy.random(300, seed=3)
    logits, target = some_logits(64, 300, seed=1)
    by_tree = evaluate(logits, target, h, ks=(1, 5, 20), crm=True)
    dense = evaluate(logits, target, h.distances(), ks=(1, 5, 20), crm=True)
    assert set(by_tree) - set(dense) == {p + k for p in ("", "crm_") for k in
                                         ("hier_precision", "hier_recall", "hier_f1", "level_accuracy")}
    assert_metrics_equal(by_tree, dense, tol=1e-12)
    float_d = h.distances() + 0.5 * (1 - np.eye(300))  # non-integer distances: no histogram
    assert "severity_histogram" not in evaluate(logits, target, float_d)


# ----------------------------------------------------------------------------- HOPS by hand
# root -> A -> {a0, a1}; root -> B -> {b0, b1}: from a0 the ideal ranking is a0 | a1 | b0, b1 (ranks 0, 1, 2, 2)
TOY = Hierarchy.from_parents({"A": "root", "B": "root", "a0": "A", "a1": "A", "b0": "B", "b1": "B"})


@pytest.mark.parametrize("ranking,k,expected", [
    ([0, 1, 2, 3], 4, 1.0),  # the ideal order
    ([0, 1, 3, 2], 4, 1.0),  # ties inside a rank do not matter
    # weights 1 (rank 0), 1/2 (rank 1); |e - o| = 0, 1; the reversed ideal top 2 gives 1 + 1/2
    ([0, 2, 1, 3], 2, 1 - 0.5 / 1.5),
    ([1, 0, 2, 3], 2, 0.0),  # the worst order of the ideal top 2
    ([1, 0, 2, 3], 1, 0.0),
    ([0, 3, 2, 1], 1, 1.0),
])
def test_hops_by_hand(ranking, k, expected):
    logits = torch.zeros(1, 4, dtype=torch.float64)
    logits[0, ranking] = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    got = evaluate(logits, torch.tensor([0]), TOY, ks=(k,))[f"hops@{k}"]
    assert got == pytest.approx(hops_one(TOY.distances()[0], np.array(ranking), k), abs=1e-12)
    assert got == pytest.approx(expected, abs=1e-12)


def test_hops_weights_fall_within_each_rank():
    # ranks 0 | 1 1 | 2 2 2 2: 1 | 1/2, 3/8 | 1/4, 3/16, 1/8, 1/16
    w = hops_weights(np.array([0, 1, 1, 2, 2, 2, 2]))
    np.testing.assert_allclose(w, [1, 0.5, 0.375, 0.25, 0.1875, 0.125, 0.0625])


# ----------------------------------------------------------------------------- streaming, ranks, ties
@pytest.mark.parametrize("name,crm,T", [("cifar100", True, 1.0), ("tiered_imagenet_h", True, 0.6),
                                        ("random", False, 2.0)])
def test_streaming_and_two_ranks_equal_one_shot(name, crm, T):
    h = Hierarchy.random(400, seed=5) if name == "random" else Hierarchy.builtin(name)
    logits, target = some_logits(150, h.num_classes, seed=2)
    full = evaluate(logits, target, h, crm=crm, temperature=T)
    ev = StreamingEvaluator(h, crm=crm, temperature=T)
    for a in range(0, 150, 37):
        ev.update(logits[a:a + 37], target[a:a + 37])
    assert_metrics_equal(ev.compute(), full, tol=1e-12)
    ranks = [StreamingEvaluator(h, crm=crm, temperature=T) for _ in range(2)]
    ranks[0].update(logits[:70], target[:70])
    ranks[1].update(logits[70:], target[70:])
    merged = StreamingEvaluator(h, crm=crm, temperature=T)
    merged.load_state_tensor(ranks[0].state_tensor() + ranks[1].state_tensor())  # an all_reduce
    assert_metrics_equal(merged.compute(), full, tol=1e-12)
    with pytest.raises(ValueError, match="same distances, ks and crm"):
        ranks[0].merge(StreamingEvaluator(h, crm=crm, temperature=T + 1))


@pytest.mark.parametrize("N,K,k", [(1, 2, 1), (3, 7, 7), (50, 100, 20), (8, 5000, 64)])
@pytest.mark.parametrize("levels", [2, 4, 1000])
def test_ranked_puts_the_lowest_index_first_among_ties(N, K, k, levels):
    g = torch.Generator().manual_seed(K + levels)
    scores = torch.randint(0, levels, (N, K), generator=g).float()
    want = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(ranked(scores, k), want)


# ----------------------------------------------------------------------------- temperature
@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_fit_temperature_minimises_the_nll(scale):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 10, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, 10, (300,), generator=g)
    target[:150] = logits[:150].argmax(1)

    def nll(log_t):
        return float(torch.nn.functional.cross_entropy(logits / math.exp(log_t), target))

    best = scipy.optimize.minimize_scalar(nll, bounds=(-6, 6), method="bounded", options={"xatol": 1e-10})
    assert math.log(fit_temperature(logits, target)) == pytest.approx(best.x, abs=1e-5)


def test_calibrated_ece_is_lower_after_fitting():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(400, 20, generator=g, dtype=torch.float64) * 6  # overconfident
    target = torch.randint(0, 20, (400,), generator=g)
    target[:200] = logits[:200].argmax(1)
    T = fit_temperature(logits[::2], target[::2])  # a validation half: half of it correct
    out = evaluate(logits[1::2], target[1::2], Hierarchy.random(20, seed=0), temperature=T)
    assert T > 1 and out["calibrated_ece"] < out["ece"]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", ["nan", "posinf", "all_neginf"])
def test_unrankable_rows_are_named_and_nothing_is_lost(bad):
    h = Hierarchy.builtin("cifar100")
    logits, target = some_logits(10, 100, seed=4)
    ev = StreamingEvaluator(h)
    ev.update(logits[:5], target[:5])
    before = ev.state_tensor()
    broken = logits[5:].clone()
    broken[[1, 3]] = {"nan": float("nan"), "posinf": float("inf"), "all_neginf": float("-inf")}[bad]
    if bad != "all_neginf":
        broken[[1, 3], 1:] = 0.0
    with pytest.raises(ValueError, match=r"in 2 of 5 rows \(rows 1, 3\)"):
        ev.update(broken, target[5:])
    assert torch.equal(ev.state_tensor(), before)


@pytest.mark.parametrize("ks,match", [((1, 101), r"ks \[101\] exceed the K=100 classes"),
                                      ((0,), "positive integers"), ((), "at least one k")])
def test_bad_ks_are_refused(ks, match):
    with pytest.raises(ValueError, match=match):
        StreamingEvaluator(Hierarchy.builtin("cifar100"), ks=ks)


@pytest.mark.parametrize("T", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_is_refused(T):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        StreamingEvaluator(Hierarchy.builtin("cifar100"), temperature=T)


def test_fit_temperature_refuses_bad_logits():
    with pytest.raises(ValueError, match="finite validation logits"):
        fit_temperature(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="validation logits"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_default_compare_metrics_are_keys_of_evaluate():
    h = Hierarchy.builtin("cifar100")
    logits, target = some_logits(20, 100, seed=0)
    out = evaluate(logits, target, h)
    assert set(DEFAULT_COMPARE_METRICS) <= set(out)


# ----------------------------------------------------------------------------- haframe train and haframe eval
def test_results_and_the_log_carry_the_new_keys(baseline):
    res = json.loads((baseline / "results.json").read_text())
    for key in ("best@5", "mistakes@2", "hprecision@5", "hmap@5", "hops@5", "ece", "mce", "hier_f1",
                "severity_histogram", "level_accuracy"):
        assert key in res["test"], key
        assert key in res["test_crm"] or key in ("ece", "mce"), key
    assert len(res["test"]["level_accuracy"]) == 3 and len(res["test"]["severity_histogram"]) == 3  # toy tree
    first = json.loads((baseline / "metrics.jsonl").read_text().splitlines()[0])
    assert "hops@5" in first["val"] and "level_accuracy" in first["val"]


def test_eval_calibrates_prints_and_plots(baseline, tmp_path, capsys):
    png, out = tmp_path / "severity.png", tmp_path / "m.json"
    rc = main(["eval", "--checkpoint", str(baseline / "best.pt"), "--calibrate", "--plot", str(png),
               "--json", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0, text
    saved = json.loads(out.read_text())
    cal = saved["calibration"]
    assert cal["temperature"] > 0 and cal["val_samples"] > 0
    assert cal["ece_before"] == saved["metrics"]["ece"] and cal["ece_after"] == saved["metrics"]["calibrated_ece"]
    assert saved["metrics"]["temperature"] == cal["temperature"] and "hops@5" in saved["crm"]
    assert "top-1 mistakes at LCA height 1..3" in text and "accuracy at depth 1..3" in text
    assert "hier_f1" in text and f"ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra,fragment", [
    (["--calibrate", "--split", "val"], "--calibrate fits the temperature on the validation split"),
    (["--plot", "."], "is a folder: name the PNG file"),
])
def test_eval_refusals(baseline, capsys, extra, fragment):
    rc = main(["eval", "--checkpoint", str(baseline / "best.pt"), *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("haframe: error: ") and fragment in lines[0], err


def test_calibrate_without_a_validation_split_is_refused(baseline, monkeypatch):
    import haframe_ext.training.evaluation as E

    real = E.build_from_config

    def no_val(config):
        built = real(config)
        built["datasets"]["val"] = torch.utils.data.Subset(built["datasets"]["val"], [])
        return built

    monkeypatch.setattr(E, "build_from_config", no_val)
    with pytest.raises(ValueError, match="--calibrate needs a validation split"):
        E.evaluate_checkpoint(baseline / "best.pt", device="cpu", calibrate=True)
    assert E.evaluate_checkpoint(baseline / "best.pt", device="cpu")["metrics"]["num_samples"] > 0
