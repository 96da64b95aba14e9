"""Training and evaluation: :class:`TrainConfig`, model and data from a config, the training loop
:func:`train`, :func:`evaluate_checkpoint` and the multi-seed runner :func:`run_seeds`.

Checkpoint files live in :mod:`haframe_ext.checkpoint`, process groups and sharding in
:mod:`haframe_ext.distributed` and the no-download demo in :mod:`haframe_ext.demo`; their public
names (:func:`load_checkpoint`, :class:`CheckpointError`, :func:`atomic_save`,
:class:`DistributedError`, :class:`GlobalBatchSampler`, :func:`demo`, ...) are importable from here too.

Each epoch appends one record to ``metrics.jsonl``: ``train_loss``, ``train_top1`` (percent, as the
validation ``top1``; null for the fixed-frame methods trained with the fused loss, whose training step
forms no logits outside the fused op), ``lr``, ``alpha``, the validation metrics and ``best_epoch``.

Reliability contract of :func:`train`:

- A checkpoint after every epoch, written atomically (temp file in the same folder, fsync,
  ``os.replace``): ``last.pt`` is the newest, ``prev.pt`` the one before it, ``best.pt`` the best
  on validation.  Everything is stored as tensors and plain Python values, so checkpoints load
  with ``torch.load(weights_only=True)``.
- ``resume=True`` continues from ``last.pt`` (or ``prev.pt`` when a crash happened between the two
  renames) exactly: model, optimizer, LR step, loss state, best metric and RNG states are restored,
  and each epoch's random streams (shuffling, augmentation) are derived from ``(seed, epoch, rank)``,
  so on CPU a run killed at any point and resumed ends with the same weights, bit for bit, as an
  uninterrupted one (the killed epoch is redone from its start).  Bit-exactness on CPU also needs
  the same number of torch intra-op threads (``torch.get_num_threads()``, e.g. ``OMP_NUM_THREADS``):
  reductions are split by thread, so 1 and 2 threads differ in the last bits (~4e-7 after 3 epochs of
  a toy run).  Each checkpoint records the count (``"threads"``) and a resume with another count
  warns.  A temp file left by a write that was killed (``.last.pt.tmp-<pid>`` and the like, of a
  process no longer running) is removed when the next checkpoint is written.
- A truncated or corrupted checkpoint raises :class:`CheckpointError` naming the file and the
  previous checkpoint to fall back to; a file that weights-only loading refuses (a pickled global
  such as ``os.system``) is reported as "not a safe checkpoint" and nothing in it is run.  Messages
  never repeat torch's advice to retry with ``weights_only=False``.
- A non-finite loss or a non-finite global gradient norm (checked after ``backward``, all-reduced
  across ranks, before ``optimizer.step()``) stops the run with :class:`TrainingDivergedError`, and
  a checkpoint whose model or optimizer state holds a NaN/Inf is never written (the run stops
  instead), so the last good checkpoint is kept untouched and really is finite.  With fp16 AMP on
  CUDA (a ``GradScaler``) Inf/NaN gradients are expected now and then: the scaler detects them
  after unscaling and skips that step, so the gradient check is left to it (the loss check and the
  checkpoint check still apply).
- Under ``torchrun`` (``WORLD_SIZE`` > 1): gloo on CPU, nccl on GPU, a distributed batch sampler
  (:class:`GlobalBatchSampler`: every world size sees the same global batches), metrics reduced
  across ranks, only rank 0 writes files; a collective that does not complete
  within ``dist_timeout`` seconds (a dead peer) raises :class:`DistributedError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import os
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from . import metrics as _metrics
from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, FolderInUseError, _atomic_write_text,
                         _rotate_save, _seal, _set_rng_state, atomic_save, claim_folder, load_checkpoint,
                         release_folder)
from .data import DataError, make_datasets
from .hierarchy import BUILTIN_NAMES, CONVENTIONS, Hierarchy, as_distance_matrix
from .distributed import (DistributedError, GlobalBatchSampler, _derive_seed, _Dist, _gather_rng, _gather_rows,
                          _is_comm_error)
from .models import BACKBONES, FIXED_FRAME_METHODS, build_frame, build_loss, build_model, check_method
from .nn import FixedFrameClassifier, HAFrameLoss

__all__ = [
    "TrainConfig", "train", "evaluate_checkpoint", "run_seeds", "demo", "load_checkpoint",
    "CheckpointError", "TrainingDivergedError", "DistributedError", "load_hierarchy", "atomic_save",
    "build_from_config",
]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


# ----------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in every checkpoint and in results.json)."""

    out: str = "runs/haframe"               # output folder (checkpoints, metrics.jsonl, results.json)
    method: str = "haframe"                 # cross-entropy | haframe | etf | haframe-ce
    dataset: str = "synthetic"              # synthetic | cifar100 | imagefolder | features
    data_root: Optional[str] = None         # cifar-100-python folder / ImageFolder root / features folder
    hierarchy: str = "cifar100"             # builtin name, an edge-list file, or random:K (a seeded random tree)
    classes: Optional[str] = None           # class-order file for an edge-list hierarchy
    distances: Optional[str] = None         # optional .npy/.csv distance matrix (overrides the tree's)
    distance_convention: str = "published"  # published (D - depth(LCA), the published matrices) | height
    backbone: Optional[str] = None          # mlp | small-cnn | wrn28 | resnet50 (default: mlp / wrn28)
    hidden: int = 512                       # mlp width
    depth: int = 2                          # mlp layers
    widen_factor: int = 10                  # WRN-28-k
    pretrained: bool = False                # resnet50: ImageNet weights
    feature_dim: Optional[int] = None       # frame dim (default K) / type-I width (default 512)
    num_blocks: int = 2                     # residual blocks in the type-II layer
    gamma: float = 2.0
    s_min: Union[str, float] = "exact"
    alpha: float = 0.4
    alpha_schedule: str = "constant"
    alpha_period: Optional[float] = None
    epochs: int = 100
    batch_size: int = 64                    # global batch (split over ranks under torchrun)
    eval_batch_size: int = 512
    lr: float = 0.1
    backbone_lr_scale: float = 1.0          # backbone lr = lr * scale (transform layers and classifier: lr)
    min_lr: float = 0.0                     # cosine schedule floor
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    grad_clip: Optional[float] = None       # max global grad norm
    amp: bool = True                        # autocast on CUDA only (bf16 where supported, else fp16 + scaler)
    seed: int = 0
    deterministic: bool = True
    num_workers: int = 0
    device: str = "auto"
    resume: bool = False
    resume_from: Optional[str] = None       # explicit checkpoint to resume from (default out/last.pt)
    overwrite: bool = False                 # start over in an out folder that holds an earlier run (its files go)
    n_per_class: int = 50                   # synthetic
    eval_per_class: Optional[int] = None    # synthetic val/test per class (default n_per_class)
    eval_samples: Optional[int] = None      # synthetic val/test: this many samples of random classes instead
    input_dim: int = 64                     # synthetic
    difficulty: float = 1.0                 # synthetic
    image_size: int = 224                   # imagefolder
    augment: bool = True
    select_metric: str = "top1"             # validation metric for best.pt (top* maximised, others minimised)
    eval_ks: Tuple[int, ...] = (1, 5, 20)
    progress: bool = True
    tensorboard: bool = True
    dist_timeout: float = 300.0             # seconds before a stuck collective fails
    stop_after_epochs: Optional[int] = None  # stop this invocation after N epochs (as if killed; for tests)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        d = dict(d)
        if isinstance(d.get("eval_ks"), list):  # JSON has no tuples; the element types are checked by validate()
            d["eval_ks"] = tuple(d["eval_ks"])
        return cls(**d)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eval_ks"] = list(d["eval_ks"])
        return d

    def validate(self) -> None:
        """Check every field's type and range (a ValueError naming the field and its flag); ints given for
        float fields become floats."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_field(f.name, str(f.type), getattr(self, f.name)))
        check_method(self.method)
        if self.backbone is not None and self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.device != "auto" and not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r} (--device)")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr}) (--min-lr, --lr)")
        if self.distance_convention not in CONVENTIONS:
            raise ValueError(f"distance_convention must be one of {', '.join(CONVENTIONS)}, got "
                             f"{_shown(self.distance_convention)} (--distance-convention)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# the range of each numeric TrainConfig field: (test, how the message states it); types come from the annotations
_RANGES = {
    "hidden": (lambda v: v >= 1, ">= 1"), "depth": (lambda v: v >= 1, ">= 1"),
    "widen_factor": (lambda v: v >= 1, ">= 1"), "feature_dim": (lambda v: v >= 1, ">= 1"),
    "num_blocks": (lambda v: v >= 0, ">= 0"), "gamma": (lambda v: v > 0, "> 0"),
    "alpha": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"), "alpha_period": (lambda v: v > 0, "> 0 (epochs)"),
    "epochs": (lambda v: v >= 1, ">= 1"), "batch_size": (lambda v: v >= 2, ">= 2 (batch norm)"),
    "eval_batch_size": (lambda v: v >= 1, ">= 1"), "lr": (lambda v: v > 0, "> 0"),
    "backbone_lr_scale": (lambda v: v >= 0, ">= 0"), "min_lr": (lambda v: v >= 0, ">= 0"),
    "warmup_epochs": (lambda v: v >= 0, ">= 0"), "momentum": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "weight_decay": (lambda v: v >= 0, ">= 0"), "grad_clip": (lambda v: v > 0, "> 0"),
    "seed": (lambda v: 0 <= v < 2 ** 63, "in [0, 2**63)"), "num_workers": (lambda v: v >= 0, ">= 0"),
    "n_per_class": (lambda v: v >= 1, ">= 1"),
    "eval_per_class": (lambda v: v >= 1, ">= 1 (omit it for the default, n_per_class)"),
    "eval_samples": (lambda v: v >= 1, ">= 1 (omit it for eval_per_class samples of every class)"),
    "input_dim": (lambda v: v >= 1, ">= 1"), "difficulty": (lambda v: v >= 0, ">= 0"),
    "image_size": (lambda v: v >= 1, ">= 1"), "dist_timeout": (lambda v: v > 0, "> 0 (seconds)"),
    "stop_after_epochs": (lambda v: v >= 1, ">= 1"),
    "eval_ks": (lambda v: v >= 1, ">= 1 (the k of top-k and HierDist@k)"),
}

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def _shown(v: Any) -> str:
    """A config value as the message quotes it (cut at 60 characters), with the JSON kind of a string or null."""
    text = json.dumps(v) if v is None or isinstance(v, bool) else repr(v)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} (a string)" if isinstance(v, str) else text


def _check_field(name: str, annotation: str, v: Any) -> Any:
    """``v`` checked against the field's type and range; raises a ValueError naming the field and its flag."""
    tp = annotation.replace("typing.", "")
    optional = tp.startswith("Optional[")
    if optional:
        if v is None:
            return None
        tp = tp[len("Optional["):-1]

    def bad(what: str) -> ValueError:
        none = " or null (omitted)" if optional else ""
        return ValueError(f"{name} must be {what}{none}, got {_shown(v)} ({_flag(name)})")

    def number(x, integer: bool):
        allowed = numbers.Integral if integer else numbers.Real  # numpy scalars too
        if isinstance(x, bool) or not isinstance(x, allowed):
            if integer and not isinstance(x, bool) and isinstance(x, numbers.Real) and float(x).is_integer():
                raise bad("an integer (written without a decimal point)")
            raise bad("an integer" if integer else "a number")
        if not integer and not math.isfinite(x):
            raise bad("a finite number")
        return int(x) if integer else float(x)

    rng = _RANGES.get(name)
    if tp == "bool":
        if not isinstance(v, bool):
            raise bad("true or false" + (" (a JSON boolean, without quotes)" if isinstance(v, str) else ""))
        return v
    if tp == "str":
        if not isinstance(v, str) or not v:
            raise bad("a non-empty string")
        return v
    if tp == "Union[str, float]":  # s_min
        if v in ("exact", "grid"):
            return v
        if isinstance(v, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad("'exact', 'grid' or a finite number")
        return float(v)
    if tp.startswith("Tuple[int"):
        integers = isinstance(v, (list, tuple)) and all(isinstance(k, numbers.Integral) and not isinstance(k, bool)
                                                          for k in v)
        if not integers or not v:
            raise bad("a non-empty list of integers")
        ks = tuple(int(k) for k in v)
        bad_k = next((k for k in ks if not rng[0](k)), None)
        if bad_k is not None:
            raise ValueError(f"{name} must be {rng[1]}, got {bad_k} ({_flag(name)})")
        return ks
    if tp in ("int", "float"):
        x = number(v, tp == "int")
        if rng is not None and not rng[0](x):
            raise ValueError(f"{name} must be {rng[1]}, got {x!r} ({_flag(name)})")
        return x
    raise AssertionError(f"TrainConfig field {name}: no check for type {annotation}")


# fields that must agree between a checkpoint and the run resuming from it
# (the hierarchy, classes and distances files are compared by content, see _inputs_digest, not by path)
_RESUME_KEYS = ("method", "dataset", "backbone", "hidden", "depth", "widen_factor",
                "feature_dim", "num_blocks", "gamma", "s_min", "alpha", "alpha_schedule", "alpha_period",
                "batch_size", "lr", "backbone_lr_scale", "min_lr", "warmup_epochs", "momentum", "weight_decay",
                "nesterov", "grad_clip", "seed", "n_per_class", "eval_per_class", "eval_samples", "input_dim",
                "difficulty", "distance_convention",
                "image_size", "augment", "select_metric")
# compared by path only for a checkpoint written before the content digests
_RESUME_PATH_KEYS = ("hierarchy", "distances")


# ----------------------------------------------------------------------------- small utilities
def load_hierarchy(spec: str, classes: Optional[str] = None, convention: str = "published"):
    """A builtin hierarchy by name, an edge-list file (with an optional class-order file), or random:K."""
    if spec in BUILTIN_NAMES:
        h = Hierarchy.builtin(spec)
    elif os.path.isfile(spec):
        h = Hierarchy.from_edges(spec, classes=classes)
    elif re.fullmatch(r"random:\d+", spec):
        h = Hierarchy.random(int(spec.split(":")[1]))
    else:
        raise ValueError(f"unknown hierarchy {spec!r}: not a builtin name ({', '.join(BUILTIN_NAMES)}), an "
                         "existing file, nor random:K (a seeded random tree of K classes)")
    return h.with_convention(convention)


def _distances_for(config: TrainConfig, hierarchy):
    """The distance matrix of --distances, or else the Hierarchy itself (tree queries, no K x K matrix)."""
    if config.distances:
        if not os.path.isfile(config.distances):
            raise ValueError(f"distance matrix file not found: {config.distances}")
        d = as_distance_matrix(config.distances)
        K = hierarchy.num_classes
        if d.shape != (K, K):
            raise ValueError(f"{config.distances}: distance matrix is {d.shape} but the hierarchy has {K} classes")
        return d
    return hierarchy


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def _worker_init(worker_id: int) -> None:
    s = torch.initial_seed()
    np.random.seed(s % 2 ** 32)
    random.seed(s)


def _is_better(name: str, value: float, best: Optional[float]) -> bool:
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if name.startswith("top") else value < best


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(d):
    """Metrics dict -> plain floats/ints (JSON and weights_only friendly)."""
    if isinstance(d, dict):
        return {str(k): _clean(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_clean(v) for v in d]
    if isinstance(d, torch.Tensor):
        return d.item() if d.numel() == 1 else d.tolist()
    if isinstance(d, np.generic):
        return d.item()
    if isinstance(d, np.ndarray):
        return d.tolist()
    return d


# ----------------------------------------------------------------------------- model + data from a config
def build_from_config(config: TrainConfig, hierarchy=None, datasets=None):
    """Hierarchy, distances, datasets, model and loss described by a config (no training)."""
    h = (hierarchy if hierarchy is not None else load_hierarchy(config.hierarchy, config.classes)).with_convention(
        config.distance_convention)
    d = _distances_for(config, h)
    if datasets is None:
        datasets = make_datasets(
            config.dataset, h, data_root=config.data_root, seed=config.seed, n_per_class=config.n_per_class,
            eval_per_class=config.eval_per_class, eval_samples=config.eval_samples, input_dim=config.input_dim,
            difficulty=config.difficulty, image_size=config.image_size, augment=config.augment)
    K = h.num_classes
    backbone = config.backbone or ("mlp" if datasets["kind"] == "vector" else "wrn28")
    if datasets["kind"] == "vector" and backbone != "mlp":
        raise ValueError(f"dataset {config.dataset!r} gives feature vectors: use the 'mlp' backbone, not {backbone!r}")
    if datasets["kind"] == "image" and backbone == "mlp":
        raise ValueError(f"dataset {config.dataset!r} gives images: use small-cnn, wrn28 or resnet50, not mlp")
    frame = None
    if config.method in FIXED_FRAME_METHODS:
        tree = isinstance(d, Hierarchy)
        frame = build_frame(config.method, K, hierarchy=d if tree else None, distances=None if tree else d,
                            gamma=config.gamma, s_min=config.s_min, dim=config.feature_dim, seed=config.seed)
    bkw: Dict[str, Any] = {}
    if backbone == "mlp":
        bkw = dict(in_dim=datasets["in_dim"], hidden=config.hidden, depth=config.depth)
    elif backbone in ("wrn28",):
        bkw = dict(widen_factor=config.widen_factor)
    elif backbone == "resnet50":
        bkw = dict(pretrained=config.pretrained)
    model = build_model(config.method, backbone, K, frame, feature_dim=config.feature_dim,
                        num_blocks=config.num_blocks, seed=config.seed, **bkw)
    criterion = build_loss(config.method, model, alpha=config.alpha, schedule=config.alpha_schedule,
                           period=config.alpha_period, total_epochs=config.epochs)
    return dict(hierarchy=h, distances=d, datasets=datasets, model=model, criterion=criterion, frame=frame)


class _Features(nn.Module):
    """The features ``h`` of a :class:`HAFrameModel` (backbone, then transform), without the classifier's logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.transform(self.model.backbone(x))


def _epoch_line(config: TrainConfig, epoch: int, train_loss: float, train_top1: Optional[float],
                val: Dict[str, Any]) -> str:
    """One line per epoch: top-1 in percent for train and val alike (train only where the step forms logits)."""
    train = f" train top1 {train_top1:.2f}%" if train_top1 is not None else ""
    return (f"[{config.method}] epoch {epoch}/{config.epochs} loss {train_loss:.4f}{train} | val top1 "
            f"{val.get('top1', float('nan')):.2f}% hierdist@1 {val.get('hierdist@1', float('nan')):.3f}")


def _compute_loss(criterion, features, logits, target):
    if isinstance(criterion, HAFrameLoss):
        return criterion(features, target)
    return criterion(logits.float(), target)


def _param_groups(model: nn.Module, config: TrainConfig):
    bb = [p for p in model.backbone.parameters() if p.requires_grad]
    bb_ids = {id(p) for p in bb}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in bb_ids]
    groups = []
    if bb:
        groups.append({"params": bb, "lr": config.lr * config.backbone_lr_scale, "lr_scale": config.backbone_lr_scale,
                       "name": "backbone"})
    if rest:
        groups.append({"params": rest, "lr": config.lr, "lr_scale": 1.0, "name": "head"})
    return groups


def _lr_factor(step: int, total: int, warmup: int, min_frac: float) -> float:
    """Linear warmup, then cosine from 1 to ``min_frac`` over the remaining steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    t = min(max(t, 0.0), 1.0)
    return min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * t))


def _set_lr(optimizer, config: TrainConfig, step: int, total: int, warmup: int) -> float:
    f = _lr_factor(step, total, warmup, config.min_lr / config.lr if config.lr > 0 else 0.0)
    for g in optimizer.param_groups:
        g["lr"] = config.lr * g.get("lr_scale", 1.0) * f
    return config.lr * f


# ----------------------------------------------------------------------------- evaluation
def _valid_ks(ks: Iterable[int], K: int) -> Tuple[int, ...]:
    return tuple(sorted({int(k) for k in ks if 1 <= int(k) <= K})) or (1,)


@torch.no_grad()
def _evaluate(model: nn.Module, loader, distances: np.ndarray, ks, device, dctx: Optional[_Dist] = None,
              crm: bool = False, collect: bool = False, autocast=None):
    """Streaming metrics over a loader (reduced over ranks); optionally the features and labels."""
    was_training = model.training
    model.eval()
    ev = _metrics.StreamingEvaluator(distances, ks, crm=crm)
    feats, labels = [], []
    try:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with (autocast() if autocast is not None else contextlib.nullcontext()):
                f, logits = model(x)
            ev.update(logits.float(), y)
            if collect:
                feats.append(f.float().cpu())
                labels.append(y.cpu())
    finally:
        model.train(was_training)
    if dctx is not None and dctx.enabled:
        t = ev.state_tensor().to(dctx.device)
        dctx.all_reduce(t)
        ev.load_state_tensor(t.cpu())
    out = _clean(ev.compute())
    if collect:
        F = torch.cat(feats) if feats else torch.zeros(0, 1)
        Y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
        if dctx is not None and dctx.enabled:
            F, Y = _gather_rows(F, Y, dctx)
        return out, F, Y
    return out


def _eval_loader(ds, batch_size: int, dctx: _Dist, num_workers: int = 0):
    if dctx.enabled:
        ds = torch.utils.data.Subset(ds, list(range(dctx.rank, len(ds), dctx.world)))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       pin_memory=dctx.device.type == "cuda")


def _neural_collapse(model, feats, labels, frame=None):
    """Neural-collapse diagnostics of a fixed-frame model; S from the classifier, or the frame's tree above 4096 classes."""
    clf = getattr(model, "classifier", None)
    if not isinstance(clf, FixedFrameClassifier) or feats.shape[0] == 0:
        return None
    similarity = clf.similarity.detach().cpu() if clf.similarity is not None else frame
    if similarity is None:
        return None
    try:
        return _clean(_metrics.neural_collapse(feats, labels, clf.weight.detach().cpu(), similarity))
    except Exception as exc:  # diagnostics must never lose a finished run
        return {"error": f"{type(exc).__name__}: {exc}"}


# ----------------------------------------------------------------------------- resuming and divergence checks
def _inputs_digest(hierarchy, distances) -> Dict[str, Any]:
    """What the labels mean, by content: the class count, digests of the class names in label order and as a
    set, and of the distance matrix (so a moved copy of a file resumes, and an edited or reordered one does not)."""
    import hashlib

    def digest(*parts: bytes) -> str:
        h = hashlib.blake2b(digest_size=16)
        for part in parts:
            h.update(part)
        return h.hexdigest()

    names = [str(c) for c in hierarchy.classes]
    out = {"num_classes": len(names), "classes": digest("\n".join(names).encode()),
           "class_set": digest("\n".join(sorted(names)).encode()), "distances": None}
    if isinstance(distances, np.ndarray):
        d = np.ascontiguousarray(distances, dtype=np.float64)
        out["distances"] = "matrix:" + digest(str(d.shape).encode(), d.tobytes())
    elif hasattr(hierarchy, "distance_digest"):  # no K x K matrix (large K): the tree's own content digest
        out["distances"] = "tree:" + hierarchy.distance_digest()
    return out


def _check_resume_inputs(then: Optional[Dict[str, Any]], now: Dict[str, Any], ck_cfg: Dict[str, Any],
                         config: TrainConfig, path: Path) -> None:
    """Refuse a resume whose class list or distances differ in content from the checkpoint's."""
    fix = "use a new --out folder, or the hierarchy, classes and distances files the run started with"
    if not isinstance(then, dict):  # a checkpoint from before the digests: compare the paths
        cur = config.to_dict()
        diff = [k for k in _RESUME_PATH_KEYS if k in ck_cfg and ck_cfg[k] != cur.get(k)]
        if diff:
            details = ", ".join(f"{k}: checkpoint {ck_cfg[k]!r} vs now {cur.get(k)!r}" for k in diff)
            raise CheckpointError(f"cannot resume from {path}: it was written with a different configuration "
                                  f"({details}); {fix}")
        return
    if then.get("num_classes") != now["num_classes"]:
        raise CheckpointError(f"cannot resume from {path}: it was trained on {then.get('num_classes')} classes and "
                              f"this run's hierarchy ({config.hierarchy}) has {now['num_classes']}; {fix}")
    if then.get("classes") != now["classes"]:
        how = ("the same class names in another label order" if then.get("class_set") == now["class_set"]
               else "other class names")
        source = config.classes or config.hierarchy
        raise CheckpointError(f"cannot resume from {path}: this run's class list ({source}) "
                              f"has {how} than the checkpoint's, so its labels would change meaning; {fix}")
    kind = lambda v: str(v).split(":", 1)[0]  # noqa: E731 - digests of a matrix and of a tree are not comparable
    if (now["distances"] is not None and then.get("distances") is not None
            and kind(then["distances"]) == kind(now["distances"]) and then["distances"] != now["distances"]):
        raise CheckpointError(f"cannot resume from {path}: this run's class distances (from "
                              f"{config.distances or config.hierarchy}) differ from the checkpoint's; {fix}")


def _state_mismatch(model: nn.Module, state: Dict[str, Any], exc: BaseException) -> str:
    """Why a state dict does not load: the first tensor whose shape differs (sizes named), else the error's line."""
    own = model.state_dict()
    for k, v in state.items():
        if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape):
            return (f"{k} is {list(v.shape)} in the checkpoint but {list(own[k].shape)} in this model: a different "
                    "number of classes, feature dimension or layer size")
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def checkpoint_convention(ck_cfg: Dict[str, Any]) -> str:
    """The distance convention a checkpoint was trained with.

    Checkpoints written before conventions were named used the height convention, except for the
    tiered_imagenet_h builtin, whose distances were then the published matrix.
    """
    if "distance_convention" in ck_cfg:
        return ck_cfg["distance_convention"]
    return "published" if ck_cfg.get("hierarchy") == "tiered_imagenet_h" else "height"


def _check_resume_config(ck_cfg: Dict[str, Any], config: TrainConfig, path: Path, hierarchy=None) -> None:
    then = checkpoint_convention(ck_cfg)
    if then != config.distance_convention and not (hierarchy is not None and hierarchy.is_balanced):
        raise CheckpointError(
            f"cannot resume from {path}: it was trained with {then!r} distances and this run asks for "
            f"{config.distance_convention!r}; pass --distance-convention {then} to continue it as it was")
    cur = config.to_dict()
    diff = [k for k in _RESUME_KEYS if k in ck_cfg and ck_cfg[k] != cur.get(k)]
    if diff:
        details = ", ".join(f"{k}: checkpoint {ck_cfg[k]!r} vs now {cur.get(k)!r}" for k in diff[:4])
        raise CheckpointError(f"cannot resume from {path}: it was written with a different configuration ({details}); "
                              "use a new --out folder or the same settings")
    if ck_cfg.get("epochs") != config.epochs:
        warnings.warn(f"resuming {path} with epochs={config.epochs} (was {ck_cfg.get('epochs')}): "
                      "the learning-rate schedule changes, so the run is not identical to an uninterrupted one")


def _resume_path(config: TrainConfig, out: Path) -> Optional[Path]:
    if config.resume_from:
        p = Path(config.resume_from)
        if not p.is_file():
            raise CheckpointError(f"checkpoint not found: {p}")
        return p
    last, prev = out / "last.pt", out / "prev.pt"
    if last.exists():
        return last
    if prev.exists():  # a crash between the two renames of _rotate_save
        warnings.warn(f"{last} is missing; resuming from {prev}")
        return prev
    return None


def _check_resume_threads(ck: Dict[str, Any], path: Path, device: torch.device) -> None:
    """Warn when a CPU run resumes with another intra-op thread count than the one that wrote ``ck``:
    CPU reductions split work by thread, so the result is then no longer bit-for-bit identical to an
    uninterrupted run (it differs in the last bits; ~4e-7 after 3 epochs of the tests' toy run)."""
    then, now = ck.get("threads"), torch.get_num_threads()
    if device.type == "cpu" and isinstance(then, int) and then != now:
        warnings.warn(f"{path} was written with {then} torch thread(s), this process uses {now}: the resumed run "
                      f"is not bit-for-bit identical to an uninterrupted one (set OMP_NUM_THREADS={then} or "
                      f"torch.set_num_threads({then}) for an exact resume)")


def _grad_norm(model: nn.Module) -> torch.Tensor:
    """The global L2 norm of the gradients (read only: the gradients are not changed)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = getattr(torch.nn.utils, "get_total_norm", None)
    if total is not None:
        return total(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach(), 2.0) for g in grads]), 2.0)


def _non_finite_state(model: nn.Module, optimizer) -> Optional[str]:
    """The name of the first model tensor (parameter or buffer) or optimizer state tensor with a NaN/Inf."""
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    for pid, st in optimizer.state_dict().get("state", {}).items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return f"optimizer state {k} of parameter {pid}"
    return None


def _kept_message(good: Optional[Tuple[Path, int]]) -> str:
    if good is None:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint {good[0]} (epoch {good[1]}) is kept"


# ----------------------------------------------------------------------------- training
class _Logger:
    def __init__(self, out: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except ImportError as exc:
                warnings.warn(f"TensorBoard logging is off: {exc}. Install it (pip install tensorboard, or "
                              "haframe_ext[tensorboard]) or pass --no-tensorboard / tensorboard=False; "
                              "metrics.jsonl is written either way", RuntimeWarning, stacklevel=3)
            else:
                self.tb = SummaryWriter(str(out / "tb"))

    def log(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_clean(record), default=_json_default) + "\n")
            f.flush()
        if self.tb is not None and "epoch" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, record["epoch"])
                elif isinstance(v, dict):
                    for kk, vv in v.items():
                        if isinstance(vv, (int, float)):
                            self.tb.add_scalar(f"{k}/{kk}", vv, record["epoch"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@contextlib.contextmanager
def _determinism(config: TrainConfig, device: torch.device):
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    prev_cudnn_det = torch.backends.cudnn.deterministic
    try:
        if config.deterministic:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.deterministic = True
                torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.backends.cudnn.benchmark = prev_bench
        torch.backends.cudnn.deterministic = prev_cudnn_det


def _autocast_factory(config: TrainConfig, device: torch.device):
    """(autocast context factory or None, GradScaler or None): AMP on CUDA only."""
    if not (config.amp and device.type == "cuda"):
        return None, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def train(config: TrainConfig) -> Dict[str, Any]:
    """Train, select the best epoch on validation, evaluate on test; returns the results dict
    (also written to ``<out>/results.json`` by rank 0)."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    config.validate()
    dctx = _Dist(config)
    failed = False
    claim = None
    try:
        with _determinism(config, dctx.device):
            claim = _claim_out(config, Path(config.out), dctx)
            return _train(config, dctx)
    except (KeyboardInterrupt, TrainingDivergedError, CheckpointError, DataError, FolderInUseError):
        raise
    except Exception as exc:
        if dctx.enabled and _is_comm_error(exc):
            failed = True
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise DistributedError(
                f"rank {dctx.rank}/{dctx.world}: a collective operation failed ({type(exc).__name__}: {detail}); "
                f"another process probably died or hangs (collectives time out after {config.dist_timeout:g} s): "
                "check its log") from exc
        raise
    finally:
        release_folder(claim)
        dctx.close(failed)


RUN_FILES = ("last.pt", "prev.pt", "best.pt", "metrics.jsonl", "results.json", "config.json")


def _earlier_run(out: Path) -> List[str]:
    """The files of an earlier run in ``out`` (none when it is not a folder)."""
    return [n for n in RUN_FILES if (out / n).exists()] if out.is_dir() else []


def _refuse_earlier_run(out: Path, found: Sequence[str]) -> None:
    what = ", ".join(found) if found else "files of an earlier run (rank 0 found them)"
    raise ValueError(f"output folder {out} already holds a run ({what}): pass --resume to continue it, "
                     "--overwrite to delete those files and start over, or choose another --out")


def _claim_out(config: TrainConfig, out: Path, dctx: _Dist):
    """Claim ``out`` for this run (rank 0 creates it and holds its lock file, so a second trainer is refused), then
    refuse to start a new run over an earlier run's files (its checkpoints would be replaced and the two logs
    mixed) unless ``overwrite``, which deletes them first; ``resume`` keeps them. Rank 0 decides; returns the
    claim for :func:`release_folder`."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is an existing file, not a folder (choose another --out / out)")
    claim, busy = None, None
    if dctx.main:
        try:
            claim = claim_folder(out)
        except FolderInUseError as exc:
            busy = exc
    if dctx.enabled and bool(dctx.all_reduce(torch.tensor([float(busy is not None)], device=dctx.device),
                                             "max").item()) and busy is None:
        busy = FolderInUseError(f"output folder {out} is in use by another training run (rank 0 found its lock)")
    if busy is not None:
        release_folder(claim)
        raise busy
    try:
        if config.resume or config.resume_from:
            return claim
        found = _earlier_run(out) if dctx.main else []
        refuse = bool(found) and not config.overwrite
        if dctx.enabled:
            refuse = bool(dctx.all_reduce(torch.tensor([float(refuse)], device=dctx.device), "max").item())
        if refuse:
            _refuse_earlier_run(out, found)
        if dctx.main and found:
            for name in found:
                (out / name).unlink()
            for event_file in (out / "tb").glob("events.out.tfevents.*"):
                event_file.unlink()
    except BaseException:
        release_folder(claim)
        raise
    return claim


def _train(config: TrainConfig, dctx: _Dist) -> Dict[str, Any]:
    t_start = time.perf_counter()
    out = Path(config.out)
    dctx.barrier()
    device = dctx.device
    _seed_everything(_derive_seed(config.seed, 0, dctx.rank))

    built = build_from_config(config)
    model, criterion, distances = built["model"], built["criterion"], built["distances"]
    sets = built["datasets"]
    K = built["hierarchy"].num_classes
    ks = _valid_ks(config.eval_ks, K)
    inputs = _inputs_digest(built["hierarchy"], distances)
    metrics = ["top1", "mistake_severity"] + [f"hierdist@{k}" for k in ks]
    if config.select_metric not in metrics:  # refused now, not after the first epoch has trained
        raise ValueError(f"select_metric {config.select_metric!r} is not a validation metric of this run "
                         f"(K={K}, eval_ks {list(config.eval_ks)}); choose one of {', '.join(metrics)} "
                         "(--select-metric)")
    model.to(device)
    criterion.to(device)
    optimizer = torch.optim.SGD(_param_groups(model, config), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=config.nesterov)
    autocast, scaler = _autocast_factory(config, device)

    if config.batch_size % dctx.world != 0:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {dctx.world} processes")
    per_rank = config.batch_size // dctx.world
    train_set = sets["train"]
    n_train = len(train_set)
    if n_train < 2:
        raise ValueError(f"the training set has {n_train} samples; need at least 2")
    steps_per_epoch = len(GlobalBatchSampler(n_train, per_rank, dctx.world, dctx.rank))
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({n_train} samples) is too small for {dctx.world} process(es)")
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))

    start_epoch, step = 0, 0
    best = {"metric": config.select_metric, "value": None, "epoch": None}
    history: List[Dict[str, Any]] = []
    resumed_from = None
    good: Optional[Tuple[Path, int]] = None  # the checkpoint this run resumed from or last wrote, and its epoch
    if config.resume or config.resume_from:
        path = _resume_path(config, out)
        if path is not None:
            ck = load_checkpoint(path, map_location="cpu")
            _check_resume_config(ck["config"], config, path, built["hierarchy"])
            _check_resume_inputs(ck.get("inputs"), inputs, ck["config"], config, path)
            bad = next((k for k, v in ck["model"].items()
                        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())),
                       None)
            if bad is not None:
                raise CheckpointError(f"checkpoint {path} holds non-finite weights ({bad} has NaN or Inf): it cannot "
                                      "be resumed; use an earlier checkpoint (--resume-from)")
            _check_resume_threads(ck, path, device)
            try:
                model.load_state_dict(ck["model"])
                optimizer.load_state_dict(ck["optimizer"])
                criterion.load_state_dict(ck["loss"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise CheckpointError(f"checkpoint {path} does not match this model "
                                      f"({_state_mismatch(model, ck['model'], exc)})") from None
            if scaler is not None and ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            start_epoch = int(ck["epoch"])
            step = int(ck["scheduler"]["step"])
            best = dict(ck["best"])
            history = list(ck.get("history", []))
            rng = ck["rng"]
            if isinstance(rng, list) and dctx.rank < len(rng):
                _set_rng_state(rng[dctx.rank])
            elif isinstance(rng, dict):
                _set_rng_state(rng)
            resumed_from = str(path)
            good = (Path(path), start_epoch)
    # a frozen frame with the fused loss: the step forms only the features, and the loss op forms the B x K
    # logits once, inside (so there is no training accuracy for these methods: it would need them again)
    features_only = bool(getattr(model, "fixed_frame", False)) and isinstance(criterion, HAFrameLoss)
    model_ddp = _Features(model) if features_only else model
    if dctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model_ddp = DDP(model_ddp, device_ids=[device.index] if device.type == "cuda" else None)

    logger = _Logger(out, dctx.main, config.tensorboard)
    if dctx.main:
        _atomic_write_text(json.dumps(config.to_dict(), indent=2, default=_json_default) + "\n", out / "config.json")
        if resumed_from:
            logger.log({"event": "resumed", "from": resumed_from, "epoch": start_epoch})
    val_loader = _eval_loader(sets["val"], config.eval_batch_size, dctx, config.num_workers)
    show = config.progress and dctx.main
    from tqdm.auto import tqdm

    approx = getattr(built["frame"], "approximation", None)
    if show and approx:
        tqdm.write(f"frame: K={K} classes in dim {built['frame'].dim} < K, {approx['method']}: separation margin "
                   f"{approx['margin']:.3f} (exact frame {approx['exact_margin']:.3f}), mean |W W^T - S| "
                   f"{approx['gram_error_mean']:.3f} over {approx['pairs']}")

    epochs_run = 0
    try:
        for epoch in range(start_epoch, config.epochs):
            if config.stop_after_epochs is not None and epochs_run >= config.stop_after_epochs:
                break
            t0 = time.perf_counter()
            _seed_everything(_derive_seed(config.seed, epoch + 1, dctx.rank))
            if isinstance(criterion, HAFrameLoss):
                criterion.set_epoch(epoch)
            g = torch.Generator().manual_seed(_derive_seed(config.seed, epoch + 1, 2 * 10 ** 6))  # worker seeds
            batches = GlobalBatchSampler(n_train, per_rank, dctx.world, dctx.rank, config.seed, epoch)
            loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, num_workers=config.num_workers,
                                                 worker_init_fn=_worker_init, generator=g,
                                                 pin_memory=device.type == "cuda")
            model_ddp.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.float64, device=device)
            seen = torch.zeros((), dtype=torch.float64, device=device)
            bar = tqdm(total=len(loader), desc=f"{config.method} epoch {epoch + 1}/{config.epochs}",
                       disable=not show, leave=False, dynamic_ncols=True)
            lr_now = config.lr
            for i, (x, y) in enumerate(loader):
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                lr_now = _set_lr(optimizer, config, step, total_steps, warmup_steps)
                with (autocast() if autocast is not None else contextlib.nullcontext()):
                    feats, logits = (model_ddp(x), None) if features_only else model_ddp(x)
                loss = _compute_loss(criterion, feats.float(), logits, y)
                # One flag pair per step, all-reduced (max) so that every rank stops at the same step:
                # [loss non-finite, gradient norm non-finite].  Both are checked before optimizer.step(),
                # so a NaN/Inf never reaches the weights, the momentum or a checkpoint.
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    # fp16 AMP: scaled gradients overflow to Inf now and then by design; GradScaler finds
                    # that after unscaling and skips optimizer.step() (lowering the scale), so the weights
                    # stay finite and the gradient-norm check is left to the scaler (flag 0 here).
                    scaler.scale(loss).backward()
                    if config.grad_clip is not None:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    grad_norm = None
                else:
                    loss.backward()
                    if config.grad_clip is not None:
                        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    else:
                        grad_norm = _grad_norm(model)
                flags = torch.stack([~torch.isfinite(loss.detach()),
                                     (~torch.isfinite(grad_norm.detach())).to(loss.device) if grad_norm is not None
                                     else torch.zeros((), dtype=torch.bool, device=loss.device)]).to(torch.float32)
                if dctx.enabled:
                    dctx.all_reduce(flags, op="max")
                loss_bad, grad_bad = (bool(v) for v in flags.tolist())
                if loss_bad or grad_bad:
                    optimizer.zero_grad(set_to_none=True)
                    local_loss = loss.item()
                    if loss_bad:
                        what = (f"loss became {local_loss}" if not math.isfinite(local_loss)
                                else "loss became non-finite in another process")
                        advice = "Lower the learning rate or enable gradient clipping (--grad-clip)."
                    else:
                        norm = grad_norm.item() if grad_norm is not None else float("nan")
                        what = (f"the gradient norm became {norm} (with a finite loss, {local_loss:.6g})"
                                if not math.isfinite(norm)
                                else "the gradient norm became non-finite in another process")
                        advice = ("Lower the learning rate, or look for an operation whose gradient is undefined "
                                  "(e.g. sqrt or norm at 0) in the model or the loss.")
                    msg = (f"{what} at epoch {epoch + 1}, step {i + 1}: training stopped; "
                           f"{_kept_message(good)}. {advice}")
                    logger.log({"event": "diverged", "epoch": epoch + 1, "step": i + 1, "message": msg})
                    raise TrainingDivergedError(msg)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                step += 1
                with torch.no_grad():
                    n = y.shape[0]
                    loss_sum += loss.detach().double() * n
                    if logits is not None:
                        correct += (logits.argmax(1) == y).sum().double()
                    seen += n
                if show and (i % 10 == 0 or i == len(loader) - 1):
                    shown = {"loss": f"{(loss_sum / seen).item():.4f}"}
                    if not features_only:
                        shown["top1"] = f"{100.0 * (correct / seen).item():.2f}%"
                    bar.set_postfix(**shown)
                bar.update(1)
            bar.close()
            stats = torch.stack([loss_sum, correct, seen])
            dctx.all_reduce(stats)
            train_loss = (stats[0] / stats[2].clamp_min(1)).item()
            # percent, as val top1; None where the step forms no logits (fixed frame + fused loss)
            train_top1 = None if features_only else 100.0 * (stats[1] / stats[2].clamp_min(1)).item()
            val = _evaluate(model, val_loader, distances, ks, device, dctx, autocast=autocast)
            sel = val.get(config.select_metric)
            if sel is None:
                raise ValueError(f"select_metric {config.select_metric!r} is not a validation metric; "
                                 f"available: {', '.join(sorted(val))}")
            improved = _is_better(config.select_metric, float(sel), best["value"])
            if improved:
                best = {"metric": config.select_metric, "value": float(sel), "epoch": epoch + 1}
            record = {"epoch": epoch + 1, "train_loss": train_loss, "train_top1": train_top1, "lr": lr_now,
                      "alpha": criterion.alpha if isinstance(criterion, HAFrameLoss) else 0.0,
                      "val": val, "seconds": time.perf_counter() - t0, "best_epoch": best["epoch"]}
            history.append(_clean({k: v for k, v in record.items() if k != "val"} | {"val": val}))
            # never checkpoint a non-finite state (with the gradient check above it can still come from a finite
            # update that overflows, or from batch-norm statistics of Inf activations); every rank checks, so all
            # of them stop together
            bad_state = _non_finite_state(model, optimizer)
            flag = torch.tensor(0.0 if bad_state is None else 1.0, device=device)
            dctx.all_reduce(flag, op="max")
            if bool(flag.item()):
                where = f" ({bad_state})" if bad_state else " (in another process)"
                msg = (f"the model state became non-finite (NaN or Inf) during epoch {epoch + 1}{where}: training "
                       f"stopped without writing its checkpoint; {_kept_message(good)}. Lower the learning rate "
                       "or enable gradient clipping (--grad-clip).")
                logger.log({"event": "diverged", "epoch": epoch + 1, "message": msg})
                raise TrainingDivergedError(msg)
            # checkpoint: rank 0 writes; every rank's RNG state is gathered so a resume is exact per rank
            rng = _gather_rng(dctx)
            if dctx.main:
                try:
                    if improved:
                        atomic_save(_seal({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": "best",
                                           "config": config.to_dict(), "model": model.state_dict(), "epoch": epoch + 1,
                                           "val": val}), out / "best.pt")
                    ck = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": "training",
                          "epoch": epoch + 1, "config": config.to_dict(), "model": model.state_dict(),
                          "optimizer": optimizer.state_dict(), "scheduler": {"step": step, "total": total_steps},
                          "scaler": scaler.state_dict() if scaler is not None else None,
                          "loss": criterion.state_dict(), "rng": rng, "best": best, "history": history,
                          "threads": torch.get_num_threads(), "inputs": inputs}
                    _rotate_save(_seal(ck), out)
                    logger.log(record)
                except OSError as exc:  # a full disk, a folder gone read-only: the earlier files are untouched
                    raise type(exc)(exc.errno, f"{exc.strerror or exc} while writing the checkpoint of epoch "
                                    f"{epoch + 1}: training stopped; {_kept_message(good)}", exc.filename) from None
                if show:
                    tqdm.write(_epoch_line(config, epoch + 1, train_loss, train_top1, val))
            good = (out / "last.pt", epoch + 1)
            dctx.barrier()
            epochs_run += 1
        finished = start_epoch + epochs_run >= config.epochs
        if not finished:
            return {"stopped_after_epoch": start_epoch + epochs_run, "finished": False, "out": str(out)}

        # final evaluation with the best weights
        if (out / "best.pt").exists():
            best_ck = load_checkpoint(out / "best.pt", map_location="cpu", kind="best")
            model.load_state_dict(best_ck["model"])
        test_loader = _eval_loader(sets["test"], config.eval_batch_size, dctx, config.num_workers)
        test_all, feats, labels = _evaluate(model, test_loader, distances, ks, device, dctx, crm=True,
                                            collect=True, autocast=autocast)
        test = {k: v for k, v in test_all.items() if not k.startswith("crm")}
        test_crm = _crm_part(test_all)
        nc = _neural_collapse(model, feats, labels, built["frame"]) if dctx.main else None
        results = {
            "method": config.method,
            "config": config.to_dict(),
            "best_epoch": best["epoch"],
            "best_val": {"metric": best["metric"], "value": best["value"]},
            "test": test,
            "test_crm": test_crm,
            "neural_collapse": nc,
            "frame": _clean(built["frame"].diagnostics()) if built["frame"] is not None else None,
            "epochs": config.epochs,
            "seconds": time.perf_counter() - t_start,
            "world_size": dctx.world,
            "device": str(device),
        }
        if dctx.main:
            _atomic_write_text(json.dumps(results, indent=2, default=_json_default) + "\n", out / "results.json")
        dctx.barrier()
        return results
    finally:
        logger.close()


def _crm_part(d: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The CRM-reranked metrics of a StreamingEvaluator(crm=True) result, with the 'crm' prefix removed."""
    if isinstance(d.get("crm"), dict):
        return d["crm"]
    out = {}
    for k, v in d.items():
        if k.startswith("crm_"):
            out[k[4:]] = v
        elif k.startswith("crm/"):
            out[k[4:]] = v
        elif k.startswith("crm:"):
            out[k[4:]] = v
    return out or None


# ----------------------------------------------------------------------------- checkpoint evaluation
def evaluate_checkpoint(checkpoint, *, dataset: Optional[str] = None, data_root: Optional[str] = None,
                        split: str = "test", batch_size: int = 512, device: str = "auto",
                        crm: bool = True) -> Dict[str, Any]:
    """Metrics of a saved model (``best.pt`` or ``last.pt``) on a split of its dataset (or another one)."""
    ck = load_checkpoint(checkpoint, kind="model")
    cfg = dict(ck["config"])
    cfg["distance_convention"] = checkpoint_convention(cfg)  # what it was trained with, for an older checkpoint too
    if dataset is not None:
        cfg["dataset"] = dataset
    if data_root is not None:
        cfg["data_root"] = data_root
    cfg["resume"] = False
    cfg["resume_from"] = None
    config = TrainConfig.from_dict(cfg)
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; valid: train, val, test")
    built = build_from_config(config)
    model = built["model"]
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {checkpoint} does not match the model its config describes "
                              f"({_state_mismatch(model, ck['model'], exc)})") from None
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model.to(dev)
    ds = built["datasets"][split]
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    K = built["hierarchy"].num_classes
    res, feats, labels = _evaluate(model, loader, built["distances"], _valid_ks(config.eval_ks, K), dev,
                                   crm=crm, collect=True)
    out = {"method": config.method, "split": split, "checkpoint": str(checkpoint),
           "metrics": {k: v for k, v in res.items() if not k.startswith("crm")}}
    if crm:
        out["crm"] = _crm_part(res)
    out["neural_collapse"] = _neural_collapse(model, feats, labels, built["frame"])
    return out


# ----------------------------------------------------------------------------- several seeds
def run_seeds(config: TrainConfig, seeds: Sequence[int], *, verbose: bool = True) -> Dict[str, Any]:
    """Train ``config`` once per seed (in ``<out>/seed<S>``); mean and 95% CI over seeds.

    Returns ``{"runs": [...], "summary": ..., "summary_crm": ..., "table": str}`` and writes
    ``<out>/summary.json`` and ``<out>/summary.txt`` (the table, formatted like the paper's).
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    seeds = [int(s) if isinstance(s, numbers.Integral) and not isinstance(s, bool) else s for s in seeds]
    if not seeds:
        raise ValueError("run_seeds needs at least one seed")
    twice = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
    if twice:
        raise ValueError(f"seed(s) {', '.join(map(str, twice))} listed more than once (--seeds): each seed is one run "
                         "(in <out>/seed<S>), and a repeated one would count that run twice")
    # every seed's config and folder is checked before the first one trains, so no run is lost to a later refusal
    configs = [dataclasses.replace(config, seed=s, out=str(Path(config.out) / f"seed{s}")) for s in seeds]
    for cfg in configs:
        cfg.validate()
        found = _earlier_run(Path(cfg.out))
        if found and not (cfg.resume or cfg.resume_from or cfg.overwrite):
            _refuse_earlier_run(Path(cfg.out), found)
    single = int(os.environ.get("WORLD_SIZE", "1") or 1) == 1
    claim = claim_folder(Path(config.out)) if single else None  # the summary's folder (each seed claims its own)
    try:
        runs = [train(cfg) for cfg in configs]
        tests = [r["test"] for r in runs if "test" in r]
        summary = _metrics.summarize_seeds(tests)
        crm = [r["test_crm"] for r in runs if r.get("test_crm")]
        summary_crm = _metrics.summarize_seeds(crm) if len(crm) == len(tests) and crm else None
        rows = {config.method: summary}
        if summary_crm is not None:
            rows[f"{config.method} + CRM"] = summary_crm
        table = _format_table(rows)
        result = {"seeds": seeds, "runs": runs, "summary": _clean(summary), "summary_crm": _clean(summary_crm),
                  "table": table}
        if int(os.environ.get("RANK", "0") or 0) == 0:
            out = Path(config.out)
            out.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2,
                                          default=_json_default) + "\n", out / "summary.json")
            _atomic_write_text(table + "\n", out / "summary.txt")
            if verbose:
                print(table)
    finally:
        release_folder(claim)
    return result


def _format_table(rows: Dict[str, Any]) -> str:
    try:
        return _metrics.format_table(rows)
    except Exception:
        pass
    cols = ["top1", "mistake_severity", "hierdist@1", "hierdist@5", "hierdist@20"]
    lines = ["method".ljust(24) + "".join(c.rjust(22) for c in cols)]
    for name, s in rows.items():
        cells = []
        for c in cols:
            v = s.get(c) if isinstance(s, dict) else None
            if isinstance(v, dict):
                cells.append(f"{v.get('mean', float('nan')):.4f} +/- {v.get('ci95', float('nan')):.4f}".rjust(22))
            elif isinstance(v, (int, float)):
                cells.append(f"{v:.4f}".rjust(22))
            else:
                cells.append("-".rjust(22))
        lines.append(name.ljust(24) + "".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the demo (re-exported lazily)
_DEMO_NAMES = ("DEMO_METHODS", "DEMO_COLUMNS", "demo", "demo_config", "tree_order")


def __getattr__(name: str):
    # haframe_ext.demo imports this module, so its names are looked up on first use (no import cycle)
    if name in _DEMO_NAMES:
        from . import demo as _demo_module

        return getattr(_demo_module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
