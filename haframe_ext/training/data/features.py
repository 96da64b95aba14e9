"""Precomputed feature files (``.pt`` read with ``weights_only=True``, ``.npz``/``.npy`` without pickles)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ...safe_load import describe_torch_load_error
from .common import ArrayDataset, DataError, check_labels

__all__ = ["load_features", "FeaturesDataset", "FEATURE_EXTENSIONS"]

FEATURE_EXTENSIONS = (".pt", ".pth", ".npz", ".npy")


def load_features(path, num_classes: Optional[int] = None):
    """Read a features file; returns ``(features [N, d] float32, labels [N] int64)``.

    - ``.pt``/``.pth``: ``torch.load(weights_only=True)`` of a dict with ``features`` and ``labels``.
    - ``.npz``: arrays ``features`` and ``labels`` (``allow_pickle=False``).
    - ``.npy``: the features; labels in ``<stem>_labels.npy`` or ``<stem>.labels.npy`` beside it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"features file not found: {path}")
    ext = path.suffix.lower()
    try:
        if ext in (".pt", ".pth"):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except OSError:  # permissions, I/O errors: reported as such below
                raise
            except Exception as exc:  # truncated zip, garbage, text (KeyError), refused globals, ...
                reason, unsafe = describe_torch_load_error(exc)
                what = ("not a safe torch file, refused by weights_only loading" if unsafe
                        else "corrupted, truncated or not a torch file")
                raise DataError(f"{path}: not a readable features file ({what}: {reason})") from None
            if not isinstance(obj, dict) or "features" not in obj or "labels" not in obj:
                raise DataError(f"{path}: expected a dict with 'features' and 'labels' tensors")
            feats, labels = obj["features"], obj["labels"]
        elif ext == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "features" not in z.files or "labels" not in z.files:
                    raise DataError(f"{path}: expected arrays 'features' and 'labels', found {z.files}")
                feats, labels = z["features"], z["labels"]
        elif ext == ".npy":
            feats = np.load(path, allow_pickle=False)
            cands = [path.with_name(path.stem + "_labels.npy"), path.with_name(path.stem + ".labels.npy")]
            lab = next((c for c in cands if c.is_file()), None)
            if lab is None:
                raise DataError(f"{path}: labels file not found (expected {cands[0].name} or {cands[1].name})")
            labels = np.load(lab, allow_pickle=False)
        else:
            raise DataError(f"{path}: unsupported features format {ext!r} (use {', '.join(FEATURE_EXTENSIONS)})")
    except DataError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: cannot read features ({exc})") from None
    feats = torch.as_tensor(np.asarray(feats) if not isinstance(feats, torch.Tensor) else feats)
    if feats.dim() != 2 or not (feats.is_floating_point() or feats.dtype in (torch.int64, torch.int32, torch.uint8)):
        raise DataError(f"{path}: features must be a 2-D numeric array (N, d), got {tuple(feats.shape)} {feats.dtype}")
    feats = feats.float().contiguous()
    labels = check_labels(labels, num_classes if num_classes is not None else 2 ** 62, str(path))
    if labels.shape[0] != feats.shape[0]:
        raise DataError(f"{path}: {feats.shape[0]} feature rows but {labels.shape[0]} labels")
    if not bool(torch.isfinite(feats).all()):
        raise DataError(f"{path}: features contain NaN or Inf")
    return feats, labels


class FeaturesDataset(ArrayDataset):
    """A features file as a dataset (see :func:`load_features`)."""

    def __init__(self, path, num_classes: Optional[int] = None, classes=None):
        feats, labels = load_features(path, num_classes)
        super().__init__(feats, labels, classes=classes)
        self.num_classes = num_classes
