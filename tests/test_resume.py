"""Tests for haframe_ext.training.resume: SIGKILL mid-epoch or mid-checkpoint then --resume, bit for bit on CPU; the
fallback to prev.pt; resume compares the class list and tree by content (RELIABILITY.md section 14).

Killed runs go through helpers.FAULT; ``baseline`` (one uninterrupted run) and ``two_epochs`` come from
conftest.py.  Extends tests/test_train.py, which covers the cooperative ``stop_after_epochs`` resume.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from haframe_ext.train import CheckpointError, TrainConfig, load_checkpoint, train
from helpers import EPOCHS, TOY_EDGES, assert_same_run, cli, start_fault, wait_for, write_inputs
from helpers import damage_checkpoint as _damage
from helpers import toy_train_config as _round2_config


# ----------------------------------------------------------------------------- SIGKILL, damage, then resume
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
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in log if "train_loss" in rec] == list(range(1, EPOCHS + 1))  # no duplicate epoch


def test_resume_from_prev_after_corruption_is_bit_exact_through_the_cli(two_epochs, baseline):
    cfg, out = two_epochs
    cfg_file = Path(cfg.hierarchy).parent / "cfg.json"
    _damage("truncated_tail", out / "last.pt", out)
    r = cli("train", "--config", cfg_file, "--out", out, "--resume")
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("haframe: error: checkpoint") and "Traceback" not in r.stderr
    assert "corrupted or truncated" in lines[0] and "--resume-from" in lines[0] and "prev.pt" in lines[0]
    r = cli("train", "--config", cfg_file, "--out", out, "--resume-from", out / "prev.pt")
    assert r.returncode == 0, r.stderr
    assert_same_run(out, baseline)


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



# ----------------------------------------------------------------------------- resume compares the inputs by content
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



def test_resume_compares_what_generates_the_data(tmp_path):
    """Issue 22 item 5: another --data-root, another tree under --distances (it places the synthetic data), adding
    or dropping --distances, another --deterministic or --num-workers: each resume is refused, naming it."""
    import numpy as np
    import torch

    from haframe_ext.hierarchy import Hierarchy

    tree = Hierarchy.from_edges(str(_round2_config(tmp_path).hierarchy))
    np.save(tmp_path / "d.npy", tree.distances())
    cfg = _round2_config(tmp_path, stop_after_epochs=1, distances=str(tmp_path / "d.npy"))
    train(cfg)
    resume = dict(cfg.to_dict(), stop_after_epochs=None, resume=True)
    moved = TOY_EDGES.replace("A1\tc1\n", "B2\tc1\n")  # the same classes in another tree
    (tmp_path / "moved.tsv").write_text(moved)
    with pytest.raises(CheckpointError, match=r"tree .*moved\.tsv.* differs .* synthetic data"):
        train(TrainConfig.from_dict(dict(resume, hierarchy=str(tmp_path / "moved.tsv"))))
    with pytest.raises(CheckpointError, match="trained with a --distances matrix and this run is not"):
        train(TrainConfig.from_dict(dict(resume, distances=None)))
    for field, value in (("deterministic", False), ("num_workers", 1)):
        with pytest.raises(CheckpointError, match=f"different configuration .*{field}"):
            train(TrainConfig.from_dict(dict(resume, **{field: value})))

    for name in ("feats", "other"):  # two feature folders of the same shape
        (tmp_path / name).mkdir()
        for split, n in (("train.pt", 32), ("test.pt", 16)):
            torch.save({"features": torch.randn(n, 8), "labels": torch.arange(n) % 8}, tmp_path / name / split)
    cfg = _round2_config(tmp_path, out=str(tmp_path / "f"), stop_after_epochs=1, dataset="features",
                         data_root=str(tmp_path / "feats"))
    train(cfg)
    with pytest.raises(CheckpointError, match="different configuration .*data_root"):
        train(TrainConfig.from_dict(dict(cfg.to_dict(), stop_after_epochs=None, resume=True,
                                         data_root=str(tmp_path / "other"))))


def test_eval_checks_the_class_list_of_the_checkpoint(tmp_path):
    """Issue 22 item 6: evaluate_checkpoint of best.pt after the classes file was reordered is refused (it rebuilt
    the hierarchy from the paths and scored the relabelled classes); the file put back evaluates."""
    from haframe_ext.train import evaluate_checkpoint

    names = [f"c{i}" for i in range(8)]
    cfg = _round2_config(tmp_path, classes=_classes_file(tmp_path, names), epochs=1)
    train(cfg)
    _classes_file(tmp_path, names[::-1])
    for name in ("best.pt", "last.pt"):
        with pytest.raises(CheckpointError, match="cannot evaluate .*same class names in another label order"):
            evaluate_checkpoint(Path(cfg.out) / name)
    _classes_file(tmp_path, names)
    assert evaluate_checkpoint(Path(cfg.out) / "best.pt")["metrics"]["top1"] >= 0
