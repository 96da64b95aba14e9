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
import haframe_ext.train as T
from haframe_ext.data import DataError
from haframe_ext.train import CheckpointError, TrainConfig, load_checkpoint, train

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
    return subprocess.run([sys.executable, "-m", "haframe_ext.cli", *map(str, args)], capture_output=True, text=True,
                          env=env(), timeout=timeout, cwd=str(REPO))


FAULT = textwrap.dedent('''
    """Run the haframe CLI with a fault hook that never changes a value (see the test module)."""
    import os, signal, sys, time
    from pathlib import Path
    import torch
    import haframe_ext.checkpoint as C
    import haframe_ext.train as T
    from haframe_ext import cli

    mode, out, marker = os.environ["HF_FAULT"], Path(os.environ["HF_OUT"]), Path(os.environ["HF_MARKER"])
    calls = {"after_ckpt": 0, "all": 0, "write_last": 0}
    real_loss, real_write, real_replace = T._compute_loss, C._write_tmp, os.replace

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

    T._compute_loss, C._write_tmp, os.replace = loss_hook, write_hook, replace_hook
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
        torch.save(T._seal(ck), last)
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
class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


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
    evil = {"format": T.CHECKPOINT_FORMAT, "version": 1, "epoch": 2, "payload": _Evil(marker)}
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
