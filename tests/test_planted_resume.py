"""Resume compares the distance matrix by content, every entry of it (issue 24): a --distances file edited in one
entry, same shape, is refused; the same matrix in another file, dtype or memory order resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from haframe_ext.hierarchy import Hierarchy
from haframe_ext.training.resume import inputs_digest
from haframe_ext.train import CheckpointError, TrainConfig, load_checkpoint, train
from helpers import EPOCHS, TOY_EDGES, brute_tree_distances
from helpers import toy_train_config as _round2_config


def toy_distances(folder: Path) -> np.ndarray:
    """The toy tree's published distances, int64 [8, 8], from its parent links."""
    (folder / "toy.tsv").write_text(TOY_EDGES)
    return brute_tree_distances(Hierarchy.from_edges(folder / "toy.tsv"), "published").astype(np.int64)


@pytest.mark.parametrize("entry", [(0, 1), (3, 6), (7, 0)])
@pytest.mark.parametrize("dtype", [np.int64, np.float64, np.float32])
def test_matrix_digest_sees_every_entry(tmp_path, entry, dtype):
    """One entry changed (symmetrically, same shape) changes the digest; the same values as another dtype or in
    Fortran order do not."""
    d = toy_distances(tmp_path)
    h = Hierarchy.from_edges(tmp_path / "toy.tsv")
    base = inputs_digest(h, d.astype(dtype))["distances"]
    assert inputs_digest(h, np.asfortranarray(d.astype(np.float64)))["distances"] == base
    edited = d.astype(dtype)
    i, j = entry
    edited[i, j] = edited[j, i] = d[i, j] + 1
    assert inputs_digest(h, edited)["distances"] != base


@pytest.mark.slow  # two short training runs (15 s on a loaded machine); the digest test above runs always
def test_resume_with_a_distances_file_edited_in_one_entry_is_refused(tmp_path):
    """A run trained with --distances resumes from an identical copy at another path, but not once one entry of
    the file (same shape) has changed: its labels' distances, and so its loss targets, would change."""
    d = toy_distances(tmp_path)
    np.save(tmp_path / "d.npy", d)
    cfg = _round2_config(tmp_path, distances=str(tmp_path / "d.npy"), stop_after_epochs=1)
    train(cfg)
    resume = dict(cfg.to_dict(), stop_after_epochs=None, resume=True)
    edited = d.copy()
    edited[0, 1] = edited[1, 0] = 2  # was 1: c0 and c1 share their parent A1
    np.save(tmp_path / "d.npy", edited)
    with pytest.raises(CheckpointError, match="class distances .* differ from the checkpoint's"):
        train(TrainConfig.from_dict(resume))
    np.save(tmp_path / "copy.npy", d.astype(np.float64))
    res = train(TrainConfig.from_dict(dict(resume, distances=str(tmp_path / "copy.npy"))))
    assert res["epochs"] == EPOCHS and load_checkpoint(Path(cfg.out) / "last.pt")["epoch"] == EPOCHS
