"""Tests for haframe_ext.train: a tiny run, checkpoints, exact resume, corrupted checkpoints, NaN stop,
multi-seed summaries, checkpoint evaluation, torchrun, and the demo's main effect; NaN loss and divergence through
the CLI, repeated seeds, the best epoch and the fixed-frame step (RELIABILITY.md sections 14 and 15)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import haframe_ext.training.loop as L
import haframe_ext.train as T
from _torchrun import run_torchrun
from helpers import HostileGlobal, assert_same_run, cli, start_fault, write_inputs
from helpers import toy_train_config as _round2_config
from haframe_ext.training.checkpoint import seal_checkpoint
from haframe_ext.cli.demo import demo
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
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["alpha"] for r in recs] == pytest.approx([0.0, 0.2])
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    groups = {g["name"]: g for g in ck["optimizer"]["param_groups"]}
    assert groups["backbone"]["lr"] == pytest.approx(0.1 * groups["head"]["lr"])


# ----------------------------------------------------------------------------- an earlier run in --out
def test_a_new_run_over_an_earlier_one_is_refused_and_loses_nothing(tmp_path, toy_tree):
    train(tiny(tmp_path, toy_tree, epochs=1))
    out = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"already holds a run \(last\.pt, best\.pt, metrics\.jsonl, "
                                         r"results\.json, config\.json\): pass --resume .* --overwrite"):
        train(tiny(tmp_path, toy_tree, epochs=2, lr=0.01))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_overwrite_starts_over_with_fresh_logs(tmp_path, toy_tree):
    pytest.importorskip("tensorboard")
    train(tiny(tmp_path, toy_tree, epochs=1, tensorboard=True))
    out = tmp_path / "run"
    old_events = sorted((out / "tb").glob("events.out.tfevents.*"))
    assert old_events
    res = train(tiny(tmp_path, toy_tree, epochs=2, overwrite=True, tensorboard=True))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "train_loss" in r] == [1, 2]  # the first run's epoch 1 is gone
    assert not any(p.exists() for p in old_events)
    assert json.loads((out / "results.json").read_text())["epochs"] == 2 == res["epochs"]
    assert load_checkpoint(out / "last.pt")["epoch"] == 2


def test_resume_of_a_finished_run_is_not_refused(tmp_path, toy_tree):
    train(tiny(tmp_path, toy_tree, epochs=1))
    res = train(tiny(tmp_path, toy_tree, epochs=1, resume=True))
    assert res["epochs"] == 1


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_resume_flags_never_start_over_a_finished_run(tmp_path, toy_tree):
    """Issue 22 item 1: --resume-from another folder's checkpoint into a folder holding a run, and --resume into a
    finished run whose last.pt and prev.pt are gone (with another method), are refused and change nothing; the
    resume of a checkpoint into a new folder still works."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny(tmp_path, toy_tree, epochs=1, out=str(a)))
    train(tiny(tmp_path, toy_tree, epochs=1, out=str(b)))
    before = _files(b)
    with pytest.raises(ValueError, match=r"b already holds a run .*--resume-from .* another folder.*--overwrite"):
        train(tiny(tmp_path, toy_tree, epochs=2, out=str(b), resume_from=str(a / "last.pt")))
    assert _files(b) == before
    (b / "last.pt").unlink()
    del before["last.pt"]
    with pytest.raises(ValueError, match=r"but no last\.pt or prev\.pt to resume from"):
        train(tiny(tmp_path, toy_tree, epochs=1, out=str(b), method="etf", resume=True))
    assert _files(b) == before
    res = train(tiny(tmp_path, toy_tree, epochs=2, out=str(tmp_path / "c"), resume_from=str(a / "last.pt")))
    assert res["epochs"] == 2 and load_checkpoint(tmp_path / "c" / "last.pt")["epoch"] == 2


def test_a_failed_run_never_removes_a_sibling_runs_folder(tmp_path, toy_tree, monkeypatch):
    """Issue 22 item 3: run a (into exp/a, exp new) fails on a bad hierarchy after run b claimed exp/b: exp and
    exp/b stay, exp/a goes."""
    exp = tmp_path / "exp"
    real_claim = T.claim_run_folder

    def sibling_claims_first(config, out, dctx):
        claim = real_claim(config, out, dctx)
        (exp / "b").mkdir()  # what a sibling run started at the same moment has made
        (exp / "b" / ".haframe.lock").write_text("another run")
        return claim

    monkeypatch.setattr(T, "claim_run_folder", sibling_claims_first)
    with pytest.raises(ValueError, match="no-such-tree"):
        train(tiny(tmp_path, toy_tree, out=str(exp / "a"), hierarchy="no-such-tree"))
    assert sorted(p.name for p in exp.iterdir()) == ["b"] and (exp / "b" / ".haframe.lock").exists()


def test_the_demo_never_replaces_a_training_run(tmp_path, toy_tree):
    """Issue 22 item 2: a training run in D/haframe or in D itself is refused by demo(D) before anything is
    written; a folder the demo wrote is the demo's to start over."""
    for run in (tmp_path / "d1" / "haframe", tmp_path / "d2"):
        train(tiny(tmp_path, toy_tree, epochs=1, out=str(run)))
        before = _files(run)
        with pytest.raises(ValueError, match="holds files the demo did not write"):
            demo(run.parent if run.name == "haframe" else run, epochs=1, methods=("haframe",), plot=False,
                 verbose=False)
        assert _files(run) == before
    d = tmp_path / "d3"
    for _ in range(2):
        demo(d, epochs=1, methods=("haframe",), plot=False, verbose=False, n_per_class=4, eval_per_class=2,
             hidden=16)
    assert (d / ".haframe-demo").exists() and json.loads((d / "results.json").read_text())["haframe"]


def test_seeds_stopped_after_an_epoch_say_so_and_resume_to_the_summary(tmp_path, toy_tree):
    """Issue 22 item 19: run_seeds with stop_after_epochs stopped every seed and then failed in the summary ("needs
    at least one run"); it now returns finished=False, and a resume finishes the runs and writes the summary."""
    cfg = tiny(tmp_path, toy_tree, epochs=2, stop_after_epochs=1)
    res = run_seeds(cfg, [0, 1], verbose=False)
    assert res["finished"] is False and res["stopped_after_epoch"] == 1
    assert not (tmp_path / "run" / "summary.json").exists()
    res = run_seeds(tiny(tmp_path, toy_tree, epochs=2, resume=True), [0, 1], verbose=False)
    assert len(res["runs"]) == 2 and (tmp_path / "run" / "summary.json").exists()


# ----------------------------------------------------------------------------- a user error and its --out folder
@pytest.mark.parametrize("bad", [{"hierarchy": "no-such-tree"}, {"dataset": "cifar100", "data_root": "nowhere"}])
def test_a_user_error_removes_the_out_folder_it_created(tmp_path, toy_tree, bad):
    """Issue 12: a run refused after claiming --out (unknown hierarchy, missing data) leaves no folder behind,
    down to the parents it created; a folder that existed stays, with what was in it."""
    new = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(ValueError):
        train(tiny(tmp_path, toy_tree, out=str(new), **bad))
    assert not (tmp_path / "new").exists()
    found = tmp_path / "found"
    found.mkdir()
    (found / "notes.txt").write_text("mine")
    with pytest.raises(ValueError):
        train(tiny(tmp_path, toy_tree, out=str(found), **bad))
    assert [p.name for p in found.iterdir()] == ["notes.txt"]  # the lock file is gone too
    with pytest.raises(ValueError):
        run_seeds(tiny(tmp_path, toy_tree, out=str(new), **bad), [0, 1], verbose=False)
    assert not (tmp_path / "new").exists()


def test_a_user_error_after_a_checkpoint_keeps_the_folder(tmp_path, toy_tree, monkeypatch):
    """A folder this run created is kept once it holds a checkpoint (the final test's data fails here)."""
    real = L.evaluate

    def failing_test(*args, **kwargs):
        if kwargs.get("collect"):
            raise ValueError("test split unreadable")
        return real(*args, **kwargs)

    monkeypatch.setattr(L, "evaluate", failing_test)
    with pytest.raises(ValueError, match="test split unreadable"):
        train(tiny(tmp_path, toy_tree, out=str(tmp_path / "new" / "run"), epochs=1))
    assert load_checkpoint(tmp_path / "new" / "run" / "last.pt")["epoch"] == 1


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
    real = L.compute_loss

    def poisoned(criterion, features, logits, target):
        calls["n"] += 1
        loss = real(criterion, features, logits, target)
        return loss * float("nan") if calls["n"] > 7 else loss  # 6 steps per epoch: NaN in epoch 2

    monkeypatch.setattr(L, "compute_loss", poisoned)
    cfg = tiny(tmp_path, toy_tree, epochs=3)
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at epoch 2.*last good checkpoint"):
        train(cfg)
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "results.json").exists()
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"diverged"' in log


def _nan_gradient_hook(monkeypatch, at_call):
    """Make the loss of call ``at_call`` finite with a NaN gradient (d sqrt(x)/dx at 0 is Inf, times 0)."""
    calls = {"n": 0}
    real = L.compute_loss

    def poisoned(criterion, features, logits, target):
        calls["n"] += 1
        loss = real(criterion, features, logits, target)
        if calls["n"] == at_call:
            loss = loss + 0.0 * torch.sqrt((features * 0).sum())
        return loss

    monkeypatch.setattr(L, "compute_loss", poisoned)


def test_nan_gradient_stops_before_the_update(tmp_path, toy_tree, monkeypatch):
    """Bug 9: a finite loss with a NaN gradient is caught after backward, before optimizer.step()."""
    _nan_gradient_hook(monkeypatch, at_call=6 + 3)  # epoch 2, step 3
    with pytest.raises(TrainingDivergedError, match=r"the gradient norm became nan \(with a finite loss, [0-9.]+\) "
                                                    r"at epoch 2, step 3: training stopped; the last good checkpoint "
                                                    r".*last\.pt \(epoch 1\) is kept") as info:
        train(tiny(tmp_path, toy_tree, epochs=3))
    assert "weights_only" not in str(info.value)
    out = tmp_path / "run"
    for name in ("last.pt", "best.pt"):
        ck = torch.load(out / name, weights_only=True)
        assert ck["epoch"] == 1
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point()), name
    assert not (out / "prev.pt").exists() and not (out / "results.json").exists()
    assert '"diverged"' in (out / "metrics.jsonl").read_text()


def test_a_non_finite_model_is_never_checkpointed(tmp_path, toy_tree, monkeypatch):
    """Second line of defence: with the gradient check disabled, NaN weights at the end of epoch 2 are not
    written; last.pt stays the finite epoch-1 checkpoint (and prev.pt is not rotated)."""
    real_loss = L.compute_loss
    monkeypatch.setattr(L, "grad_norm", lambda model: torch.zeros(()))
    _nan_gradient_hook(monkeypatch, at_call=2 * 6)  # the last step of epoch 2
    with pytest.raises(TrainingDivergedError, match=r"model state became non-finite \(NaN or Inf\) during epoch 2 "
                                                    r"\(.+\): training stopped without writing its checkpoint; "
                                                    r"the last good checkpoint .*last\.pt \(epoch 1\) is kept"):
        train(tiny(tmp_path, toy_tree, epochs=3))
    out = tmp_path / "run"
    assert load_checkpoint(out / "last.pt")["epoch"] == 1 and not (out / "prev.pt").exists()
    assert load_checkpoint(out / "best.pt", kind="best")["epoch"] == 1
    # in epoch 1: nothing is written, and the message says so
    monkeypatch.setattr(L, "compute_loss", real_loss)
    _nan_gradient_hook(monkeypatch, at_call=6)
    with pytest.raises(TrainingDivergedError, match="during epoch 1 .*no checkpoint had been written yet"):
        train(tiny(tmp_path, toy_tree, epochs=3, out=str(tmp_path / "run1")))
    assert not any((tmp_path / "run1").glob("*.pt"))


def test_with_a_grad_scaler_a_nan_gradient_is_left_to_the_scaler(tmp_path, toy_tree, monkeypatch):
    """With a GradScaler (fp16 AMP on CUDA; a CPU scaler stands in here) Inf/NaN gradients are expected: the
    scaler skips that step and lowers its scale, so the run goes on and every checkpoint stays finite."""
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler not available")
    try:
        torch.amp.GradScaler("cpu")
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"no CPU GradScaler: {exc}")
    monkeypatch.setattr(L, "autocast_factory", lambda config, device: (None, torch.amp.GradScaler("cpu")))
    _nan_gradient_hook(monkeypatch, at_call=6 + 3)  # epoch 2, step 3
    res = train(tiny(tmp_path, toy_tree, epochs=2))
    assert res["epochs"] == 2
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert ck["scaler"]["scale"] < 65536.0  # the scaler saw the NaN gradient and backed off


def test_resume_refuses_a_checkpoint_with_non_finite_weights(tmp_path, toy_tree):
    train(tiny(tmp_path, toy_tree, epochs=2, stop_after_epochs=1))
    last = tmp_path / "run" / "last.pt"
    ck = torch.load(last, weights_only=True)
    ck.pop("digest")
    k = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][k] = ck["model"][k].clone().fill_(float("nan"))
    torch.save(seal_checkpoint(ck), last)  # a well-sealed file (e.g. written by an older version) holding NaN weights
    with pytest.raises(CheckpointError, match=f"holds non-finite weights \\({k} has NaN or Inf\\)"):
        train(tiny(tmp_path, toy_tree, epochs=2, resume=True))


# ----------------------------------------------------------------------------- threads, temp files, messages
def test_thread_count_is_recorded_and_a_different_count_on_resume_warns(tmp_path, toy_tree):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train(tiny(tmp_path, toy_tree, epochs=3, stop_after_epochs=1))
        assert load_checkpoint(tmp_path / "run" / "last.pt")["threads"] == 1
        torch.set_num_threads(2)
        with pytest.warns(UserWarning, match=r"written with 1 torch thread\(s\), this process uses 2.*not "
                                             r"bit-for-bit.*OMP_NUM_THREADS=1"):
            train(tiny(tmp_path, toy_tree, epochs=3, stop_after_epochs=1, resume=True))
        assert load_checkpoint(tmp_path / "run" / "last.pt")["threads"] == 2
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*torch thread")
            train(tiny(tmp_path, toy_tree, epochs=3, resume=True))  # same count: no warning
    finally:
        torch.set_num_threads(threads)


def test_stale_temp_files_of_killed_writes_are_removed(tmp_path, toy_tree):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = os.getppid()
    stale = [out / f".last.pt.tmp-{dead.pid}", out / f".best.pt.tmp-{dead.pid}"]
    kept = [out / f".last.pt.tmp-{alive}",  # a process that still runs (maybe writing)
            out / ".last.pt.tmp-abc", out / "last.pt.tmp-123", out / f".mine.pt.tmp-{dead.pid}", out / "notes.txt"]
    for p in stale + kept:
        p.write_bytes(b"partial")
    train(tiny(tmp_path, toy_tree, epochs=1))
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)


def test_bad_backbone_and_eval_ks_are_config_errors(tmp_path, toy_tree):
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet9000'; choose one of mlp, small-cnn, wrn28, "
                                         r"resnet50"):
        train(tiny(tmp_path, toy_tree, backbone="resnet9000"))
    for ks in [(0,), (1, -5)]:
        with pytest.raises(ValueError, match=r"eval_ks must be >= 1"):
            train(tiny(tmp_path, toy_tree, eval_ks=ks))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="is an existing file, not a folder"):
        train(tiny(tmp_path, toy_tree, out=str(tmp_path / "a_file")))
    assert not (tmp_path / "run").exists()


def test_unreadable_and_unsafe_checkpoints_are_told_apart_without_torch_advice(tmp_path):
    torch.save({"x": HostileGlobal("true")}, tmp_path / "evil.pt")
    (tmp_path / "text.pt").write_text("hello")
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 3)
    torch.save({"x": torch.zeros(3)}, tmp_path / "good.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"is not a safe checkpoint \(refused by weights_only loading: it asks "
                                              r"for the global posix\.system") as info:
        load_checkpoint(tmp_path / "evil.pt")
    msgs = [str(info.value)]
    for name in ("text.pt", "random.pt", "trunc.pt"):
        with pytest.raises(CheckpointError, match=f"{name} is corrupted or truncated") as info:
            load_checkpoint(tmp_path / name)
        msgs.append(str(info.value))
    for m in msgs:
        assert "weights_only` set to `False`" not in m and "weights_only=False" not in m, m
        assert "will likely succeed" not in m and "\n" not in m, m


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
    p = run_torchrun(cmd, tmp_path / "run", env=env, timeout=240, cwd=str(Path(T.__file__).parents[1]))
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["world_size"] == 2
    assert res["test"]["num_samples"] == 48  # every test sample counted exactly once across ranks
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2


# ----------------------------------------------------------------------------- the demo's main effect
def test_demo_main_effect(tmp_path):
    """haframe ranks hierarchy-aware (lower HierDist@5/@20) at the same top-1 as cross-entropy."""
    res = demo(tmp_path / "demo", epochs=30, seed=0, methods=("cross-entropy", "haframe"), plot=True,
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


# ----------------------------------------------------------------------------- TensorBoard
def test_tensorboard_scalars_match_metrics_log(tmp_path, toy_tree):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny(tmp_path, toy_tree, epochs=2, tensorboard=True))
    out = tmp_path / "run"
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "epoch" in r and isinstance(r.get("train_loss"), float)]
    assert epochs, records
    tags = acc.Tags()["scalars"]
    assert {"train_loss", "lr", "val/top1", "val/hierdist@5"} <= set(tags), tags
    got = {e.step: e.value for e in acc.Scalars("train_loss")}
    for r in epochs:
        assert got[r["epoch"]] == pytest.approx(r["train_loss"], rel=1e-6)


def test_missing_tensorboard_warns_with_the_fix(tmp_path, toy_tree, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.warns(RuntimeWarning, match="pip install tensorboard"):
        train(tiny(tmp_path, toy_tree, epochs=1, tensorboard=True))
    assert (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "tb").exists()


# ----------------------------------------------------------------------------- many classes, conventions
def test_large_k_run_forms_no_k_by_k_matrix(tmp_path, monkeypatch):
    from haframe_ext.hierarchy import Hierarchy

    def refuse(*a, **k):
        raise AssertionError("a K x K distance matrix was formed")

    monkeypatch.setattr(Hierarchy, "distances", refuse)
    monkeypatch.setattr(Hierarchy, "tree_distances", refuse)
    K = 5000
    cfg = TrainConfig.from_dict(dict(
        out=str(tmp_path / "big"), hierarchy=f"random:{K}", feature_dim=32, n_per_class=1, eval_samples=200,
        input_dim=16, hidden=32, epochs=1, batch_size=256, eval_batch_size=256, progress=False,
        tensorboard=False))
    res = train(cfg)
    for part in ("test", "test_crm"):
        assert {"top1", "mistake_severity", "hierdist@1", "hierdist@5", "hierdist@20"} <= set(res[part])
    assert res["frame"]["approximation"]["method"] == "aligned projection" and res["frame"]["convention"] == "published"
    assert res["neural_collapse"]["angular_collapse_avg"] >= 0
    ck = load_checkpoint(tmp_path / "big" / "last.pt")
    sizes = [v.numel() for part in ("model", "loss") for v in ck[part].values() if isinstance(v, torch.Tensor)]
    assert max(sizes) < K * K / 100  # the frame (K x 32) once, never K x K


UNBALANCED = "root\tA\nroot\tB\nA\ta1\nA\ta2\nB\tb1\nB\tB2\nB2\tb2\nB2\tb3\n"  # leaves at depths 2 and 3


def test_distance_convention_is_recorded_and_old_checkpoints_keep_theirs(tmp_path):

    tree = tmp_path / "u.tsv"
    tree.write_text(UNBALANCED)
    cfg = dict(out=str(tmp_path / "h"), hierarchy=str(tree), distance_convention="height", backbone="mlp",
               hidden=8, input_dim=4, n_per_class=6, epochs=2, stop_after_epochs=1, batch_size=8, progress=False,
               tensorboard=False, eval_ks=(1, 2))
    train(TrainConfig.from_dict(cfg))
    last = tmp_path / "h" / "last.pt"
    ck = load_checkpoint(last)
    assert ck["config"]["distance_convention"] == "height"
    with pytest.raises(CheckpointError, match="trained with 'height' distances.*--distance-convention height"):
        train(TrainConfig.from_dict(dict(cfg, distance_convention="published", resume=True)))
    # a checkpoint from before conventions were named: its (height) distances are kept
    legacy = {k: v for k, v in ck.items() if k != "digest"}
    legacy["config"] = {k: v for k, v in ck["config"].items() if k != "distance_convention"}
    torch.save(seal_checkpoint(legacy), last)
    with pytest.raises(CheckpointError, match="trained with 'height' distances"):
        train(TrainConfig.from_dict(dict(cfg, distance_convention="published", resume=True)))
    assert T.checkpoint_convention(legacy["config"]) == "height"
    assert T.checkpoint_convention({"hierarchy": "tiered_imagenet_h"}) == "published"  # was the published matrix
    res = train(TrainConfig.from_dict(dict(cfg, resume=True, stop_after_epochs=None)))
    assert res["config"]["distance_convention"] == "height" and res["frame"]["convention"] == "height"



# ------------------------------------------------------------------ NaN loss and divergence (RELIABILITY.md section 15)
def test_nan_loss_in_epoch_2_stops_with_one_clear_line_and_keeps_the_good_checkpoint(tmp_path, baseline):
    cfg = write_inputs(tmp_path)
    out = tmp_path / "run"
    proc = start_fault(tmp_path, "nan_epoch2", out, cfg)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("haframe: error: loss became nan at epoch 2, step 1: training stopped;")
    assert f"the last good checkpoint {out / 'last.pt'} (epoch 1) is kept" in lines[0]
    assert "--grad-clip" in lines[0]
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and not (out / "prev.pt").exists() and not (out / "results.json").exists()
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert any(json.loads(line).get("event") == "diverged" for line in (out / "metrics.jsonl").read_text().splitlines())
    # the kept checkpoint really is the good one: resuming from it reproduces the uninterrupted run
    r = cli("train", "--config", cfg, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert_same_run(out, baseline)


def test_natural_divergence_in_epoch_1_says_no_checkpoint_was_written(tmp_path):
    cfg = write_inputs(tmp_path)
    r = cli("train", "--config", cfg, "--out", tmp_path / "run", "--lr", "1e30")
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "loss became" in lines[0] and "at epoch 1" in lines[0] and "no checkpoint had been written yet" in lines[0]
    assert not (tmp_path / "run" / "last.pt").exists()


def test_nan_gradient_at_the_end_of_an_epoch_never_reaches_a_checkpoint(tmp_path):
    cfg = write_inputs(tmp_path)
    out = tmp_path / "run"
    proc = start_fault(tmp_path, "nan_grad_end_of_epoch2", out, cfg)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    for name in ("last.pt", "prev.pt", "best.pt"):
        if (out / name).exists():
            ck = torch.load(out / name, weights_only=True)
            assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point()), name



# ------------------------------------------------- seeds, the best epoch, the training step (RELIABILITY.md section 14)
def test_duplicate_seeds_are_refused_before_any_training(tmp_path):
    """Issue 14 item 6: --seeds 0 0 would count one run twice (with --resume) or fail after the first trained."""
    cfg = _round2_config(tmp_path, epochs=1)
    for resume in (False, True):
        with pytest.raises(ValueError, match=r"seed\(s\) 0 listed more than once"):
            T.run_seeds(dataclasses_replace(cfg, resume=resume), [0, 1, 0], verbose=False)
    assert not (Path(cfg.out) / "seed0").exists()


def test_a_later_seed_folder_holding_a_run_is_refused_before_the_first_seed_trains(tmp_path):
    """The class of item 6: every seed's folder is checked up front, so no finished seed run is lost to it."""
    cfg = _round2_config(tmp_path, epochs=1)
    train(dataclasses_replace(cfg, seed=1, out=str(Path(cfg.out) / "seed1")))
    with pytest.raises(ValueError, match=r"seed1 already holds a run"):
        T.run_seeds(cfg, [0, 1], verbose=False)
    assert not (Path(cfg.out) / "seed0" / "last.pt").exists()


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


@pytest.mark.parametrize("metric,values,best", [("top1", [20.0, 60.0, 40.0], 2),
                                                 ("mistake_severity", [1.5, 0.5, 0.9], 2),
                                                 ("top1", [50.0, 10.0, 30.0], 1)])
@pytest.mark.parametrize("resume", [False, True])
def test_best_epoch_is_the_validation_peak_not_the_last_epoch(tmp_path, monkeypatch, metric, values, best, resume):
    """The mutation-test gap: the validation metric peaks before the last epoch (scripted, so the test does not
    depend on training dynamics); best_epoch, the epoch and weights in best.pt and the best value agree with
    metrics.jsonl; with resume, across a stop after epoch 2."""
    real = L.evaluate
    calls = {"val": 0}

    def scripted(*args, **kwargs):
        res = real(*args, **kwargs)
        if not kwargs.get("collect"):  # the per-epoch validation (the test evaluation collects features)
            res = dict(res, **{metric: values[calls["val"]]})
            calls["val"] += 1
        return res

    monkeypatch.setattr(L, "evaluate", scripted)
    cfg = _round2_config(tmp_path, select_metric=metric, stop_after_epochs=2 if resume else None)
    res = train(cfg)
    if resume:
        res = train(dataclasses_replace(cfg, stop_after_epochs=None, resume=True))
    out = Path(cfg.out)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    log = [r for r in log if "train_loss" in r]
    assert [r["val"][metric] for r in log] == values
    pick = max if metric.startswith("top") else min
    peak = pick(log, key=lambda r: r["val"][metric])
    assert peak["epoch"] == best
    so_far = [max(range(1, e + 1), key=lambda i: values[i - 1] * (1 if pick is max else -1)) for e in (1, 2, 3)]
    assert [r["best_epoch"] for r in log] == so_far
    assert res["best_epoch"] == best and res["best_val"] == {"metric": metric, "value": values[best - 1]}
    saved = json.loads((out / "results.json").read_text())
    assert saved["best_epoch"] == best and saved["best_val"]["value"] == values[best - 1]
    bk = load_checkpoint(out / "best.pt", kind="best")
    assert bk["epoch"] == best and bk["val"][metric] == values[best - 1]
    last = load_checkpoint(out / "last.pt")
    assert last["best"] == {"metric": metric, "value": values[best - 1], "epoch": best}
    # best.pt holds the weights of the best epoch: epoch 2's are also in prev.pt (last.pt is epoch 3)
    same_as = {2: out / "prev.pt", 3: out / "last.pt"}.get(best)
    if same_as is not None:
        ref = load_checkpoint(same_as)
        assert all(torch.equal(bk["model"][k], ref["model"][k]) for k in bk["model"])
    else:
        assert not all(torch.equal(bk["model"][k], last["model"][k]) for k in bk["model"])


@pytest.mark.parametrize("method", ["haframe", "etf", "haframe-ce", "cross-entropy"])
def test_fixed_frame_training_steps_form_logits_only_in_the_fused_op(tmp_path, monkeypatch, method):
    """Issue 11 item 5: the training step of a fixed-frame method never calls the classifier (the fused loss forms
    the B x K logits once); train_top1 is then null, and a percent (like val top1) for a learned classifier."""
    from haframe_ext.nn import FixedFrameClassifier

    with_grad = {"n": 0}
    real = FixedFrameClassifier.forward

    def counting(self, h):
        with_grad["n"] += torch.is_grad_enabled()
        return real(self, h)

    monkeypatch.setattr(FixedFrameClassifier, "forward", counting)
    cfg = _round2_config(tmp_path, method=method, epochs=1)
    train(cfg)
    assert with_grad["n"] == 0
    rec = next(json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines())
    if method == "cross-entropy":
        assert 0.0 <= rec["train_top1"] <= 100.0 and rec["train_top1"] > 1.0  # a percent, not a fraction
    else:
        assert rec["train_top1"] is None

