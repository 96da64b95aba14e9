"""What every dataset kind shares: :class:`DataError`, the split names, label checks and an in-memory dataset."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["DataError", "SPLITS", "check_labels", "ArrayDataset"]

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A dataset cannot be read: a missing file, a bad format, or labels that do not fit the hierarchy."""


def check_labels(labels, num_classes: int, source: str = "dataset") -> torch.Tensor:
    """Return labels as a 1-D int64 tensor; DataError if any is outside [0, num_classes)."""
    t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if t.dim() != 1:
        raise DataError(f"{source}: labels must be 1-D, got shape {tuple(t.shape)}")
    if t.is_floating_point():
        if t.numel() and not bool(torch.all(t == t.round())):
            raise DataError(f"{source}: labels must be integer class indices, got non-integer values")
    elif t.dtype == torch.bool:
        raise DataError(f"{source}: labels must be integer class indices, got booleans")
    t = t.to(torch.int64)
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"{source}: labels range over [{lo}, {hi}] but the hierarchy has {num_classes} classes "
                f"(labels must be in [0, {num_classes})); does the label count match the hierarchy?")
    return t


class ArrayDataset(Dataset):
    """In-memory (inputs, targets) dataset with an optional per-sample transform."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, transform=None, classes=None):
        if len(inputs) != len(targets):
            raise DataError(f"{len(inputs)} inputs but {len(targets)} labels")
        self.inputs = inputs
        self.targets = targets
        self.transform = transform
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        x = self.inputs[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[i]
