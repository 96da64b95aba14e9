"""Tests for haframe_ext.train: a tiny run, checkpoints, exact resume, corrupted checkpoints, NaN stop,
multi-seed summaries, checkpoint evaluation, torchrun, and the demo's main effect."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import haframe_ext.train as T
from haframe_ext.train import (CheckpointError, TrainConfig, TrainingDivergedError, evaluate_checkpoint,
                               load_checkpoint, run_seeds, train)

TOY_EDGES = "".join(f"{p}\t{c}\n" for p, c in [
    ("root", "A"), ("root", "B"), ("A", "A1"), ("A", "A2"), ("B", "B1"), ("B", "B2"),
    ("A1", "c0"), ("A1", "c1"), ("A2", "c2"), ("A2", "c3"), ("B1", "c4"), ("B1", "c5"), ("B2", "c6"), ("B2", "c7")])


@pytest.fixture
def toy_tree(tmp_path):
    p = tmp_path / "toy.tsv"
    p.write_text(TOY_EDGES)
    return str(p)


def tiny(tmp_path, toy_tree, **kw):
    base = dict(out=str(tmp_path / "run"), method="haframe", dataset="synthetic", hierarchy=toy_tree,
                backbone="mlp", hidden=16, input_dim=8, n_per_class=12, eval_per_class=6, difficulty=1.0,
                epochs=2, batch_size=16, eval_batch_size=64, lr=0.05, progress=False, tensorboard=False,
                eval_ks=(1, 2, 5))
    base.update(kw)
    return TrainConfig.from_dict(base)


def states_equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def tensor_data_offset(path):
    """File offset of a byte inside the largest tensor record of a torch.save zip file."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.compress_size)
    raw = Path(path).read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len + info.compress_size // 2


# ----------------------------------------------------------------------------- a tiny run
def test_one_epoch_writes_checkpoints_logs_and_results(tmp_path, toy_tree):
    res = train(tiny(tmp_path, toy_tree, epochs=1))
    out = tmp_path / "run"
    for name in ("last.pt", "best.pt", "metrics.jsonl", "results.json", "config.json"):
        assert (out / name).exists(), name
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temp files left
    ck = torch.load(out / "last.pt", weights_only=True)  # plain tensors and values only
    assert ck["epoch"] == 1 and ck["format"] == "haframe_ext.checkpoint"
    assert {"model", "optimizer", "scheduler", "loss", "rng", "best", "config"} <= set(ck)
    assert "classifier.weight" in ck["model"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    assert rec["epoch"] == 1 and "train_loss" in rec and "top1" in rec["val"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["test"] == pytest.approx(res["test"])
    assert {"top1", "mistake_severity", "hierdist@1", "hierdist@5"} <= set(res["test"])
    assert {"top1", "hierdist@5"} <= set(res["test_crm"])
    assert set(res["neural_collapse"]) >= {"angular_collapse_avg", "self_duality"}
    assert res["best_epoch"] == 1


@pytest.mark.parametrize("method", ["cross-entropy", "etf", "haframe-ce"])
def test_other_methods_train(tmp_path, toy_tree, method):
    res = train(tiny(tmp_path, toy_tree, method=method, epochs=1))
    assert 0.0 <= res["test"]["top1"] <= 100.0
    assert (res["neural_collapse"] is None) == (method == "cross-entropy")


def test_schedule_and_backbone_lr_scale(tmp_path, toy_tree):
    cfg = tiny(tmp_path, toy_tree, alpha_schedule="linear-increase", backbone_lr_scale=0.1, epochs=2)
    train(cfg)
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["alpha"] for r in recs] == pytest.approx([0.0, 0.2])
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    groups = {g["name"]: g for g in ck["optimizer"]["param_groups"]}
    assert groups["backbone"]["lr"] == pytest.approx(0.1 * groups["head"]["lr"])


# ----------------------------------------------------------------------------- resume
def test_resume_is_bit_exact(tmp_path, toy_tree):
    full = train(tiny(tmp_path / "a", toy_tree, epochs=3))
    part = train(tiny(tmp_path / "b", toy_tree, epochs=3, stop_after_epochs=1))
    assert part == {"stopped_after_epoch": 1, "finished": False, "out": str(tmp_path / "b" / "run")}
    assert load_checkpoint(tmp_path / "b" / "run" / "last.pt")["epoch"] == 1
    part2 = train(tiny(tmp_path / "b", toy_tree, epochs=3, stop_after_epochs=1, resume=True))
    assert part2["stopped_after_epoch"] == 2 and (tmp_path / "b" / "run" / "prev.pt").exists()
    resumed = train(tiny(tmp_path / "b", toy_tree, epochs=3, resume=True))
    a = load_checkpoint(tmp_path / "a" / "run" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "run" / "last.pt")
    assert states_equal(a["model"], b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert all(torch.equal(a["optimizer"]["state"][k]["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
               for k in a["optimizer"]["state"])
    assert full["test"] == resumed["test"] and full["best_epoch"] == resumed["best_epoch"]


def test_resume_falls_back_to_prev_when_last_is_missing(tmp_path, toy_tree):
    train(tiny(tmp_path, toy_tree, epochs=3, stop_after_epochs=2))
    out = tmp_path / "run"
    os.replace(out / "last.pt", out / "gone.pt")  # as if killed between the two renames
    with pytest.warns(UserWarning, match="resuming from"):
        res = train(tiny(tmp_path, toy_tree, epochs=3, resume=True))
    assert res["epochs"] == 3 and load_checkpoint(out / "last.pt")["epoch"] == 3


def test_resume_refuses_a_different_configuration(tmp_path, toy_tree):
    train(tiny(tmp_path, toy_tree, epochs=2, stop_after_epochs=1))
    with pytest.raises(CheckpointError, match="different configuration.*method"):
        train(tiny(tmp_path, toy_tree, epochs=2, method="etf", resume=True))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_checkpoint_is_reported(tmp_path, toy_tree, damage):
    train(tiny(tmp_path, toy_tree, epochs=3, stop_after_epochs=2))
    last = tmp_path / "run" / "last.pt"
    data = bytearray(last.read_bytes())
    if damage == "flip":
        data[tensor_data_offset(last)] ^= 0xFF  # a weight's bytes: torch.load alone would not notice
    else:
        data = data[: len(data) // 2]
    last.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as exc:
        train(tiny(tmp_path, toy_tree, epochs=3, resume=True))
    msg = str(exc.value)
    assert str(last) in msg and "prev.pt" in msg and ("corrupted" in msg)
    # the previous checkpoint is intact and resuming from it works
    res = train(tiny(tmp_path, toy_tree, epochs=3, resume_from=str(tmp_path / "run" / "prev.pt")))
    assert res["epochs"] == 3


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a haframe_ext checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


# ----------------------------------------------------------------------------- NaN stop
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, toy_tree, monkeypatch):
    calls = {"n": 0}
    real = T._compute_loss

    def poisoned(criterion, features, logits, target):
        calls["n"] += 1
        loss = real(criterion, features, logits, target)
        return loss * float("nan") if calls["n"] > 7 else loss  # 6 steps per epoch: NaN in epoch 2

    monkeypatch.setattr(T, "_compute_loss", poisoned)
    cfg = tiny(tmp_path, toy_tree, epochs=3)
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at epoch 2.*last good checkpoint"):
        train(cfg)
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "results.json").exists()
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"diverged"' in log


# ----------------------------------------------------------------------------- evaluation, seeds
def test_evaluate_checkpoint_matches_training_results(tmp_path, toy_tree):
    res = train(tiny(tmp_path, toy_tree, epochs=2))
    ev = evaluate_checkpoint(tmp_path / "run" / "best.pt", device="cpu")
    assert ev["metrics"] == pytest.approx(res["test"])
    assert ev["crm"] == pytest.approx(res["test_crm"])


def test_run_seeds_summary(tmp_path, toy_tree):
    out = run_seeds(tiny(tmp_path, toy_tree, epochs=1), seeds=[0, 1], verbose=False)
    assert out["seeds"] == [0, 1] and len(out["runs"]) == 2
    s = out["summary"]["top1"]
    assert s["n"] == 2 and s["ci95"] >= 0
    assert "+/-" in out["table"]
    assert (tmp_path / "run" / "seed1" / "results.json").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["summary"]["top1"]["n"] == 2


def test_config_validation(tmp_path, toy_tree):
    with pytest.raises(ValueError, match="valid methods"):
        train(tiny(tmp_path, toy_tree, method="nope"))
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="not a builtin name"):
        train(tiny(tmp_path, toy_tree, hierarchy="no-such-tree"))
    with pytest.raises(ValueError, match="select_metric"):
        train(tiny(tmp_path, toy_tree, epochs=1, select_metric="f1"))


# ----------------------------------------------------------------------------- torchrun
@pytest.mark.parametrize("n", [100, 37, 5])
def test_global_batches_are_the_same_for_every_world_size(n):
    single = list(T.GlobalBatchSampler(n, per_rank=8, world=1, rank=0, seed=3, epoch=2))
    ranks = [list(T.GlobalBatchSampler(n, per_rank=4, world=2, rank=r, seed=3, epoch=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for i, batch in enumerate(single):
        assert ranks[0][i] + ranks[1][i] == batch
        assert abs(len(ranks[0][i]) - len(ranks[1][i])) <= 1
    seen = [j for b in single for j in b]
    assert len(seen) == len(set(seen))  # no sample repeated
    assert len(seen) >= n - 3  # only a last batch under 2 samples per process is dropped
    assert single != list(T.GlobalBatchSampler(n, 8, 1, 0, seed=3, epoch=3))  # reshuffled each epoch


def test_torchrun_two_processes_gloo(tmp_path, toy_tree):
    cfg = tiny(tmp_path, toy_tree, epochs=2)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    env = dict(os.environ, HAFRAME_DISABLE_NATIVE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "haframe_ext.cli", "train", "--config", str(tmp_path / "cfg.json"), "--no-progress"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=str(Path(T.__file__).parents[1]))
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["world_size"] == 2
    assert res["test"]["num_samples"] == 48  # every test sample counted exactly once across ranks
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2


# ----------------------------------------------------------------------------- the demo's main effect
def test_demo_main_effect(tmp_path):
    """haframe ranks hierarchy-aware (lower HierDist@5/@20) at the same top-1 as cross-entropy."""
    res = T.demo(tmp_path / "demo", epochs=30, seed=0, methods=("cross-entropy", "haframe"), plot=True,
                 verbose=False, n_per_class=30, eval_per_class=20, hidden=128)
    ce, hf = res["cross-entropy"], res["haframe"]
    assert 40.0 <= ce["top1"] <= 80.0
    assert abs(hf["top1"] - ce["top1"]) <= 3.0
    assert hf["hierdist@5"] < ce["hierdist@5"] - 0.2
    assert hf["hierdist@20"] < ce["hierdist@20"] - 0.3
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(saved) == {"cross-entropy", "haframe"}
    assert {"top1", "mistake_severity", "hierdist@1", "hierdist@5", "hierdist@20", "num_samples",
            "seconds"} <= set(saved["haframe"])
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000
