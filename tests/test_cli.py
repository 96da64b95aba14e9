"""Tests for the ``haframe`` command line: help, one-line errors with exit code 2, frame/train/eval/bench."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from haframe_ext.cli import main
from haframe_ext.frame import HAFrame
import helpers

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["frame", "train", "eval", "demo", "bench", "hierarchy"]
TOY_EDGES = "".join(f"{p}\t{c}\n" for p, c in [
    ("root", "A"), ("root", "B"), ("A", "a0"), ("A", "a1"), ("B", "b0"), ("B", "b1")])


def run_cli(*args, timeout=120):
    """Run the CLI as a separate process, the way a user does."""
    return helpers.run_cli(*args, timeout=timeout, env=dict(os.environ, HAFRAME_DISABLE_NATIVE="1"), cwd=str(REPO))


def assert_user_error(rc, err, *fragments):
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("haframe: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("sub", [None] + SUBCOMMANDS)
def test_help_exits_zero(sub, capsys):
    argv = ["--help"] if sub is None else [sub, "--help"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    if sub == "train":
        assert "--method" in out and "--resume" in out and "--alpha-schedule" in out


def test_help_as_a_process():
    p = run_cli("--help")
    assert p.returncode == 0 and "frame" in p.stdout and "demo" in p.stdout


@pytest.mark.parametrize("argv,fragments", [
    (["frame", "--hierarchy", "no-such-tree"], ["no-such-tree", "not a builtin name"]),
    (["frame", "--distances", "/nonexistent/d.npy"], ["not found"]),
    (["frame", "--gamma", "abc"], ["--gamma"]),
    (["frame", "--s-min", "lots"], ["--s-min"]),
    (["train", "--method", "softmax"], ["unknown method 'softmax'", "haframe"]),
    (["train", "--dataset", "mnist", "--epochs", "1"], ["unknown dataset 'mnist'"]),
    (["train", "--dataset", "cifar100", "--data-root", "/nonexistent/cifar"], ["not found"]),
    (["train", "--config", "/nonexistent/cfg.json"], ["config file not found"]),
    (["train", "--alpha", "3"], ["alpha"]),
    (["eval", "--checkpoint", "/nonexistent/best.pt"], ["checkpoint not found"]),
    (["eval"], ["--checkpoint"]),
    (["bogus"], ["invalid choice"]),
])
def test_user_errors_are_one_line_exit_2(argv, fragments, capsys):
    rc = main(argv)
    captured = capsys.readouterr()
    assert_user_error(rc, captured.err, *fragments)


def test_user_error_as_a_process():
    p = run_cli("train", "--method", "softmax")
    assert_user_error(p.returncode, p.stderr, "unknown method")


def test_frame_bad_distance_file(tmp_path, capsys):
    bad = tmp_path / "d.npy"
    np.save(bad, np.array([[0, 1], [2, 0]]))
    assert_user_error(main(["frame", "--distances", str(bad)]), capsys.readouterr().err, "not symmetric")
    txt = tmp_path / "d.txt"
    txt.write_text("hello")
    assert_user_error(main(["frame", "--distances", str(txt)]), capsys.readouterr().err, "extension")
    cyc = tmp_path / "cycle.tsv"
    cyc.write_text("a\tb\nb\ta\n")
    rc = main(["frame", "--hierarchy", str(cyc)])
    assert_user_error(rc, capsys.readouterr().err)


def test_frame_writes_file_and_png(tmp_path, capsys):
    out, png = tmp_path / "frame.pt", tmp_path / "frame.png"
    assert main(["frame", "--hierarchy", "cifar100", "--gamma", "2", "--out", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "s_min" in text and "-0.3057" in text and "gram_error" in text
    fr = HAFrame.load(out)
    assert fr.num_classes == 100 and fr.gram_error() < 1e-5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_frame_from_edges_and_etf(tmp_path, capsys):
    edges = tmp_path / "toy.tsv"
    edges.write_text(TOY_EDGES)
    assert main(["frame", "--hierarchy", str(edges), "--gamma", "1", "--dim", "6",
                 "--out", str(tmp_path / "t.pt")]) == 0
    assert HAFrame.load(tmp_path / "t.pt").weight.shape == (4, 6)
    assert main(["frame", "--etf", "5"]) == 0
    assert "min_offdiag_similarity   -0.25" in capsys.readouterr().out


def test_train_then_eval(tmp_path, capsys):
    edges = tmp_path / "toy.tsv"
    edges.write_text(TOY_EDGES)
    out = tmp_path / "run"
    rc = main(["train", "--hierarchy", str(edges), "--method", "haframe", "--epochs", "2", "--batch-size", "16",
               "--n-per-class", "12", "--eval-per-class", "5", "--input-dim", "6", "--hidden", "16",
               "--eval-ks", "1", "2", "--out", str(out), "--no-progress", "--no-tensorboard"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "hierdist@2" in text and (out / "results.json").exists()
    rc = main(["eval", "--checkpoint", str(out / "best.pt"), "--json", str(tmp_path / "m.json")])
    assert rc == 0
    saved = json.loads((tmp_path / "m.json").read_text())
    res = json.loads((out / "results.json").read_text())
    assert saved["metrics"].keys() == res["test"].keys()
    for key, value in res["test"].items():  # key by key: pytest.approx takes no dict of lists on every version
        assert saved["metrics"][key] == pytest.approx(value), key
    # a corrupted checkpoint is a user-facing error, not a traceback
    bad = tmp_path / "bad.pt"
    bad.write_bytes((out / "best.pt").read_bytes()[:500])
    assert_user_error(main(["eval", "--checkpoint", str(bad)]), capsys.readouterr().err, "corrupted")
    # stop early, then resume from the command line
    rc = main(["train", "--hierarchy", str(edges), "--epochs", "2", "--batch-size", "16", "--n-per-class", "12",
               "--eval-per-class", "5", "--input-dim", "6", "--hidden", "16", "--eval-ks", "1", "2",
               "--out", str(tmp_path / "r2"), "--no-progress", "--stop-after-epochs", "1"])
    assert rc == 0 and "resume" in capsys.readouterr().out
    rc = main(["train", "--hierarchy", str(edges), "--epochs", "2", "--batch-size", "16", "--n-per-class", "12",
               "--eval-per-class", "5", "--input-dim", "6", "--hidden", "16", "--eval-ks", "1", "2",
               "--out", str(tmp_path / "r2"), "--no-progress", "--resume"])
    assert rc == 0
    r2 = json.loads((tmp_path / "r2" / "results.json").read_text())
    assert r2["test"] == res["test"]


def test_train_label_count_mismatch(tmp_path, capsys):
    edges = tmp_path / "toy.tsv"
    edges.write_text(TOY_EDGES)
    feats = tmp_path / "feats"
    feats.mkdir()
    torch.save({"features": torch.randn(8, 3), "labels": torch.arange(8)}, feats / "train.pt")  # 8 labels, 4 classes
    torch.save({"features": torch.randn(4, 3), "labels": torch.arange(4)}, feats / "test.pt")
    rc = main(["train", "--hierarchy", str(edges), "--dataset", "features", "--data-root", str(feats),
               "--epochs", "1", "--out", str(tmp_path / "o"), "--no-progress"])
    assert_user_error(rc, capsys.readouterr().err, "hierarchy has 4 classes")


def test_bench_in_process(capsys):
    assert main(["bench", "--batch", "8", "--min-run-time", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "reference_loss" in out and "haframe_loss" in out and "TF32" in out


# ----------------------------------------------------------------------------- reliability fixes (bugs 10, 11, smaller)
def _no_torch_advice(line):
    assert "weights_only` set to `False`" not in line and "weights_only=False" not in line, line
    assert "will likely succeed" not in line, line


def test_bad_backbone_eval_ks_and_out_are_one_line_errors(tmp_path, capsys):
    edges = tmp_path / "toy.tsv"
    edges.write_text(TOY_EDGES)
    base = ["train", "--hierarchy", str(edges), "--epochs", "1", "--no-progress", "--no-tensorboard"]
    rc = main(base + ["--backbone", "resnet9000", "--out", str(tmp_path / "r")])
    assert_user_error(rc, capsys.readouterr().err,
                      "unknown backbone 'resnet9000'; choose one of mlp, small-cnn, wrn28, resnet50")
    for ks in (["0"], ["-3"], ["1", "0", "5"]):
        rc = main(base + ["--eval-ks", *ks, "--out", str(tmp_path / "r")])
        assert_user_error(rc, capsys.readouterr().err, "eval_ks must be >= 1")
    (tmp_path / "a_file").write_text("not a folder")
    rc = main(base + ["--out", str(tmp_path / "a_file")])
    assert_user_error(rc, capsys.readouterr().err, str(tmp_path / "a_file"), "is an existing file, not a folder")
    assert (tmp_path / "a_file").read_text() == "not a folder" and not (tmp_path / "r").exists()


def test_a_second_run_into_the_same_out_is_one_line_and_overwrite_starts_over(tmp_path, capsys):
    edges = tmp_path / "toy.tsv"
    edges.write_text(TOY_EDGES)
    base = ["train", "--hierarchy", str(edges), "--epochs", "1", "--no-progress", "--no-tensorboard",
            "--n-per-class", "8", "--input-dim", "8", "--hidden", "16", "--out", str(tmp_path / "r")]
    assert main(base) == 0
    capsys.readouterr()
    best = (tmp_path / "r" / "best.pt").read_bytes()
    rc = main(base)
    assert_user_error(rc, capsys.readouterr().err, "already holds a run", "--resume", "--overwrite")
    assert (tmp_path / "r" / "best.pt").read_bytes() == best
    assert main(base + ["--overwrite"]) == 0


@pytest.mark.parametrize("content", ["text", "random", "empty", "evil"])
def test_unreadable_features_file_is_one_line_without_torch_advice(tmp_path, capsys, content):
    edges = tmp_path / "toy.tsv"
    edges.write_text(TOY_EDGES)
    feats = tmp_path / "feats"
    feats.mkdir()
    train_pt = feats / "train.pt"
    if content == "text":
        train_pt.write_text("hello")  # the legacy unpickler's KeyError (bug 11)
    elif content == "random":
        train_pt.write_bytes(np.random.default_rng(0).bytes(300))
    elif content == "empty":
        train_pt.write_bytes(b"")
    else:
        torch.save({"features": torch.randn(8, 3), "labels": torch.arange(8) % 4,
                    "x": helpers.HostileGlobal("true")}, train_pt)
    torch.save({"features": torch.randn(4, 3), "labels": torch.arange(4)}, feats / "test.pt")
    rc = main(["train", "--hierarchy", str(edges), "--dataset", "features", "--data-root", str(feats),
               "--epochs", "1", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    what = ("not a safe torch file, refused by weights_only loading: it asks for the global posix.system"
            if content == "evil" else "corrupted, truncated or not a torch file")
    assert_user_error(rc, err, f"{train_pt}: not a readable features file ({what}")
    _no_torch_advice(err)


def test_eval_of_a_malicious_checkpoint_says_not_safe(tmp_path, capsys):
    torch.save({"format": "haframe_ext.checkpoint", "x": helpers.HostileGlobal("true")}, tmp_path / "evil.pt")
    rc = main(["eval", "--checkpoint", str(tmp_path / "evil.pt")])
    err = capsys.readouterr().err
    assert_user_error(rc, err, "evil.pt is not a safe checkpoint (refused by weights_only loading: it asks for the "
                               "global posix.system")
    assert "corrupted" not in err
    _no_torch_advice(err)
    (tmp_path / "rand.pt").write_bytes(np.random.default_rng(1).bytes(400))
    rc = main(["eval", "--checkpoint", str(tmp_path / "rand.pt")])
    err = capsys.readouterr().err
    assert_user_error(rc, err, "rand.pt is corrupted or truncated")
    _no_torch_advice(err)


def test_haframe_load_of_a_bad_file_is_a_hierarchy_error(tmp_path):
    from haframe_ext import HierarchyError

    (tmp_path / "text.pt").write_text("hello")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(300))
    torch.save({"w": helpers.HostileGlobal("true")}, tmp_path / "evil.pt")
    HAFrame.etf(4).save(tmp_path / "f.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "f.pt").read_bytes()[:-50])
    for name in ("text.pt", "random.pt", "trunc.pt"):
        with pytest.raises(HierarchyError, match="is not a readable HAFrame file") as info:
            HAFrame.load(tmp_path / name)
        _no_torch_advice(str(info.value))
    with pytest.raises(HierarchyError, match=r"is not a safe torch file \(refused by weights_only loading: it asks "
                                             r"for the global posix\.system"):
        HAFrame.load(tmp_path / "evil.pt")
    torch.save({"format": "haframe_ext.HAFrame", "version": 1}, tmp_path / "partial.pt")
    with pytest.raises(HierarchyError, match="incomplete or malformed HAFrame file"):
        HAFrame.load(tmp_path / "partial.pt")
    with pytest.raises(FileNotFoundError):
        HAFrame.load(tmp_path / "nope.pt")
    assert HAFrame.load(tmp_path / "f.pt").num_classes == 4


def test_resume_help_states_the_thread_count_caveat(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "OMP_NUM_THREADS" in text and "thread count" in text


# ------------------------------------------------------------ runs through the CLI (RELIABILITY.md sections 14, 16, 18)
def _tiny_train(tmp_path, *extra):
    edges = tmp_path / "toy.tsv"
    edges.write_text(TOY_EDGES)
    return ["train", "--hierarchy", str(edges), "--epochs", "2", "--no-progress", "--no-tensorboard",
            "--n-per-class", "8", "--input-dim", "8", "--hidden", "16", "--out", str(tmp_path / "r"), *extra]


def test_overwrite_written_as_the_string_false_in_a_config_keeps_the_earlier_run(tmp_path, capsys):
    """Issue 14 item 1: {"overwrite": "false"} counted as true and deleted a finished run."""
    assert main(_tiny_train(tmp_path)) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    cfg = tmp_path / "c.json"
    cfg.write_text('{"overwrite": "false"}')
    capsys.readouterr()
    rc = main(_tiny_train(tmp_path, "--config", str(cfg)))
    assert_user_error(rc, capsys.readouterr().err, "overwrite must be true or false", "'false' (a string)")
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == before


@pytest.mark.parametrize("error", [
    MemoryError("Unable to allocate 74.5 GiB for an array with shape (100000, 100000) and data type float64"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to "
                 "allocate 80000000000 bytes."),
])
def test_an_allocation_that_fails_is_one_line_naming_the_size(tmp_path, capsys, monkeypatch, error):
    """Issue 14 item 11: numpy's _ArrayMemoryError and torch's CPU allocator error were tracebacks."""
    def fail(*a, **k):
        raise error

    monkeypatch.setattr(HAFrame, "from_hierarchy", classmethod(lambda cls, *a, **k: fail()))
    rc = main(["frame", "--hierarchy", "cifar100"])
    size = "74.5 GiB" if isinstance(error, MemoryError) else "80000000000 bytes"
    assert_user_error(rc, capsys.readouterr().err, "out of memory", size, "is available")


def test_a_100000_leaf_star_is_one_line_naming_the_size(tmp_path, capsys):
    """Issue 14 item 11, the real thing (a K x K matrix of 100,000 classes does not fit this machine)."""
    star = tmp_path / "star.tsv"
    star.write_text("".join(f"root\tleaf{i}\n" for i in range(100_000)))
    rc = main(["frame", "--hierarchy", str(star)])
    err = capsys.readouterr().err
    assert_user_error(rc, err)
    assert "100000" in err or "100,000" in err, err


def test_a_read_only_out_folder_is_one_line(tmp_path, capsys, monkeypatch):
    """Issue 14 item 11: an --out on a read-only filesystem gave an OSError traceback."""
    import errno
    import pathlib

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    rc = main(_tiny_train(tmp_path))
    assert_user_error(rc, capsys.readouterr().err, "Read-only file system", str(tmp_path / "r"),
                      "choose a writable folder")


def test_a_disk_that_fills_up_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path, capsys, monkeypatch):
    """Issue 14 item 11: a full disk while writing epoch 2's checkpoint: one line naming the epoch and the kept
    checkpoint; epoch 1's last.pt intact, no temp file left, no results."""
    import errno

    real_save = torch.save
    writes = {"last": 0}

    def full_disk(obj, f, *a, **k):
        name = getattr(f, "name", str(f))
        if ".last.pt.tmp-" in str(name):
            writes["last"] += 1
            if writes["last"] == 2:
                f.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    rc = main(_tiny_train(tmp_path))
    out = tmp_path / "r"
    assert_user_error(rc, capsys.readouterr().err, "No space left on device", "checkpoint of epoch 2",
                      f"the last good checkpoint {out / 'last.pt'} (epoch 1) is kept", "free some space")
    from haframe_ext.train import load_checkpoint

    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert not (out / "results.json").exists() and not (out / ".haframe.lock").exists()


# ----------------------------------------------------------------------------- first-hour UX
def _subparsers():
    """``{command: its parser}`` of the haframe parser."""
    import argparse

    from haframe_ext.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_of_every_command_has_a_one_line_description():
    missing = []
    for name, parser in _subparsers().items():
        for action in parser._actions:
            text = (action.help or "").split(" (default:")[0].strip()
            if not text or "\n" in text:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "options without a one-line description: " + ", ".join(missing)


def test_frame_hierarchy_help_lists_the_builtin_names(capsys):
    from haframe_ext.hierarchy import BUILTIN_NAMES

    assert main(["frame", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in BUILTIN_NAMES), out


def test_plot_without_matplotlib_is_refused_before_the_frame_is_computed(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails, as where it is not installed

    def never(*a, **k):
        raise AssertionError("the frame was computed before --plot was refused")

    monkeypatch.setattr(HAFrame, "etf", never)
    monkeypatch.setattr(HAFrame, "from_hierarchy", never)
    for argv in (["frame", "--etf", "5"], ["frame", "--hierarchy", "cifar100"]):
        rc = main(argv + ["--plot", str(tmp_path / "f.png")])
        assert_user_error(rc, capsys.readouterr().err, "--plot needs matplotlib", "pip install matplotlib")
    assert not (tmp_path / "f.png").exists()


def test_a_missing_tensorboard_is_one_warning_line(tmp_path):
    (tmp_path / "toy.tsv").write_text(TOY_EDGES)
    code = ("import sys; sys.modules['tensorboard'] = None; from haframe_ext.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, HAFRAME_DISABLE_NATIVE="1")
    p = subprocess.run([sys.executable, "-c", code, "train", "--hierarchy", "toy.tsv", "--epochs", "1",
                        "--n-per-class", "4", "--hidden", "8", "--out", "run", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("haframe: warning: TensorBoard logging is off"), p.stderr
    assert "pip install tensorboard" in lines[0] and "warnings.warn" not in p.stderr


def test_the_demo_says_its_data_are_synthetic(tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    titles = []
    savefig = matplotlib.figure.Figure.savefig

    def record(fig, *a, **k):
        titles.append(fig._suptitle.get_text() if fig._suptitle is not None else "")
        return savefig(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--methods", "haframe"]) == 0
    out = capsys.readouterr().out
    assert "test metrics on synthetic data" in out, out
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert "synthetic" in saved["haframe"]["data"]
    assert len(titles) == 1 and "synthetic data" in titles[0], titles
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000


def test_bench_full_outside_a_source_checkout_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(main(["bench", "--full"]), capsys.readouterr().err, "--full needs a source checkout")
    assert not any(m == "bench" or m.startswith("bench.") for m in sys.modules)
