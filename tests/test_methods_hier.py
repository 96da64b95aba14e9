"""The baseline methods in the trainer: hxe, soft-labels and multi-level (haframe_ext/training/baselines.py, models.py,
config.py): their heads, losses, config fields, training runs and checkpoints."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from haframe_ext.training.baselines import HeadLoss, MultiLevelHead, MultiLevelLoss, level_targets
from haframe_ext.training.checkpoint import CheckpointError, load_checkpoint
from haframe_ext.cli import main
from haframe_ext.training.config import TrainConfig, build_from_config
from haframe_ext.ops.hier_losses import hxe_loss, soft_label_loss
from haframe_ext.hierarchy import Hierarchy
from haframe_ext.training.models import METHODS, build_loss, build_model
from haframe_ext.train import evaluate_checkpoint, train
from helpers import TOY_EDGES

NEW_METHODS = ("hxe", "soft-labels", "multi-level")


def _unbalanced() -> Hierarchy:
    """Classes at depths 1, 2 and 4: padding at every level, a chain above one class."""
    return Hierarchy.from_parents({"a": "r", "b": "r", "c": "b", "d": "b", "e": "r", "f": "e", "g": "f",
                                   "h": "g", "i": "g"})


TREES = {"cifar100": lambda: Hierarchy.builtin("cifar100"), "toy": lambda: Hierarchy.from_edges(
    __import__("io").StringIO(TOY_EDGES)), "unbalanced": _unbalanced, "random60": lambda: Hierarchy.random(60, seed=3)}


def _ancestor_at(h: Hierarchy, cls: str, level: int) -> str:
    """The brute-force node of a class at a depth level: its ancestor there, or itself when shallower."""
    path = [cls] + list(h.ancestors(cls))  # the class, then up to the root
    path = [n for n in path if h.depth(n) == level]
    return path[0] if path else cls


@pytest.mark.parametrize("tree", sorted(TREES))
def test_level_targets_follow_the_tree_with_padding(tree):
    h = TREES[tree]()
    levels = level_targets(h)
    assert len(levels) == h.max_depth
    np.testing.assert_array_equal(levels[-1], np.arange(h.num_classes))  # finest level: the labels themselves
    for lvl, t in enumerate(levels, start=1):
        nodes = [_ancestor_at(h, c, lvl) for c in h.classes]
        assert t.shape == (h.num_classes,) and t.min() == 0 and t.max() == len(set(nodes)) - 1
        # same index exactly where the brute-force node is the same
        same = np.equal.outer(t, t)
        want = np.array([[a == b for b in nodes] for a in nodes])
        np.testing.assert_array_equal(same, want)


def test_level_targets_refuse_a_distance_matrix():
    with pytest.raises(ValueError, match="need a tree"):
        level_targets(np.zeros((3, 3)))


@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("tree", ["toy", "unbalanced"])
def test_multilevel_loss_is_the_sum_of_per_level_cross_entropies(tree, B):
    h = TREES[tree]()
    torch.manual_seed(0)
    head = MultiLevelHead(5, h).double()
    feats = torch.randn(B, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, h.num_classes, (B,))
    loss = MultiLevelLoss(head)(feats, y)
    levels = level_targets(h)
    want = sum(F.cross_entropy(lin(feats), torch.from_numpy(t)[y]) for lin, t in zip(head.heads, levels))
    torch.testing.assert_close(loss.double(), want.double(), rtol=1e-6, atol=1e-6)
    loss.backward()
    assert feats.grad is not None and all(lin.weight.grad is not None for lin in head.heads)
    assert head(feats).shape == (B, h.num_classes)  # prediction: the finest head's K logits


def test_multilevel_heads_that_cannot_fit_are_refused_naming_the_size(monkeypatch):
    import haframe_ext.training.baselines as B

    monkeypatch.setattr(B, "available_memory", lambda: 10_000)
    h = TREES["toy"]()  # 2 + 4 + 8 nodes: 14 x (16 + 1) x 12 bytes = 2,856 fits; width 64 does not
    assert MultiLevelHead(16, h).num_classes == 8
    with pytest.raises(ValueError, match=r"over 14 nodes \(3 levels, padded\) at width 64 .* --feature-dim"):
        MultiLevelHead(64, h)


def test_multilevel_loss_refuses_out_of_range_labels():
    h = TREES["toy"]()
    loss = MultiLevelLoss(MultiLevelHead(4, h))
    with pytest.raises(ValueError, match="labels must be in"):
        loss(torch.randn(2, 4), torch.tensor([0, 8]))


@pytest.mark.parametrize("kind,alpha,normalize,beta", [("hxe", 0.1, True, 10.0), ("hxe", 0.3, False, 10.0),
                                                       ("soft-labels", 0.1, False, 4.0)])
@pytest.mark.parametrize("B", [1, 6])
def test_head_loss_equals_the_loss_of_the_heads_logits(kind, alpha, normalize, beta, B):
    h = TREES["unbalanced"]()
    torch.manual_seed(1)
    lin = nn.Linear(3, h.num_classes).double()
    feats = torch.randn(B, 3, dtype=torch.float64)
    y = torch.randint(0, h.num_classes, (B,))
    got = HeadLoss(lin, kind, h, alpha=alpha, normalize=normalize, beta=beta)(feats, y)
    logits = lin(feats)
    want = (hxe_loss(logits, y, h, alpha=alpha, normalize=normalize) if kind == "hxe"
            else soft_label_loss(logits, y, h, beta=beta))
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)
    got.backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None  # the classifier is trained


@pytest.mark.parametrize("tree", ["cifar100", "unbalanced"])
def test_the_trainers_hxe_at_alpha_zero_is_cross_entropy(tree):
    h = TREES[tree]()
    model = build_model("hxe", "mlp", h.num_classes, in_dim=4, hidden=8, depth=1, feature_dim=6).double()
    feats = torch.randn(5, 6, dtype=torch.float64)
    y = torch.arange(5) % h.num_classes
    got = build_loss("hxe", model, hierarchy=h, hxe_alpha=0.0)(feats, y)  # the trainer's default: unnormalised
    torch.testing.assert_close(got.double(), F.cross_entropy(model.classifier(feats), y), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_factory_builds_a_trainable_head_and_its_loss(method):
    assert method in METHODS
    h = TREES["toy"]()
    model = build_model(method, "mlp", h.num_classes, hierarchy=h, in_dim=4, hidden=8, depth=1, feature_dim=6)
    loss = build_loss(method, model, hierarchy=h)
    assert loss.reads_features and not model.fixed_frame
    model.eval()
    feats, logits = model(torch.randn(3, 4))
    assert feats.shape == (3, 6) and logits.shape == (3, h.num_classes)
    loss(feats, torch.tensor([0, 3, 7])).backward()
    assert all(p.grad is not None for p in model.classifier.parameters())


def test_hxe_with_only_a_distance_matrix_is_refused():
    h = TREES["toy"]()
    model = build_model("hxe", "mlp", 8, in_dim=4, hidden=8, depth=1)
    with pytest.raises(ValueError, match="tree"):
        build_loss("hxe", model, hierarchy=h.distances())(torch.randn(2, 512), torch.tensor([0, 1]))


@pytest.mark.parametrize("field,value,msg", [("hxe_alpha", -0.1, ">= 0"), ("hxe_alpha", float("nan"), "finite"),
                                             ("soft_beta", -1, ">= 0"), ("soft_beta", float("inf"), "finite"),
                                             ("soft_beta", "10", "a number")])
def test_config_fields_are_checked(field, value, msg):
    cfg = TrainConfig(**{field: value})
    with pytest.raises(ValueError, match=msg) as err:
        cfg.validate()
    assert f"--{field.replace('_', '-')}" in str(err.value)


@pytest.mark.parametrize("flag,value", [("--hxe-alpha", "-1"), ("--soft-beta", "nan")])
def test_cli_refuses_a_bad_value_in_one_line(tmp_path, capsys, flag, value):
    code = main(["train", "--method", "hxe", flag, value, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("haframe: error:") and flag in err
    assert not (tmp_path / "run").exists()


def _tiny(tmp_path, method, **kw):
    base = dict(out=str(tmp_path / method), method=method, dataset="synthetic", hierarchy="cifar100",
                backbone="mlp", hidden=16, depth=1, input_dim=8, n_per_class=3, eval_per_class=2, epochs=1,
                batch_size=32, eval_batch_size=256, feature_dim=16, lr=0.05, progress=False, tensorboard=False)
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.mark.parametrize("method,kw", [("hxe", dict(hxe_alpha=0.3)), ("soft-labels", dict(soft_beta=5.0)),
                                       ("multi-level", {}),
                                       ("hxe", dict(hierarchy="random:300", eval_samples=100, n_per_class=1)),
                                       ("soft-labels", dict(hierarchy="random:300", eval_samples=100, n_per_class=1))])
def test_a_run_trains_evaluates_with_crm_and_records_its_settings(tmp_path, method, kw):
    cfg = _tiny(tmp_path, method, **kw)
    res = train(cfg)
    assert res["method"] == method and np.isfinite(res["test"]["top1"]) and res["test_crm"]
    ck = load_checkpoint(tmp_path / method / "last.pt")
    for field in ("hxe_alpha", "hxe_normalize", "soft_beta"):
        assert ck["config"][field] == getattr(cfg, field)
    record = json.loads((tmp_path / method / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train_top1"] is None and np.isfinite(record["train_loss"])  # the step formed no logits
    again = evaluate_checkpoint(tmp_path / method / "best.pt")  # `haframe eval` rebuilds the head from the config
    assert again["metrics"]["top1"] == pytest.approx(res["test"]["top1"])


def test_resume_with_another_hxe_alpha_is_refused(tmp_path):
    cfg = _tiny(tmp_path, "hxe", epochs=2, stop_after_epochs=1)
    assert train(cfg)["finished"] is False
    with pytest.raises(CheckpointError, match="hxe_alpha"):
        train(_tiny(tmp_path, "hxe", epochs=2, hxe_alpha=0.5, resume=True))


def test_soft_labels_use_the_distance_matrix_given(tmp_path):
    h = Hierarchy.builtin("cifar100")
    np.save(tmp_path / "d.npy", h.distances())
    built = build_from_config(_tiny(tmp_path, "soft-labels", distances=str(tmp_path / "d.npy")))
    assert isinstance(built["criterion"].hierarchy, np.ndarray)
    built = build_from_config(_tiny(tmp_path, "hxe", distances=str(tmp_path / "d.npy")))
    assert isinstance(built["criterion"].hierarchy, Hierarchy)  # HXE takes the tree's ancestors either way


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hxe", "multi-level"])
def test_two_processes_train_the_head_as_one_process_does(tmp_path, method):
    """The head is used outside the DDP forward (the loss reads it): its gradients must still be all-reduced, so
    a 2-process full-batch run ends near the 1-process one; only the per-rank batch-norm statistics differ
    (test_distributed.py measured 0.03 for the whole model, and 0.26 for training on one rank's half of the data,
    which is what a head without all-reduced gradients would do)."""
    import os
    import subprocess
    import sys

    from _torchrun import run_torchrun

    (tmp_path / "toy.tsv").write_text(TOY_EDGES)
    cfg = dict(method=method, dataset="synthetic", hierarchy=str(tmp_path / "toy.tsv"), backbone="mlp", hidden=32,
               input_dim=8, n_per_class=40, eval_per_class=10, epochs=3, batch_size=320, lr=0.2, progress=False,
               tensorboard=False, eval_ks=[1, 2, 5], dist_timeout=60, feature_dim=16)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = ["-m", "haframe_ext.cli", "train", "--config", str(tmp_path / "cfg.json"), "--out"]
    single = subprocess.run([sys.executable, *args, str(tmp_path / "one")], capture_output=True, text=True, env=env,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = run_torchrun([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                        str(tmp_path / "two")], tmp_path / "two", env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one, two = (load_checkpoint(tmp_path / n / "last.pt")["model"] for n in ("one", "two"))
    head = [k for k in one if k.startswith("classifier.")]
    assert head
    rel = (sum(((one[k].double() - two[k].double()) ** 2).sum() for k in head).sqrt()
           / sum((one[k].double() ** 2).sum() for k in head).sqrt()).item()
    assert rel <= 0.1, f"relative distance of the trained heads {rel:.3f}"
