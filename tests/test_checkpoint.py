"""Tests for haframe_ext.training.checkpoint and haframe_ext.files: corrupted and malicious checkpoints, weights_only
loading, the claim on the output folder, and a checkpoint that does not fit the model (RELIABILITY.md sections 14,
16 and 17).

The runs come from conftest.py (``two_epochs``: a tiny run stopped after 2 of 3 epochs, copied per test) and
helpers.py (the tiny run's config and the CLI runner).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import haframe_ext.train as T
from haframe_ext.files import FolderInUseError
from haframe_ext.training.checkpoint import CHECKPOINT_FORMAT, seal_checkpoint
from haframe_ext.training.runlog import RUN_FILES
from haframe_ext.train import CheckpointError, TrainConfig, load_checkpoint, train
from helpers import REPO, env, sha, write_inputs
from helpers import damage_checkpoint as _damage
from helpers import hostile_touch as _Evil
from helpers import toy_train_config as _round2_config


# ----------------------------------------------------------------------------- corrupted checkpoints
CORRUPTIONS = ["truncated_to_1_byte", "empty", "truncated_tail", "random_bytes", "text_file", "zeroed_block",
               "edited_epoch", "edited_weight", "foreign_torch_file", "missing_keys"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupted_last_checkpoint_is_reported_and_prev_is_kept(two_epochs, kind):
    cfg, out = two_epochs
    prev_hash = sha(out / "prev.pt")
    best_hash = sha(out / "best.pt")
    _damage(kind, out / "last.pt", out)
    with pytest.raises(CheckpointError) as info:
        train(TrainConfig.from_dict(dict(cfg.to_dict(), stop_after_epochs=None, resume=True)))
    msg = str(info.value)
    assert str(out / "last.pt") in msg
    assert any(w in msg for w in ("corrupted", "truncated", "not a haframe_ext checkpoint", "incomplete")), msg
    if kind != "missing_keys":
        assert f"resume_from='{out / 'prev.pt'}'" in msg and "--resume-from" in msg, msg
    # nothing was overwritten: the previous good checkpoint and best.pt are byte-identical, no results
    assert sha(out / "prev.pt") == prev_hash and sha(out / "best.pt") == best_hash
    assert load_checkpoint(out / "prev.pt")["epoch"] == 1
    assert not (out / "results.json").exists()



# ----------------------------------------------------------------------------- safe loading
def test_every_file_the_trainer_writes_loads_with_weights_only(two_epochs, tmp_path):
    cfg, out = two_epochs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the thread count the checkpoints were written with (no resume warning)
    try:
        train(TrainConfig.from_dict(dict(cfg.to_dict(), stop_after_epochs=None, resume=True)))
    finally:
        torch.set_num_threads(threads)
    from haframe_ext import HAFrame

    HAFrame.from_hierarchy("cifar100", gamma=2.0).save(tmp_path / "frame.pt")
    for path in [out / "last.pt", out / "prev.pt", out / "best.pt", tmp_path / "frame.pt"]:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], path
        obj = torch.load(path, weights_only=True)
        assert isinstance(obj, dict)


@pytest.mark.parametrize("where", ["last.pt", "resume_from", "eval"])
def test_malicious_checkpoint_is_refused_and_never_executed(two_epochs, tmp_path, where):
    cfg, out = two_epochs
    marker = tmp_path / "PWNED"
    evil = {"format": CHECKPOINT_FORMAT, "version": 1, "epoch": 2, "payload": _Evil(marker)}
    path = out / "last.pt" if where == "last.pt" else tmp_path / "evil.pt"
    torch.save(evil, path)
    with pytest.raises(CheckpointError, match=r"not a safe checkpoint \(refused by weights_only loading: "
                                              r"it asks for the global posix\.system"):
        if where == "eval":
            T.evaluate_checkpoint(path)
        else:
            kw = {"resume": True} if where == "last.pt" else {"resume_from": str(path), "out": str(tmp_path / "new")}
            train(TrainConfig.from_dict(dict(cfg.to_dict(), stop_after_epochs=None, **kw)))
    assert not marker.exists()
    # the same file through plain pickle would have run the command: the test's payload is live
    with zipfile.ZipFile(path) as z:
        pickle.loads(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))))
    assert marker.exists()



# ----------------------------------------------------------------------------- the claim on the output folder
def _hold_lock(out: Path):
    """A forked child that claims ``out`` and sleeps (another trainer); returns its pid once it holds the lock."""
    from haframe_ext.files import claim_folder

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            claim_folder(out)
            os.write(w, b"1")
            time.sleep(120)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    return pid


def test_a_second_trainer_into_a_claimed_out_is_refused_and_a_killed_ones_claim_is_not_stale(tmp_path):
    """Issue 14 item 2: the folder is claimed atomically (a lock file) before anything is checked or written, so a
    second trainer is refused while the first runs; a SIGKILLed holder leaves no claim behind."""
    cfg = _round2_config(tmp_path, epochs=1)
    out = Path(cfg.out)
    holder = _hold_lock(out)
    try:
        with pytest.raises(FolderInUseError, match=rf"output folder {out} is in use by another training run "
                                                     rf"\(process {holder} on .*\): wait for it"):
            train(cfg)
        assert not any((out / n).exists() for n in RUN_FILES)  # the refused trainer wrote nothing
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    assert (out / ".haframe.lock").exists()  # the killed holder's file is left, but unlocked
    res = train(cfg)
    assert res["best_epoch"] == 1 and not (out / ".haframe.lock").exists()  # released at the end


def test_two_trainers_started_at_once_into_one_out_one_is_refused(tmp_path):
    """Issue 14 item 2 end to end: seeds 1 and 2 started together into the same folder; exactly one finishes and
    the other exits 2 with one line, and the folder holds one run (metrics epochs 1..3 once each)."""
    cfg = write_inputs(tmp_path)
    out = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "haframe_ext.cli", "train", "--config", str(cfg), "--out",
                               str(out), "--seed", str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(), cwd=str(REPO)) for s in (1, 2)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and ("in use by another training run" in lines[0] or "already holds a run" in lines[0])
    seed = json.loads((out / "config.json").read_text())["seed"]
    assert load_checkpoint(out / "last.pt")["config"]["seed"] == seed
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == seed
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "train_loss" in r] == [1, 2, 3]


def test_a_claim_ends_with_its_process_not_with_a_forked_straggler(tmp_path):
    """A DataLoader worker forked by a run inherits its lock descriptor; the claim must not outlive the run."""
    from haframe_ext.files import claim_folder, release_folder

    script = ("import os, sys, time\n"
              "from pathlib import Path\n"
              "from haframe_ext.files import claim_folder\n"
              "claim_folder(Path(sys.argv[1]))\n"
              "if os.fork() == 0:\n"
              "    time.sleep(20); os._exit(0)\n"  # the straggler: still alive after its parent is gone
              "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], check=True, timeout=60)
    release_folder(claim_folder(tmp_path / "run"))  # free at once, although the straggler still runs



# ----------------------------------------------------------------------------- a checkpoint that does not fit the model
def test_a_model_that_does_not_match_a_checkpoint_names_the_tensor_and_both_shapes(tmp_path):
    """Issue 14 item 16, for any state mismatch (here: another feature dimension through --resume-from)."""
    cfg = _round2_config(tmp_path, stop_after_epochs=1)
    train(cfg)
    other = _round2_config(tmp_path, out=str(tmp_path / "other"), feature_dim=16,
                           resume_from=str(Path(cfg.out) / "last.pt"))
    ck = load_checkpoint(Path(cfg.out) / "last.pt")
    ck["config"]["feature_dim"] = 16  # get past the config comparison to the state itself
    ck.pop("digest")
    torch.save(seal_checkpoint(ck), Path(cfg.out) / "last.pt")
    with pytest.raises(CheckpointError, match=r"is \[8, 8\] in the checkpoint but \[8, 16\] in this model"):
        train(other)



# ----------------------------------------------------------------------------- a disk that fills up
FULL_DISK = r"""
import json, os, resource, runpy, signal, sys, traceback
import haframe_ext.cli, haframe_ext.train  # imported before the limit: the cases' writes are what it stops
cases, folder = json.load(open(sys.argv[1])), sys.argv[2]
out = {}
for cid, limit, argv in cases:
    err = os.path.join(folder, cid + ".err")
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            code = haframe_ext.cli.main(argv)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    out[cid] = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), open(err).read()]
json.dump(out, open(os.path.join(folder, "codes.json"), "w"))
"""


def test_a_disk_that_fills_up_keeps_every_earlier_file_and_is_one_line(two_epochs, tmp_path):
    """Issue 22 items 4 and 16: every file the CLI writes (hierarchy --out, eval --json, frame --out, the training
    checkpoint through torch's zip writer) stops at a file-size limit (EFBIG, what a full disk gives) with one line,
    exit 2, the earlier file byte-identical (or none), and no temp file."""
    _, run = two_epochs
    work = tmp_path / "w"
    work.mkdir()
    precious = "precious earlier content\n" * 400
    for name in ("edges.tsv", "metrics.json", "frame.pt"):
        (work / name).write_text(precious)
    cfg = write_inputs(work / "in")
    cases = [("hierarchy", 500, ["hierarchy", "cifar100", "--out", str(work / "edges.tsv")]),
             ("eval", 300, ["eval", "--checkpoint", str(run / "best.pt"), "--json", str(work / "metrics.json")]),
             ("eval-new", 300, ["eval", "--checkpoint", str(run / "best.pt"), "--json", str(work / "new.json")]),
             ("frame", 5000, ["frame", "--hierarchy", "cifar100", "--out", str(work / "frame.pt")]),
             ("train", 5000, ["train", "--config", str(cfg), "--out", str(work / "run")])]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    p = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path / "cases.json"), str(tmp_path)],
                       capture_output=True, text=True, env=env(), timeout=300, cwd=str(REPO))
    assert p.returncode == 0, p.stderr[-3000:]
    codes = json.loads((tmp_path / "codes.json").read_text())
    for cid, (rc, err) in codes.items():
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("haframe: error: "), (cid, rc, err[-2000:])
        assert "File too large" in lines[0], (cid, lines[0])
    for name in ("edges.tsv", "metrics.json", "frame.pt"):
        assert (work / name).read_text() == precious, name
    assert not (work / "new.json").exists()
    assert "checkpoint of epoch 1" in codes["train"][1]
    assert not [p for p in work.rglob("*") if ".tmp-" in p.name]
