"""``root/<class name>/<image>`` trees (torchvision's ImageFolder layout) with labels in the hierarchy's order."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import DataError

__all__ = ["ImageFolderDataset", "image_folder", "IMG_EXTENSIONS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class _ImageTransform:
    """PIL image -> normalised float tensor (C, S, S): resize shorter side, then a random
    (augment) or centre crop of ``size`` and a random horizontal flip when augmenting."""

    def __init__(self, size: int = 224, augment: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size = int(size)
        self.resize = int(round(self.size * 8 / 7)) if self.size >= 64 else self.size
        self.augment = augment
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, img):
        img = img.convert("RGB")
        w, h = img.size
        s = self.resize / min(w, h)
        img = img.resize((max(self.size, round(w * s)), max(self.size, round(h * s))))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        _, H, W = x.shape
        if self.augment:
            top = int(torch.randint(0, H - self.size + 1, (1,)))
            left = int(torch.randint(0, W - self.size + 1, (1,)))
        else:
            top, left = (H - self.size) // 2, (W - self.size) // 2
        x = x[:, top:top + self.size, left:left + self.size]
        if self.augment and int(torch.randint(0, 2, (1,))) == 1:
            x = x.flip(-1)
        return ((x - self.mean) / self.std).contiguous()


def _pil_loader(path):
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading an ImageFolder needs Pillow (pip install pillow) or torchvision") from None
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class ImageFolderDataset(Dataset):
    """``root/<class name>/<image>`` with labels in the hierarchy's class order.

    Uses ``torchvision.datasets.ImageFolder`` to scan and load when torchvision imports, else an
    equivalent scan (sorted class folders, files with image extensions) and Pillow.
    Folder names must be class names of the hierarchy (a split may lack some classes).
    """

    def __init__(self, root, hierarchy, image_size: int = 224, augment: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"ImageFolder root not found: {root}")
        classes = list(hierarchy.classes)
        index = {c: i for i, c in enumerate(classes)}
        self.transform = _ImageTransform(image_size, augment)
        try:
            import torchvision  # noqa: F401
            from torchvision.datasets import ImageFolder
        except ImportError:
            ImageFolder = None
        if ImageFolder is not None:
            try:
                tv = ImageFolder(str(root))
            except (FileNotFoundError, RuntimeError) as exc:
                raise DataError(f"{root}: {exc}") from None
            folder_classes = tv.classes
            samples = tv.samples
            self._loader = tv.loader
        else:
            folder_classes = sorted(d.name for d in root.iterdir() if d.is_dir())
            samples = []
            for ci, c in enumerate(folder_classes):
                for dirpath, _, files in sorted(os.walk(root / c, followlinks=True)):
                    for fn in sorted(files):
                        if fn.lower().endswith(IMG_EXTENSIONS):
                            samples.append((os.path.join(dirpath, fn), ci))
            self._loader = _pil_loader
        if not folder_classes:
            raise DataError(f"{root}: no class folders found")
        unknown = [c for c in folder_classes if c not in index]
        if unknown:
            raise DataError(f"{root}: {len(unknown)} class folder(s) not in the hierarchy, e.g. {unknown[:3]}")
        if not samples:
            raise DataError(f"{root}: no image files found (extensions {', '.join(IMG_EXTENSIONS)})")
        remap = [index[c] for c in folder_classes]
        self.samples = [(p, remap[c]) for p, c in samples]
        self.targets = torch.tensor([t for _, t in self.samples], dtype=torch.long)
        self.classes = classes
        self.num_classes = len(classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, target = self.samples[i]
        try:
            img = self._loader(path)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        return self.transform(img), self.targets[i]


def image_folder(root, hierarchy, split: str = "train", image_size: int = 224, augment: Optional[bool] = None):
    """The ``split`` subfolder of an ImageFolder tree (``root/train``, ``root/val``, ``root/test``)."""
    root = Path(root)
    path = root / split if (root / split).is_dir() else None
    if path is None:
        raise DataError(f"ImageFolder split folder not found: {root / split}")
    return ImageFolderDataset(path, hierarchy, image_size, augment=(split == "train") if augment is None else augment)
