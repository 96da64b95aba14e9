"""Training faults: SIGKILL mid-epoch and mid-checkpoint then --resume (bit-for-bit on CPU), corrupted and
malicious checkpoints, NaN loss, safe loading (weights_only / restricted CIFAR unpickler).

Runs that must be killed go through a small wrapper script (written to tmp_path) that installs a timing
hook in ``haframe_ext.train`` and then calls ``haframe_ext.cli.main``: the hook never changes a value, it
only stalls the process (so the test can SIGKILL it at a known point) or SIGKILLs it from inside a
checkpoint write.  Resumes and the uninterrupted baseline run the plain ``python -m haframe_ext.cli``.
Extends tests/test_train.py, which covers the cooperative ``stop_after_epochs`` resume, the in-process
NaN stop and two corruptions of ``last.pt``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import haframe_ext
import haframe_ext.loop as L
import haframe_ext.train as T
from haframe_ext.checkpoint import CHECKPOINT_FORMAT, FolderInUseError, seal_checkpoint
from haframe_ext.data import DataError
from haframe_ext.runlog import RUN_FILES, epoch_line
from haframe_ext.train import CheckpointError, TrainConfig, load_checkpoint, train
from helpers import HostileGlobal, run_cli

REPO = Path(__file__).resolve().parents[1]
PKG = Path(haframe_ext.__file__).resolve().parent
TOY_EDGES = "".join(f"{p}\t{c}\n" for p, c in [
    ("root", "A"), ("root", "B"), ("A", "A1"), ("A", "A2"), ("B", "B1"), ("B", "B2"),
    ("A1", "c0"), ("A1", "c1"), ("A2", "c2"), ("A2", "c3"), ("B1", "c4"), ("B1", "c5"), ("B2", "c6"), ("B2", "c7")])
EPOCHS = 3
STEPS_PER_EPOCH = 6  # 8 classes x 12 samples / batch 16


def toy_config(folder: Path) -> dict:
    """The tiny run every test here uses (3 epochs of 6 steps, a few seconds)."""
    return dict(method="haframe", dataset="synthetic", hierarchy=str(folder / "toy.tsv"), backbone="mlp", hidden=16,
                input_dim=8, n_per_class=12, eval_per_class=6, difficulty=1.0, epochs=EPOCHS, batch_size=16,
                eval_batch_size=64, lr=0.05, progress=False, tensorboard=False, eval_ks=[1, 2, 5])


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def write_inputs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "toy.tsv").write_text(TOY_EDGES)
    cfg = folder / "cfg.json"
    cfg.write_text(json.dumps(toy_config(folder)))
    return cfg


def cli(*args, timeout=120):
    return run_cli(*args, timeout=timeout, env=env(), cwd=str(REPO))


FAULT = textwrap.dedent('''
    """Run the haframe CLI with a fault hook that never changes a value (see the test module)."""
    import os, signal, sys, time
    from pathlib import Path
    import torch
    import haframe_ext.checkpoint as C
    import haframe_ext.loop as L
    from haframe_ext import cli

    mode, out, marker = os.environ["HF_FAULT"], Path(os.environ["HF_OUT"]), Path(os.environ["HF_MARKER"])
    calls = {"after_ckpt": 0, "all": 0, "write_last": 0}
    real_loss, real_write, real_replace = L.compute_loss, C._write_tmp, os.replace

    def loss_hook(criterion, features, logits, target):
        calls["all"] += 1
        if (out / "last.pt").exists():
            calls["after_ckpt"] += 1
        loss = real_loss(criterion, features, logits, target)
        if mode == "stall_epoch2" and calls["after_ckpt"] == 3:      # 2 steps of epoch 2 done
            marker.write_text("epoch 2, step 3")
            time.sleep(600)
        if mode == "nan_epoch2" and calls["after_ckpt"] >= 1:
            loss = loss * float("nan")
        if mode == "nan_grad_end_of_epoch2" and calls["all"] == 2 * %d:
            loss = loss + 0.0 * torch.sqrt((features * 0).sum())    # finite loss, NaN gradient
        return loss

    def write_hook(obj, path):
        tmp = real_write(obj, path)
        if mode == "kill_in_write" and Path(path).name == "last.pt":
            calls["write_last"] += 1
            if calls["write_last"] == 2:                               # epoch 2's temp file is complete
                os.kill(os.getpid(), signal.SIGKILL)
        return tmp

    def replace_hook(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        if mode == "kill_between_renames" and Path(dst).name == "prev.pt":
            os.kill(os.getpid(), signal.SIGKILL)                       # last.pt -> prev.pt done, tmp not renamed

    L.compute_loss, C._write_tmp, os.replace = loss_hook, write_hook, replace_hook
    sys.exit(cli.main(sys.argv[1:]))
''' % STEPS_PER_EPOCH)


def start_fault(tmp: Path, mode: str, out: Path, cfg: Path) -> subprocess.Popen:
    script = tmp / "fault.py"
    script.write_text(FAULT)
    e = dict(env(), HF_FAULT=mode, HF_OUT=str(out), HF_MARKER=str(tmp / "marker"))
    return subprocess.Popen([sys.executable, str(script), "train", "--config", str(cfg), "--out", str(out)],
                            env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))


def wait_for(path: Path, proc: subprocess.Popen, timeout=90.0):
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc={proc.returncode}) before {path.name}: {proc.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_same_run(out_a: Path, out_b: Path):
    """Final weights, optimizer state, history and test metrics identical, bit for bit."""
    a, b = load_checkpoint(out_a / "last.pt"), load_checkpoint(out_b / "last.pt")
    assert a["epoch"] == b["epoch"] == EPOCHS
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]), k
    assert a["scheduler"] == b["scheduler"] and a["best"] == b["best"]
    strip = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    ba, bb = load_checkpoint(out_a / "best.pt", kind="best"), load_checkpoint(out_b / "best.pt", kind="best")
    assert all(torch.equal(ba["model"][k], bb["model"][k]) for k in ba["model"])
    ra, rb = (json.loads((o / "results.json").read_text()) for o in (out_a, out_b))
    for key in ("test", "test_crm", "best_epoch", "best_val", "neural_collapse", "frame"):
        assert ra[key] == rb[key], key


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One uninterrupted run through the CLI."""
    tmp = tmp_path_factory.mktemp("baseline")
    cfg = write_inputs(tmp)
    p = cli("train", "--config", cfg, "--out", tmp / "run")
    assert p.returncode == 0, p.stderr
    return tmp / "run"


# ----------------------------------------------------------------------------- SIGKILL and resume
@pytest.mark.parametrize("mode", ["stall_epoch2", "kill_in_write", "kill_between_renames"])
def test_sigkill_then_resume_is_bit_exact(tmp_path, baseline, mode):
    """Killed (SIGKILL) mid-epoch 2 (after 2 of its 6 steps), inside epoch 2's checkpoint write (temp file
    complete, not renamed), or between its two renames (last.pt -> prev.pt done, no last.pt); ``--resume``
    then ends with the uninterrupted run's weights and metrics, bit for bit."""
    cfg = write_inputs(tmp_path)
    out = tmp_path / "run"
    proc = start_fault(tmp_path, mode, out, cfg)
    if mode == "stall_epoch2":
        wait_for(tmp_path / "marker", proc)
        assert load_checkpoint(out / "last.pt")["epoch"] == 1  # the process is in epoch 2, past its 2nd step
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=90)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    if mode == "kill_in_write":
        assert load_checkpoint(out / "last.pt")["epoch"] == 1 and any(out.glob(".last.pt.tmp-*"))
    if mode == "kill_between_renames":
        assert not (out / "last.pt").exists() and load_checkpoint(out / "prev.pt")["epoch"] == 1
    assert not (out / "results.json").exists()

    r = cli("train", "--config", cfg, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    if mode == "kill_between_renames":
        assert "resuming from" in r.stderr and "prev.pt" in r.stderr  # the fallback is announced
    assert_same_run(out, baseline)
    log = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in log if "train_loss" in rec] == list(range(1, EPOCHS + 1))  # no duplicate epoch


# ----------------------------------------------------------------------------- corrupted checkpoints
def _damage(kind: str, last: Path, tmp: Path):
    data = bytearray(last.read_bytes())
    if kind == "truncated_to_1_byte":
        last.write_bytes(bytes(data[:1]))
    elif kind == "empty":
        last.write_bytes(b"")
    elif kind == "truncated_tail":
        last.write_bytes(bytes(data[:-100]))
    elif kind == "random_bytes":
        last.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif kind == "text_file":
        last.write_text('{"epoch": 2}\n')
    elif kind == "zeroed_block":
        mid = len(data) // 2
        data[mid:mid + 256] = bytes(256)
        last.write_bytes(bytes(data))
    elif kind == "edited_epoch":  # a well-formed file whose content no longer matches its digest
        ck = torch.load(last, weights_only=True)
        ck["epoch"] = 7
        torch.save(ck, last)
    elif kind == "edited_weight":
        ck = torch.load(last, weights_only=True)
        k = next(k for k, v in ck["model"].items() if v.is_floating_point())
        ck["model"][k] = ck["model"][k] + 1e-6
        torch.save(ck, last)
    elif kind == "foreign_torch_file":
        torch.save({"state_dict": {"w": torch.zeros(3)}}, last)
    elif kind == "missing_keys":  # a resealed checkpoint without its optimizer state
        ck = torch.load(last, weights_only=True)
        ck.pop("digest")
        ck.pop("optimizer")
        torch.save(seal_checkpoint(ck), last)
    else:
        raise AssertionError(kind)


CORRUPTIONS = ["truncated_to_1_byte", "empty", "truncated_tail", "random_bytes", "text_file", "zeroed_block",
               "edited_epoch", "edited_weight", "foreign_torch_file", "missing_keys"]


@pytest.fixture(scope="module")
def _two_epochs_master(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_epochs")
    folder = tmp / "in"
    write_inputs(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI runs (OMP_NUM_THREADS=1): bit-exactness needs the same thread count
    try:
        train(TrainConfig.from_dict(dict(toy_config(folder), out=str(tmp / "run"), stop_after_epochs=2)))
    finally:
        torch.set_num_threads(threads)
    return folder, tmp / "run"


@pytest.fixture
def two_epochs(_two_epochs_master, tmp_path):
    """A run stopped after 2 of 3 epochs (a fresh copy per test): last.pt (epoch 2) and prev.pt (epoch 1)."""
    import shutil

    folder, master = _two_epochs_master
    out = tmp_path / "run"
    shutil.copytree(master, out)
    return TrainConfig.from_dict(dict(toy_config(folder), out=str(out), stop_after_epochs=2)), out


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


def test_resume_from_prev_after_corruption_is_bit_exact_through_the_cli(two_epochs, baseline):
    cfg, out = two_epochs
    cfg_file = Path(cfg.hierarchy).parent / "cfg.json"
    _damage("truncated_tail", out / "last.pt", out)
    r = cli("train", "--config", cfg_file, "--out", out, "--resume")
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("haframe: error: checkpoint") and "Traceback" not in r.stderr
    assert "corrupted or truncated" in lines[0] and "--resume-from" in lines[0] and "prev.pt" in lines[0]
    r = cli("train", "--config", cfg_file, "--out", out, "--resume-from", out / "prev.pt")
    assert r.returncode == 0, r.stderr
    assert_same_run(out, baseline)


# ----------------------------------------------------------------------------- NaN
def test_nan_loss_in_epoch_2_stops_with_one_clear_line_and_keeps_the_good_checkpoint(tmp_path, baseline):
    cfg = write_inputs(tmp_path)
    out = tmp_path / "run"
    proc = start_fault(tmp_path, "nan_epoch2", out, cfg)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("haframe: error: loss became nan at epoch 2, step 1: training stopped;")
    assert f"the last good checkpoint {out / 'last.pt'} (epoch 1) is kept" in lines[0]
    assert "--grad-clip" in lines[0]
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and not (out / "prev.pt").exists() and not (out / "results.json").exists()
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert any(json.loads(l).get("event") == "diverged" for l in (out / "metrics.jsonl").read_text().splitlines())
    # the kept checkpoint really is the good one: resuming from it reproduces the uninterrupted run
    r = cli("train", "--config", cfg, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert_same_run(out, baseline)


def test_natural_divergence_in_epoch_1_says_no_checkpoint_was_written(tmp_path):
    cfg = write_inputs(tmp_path)
    r = cli("train", "--config", cfg, "--out", tmp_path / "run", "--lr", "1e30")
    assert r.returncode == 1, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
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


# ----------------------------------------------------------------------------- safe loading
def _Evil(marker):
    """Unpickling this would run a shell command that creates a marker file."""
    return HostileGlobal(f"touch {marker}")


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
            kw = {"resume": True} if where == "last.pt" else {"resume_from": str(path)}
            train(TrainConfig.from_dict(dict(cfg.to_dict(), stop_after_epochs=None, **kw)))
    assert not marker.exists()
    # the same file through plain pickle would have run the command: the test's payload is live
    with zipfile.ZipFile(path) as z:
        pickle.loads(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))))
    assert marker.exists()


def _fake_cifar(root: Path):
    """A valid tiny cifar-100-python folder (1 image per class per split)."""
    from haframe_ext.hierarchy import Hierarchy

    root.mkdir(parents=True)
    names = Hierarchy.builtin("cifar100").classes
    rng = np.random.default_rng(0)

    def blob(n):
        labels = [c for _ in range(n) for c in range(100)]
        return {b"fine_labels": labels, b"coarse_labels": [c // 5 for c in labels], b"batch_label": b"x",
                b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), b"filenames": [b"f"] * len(labels)}

    for name, obj in (("train", blob(2)), ("test", blob(1)),
                      ("meta", {b"fine_label_names": [n.encode() for n in names]})):
        with open(root / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)


class _EvilPopen:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (subprocess.Popen, (["touch", self.marker],))


class _EvilExec:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import builtins
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


class _ReconstructNonArray:
    """An allowed reconstructor (numpy's _reconstruct) asked to build something that is not an ndarray."""

    def __reduce__(self):
        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # numpy 1.x
            from numpy.core.multiarray import _reconstruct
        return (_reconstruct, (np.dtype, (0,), b"b"))


@pytest.mark.parametrize("attack", ["os.system-p0", "os.system-p2", "os.system-p5", "subprocess.Popen", "exec",
                                    "nested-in-list", "in-meta", "reconstruct-non-ndarray"])
def test_cifar_loader_refuses_malicious_pickles_without_side_effects(tmp_path, attack):
    from haframe_ext.data import CIFAR100

    root = tmp_path / "cifar-100-python"
    _fake_cifar(root)
    marker = tmp_path / "PWNED"
    target = root / ("meta" if attack == "in-meta" else "train")
    proto = {"os.system-p0": 0, "os.system-p5": 5}.get(attack, 2)
    payload = {"os.system-p0": _Evil(marker), "os.system-p2": _Evil(marker), "os.system-p5": _Evil(marker),
               "subprocess.Popen": _EvilPopen(marker), "exec": _EvilExec(marker),
               "nested-in-list": [1, [2, {"x": _Evil(marker)}]], "in-meta": _Evil(marker)}.get(attack)
    if attack == "reconstruct-non-ndarray":
        payload = _ReconstructNonArray()
    with open(target, "wb") as f:
        pickle.dump({b"data": payload, b"fine_labels": [0]}, f, protocol=proto)
    with pytest.raises(DataError, match="refusing to load global|only plain numpy arrays"):
        CIFAR100(root, "train")
    assert not marker.exists()


def test_cifar_malicious_pickle_through_the_cli_is_one_line_and_inert(tmp_path):
    root = tmp_path / "cifar-100-python"
    _fake_cifar(root)
    marker = tmp_path / "PWNED"
    with open(root / "train", "wb") as f:
        pickle.dump({b"data": _Evil(marker)}, f, protocol=2)
    r = cli("train", "--dataset", "cifar100", "--data-root", root, "--hierarchy", "cifar100", "--epochs", "1",
            "--backbone", "small-cnn", "--out", tmp_path / "run", "--no-progress")
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "refusing to load global posix.system" in lines[0] and "Traceback" not in r.stderr
    assert not marker.exists()


def test_features_files_with_pickled_code_are_refused_without_side_effects(tmp_path):
    from haframe_ext.data import load_features

    marker = tmp_path / "PWNED"
    torch.save({"features": torch.zeros(4, 3), "labels": torch.zeros(4, dtype=torch.long), "x": _Evil(marker)},
               tmp_path / "train.pt")
    with pytest.raises(DataError, match="not a readable features file"):
        load_features(tmp_path / "train.pt", 8)
    np.save(tmp_path / "obj.npy", np.array([_Evil(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(DataError):
        load_features(tmp_path / "obj.npy", 8)
    assert not marker.exists()


def test_package_source_never_unpickles_user_files():
    """Static guard: every torch.load passes weights_only=True, every np.load allow_pickle=False, and no
    pickle.load/loads/Unpickler is used except the restricted CifarUnpickler."""
    problems = []
    for path in sorted(PKG.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.name}:{node.lineno}"
            if owner == "torch" and node.func.attr == "load":
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "np" and node.func.attr == "load":
                v = kw.get("allow_pickle")
                if not (isinstance(v, ast.Constant) and v.value is False):
                    problems.append(f"{where}: np.load without allow_pickle=False")
            if owner == "pickle" and node.func.attr in ("load", "loads", "Unpickler"):
                problems.append(f"{where}: pickle.{node.func.attr}")
    assert not problems, problems


# ----------------------------------------------------------------------------- round 2 (RELIABILITY.md section 21)
def _round2_config(folder: Path, **kw) -> TrainConfig:
    (folder / "toy.tsv").write_text(TOY_EDGES) if not (folder / "toy.tsv").exists() else None
    base = dict(toy_config(folder), out=str(folder / "run"))
    base.update(kw)
    return TrainConfig.from_dict(base)


def _hold_lock(out: Path):
    """A forked child that claims ``out`` and sleeps (another trainer); returns its pid once it holds the lock."""
    from haframe_ext.checkpoint import claim_folder

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
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and ("in use by another training run" in lines[0] or "already holds a run" in lines[0])
    seed = json.loads((out / "config.json").read_text())["seed"]
    assert load_checkpoint(out / "last.pt")["config"]["seed"] == seed
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == seed
    log = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "train_loss" in r] == [1, 2, 3]


def _classes_file(folder: Path, names) -> str:
    p = folder / "classes.txt"
    p.write_text("\n".join(names) + "\n")
    return str(p)


def test_resume_compares_the_class_list_and_tree_by_content_not_by_path(tmp_path):
    """Issue 14 item 4: a reordered --classes file or an edited tree at the same path is refused; an identical
    copy of the tree at another path resumes."""
    names = [f"c{i}" for i in range(8)]
    cfg = _round2_config(tmp_path, classes=_classes_file(tmp_path, names), stop_after_epochs=1)
    train(cfg)
    resume = dict(cfg.to_dict(), stop_after_epochs=None, resume=True)
    _classes_file(tmp_path, [names[1], names[0]] + names[2:])  # same path, two labels swapped
    with pytest.raises(CheckpointError, match="same class names in another label order"):
        train(TrainConfig.from_dict(resume))
    _classes_file(tmp_path, names)
    edited = TOY_EDGES.replace("A1\tc1\n", "B2\tc1\n")  # same leaves, c1 moved to another subtree
    (tmp_path / "toy.tsv").write_text(edited)
    with pytest.raises(CheckpointError, match="class distances .* differ from the checkpoint's"):
        train(TrainConfig.from_dict(resume))
    (tmp_path / "toy.tsv").write_text(TOY_EDGES)
    copy = tmp_path / "elsewhere" / "same_tree.tsv"
    copy.parent.mkdir()
    copy.write_text(TOY_EDGES)
    res = train(TrainConfig.from_dict(dict(resume, hierarchy=str(copy))))
    assert res["epochs"] == EPOCHS and load_checkpoint(Path(cfg.out) / "last.pt")["epoch"] == EPOCHS


def test_resume_with_another_number_of_classes_names_both_sizes(tmp_path):
    """Issue 14 item 16: not torch's 'Error(s) in loading state_dict', but the two class counts."""
    cfg = _round2_config(tmp_path, stop_after_epochs=1)
    train(cfg)
    (tmp_path / "toy.tsv").write_text(TOY_EDGES.replace("B\tB2\n", "").replace("B2\tc6\nB2\tc7\n", ""))  # 6 at the path
    with pytest.raises(CheckpointError, match=r"trained on 8 classes and this run's hierarchy .* has 6"):
        train(TrainConfig.from_dict(dict(cfg.to_dict(), stop_after_epochs=None, resume=True)))


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


def test_when_last_and_prev_are_both_damaged_prev_is_not_called_intact(two_epochs):
    """Issue 14 item 15."""
    cfg, out = two_epochs
    _damage("truncated_tail", out / "last.pt", out)
    _damage("random_bytes", out / "prev.pt", out)
    with pytest.raises(CheckpointError) as info:
        train(TrainConfig.from_dict(dict(cfg.to_dict(), stop_after_epochs=None, resume=True)))
    msg = str(info.value)
    assert "intact" not in msg and "--resume-from" not in msg, msg
    assert f"the previous checkpoint {out / 'prev.pt'} is damaged too" in msg and "--overwrite" in msg, msg


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
    log = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
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
    rec = next(json.loads(l) for l in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines())
    if method == "cross-entropy":
        assert 0.0 <= rec["train_top1"] <= 100.0 and rec["train_top1"] > 1.0  # a percent, not a fraction
    else:
        assert rec["train_top1"] is None


def test_the_epoch_line_states_top1_in_percent_for_train_and_val():
    """Issue 12: one unit per quantity (it printed 'acc 0.009 | val top1 1.0000')."""
    cfg = TrainConfig(method="cross-entropy", epochs=3)
    line = epoch_line(cfg, 2, 1.23456, 0.9, {"top1": 1.0, "hierdist@1": 2.5})
    assert line == "[cross-entropy] epoch 2/3 loss 1.2346 train top1 0.90% | val top1 1.00% hierdist@1 2.500"
    line = epoch_line(TrainConfig(epochs=3), 1, 1.0, None, {"top1": 50.0, "hierdist@1": 1.0})
    assert line == "[haframe] epoch 1/3 loss 1.0000 | val top1 50.00% hierdist@1 1.000"


def test_a_claim_ends_with_its_process_not_with_a_forked_straggler(tmp_path):
    """A DataLoader worker forked by a run inherits its lock descriptor; the claim must not outlive the run."""
    from haframe_ext.checkpoint import claim_folder, release_folder

    script = ("import os, sys, time\n"
              "from pathlib import Path\n"
              "from haframe_ext.checkpoint import claim_folder\n"
              "claim_folder(Path(sys.argv[1]))\n"
              "if os.fork() == 0:\n"
              "    time.sleep(20); os._exit(0)\n"  # the straggler: still alive after its parent is gone
              "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], check=True, timeout=60)
    release_folder(claim_folder(tmp_path / "run"))  # free at once, although the straggler still runs
