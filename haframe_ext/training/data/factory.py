"""``make_datasets``: the train/val/test datasets of a dataset name, a data root and a hierarchy."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

from .cifar import CIFAR100
from .common import SPLITS, DataError
from .features import FEATURE_EXTENSIONS, FeaturesDataset
from .imagefolder import ImageFolderDataset, image_folder
from .synthetic import SyntheticHierarchical

__all__ = ["make_datasets", "DATASETS"]

DATASETS = ("synthetic", "cifar100", "imagefolder", "features")


def _num_classes(hierarchy) -> int:
    """The hierarchy's class count; DataError without a hierarchy."""
    if hierarchy is None:
        raise DataError("a hierarchy is needed to know the classes")
    return int(hierarchy.num_classes)


def _find_split_file(root: Path, split: str) -> Optional[Path]:
    for ext in FEATURE_EXTENSIONS:
        p = root / f"{split}{ext}"
        if p.is_file():
            return p
    return None


def make_datasets(name: str, hierarchy, *, data_root=None, seed: int = 0, n_per_class: int = 50,
                  eval_per_class: Optional[int] = None, eval_samples: Optional[int] = None,
                  input_dim: int = 64, difficulty: float = 1.0,
                  image_size: int = 224, augment: bool = True) -> Dict[str, object]:
    """Build ``{"train", "val", "test"}`` datasets plus ``kind`` ("vector" or "image"), ``in_dim``
    (vector size) and ``classes``.

    ``name``: ``synthetic`` (no files), ``cifar100`` (``data_root`` = the ``cifar-100-python``
    folder), ``imagefolder`` (``data_root`` with ``train``/``val``/``test`` subfolders; ``val``
    optional: then 10% of train, seeded), ``features`` (``data_root`` = a folder with
    ``train``/``val``/``test`` files ``.pt``/``.npz``/``.npy``; ``val`` optional likewise).
    """
    K = _num_classes(hierarchy)
    if name == "synthetic":
        kw = dict(n_per_class=n_per_class, input_dim=input_dim, difficulty=difficulty, seed=seed,
                  eval_per_class=eval_per_class, eval_samples=eval_samples)
        sets = {s: SyntheticHierarchical(hierarchy, split=s, **kw) for s in SPLITS}
        return dict(sets, kind="vector", in_dim=input_dim, classes=list(hierarchy.classes))
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    if data_root is None:
        raise DataError(f"dataset {name!r} needs a data root (--data-root)")
    root = Path(data_root)
    if not root.exists():
        raise DataError(f"data root not found: {root}")
    if name == "cifar100":
        if K != 100:
            raise DataError(f"CIFAR-100 has 100 classes but the hierarchy has {K}")
        sets = {s: CIFAR100(root, s, augment=(augment and s == "train"), hierarchy=hierarchy) for s in SPLITS}
        return dict(sets, kind="image", in_dim=None, classes=list(hierarchy.classes))
    if name == "imagefolder":
        train = image_folder(root, hierarchy, "train", image_size, augment=augment)
        test = image_folder(root, hierarchy, "test", image_size, augment=False)
        if (root / "val").is_dir():
            val = image_folder(root, hierarchy, "val", image_size, augment=False)
        else:
            train, val = _holdout(train, seed, lambda: ImageFolderDataset(root / "train", hierarchy, image_size, False))
        return dict(train=train, val=val, test=test, kind="image", in_dim=None, classes=list(hierarchy.classes))
    # features
    files = {s: _find_split_file(root, s) for s in SPLITS} if root.is_dir() else {}
    if not root.is_dir() or files["train"] is None or files["test"] is None:
        raise DataError(f"{root}: expected a folder with train and test feature files "
                        f"(train.pt / train.npz / train.npy, test.*, optional val.*)")
    train = FeaturesDataset(files["train"], K, hierarchy.classes)
    test = FeaturesDataset(files["test"], K, hierarchy.classes)
    if files["val"] is not None:
        val = FeaturesDataset(files["val"], K, hierarchy.classes)
    else:
        train, val = _holdout(train, seed, None)
    dims = {_vector_dim(train), _vector_dim(val), _vector_dim(test)}
    if len(dims) != 1:
        raise DataError(f"{root}: train/val/test features have different dimensions {sorted(dims)}")
    return dict(train=train, val=val, test=test, kind="vector", in_dim=dims.pop(), classes=list(hierarchy.classes))


def _vector_dim(ds) -> int:
    while isinstance(ds, torch.utils.data.Subset):
        ds = ds.dataset
    return int(ds.inputs.shape[1])


def _holdout(train, seed: int, eval_factory, fraction: float = 0.1):
    """Split a seeded ``fraction`` of ``train`` off as validation (the val part without augmentation)."""
    n = len(train)
    g = torch.Generator().manual_seed(int(seed) + 7919)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, int(round(n * fraction)))
    val_idx, train_idx = perm[:n_val].tolist(), perm[n_val:].tolist()
    eval_base = eval_factory() if eval_factory is not None else train
    return torch.utils.data.Subset(train, train_idx), torch.utils.data.Subset(eval_base, val_idx)
