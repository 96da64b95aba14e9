"""Datasets: synthetic hierarchical data, CIFAR-100 (standard python files), ImageFolder trees and
precomputed feature files, all with labels in the hierarchy's class order.

Nothing here unpickles a user file except the standard CIFAR-100 files, which are read with a
restricted unpickler (:class:`CifarUnpickler`) that admits only the few numpy reconstructors those
files use.  Feature files are read with ``torch.load(weights_only=True)`` or ``numpy.load(allow_pickle=False)``.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DataError", "ArrayDataset", "SyntheticHierarchical", "CIFAR100", "CifarUnpickler", "load_cifar_pickle",
    "ImageFolderDataset", "image_folder", "load_features", "FeaturesDataset", "check_labels",
    "make_datasets", "DATASETS", "random_crop_flip", "CIFAR100_MEAN", "CIFAR100_STD",
]

DATASETS = ("synthetic", "cifar100", "imagefolder", "features")
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A dataset cannot be read: a missing file, a bad format, or labels that do not fit the hierarchy."""


# ----------------------------------------------------------------------------- torch.load failures
# torch's advice that comes with a failed weights_only load ("Re-running `torch.load` with `weights_only` set
# to `False` will likely succeed ..."): false for a damaged file and unsafe for a hostile one, so never shown
_UNSAFE_ADVICE = re.compile(r"weights_only\W*(?:set\s+to\W*|=\s*)False|arbitrary code execution|trusted source|"
                            r"trust the source|add_safe_globals|safe_globals|allowlist|file an issue|"
                            r"Weights only load failed|two options|documentation of torch\.load", re.I)
# well-formed pickles that ask for something the weights-only unpickler refuses (code, arbitrary classes)
_REFUSED = re.compile(r"Trying to call reduce for unrecognized function|Can only (?:create new object|build)|"
                      r"Cannot use ``weights_only=True`` with (?:TorchScript archives|files saved in the legacy \.tar)")


def describe_torch_load_error(exc: BaseException) -> Tuple[str, bool]:
    """``(reason, unsafe)`` for an exception raised by ``torch.load(path, weights_only=True)``.

    ``unsafe`` is True when the file is a readable pickle that asks for something the weights-only
    unpickler refuses (a global such as ``posix.system``, an arbitrary class, a TorchScript archive):
    the file is not a *safe* torch file, as opposed to a corrupted, truncated or foreign one.
    ``reason`` is one line without torch's advice to retry with ``weights_only=False`` (wrong for a
    damaged file, dangerous for a hostile one).
    """
    text = str(exc)
    m = re.search(r"GLOBAL\s+(\S+?)(?:\s+whose module|\s+was not an allowed global|\s|$)", text)
    if m:
        return f"it asks for the global {m.group(1)}", True
    inner = text.rsplit("WeightsUnpickler error:", 1)[-1]
    m = _REFUSED.search(inner)
    if m:
        what = inner[m.start():].split("``torch.load``")[0]
        what = " ".join(what.split()).rstrip(". ")
        what = re.sub(r"\s*(?:via|allowlisted via)\s*`add_safe_globals`", "", what)
        if "TorchScript" in what:
            what = "it is a TorchScript archive"
        elif "legacy .tar" in what:
            what = "it is in torch's legacy .tar format"
        return what, True
    if isinstance(exc, EOFError):
        return "the file ends early", False
    if isinstance(exc, KeyError):  # the legacy (non-zip) unpickler reading a text or other non-torch file
        return f"the legacy torch unpickler failed with KeyError {text}", False
    sentences = re.split(r"(?<=[.!?])\s+|\n+", inner)
    keep = [s.strip() for s in sentences if s.strip() and not _UNSAFE_ADVICE.search(s)]
    detail = " ".join(keep[0].split()).rstrip(".") if keep else ""  # the first sentence says what failed
    if not detail:
        detail = type(exc).__name__
    elif len(detail) > 300:
        detail = detail[:297] + "..."
    if re.fullmatch(r"Unsupported operand \d+", detail):
        detail = f"unpickling stopped at an unsupported opcode {detail.split()[-1]}"
    return detail, False


# ----------------------------------------------------------------------------- helpers
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


def _num_classes(hierarchy) -> int:
    if hierarchy is None:
        raise DataError("a hierarchy is needed to know the classes")
    return int(hierarchy.num_classes)


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


# ----------------------------------------------------------------------------- synthetic
class SyntheticHierarchical(Dataset):
    """A seeded synthetic classification task whose class geometry follows a hierarchy.

    Generation (all from ``seed``; only the per-sample noise depends on ``split``):

    1. Every tree node below the root gets a random offset ``o_v ~ N(0, s_t^2 I_L)`` in a latent
       space of dimension ``L = latent_dim``, with ``s_t = decay^(t-1)`` for a node at depth t
       (scaled so that ``sum_t s_t^2 = 1`` over the deepest path): coarse splits are large,
       fine splits small.
    2. The prototype of a class (a leaf) is the sum of the offsets on its root -> leaf path, so
       classes close in the tree are close in latent space.
    3. A sample of class c is ``z = p_c + difficulty * noise_scale * eps`` with ``eps ~ N(0, I_L)``.
    4. The input is ``x = tanh(z A1 + b1) A2 + 0.05 * difficulty * eta`` with a fixed random
       two-layer map (A1: L x 2D, A2: 2D x D, D = ``input_dim``) and ``eta ~ N(0, I_D)``.

    ``difficulty`` is the one knob: 0 gives perfectly separable prototypes, about 1 makes the
    finest splits (siblings) hard while the coarse structure stays learnable.
    ``n_per_class`` samples per class in the train split, ``eval_per_class`` (default the same)
    in ``val`` and ``test``, or, with ``eval_samples``, that many samples of uniformly drawn classes
    in each of ``val`` and ``test`` (with 10^5 classes, a per-class count would make evaluation cost
    more than training).  Splits are drawn from independent streams of the same generator.
    """

    def __init__(self, hierarchy, n_per_class: int = 50, input_dim: int = 64, difficulty: float = 1.0,
                 seed: int = 0, split: str = "train", *, latent_dim: Optional[int] = None,
                 eval_per_class: Optional[int] = None, eval_samples: Optional[int] = None, decay: float = 0.6,
                 noise_scale: float = 0.35):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        if int(n_per_class) < 1 or int(input_dim) < 1:
            raise DataError(f"n_per_class and input_dim must be >= 1, got {n_per_class}, {input_dim}")
        if difficulty < 0:
            raise DataError(f"difficulty must be >= 0, got {difficulty}")
        if eval_samples is not None and int(eval_samples) < 1:
            raise DataError(f"eval_samples must be >= 1, got {eval_samples}")
        self.hierarchy = hierarchy
        self.classes = list(hierarchy.classes)
        self.num_classes = K = len(self.classes)
        self.split = split
        self.seed = int(seed)
        self.input_dim = D = int(input_dim)
        self.latent_dim = L = int(latent_dim) if latent_dim is not None else D
        self.difficulty = float(difficulty)
        n = int(n_per_class) if split == "train" else int(eval_per_class or n_per_class)

        rng = np.random.default_rng([self.seed, 0x5EED])
        tree = hierarchy.tree  # nodes in breadth-first order: parent [n], depth [n], class_idx [K]
        height = int(tree.depth.max())
        scales = np.array([decay ** (t - 1) for t in range(1, height + 1)], dtype=np.float64)
        scales /= np.sqrt((scales ** 2).sum())
        offsets = np.zeros((tree.num_nodes, L))  # [n, L]; the root's is 0
        offsets[1:] = rng.standard_normal((tree.num_nodes - 1, L)) * scales[tree.depth[1:] - 1, None]
        for t in range(1, height + 1):  # depth by depth: a parent's prototype exists before its children's
            sl = slice(*np.searchsorted(tree.depth, [t, t + 1]))
            offsets[sl] += offsets[tree.parent[sl]]
        protos = offsets[tree.class_idx]  # [K, L]
        H = 2 * D
        A1 = rng.standard_normal((L, H)) / np.sqrt(L) * 1.5
        b1 = rng.standard_normal(H) * 0.1
        A2 = rng.standard_normal((H, D)) / np.sqrt(H)
        self.prototypes = torch.from_numpy(protos).float()

        split_rng = np.random.default_rng([self.seed, 1 + SPLITS.index(split), 0xDA7A])
        if split != "train" and eval_samples is not None:
            y = np.sort(split_rng.integers(0, K, int(eval_samples)))
        else:
            y = np.repeat(np.arange(K), n)
        N = len(y)
        z = protos[y] + self.difficulty * noise_scale * split_rng.standard_normal((N, L))
        x = np.tanh(z @ A1 + b1) @ A2 + 0.05 * self.difficulty * split_rng.standard_normal((N, D))
        perm = split_rng.permutation(N)
        self.inputs = torch.from_numpy(x[perm]).float().contiguous()
        self.targets = torch.from_numpy(y[perm]).long()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.inputs[i], self.targets[i]


# ----------------------------------------------------------------------------- CIFAR-100
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


# ----------------------------------------------------------------------------- ImageFolder
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


# ----------------------------------------------------------------------------- feature files
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


def _find_split_file(root: Path, split: str) -> Optional[Path]:
    for ext in FEATURE_EXTENSIONS:
        p = root / f"{split}{ext}"
        if p.is_file():
            return p
    return None


# ----------------------------------------------------------------------------- factory
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
