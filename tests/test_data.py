"""Tests for haframe_ext.training.data: synthetic hierarchical data, CIFAR-100 files with the restricted
unpickler, ImageFolder trees and feature files."""

import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from haframe_ext.training.data import (CIFAR100, CifarUnpickler, DataError, FeaturesDataset, ImageFolderDataset,
                              SyntheticHierarchical, check_labels, load_cifar_pickle, load_features,
                              make_datasets, random_crop_flip)
from haframe_ext.hierarchy import Hierarchy
from helpers import cli
from helpers import hostile_touch as _Evil

TOY_EDGES = """root\tA
root\tB
A\tA1
A\tA2
B\tB1
B\tB2
A1\tc0
A1\tc1
A2\tc2
A2\tc3
B1\tc4
B1\tc5
B2\tc6
B2\tc7
"""


@pytest.fixture
def toy(tmp_path):
    p = tmp_path / "toy.tsv"
    p.write_text(TOY_EDGES)
    return Hierarchy.from_edges(str(p))


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_per_seed(toy):
    a = SyntheticHierarchical(toy, 10, 12, 1.0, seed=3, split="train")
    b = SyntheticHierarchical(toy, 10, 12, 1.0, seed=3, split="train")
    c = SyntheticHierarchical(toy, 10, 12, 1.0, seed=4, split="train")
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    assert a.inputs.shape == (80, 12) and a.inputs.dtype == torch.float32
    assert torch.bincount(a.targets, minlength=8).tolist() == [10] * 8
    x, y = a[0]
    assert x.shape == (12,) and y.dtype == torch.int64


def test_synthetic_splits_are_disjoint_and_share_the_generator(toy):
    kw = dict(n_per_class=10, input_dim=6, difficulty=1.0, seed=0, eval_per_class=4)
    tr, va, te = (SyntheticHierarchical(toy, split=s, **kw) for s in ("train", "val", "test"))
    assert len(tr) == 80 and len(va) == 32 and len(te) == 32
    rows = {tuple(r.tolist()) for r in tr.inputs}
    assert not any(tuple(r.tolist()) in rows for r in va.inputs)
    assert not any(tuple(r.tolist()) in rows for r in te.inputs)
    assert torch.equal(tr.prototypes, te.prototypes)  # same classes, different samples
    with pytest.raises(DataError, match="unknown split"):
        SyntheticHierarchical(toy, split="holdout")


def test_synthetic_prototypes_follow_the_tree(toy):
    ds = SyntheticHierarchical(toy, 2, 8, 1.0, seed=0, latent_dim=256)
    P = ds.prototypes
    d = toy.distances()
    dist = torch.cdist(P, P)
    by_level = {lvl: dist[torch.from_numpy(d == lvl)].mean().item() for lvl in (1, 2, 3)}
    assert by_level[1] < by_level[2] < by_level[3]


def test_synthetic_difficulty_zero_is_separable(toy):
    ds = SyntheticHierarchical(toy, 5, 8, 0.0, seed=0)
    for c in range(8):
        rows = ds.inputs[ds.targets == c]
        assert torch.allclose(rows, rows[0].expand_as(rows))


# ----------------------------------------------------------------------------- CIFAR-100 files
def _write_fake_cifar(root, per_class_train=3, per_class_test=1, protocol=2, str_keys=False):
    """A tiny cifar-100-python folder: pickled dicts of bytes keys and numpy arrays, like the real files."""
    root.mkdir(parents=True, exist_ok=True)
    names = Hierarchy.builtin("cifar100").classes
    key = (lambda s: s) if str_keys else (lambda s: s.encode())
    rng = np.random.default_rng(0)

    def blob(n_per):
        labels = [c for _ in range(n_per) for c in range(100)]  # classes interleaved
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        return {key("batch_label"): b"fake", key("fine_labels"): labels,
                key("coarse_labels"): [c // 5 for c in labels], key("data"): data,
                key("filenames"): [f"img{i}.png".encode() for i in range(len(labels))]}

    train, test = blob(per_class_train), blob(per_class_test)
    meta = {key("fine_label_names"): [n.encode() for n in names],
            key("coarse_label_names"): [f"coarse{i}".encode() for i in range(20)]}
    for name, obj in (("train", train), ("test", test), ("meta", meta)):
        with open(root / name, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
    return train, test


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_loader_reads_standard_files(tmp_path, protocol):
    root = tmp_path / "cifar-100-python"
    train, test = _write_fake_cifar(root, protocol=protocol)
    h = Hierarchy.builtin("cifar100")
    tr = CIFAR100(tmp_path, "train", hierarchy=h, val_per_class=1)  # finds the cifar-100-python subfolder
    va = CIFAR100(root, "val", hierarchy=h, val_per_class=1)
    te = CIFAR100(root, "test", hierarchy=h)
    full = CIFAR100(root, "trainval", augment=False, normalize=False)
    assert (len(tr), len(va), len(te), len(full)) == (200, 100, 100, 300)
    assert torch.bincount(va.targets, minlength=100).tolist() == [1] * 100
    # val = the last image of each class in file order (here the last 100 rows)
    x, y = va[0]
    assert x.shape == (3, 32, 32)
    raw = torch.from_numpy(train[b"data"][200]).view(3, 32, 32).float() / 255
    mean = torch.tensor([0.5071, 0.4865, 0.4409]).view(3, 1, 1)
    std = torch.tensor([0.2673, 0.2564, 0.2762]).view(3, 1, 1)
    assert torch.allclose(x, (raw - mean) / std, atol=1e-5) and int(y) == 0
    assert tr.augment and not va.augment and not te.augment
    xf, _ = full[5]
    assert 0.0 <= xf.min() and xf.max() <= 1.0


def test_cifar_string_keys_also_work(tmp_path):
    _write_fake_cifar(tmp_path / "c", str_keys=True, protocol=4)
    assert len(CIFAR100(tmp_path / "c", "test")) == 100


def test_make_datasets_cifar(tmp_path):
    root = tmp_path / "cifar-100-python"
    _write_fake_cifar(root, per_class_train=51)
    sets = make_datasets("cifar100", Hierarchy.builtin("cifar100"), data_root=str(root))
    assert (len(sets["train"]), len(sets["val"]), len(sets["test"])) == (100, 5000, 100)
    assert sets["kind"] == "image"


def test_restricted_unpickler_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "cifar-100-python"
    _write_fake_cifar(root)
    with open(root / "train", "wb") as f:
        pickle.dump({b"data": _Evil()}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load global"):
        CIFAR100(root, "train")
    assert not (tmp_path / "pwned-by-pickle").exists()
    # builtins via any route are refused too
    payload = b"\x80\x02cbuiltins\neval\nq\x00X\x06\x00\x00\x001 + 1q\x01\x85q\x02Rq\x03."
    (root / "meta").write_bytes(payload)
    with pytest.raises(DataError, match="builtins.eval"):
        load_cifar_pickle(root / "meta")


def test_restricted_unpickler_refuses_object_arrays_and_garbage(tmp_path):
    p = tmp_path / "objarr"
    with open(p, "wb") as f:
        pickle.dump({b"data": np.array([1, "x"], dtype=object)}, f, protocol=2)
    with pytest.raises(DataError, match="object arrays"):
        load_cifar_pickle(p)
    (tmp_path / "junk").write_bytes(b"\x00\x01 not a pickle at all")
    with pytest.raises(DataError, match="not a valid CIFAR-100 file"):
        load_cifar_pickle(tmp_path / "junk")
    with pytest.raises(DataError, match="not found"):
        load_cifar_pickle(tmp_path / "missing")
    # the unpickler admits exactly the reconstructors the real files use
    assert set(CifarUnpickler._ALLOWED) == {("numpy.core.multiarray", "_reconstruct"),
                                            ("numpy._core.multiarray", "_reconstruct"),
                                            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


def test_cifar_bad_contents(tmp_path):
    root = tmp_path / "c"
    _write_fake_cifar(root)
    with open(root / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"fine_labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match=r"\(N, 3072\)"):
        CIFAR100(root, "test")
    with open(root / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}, f, protocol=2)
    with pytest.raises(DataError, match="100 classes"):
        CIFAR100(root, "test")
    with pytest.raises(DataError, match="CIFAR-100 folder not found"):
        CIFAR100(tmp_path / "nope", "test")


def test_random_crop_flip_shape_and_content():
    torch.manual_seed(0)
    img = torch.arange(3 * 32 * 32, dtype=torch.float32).view(3, 32, 32) + 1
    outs = [random_crop_flip(img) for _ in range(20)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.equal(o, img) for o in outs)
    assert any((o == 0).any() for o in outs)  # zero padding shows up


# ----------------------------------------------------------------------------- feature files
def test_features_pt_npz_npy(tmp_path):
    feats = torch.randn(10, 4)
    labels = torch.arange(10) % 8
    torch.save({"features": feats, "labels": labels}, tmp_path / "a.pt")
    np.savez(tmp_path / "b.npz", features=feats.numpy(), labels=labels.numpy())
    np.save(tmp_path / "c.npy", feats.numpy())
    np.save(tmp_path / "c_labels.npy", labels.numpy())
    for name in ("a.pt", "b.npz", "c.npy"):
        f, y = load_features(tmp_path / name, num_classes=8)
        assert torch.allclose(f, feats) and torch.equal(y, labels)
    ds = FeaturesDataset(tmp_path / "a.pt", 8)
    assert len(ds) == 10 and ds[3][0].shape == (4,)


def test_features_label_count_mismatch(tmp_path):
    torch.save({"features": torch.randn(4, 3), "labels": torch.tensor([0, 1, 2, 12])}, tmp_path / "x.pt")
    with pytest.raises(DataError, match=r"labels range over \[0, 12\] but the hierarchy has 8 classes"):
        load_features(tmp_path / "x.pt", num_classes=8)
    with pytest.raises(DataError, match="hierarchy has 3 classes"):
        check_labels([-1, 0], 3)


def test_features_refuse_pickled_objects_and_bad_files(tmp_path):
    torch.save({"features": torch.randn(2, 2), "labels": torch.tensor([0, 1]), "x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="not a readable features file"):
        load_features(tmp_path / "evil.pt")
    np.save(tmp_path / "obj.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    np.save(tmp_path / "obj_labels.npy", np.array([0, 1]))
    with pytest.raises(DataError, match="cannot read features"):
        load_features(tmp_path / "obj.npy")
    (tmp_path / "f.txt").write_text("1,2")
    with pytest.raises(DataError, match="unsupported features format"):
        load_features(tmp_path / "f.txt")
    with pytest.raises(DataError, match="features file not found"):
        load_features(tmp_path / "none.pt")
    np.save(tmp_path / "lonely.npy", np.zeros((2, 2)))
    with pytest.raises(DataError, match="labels file not found"):
        load_features(tmp_path / "lonely.npy")
    torch.save({"features": torch.randn(3, 2), "labels": torch.tensor([0, 1])}, tmp_path / "n.pt")
    with pytest.raises(DataError, match="3 feature rows but 2 labels"):
        load_features(tmp_path / "n.pt")


def test_make_datasets_features_folder(tmp_path, toy):
    for split, n in (("train", 40), ("test", 16)):
        torch.save({"features": torch.randn(n, 5), "labels": torch.arange(n) % 8}, tmp_path / f"{split}.pt")
    sets = make_datasets("features", toy, data_root=str(tmp_path), seed=0)
    assert sets["kind"] == "vector" and sets["in_dim"] == 5
    assert len(sets["train"]) + len(sets["val"]) == 40 and len(sets["test"]) == 16
    with pytest.raises(DataError, match="unknown dataset"):
        make_datasets("mnist", toy, data_root=str(tmp_path))
    with pytest.raises(DataError, match="needs a data root"):
        make_datasets("features", toy)
    with pytest.raises(DataError, match="expected a folder with train and test"):
        make_datasets("features", toy, data_root=str(tmp_path / "train.pt"))


# ----------------------------------------------------------------------------- ImageFolder
def test_image_folder(tmp_path, toy):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("c0", "c5"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    sets = make_datasets("imagefolder", toy, data_root=str(tmp_path), image_size=16)
    x, y = sets["test"][0]
    assert x.shape == (3, 16, 16)
    assert sorted(set(sets["test"].targets.tolist())) == [0, 5]  # mapped to the hierarchy's order
    assert len(sets["train"]) + len(sets["val"]) == 4
    (tmp_path / "test" / "zebra").mkdir()
    with pytest.raises(DataError, match="not in the hierarchy"):
        ImageFolderDataset(tmp_path / "test", toy)


def test_synthetic_eval_samples_draw_classes_uniformly():
    h = Hierarchy.random(3000, seed=1)
    kw = dict(n_per_class=1, input_dim=8, seed=4, eval_samples=500)
    train = SyntheticHierarchical(h, split="train", **kw)
    val = SyntheticHierarchical(h, split="val", **kw)
    again = SyntheticHierarchical(h, split="val", **kw)
    assert len(train) == 3000 and len(val) == 500
    assert torch.equal(val.inputs, again.inputs) and torch.equal(val.targets, again.targets)
    assert val.targets.min() >= 0 and val.targets.max() < 3000 and len(val.targets.unique()) > 400
    plain = SyntheticHierarchical(h, split="train", n_per_class=1, input_dim=8, seed=4)
    assert torch.equal(plain.inputs, train.inputs)  # eval_samples leaves the train split alone
    with pytest.raises(DataError, match="eval_samples must be >= 1"):
        SyntheticHierarchical(h, split="val", eval_samples=0)


# ----------------------------------------------------------------------------- package layout
PUBLIC_NAMES = {"DataError", "ArrayDataset", "SyntheticHierarchical", "CIFAR100", "CifarUnpickler", "load_cifar_pickle",
                "ImageFolderDataset", "image_folder", "load_features", "FeaturesDataset", "check_labels",
                "make_datasets", "DATASETS", "random_crop_flip", "CIFAR100_MEAN", "CIFAR100_STD"}


def test_the_data_package_exports_the_same_public_names():
    import haframe_ext.training.data as data

    assert set(data.__all__) == PUBLIC_NAMES
    assert all(hasattr(data, name) for name in PUBLIC_NAMES)
    assert data.DATASETS == ("synthetic", "cifar100", "imagefolder", "features")


def test_frames_and_checkpoints_do_not_import_the_datasets():
    import subprocess
    import sys

    code = ("import sys, haframe_ext.frame, haframe_ext.files, haframe_ext.training.checkpoint, haframe_ext.safe_load; "
            "print(sorted(m for m in sys.modules if m.startswith('haframe_ext.training.data')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


@pytest.mark.parametrize("content,unsafe,fragment", [
    ("evil", True, "it asks for the global posix.system"),
    ("text", False, "KeyError"),
    ("empty", False, ""),
])
def test_describe_torch_load_error_says_unsafe_or_damaged_without_torch_advice(tmp_path, content, unsafe, fragment):
    from haframe_ext.safe_load import describe_torch_load_error

    path = tmp_path / "f.pt"
    if content == "evil":
        torch.save({"x": _Evil()}, path)
    elif content == "text":
        path.write_text("hello")
    else:
        path.write_bytes(b"")
    with pytest.raises(Exception) as info:
        torch.load(path, weights_only=True)
    reason, is_unsafe = describe_torch_load_error(info.value)
    assert is_unsafe is unsafe and fragment in reason and "\n" not in reason
    assert "weights_only" not in reason and "False" not in reason



# ------------------------------------------------------------------------ malicious pickles (RELIABILITY.md section 17)
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
    from haframe_ext.training.data import CIFAR100

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
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "refusing to load global posix.system" in lines[0] and "Traceback" not in r.stderr
    assert not marker.exists()


def test_features_files_with_pickled_code_are_refused_without_side_effects(tmp_path):
    from haframe_ext.training.data import load_features

    marker = tmp_path / "PWNED"
    torch.save({"features": torch.zeros(4, 3), "labels": torch.zeros(4, dtype=torch.long), "x": _Evil(marker)},
               tmp_path / "train.pt")
    with pytest.raises(DataError, match="not a readable features file"):
        load_features(tmp_path / "train.pt", 8)
    np.save(tmp_path / "obj.npy", np.array([_Evil(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(DataError):
        load_features(tmp_path / "obj.npy", 8)
    assert not marker.exists()

