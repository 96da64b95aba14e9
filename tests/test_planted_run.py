"""A finished run's reported figures against brute force from its own files (issue 24: figures that the suite only
checked for presence or sign).

One tiny run; then its best.pt is loaded into a freshly built model, the test split is pushed through it, and
results.json's test and CRM metrics, neural-collapse diagnostics and frame Gram error are recomputed here in
float64 from the logits, the features and distances taken from the tree's parent links.  The best epoch must be
the one whose validation figure in metrics.jsonl is the best.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from haframe_ext.training.config import build_from_config
from haframe_ext.hierarchy import Hierarchy
from haframe_ext.train import evaluate_checkpoint, load_checkpoint, train
from helpers import EPOCHS, brute_similarity, brute_tree_distances
from helpers import toy_train_config as _round2_config

GAMMA = 2.0  # toy_config's gamma is the default; checked below against the saved config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(config, results, out folder) of one tiny run on an unbalanced tree under the height convention."""
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "toy.tsv").write_text("root\tA\nroot\tB\nA\tc0\nA\tc1\nA\tA2\nA2\tc2\nA2\tc3\nB\tB1\nB1\tc4\nB1\tc5\n"
                                 "B1\tB2\nB2\tc6\nB2\tc7\n")
    cfg = _round2_config(tmp, distance_convention="height", eval_ks=[1, 2, 8], lr=0.2)
    res = train(cfg)
    return cfg, res, Path(cfg.out)


def test_results_hold_the_best_epoch_of_the_log(finished):
    """best_epoch / best_val are the epoch with the highest validation top-1 in metrics.jsonl (first on a tie)."""
    cfg, res, out = finished
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [(r["val"]["top1"], r["epoch"]) for r in recs if "val" in r and "epoch" in r]
    assert [e for _, e in val] == list(range(1, EPOCHS + 1))
    best = max(v for v, _ in val)
    assert res["best_epoch"] == next(e for v, e in val if v == best)
    assert res["best_val"] == {"metric": "top1", "value": pytest.approx(best, rel=1e-12)}
    assert json.loads((out / "results.json").read_text())["best_epoch"] == res["best_epoch"]
    assert load_checkpoint(out / "best.pt", kind="best")["epoch"] == res["best_epoch"]


def outputs_of_best(cfg, out: Path):
    """(features [N, d], logits [N, K], labels [N], classifier weight [K, d]) of best.pt on the test split, float64."""
    built = build_from_config(cfg)
    model = built["model"]
    model.load_state_dict(load_checkpoint(out / "best.pt", map_location="cpu", kind="best")["model"])
    model.eval()
    xs, ys = zip(*[built["datasets"]["test"][i] for i in range(len(built["datasets"]["test"]))])
    with torch.no_grad():
        f, logits = model(torch.stack(xs))
    return f.double(), logits.double(), torch.as_tensor(ys), model.classifier.weight.detach().double()


def test_reported_test_metrics_equal_the_brute_force_of_best_pt(finished):
    """top1, mistake severity, HierDist@k and their CRM versions of results.json, from best.pt's logits."""
    cfg, res, out = finished
    h = Hierarchy.from_edges(Path(cfg.hierarchy))
    d = brute_tree_distances(h, "height")
    _, logits, y, _ = outputs_of_best(cfg, out)
    y = y.numpy()
    p = torch.softmax(logits, 1).numpy()
    for part, scores in (("test", logits.numpy()), ("test_crm", -(p @ d.T))):
        order = np.argsort(-scores, axis=1, kind="stable")
        dk = d[y[:, None], order]
        wrong = order[:, 0] != y
        got = res[part]
        assert got["top1"] == pytest.approx(100.0 * (~wrong).mean(), abs=1e-9), part
        assert got["mistake_severity"] == pytest.approx(dk[wrong, 0].mean() if wrong.any() else 0.0, rel=1e-9), part
        for k in (1, 2, 8):
            assert got[f"hierdist@{k}"] == pytest.approx(dk[:, :k].mean(axis=1).mean(), rel=1e-9), (part, k)
    assert 0 < res["test"]["top1"] < 100  # the figures above are not degenerate


def test_reported_neural_collapse_and_frame_error_equal_the_brute_force(finished):
    """angular collapse (mean, population std over class-mean pairs of |cos - S|), self-duality, NC1 and the
    frame's Gram error, from best.pt's features and classifier and S from the tree."""
    cfg, res, out = finished
    assert cfg.gamma == GAMMA
    h = Hierarchy.from_edges(Path(cfg.hierarchy))
    S, s = brute_similarity(brute_tree_distances(h, "height"), GAMMA)
    feats, _, y, W = outputs_of_best(cfg, out)
    classes = torch.unique(y)
    mu = torch.stack([feats[y == c].mean(0) for c in classes])  # [C, d]
    mu_g = feats.mean(0)
    unit = mu / mu.norm(dim=1, keepdim=True)
    C = len(classes)
    iu = np.triu_indices(C, 1)
    gap = np.abs((unit @ unit.T).numpy() - S[np.ix_(classes.numpy(), classes.numpy())])[iu]
    M = mu - mu_g
    Wc = W[classes]
    within = np.mean([float(((feats[i] - mu[(classes == y[i]).nonzero()[0, 0]]) ** 2).sum()) for i in range(len(y))])
    between = float((M ** 2).sum(1).mean())
    nc = res["neural_collapse"]
    assert nc["angular_collapse_avg"] == pytest.approx(gap.mean(), rel=1e-6)
    assert nc["angular_collapse_std"] == pytest.approx(gap.std(), rel=1e-5)
    assert nc["self_duality"] == pytest.approx(float((Wc / Wc.norm() - M / M.norm()).norm()), rel=1e-6)
    assert nc["nc1"] == pytest.approx(within / between, rel=1e-6)
    assert res["frame"]["s_min"] == pytest.approx(s, abs=1e-12)
    assert res["frame"]["convention"] == "height"
    assert res["frame"]["gram_error"] == pytest.approx(float(np.abs((W @ W.T).numpy() - S).max()), abs=1e-6)
    assert math.isfinite(nc["angular_collapse_avg"]) and nc["angular_collapse_avg"] > 0


def test_evaluating_best_pt_again_reports_what_the_run_did(finished):
    """evaluate_checkpoint rebuilds the run from best.pt's saved config (the height convention included) and
    reports the figures checked against the brute force above."""
    cfg, res, out = finished
    ev = evaluate_checkpoint(out / "best.pt", device="cpu")
    assert ev["metrics"] == pytest.approx(res["test"], rel=1e-9, abs=1e-12)
    assert ev["crm"] == pytest.approx(res["test_crm"], rel=1e-9, abs=1e-12)
    assert ev["neural_collapse"] == pytest.approx(res["neural_collapse"], rel=1e-9, abs=1e-12)
