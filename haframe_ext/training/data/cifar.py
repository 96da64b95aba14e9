"""CIFAR-100 from the standard python files, read with a restricted unpickler, and its augmentation.

Only the standard CIFAR-100 files are unpickled, by :class:`CifarUnpickler`, which admits only the few numpy
reconstructors those files use.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import DataError, check_labels

__all__ = ["CIFAR100", "CifarUnpickler", "load_cifar_pickle", "random_crop_flip", "CIFAR100_MEAN", "CIFAR100_STD"]

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("CIFAR-100 file: only plain numpy arrays are allowed")
    try:
        from numpy._core.multiarray import _reconstruct as real
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct as real
    return real(subtype, shape, dtype)


def _dtype(*args):
    dt = np.dtype(*args)
    if dt.hasobject:
        raise pickle.UnpicklingError("CIFAR-100 file: object arrays are not allowed")
    return dt


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, 'latin1'): admit only that.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("CIFAR-100 file: only latin-1 encoding of str is allowed")
    return obj.encode("latin1")


class CifarUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR-100 python files: builtin containers and plain numpy arrays only.

    ``find_class`` admits exactly ``numpy.core.multiarray._reconstruct`` (and numpy 2's
    ``numpy._core.multiarray._reconstruct``), ``numpy.ndarray``, ``numpy.dtype`` (refusing object
    dtypes) and ``_codecs.encode`` for latin-1 only (how Python 3 writes bytes at protocol 2);
    every other global raises :class:`pickle.UnpicklingError`.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module, name):
        fn = self._ALLOWED.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: a CIFAR-100 file holds only dicts, lists, "
                "strings and numpy arrays")
        return fn

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("CIFAR-100 file: persistent ids are not allowed")


def load_cifar_pickle(path: Union[str, os.PathLike]) -> dict:
    """Read one CIFAR-100 python file (``train``, ``test`` or ``meta``) safely; keys become str."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CIFAR-100 file not found: {path}")
    try:
        with open(path, "rb") as f:
            obj = CifarUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: not a valid CIFAR-100 file ({exc})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError,
            MemoryError) as exc:
        raise DataError(f"{path}: not a valid CIFAR-100 file ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, found {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _decode_names(names) -> List[str]:
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def random_crop_flip(img: torch.Tensor, padding: int = 4, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard CIFAR augmentation on a (C, H, W) tensor: zero-pad, random crop back to (H, W),
    horizontal flip with probability 1/2. Uses torch's RNG (or ``generator``)."""
    C, H, W = img.shape
    padded = torch.nn.functional.pad(img, (padding, padding, padding, padding))
    r = torch.randint(0, 2 * padding + 1, (2,), generator=generator)
    flip = torch.randint(0, 2, (1,), generator=generator)
    top, left = int(r[0]), int(r[1])
    out = padded[:, top:top + H, left:left + W]
    if int(flip) == 1:
        out = out.flip(-1)
    return out.contiguous()


class CIFAR100(Dataset):
    """CIFAR-100 from the standard ``cifar-100-python`` folder (files ``train``, ``test``, ``meta``).

    ``split``: ``train`` (45,000: all training images but the last 50 of each class),
    ``val`` (those last 50 per class, the paper's validation split), ``test`` (10,000), or
    ``trainval`` (all 50,000).  ``augment`` (default: on for train/trainval) applies
    :func:`random_crop_flip`; images are scaled to [0, 1] and normalised with the CIFAR-100
    mean and std.  With ``hierarchy``, labels are mapped by class name to the hierarchy's order.
    """

    def __init__(self, root, split: str = "train", augment: Optional[bool] = None, normalize: bool = True,
                 hierarchy=None, val_per_class: int = 50):
        if split not in ("train", "val", "test", "trainval"):
            raise DataError(f"unknown CIFAR-100 split {split!r}; valid: train, val, test, trainval")
        root = Path(root)
        if root.is_dir() and (root / "cifar-100-python").is_dir():
            root = root / "cifar-100-python"
        if not root.is_dir():
            raise DataError(f"CIFAR-100 folder not found: {root} (expected the extracted 'cifar-100-python' folder)")
        meta = load_cifar_pickle(root / "meta")
        if "fine_label_names" not in meta:
            raise DataError(f"{root / 'meta'}: no 'fine_label_names' entry")
        names = _decode_names(meta["fine_label_names"])
        blob = load_cifar_pickle(root / ("test" if split == "test" else "train"))
        for key in ("data", "fine_labels"):
            if key not in blob:
                raise DataError(f"{root}: CIFAR-100 file lacks the '{key}' entry")
        data = blob["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{root}: 'data' must be a uint8 array of shape (N, 3072), got "
                            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
        labels = np.asarray(blob["fine_labels"], dtype=np.int64)
        if labels.shape != (data.shape[0],):
            raise DataError(f"{root}: {data.shape[0]} images but {labels.shape} labels")
        labels = check_labels(labels, len(names), f"{root}").numpy()
        if hierarchy is not None:
            classes = list(hierarchy.classes)
            if classes != names:
                index = {c: i for i, c in enumerate(classes)}
                unknown = [n for n in names if n not in index]
                if unknown:
                    raise DataError(f"CIFAR-100 classes not in the hierarchy: {unknown[:5]}"
                                    f"{' ...' if len(unknown) > 5 else ''}")
                remap = np.array([index[n] for n in names], dtype=np.int64)
                labels = remap[labels]
            names = classes
        if split in ("train", "val"):
            val_mask = np.zeros(len(labels), dtype=bool)
            for c in np.unique(labels):
                idx = np.nonzero(labels == c)[0]
                val_mask[idx[-val_per_class:]] = True
            keep = val_mask if split == "val" else ~val_mask
            data, labels = data[keep], labels[keep]
        self.classes = names
        self.num_classes = len(names)
        self.images = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)  # uint8
        self.targets = torch.from_numpy(labels).long()
        self.augment = split in ("train", "trainval") if augment is None else bool(augment)
        self.normalize = normalize
        self._mean = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
        self._std = torch.tensor(CIFAR100_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        x = self.images[i].float().div_(255.0)
        if self.augment:
            x = random_crop_flip(x)
        if self.normalize:
            x = (x - self._mean) / self._std
        return x, self.targets[i]
