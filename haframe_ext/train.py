"""Training and evaluation: :class:`TrainConfig`, :func:`train`, :func:`evaluate_checkpoint`,
the multi-seed runner :func:`run_seeds` and the no-download :func:`demo`.

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
import datetime
import hashlib
import json
import math
import os
import random
import re
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from . import metrics as _metrics
from .data import DataError, describe_torch_load_error, make_datasets
from .models import BACKBONES, FIXED_FRAME_METHODS, METHODS, build_frame, build_loss, build_model, check_method
from .nn import FixedFrameClassifier, HAFrameLoss

__all__ = [
    "TrainConfig", "train", "evaluate_checkpoint", "run_seeds", "demo", "load_checkpoint",
    "CheckpointError", "TrainingDivergedError", "DistributedError", "load_hierarchy", "atomic_save",
    "build_from_config",
]

CHECKPOINT_FORMAT = "haframe_ext.checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupted or does not belong to this run."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


class DistributedError(RuntimeError):
    """A collective operation failed or timed out (usually: another rank died)."""


# ----------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in every checkpoint and in results.json)."""

    out: str = "runs/haframe"               # output folder (checkpoints, metrics.jsonl, results.json)
    method: str = "haframe"                 # cross-entropy | haframe | etf | haframe-ce
    dataset: str = "synthetic"              # synthetic | cifar100 | imagefolder | features
    data_root: Optional[str] = None         # cifar-100-python folder / ImageFolder root / features folder
    hierarchy: str = "cifar100"             # builtin name or an edge-list file
    classes: Optional[str] = None           # class-order file for an edge-list hierarchy
    distances: Optional[str] = None         # optional .npy/.csv distance matrix (overrides the tree's)
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
    n_per_class: int = 50                   # synthetic
    eval_per_class: Optional[int] = None    # synthetic val/test per class (default n_per_class)
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
        if "eval_ks" in d and d["eval_ks"] is not None:
            d["eval_ks"] = tuple(int(k) for k in d["eval_ks"])
        return cls(**d)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eval_ks"] = list(d["eval_ks"])
        return d

    def validate(self) -> None:
        check_method(self.method)
        if self.backbone is not None and self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        bad_ks = [k for k in self.eval_ks if int(k) < 1]
        if bad_ks:
            raise ValueError(f"eval_ks must be >= 1 (the k of top-k and HierDist@k), got {bad_ks[0]}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (batch norm), got {self.batch_size}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.lr <= 0 or self.backbone_lr_scale < 0:
            raise ValueError(f"lr must be > 0 and backbone_lr_scale >= 0, got {self.lr}, {self.backbone_lr_scale}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


# fields that must agree between a checkpoint and the run resuming from it
_RESUME_KEYS = ("method", "dataset", "hierarchy", "distances", "backbone", "hidden", "depth", "widen_factor",
                "feature_dim", "num_blocks", "gamma", "s_min", "alpha", "alpha_schedule", "alpha_period",
                "batch_size", "lr", "backbone_lr_scale", "min_lr", "warmup_epochs", "momentum", "weight_decay",
                "nesterov", "seed", "n_per_class", "input_dim", "difficulty")


# ----------------------------------------------------------------------------- small utilities
def load_hierarchy(spec: str, classes: Optional[str] = None):
    """A builtin hierarchy by name, or an edge-list file (with an optional class-order file)."""
    from . import hierarchy as _h

    builtin = getattr(_h, "BUILTIN_NAMES", ("cifar100", "fgvc_aircraft", "inat19", "tiered_imagenet_h"))
    if spec in builtin:
        return _h.Hierarchy.builtin(spec)
    if os.path.isfile(spec):
        return _h.Hierarchy.from_edges(spec, classes=classes)
    raise ValueError(f"unknown hierarchy {spec!r}: not a builtin name ({', '.join(builtin)}) nor an existing file")


def _distances_for(config: TrainConfig, hierarchy) -> np.ndarray:
    from .hierarchy import as_distance_matrix

    if config.distances:
        if not os.path.isfile(config.distances):
            raise ValueError(f"distance matrix file not found: {config.distances}")
        d = as_distance_matrix(config.distances)
        K = hierarchy.num_classes
        if d.shape != (K, K):
            raise ValueError(f"{config.distances}: distance matrix is {d.shape} but the hierarchy has {K} classes")
        return d
    return hierarchy.distances()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_tmp(obj, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def atomic_save(obj, path) -> None:
    """``torch.save`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    tmp = _write_tmp(obj, path)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# temp files of _write_tmp / _atomic_write_text for the files train() writes: ".<name>.tmp-<pid>"
_TEMP_NAME = re.compile(r"^\.(last\.pt|best\.pt|results\.json|config\.json)\.tmp-(\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or unknown: leave its file alone
    return True


def _remove_stale_temps(out: Path) -> List[Path]:
    """Remove temp files that a killed write left in ``out`` (only our own ``.<name>.tmp-<pid>`` pattern,
    only of processes that no longer run, never this process's)."""
    removed = []
    try:
        entries = list(os.scandir(out))
    except OSError:
        return removed
    for e in entries:
        m = _TEMP_NAME.match(e.name)
        if m is None or not e.is_file(follow_symlinks=False):
            continue
        pid = int(m.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(e.path)
            removed.append(Path(e.path))
    return removed


def _rotate_save(obj, out: Path) -> None:
    """Write ``last.pt`` atomically, keeping the previous one as ``prev.pt`` (and removing temp files a
    killed earlier write left behind)."""
    _remove_stale_temps(out)
    last, prev = out / "last.pt", out / "prev.pt"
    tmp = _write_tmp(obj, last)
    if last.exists():
        os.replace(last, prev)
    os.replace(tmp, last)
    _fsync_dir(out)


def _digest(obj) -> str:
    """Content hash of a checkpoint payload (tensors' bytes, dtypes and shapes; plain values' repr)."""
    h = hashlib.blake2b(digest_size=16)

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=lambda k: (type(k).__name__, str(k))):
                h.update(repr(k).encode())
                walk(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[" if isinstance(o, list) else b"(")
            for v in o:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()


def _seal(payload: Dict[str, Any]) -> Dict[str, Any]:
    """The payload plus its content digest (checked by load_checkpoint)."""
    return dict(payload, digest=_digest(payload))


def _rng_state() -> Dict[str, Any]:
    """torch / CUDA / numpy / python RNG states as tensors and numbers (weights_only-loadable)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached_gaussian": float(cached),
        "python_version": int(version), "python_state": torch.tensor(pystate, dtype=torch.int64),
        "python_gauss": None if gauss is None else float(gauss),
    }


def _set_rng_state(s: Dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), int(s["numpy_pos"]),
                         int(s["numpy_has_gauss"]), float(s["numpy_cached_gaussian"])))
    random.setstate((int(s["python_version"]), tuple(int(v) for v in s["python_state"].tolist()),
                     s["python_gauss"]))


def _derive_seed(*parts: int) -> int:
    h = hashlib.sha256(("haframe:" + ":".join(str(int(p)) for p in parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def _worker_init(worker_id: int) -> None:
    s = torch.initial_seed()
    np.random.seed(s % 2 ** 32)
    random.seed(s)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """The training batches of one process for one epoch.

    The epoch's permutation of the dataset (seeded by ``seed`` and ``epoch`` only) is cut into
    global batches of ``per_rank * world`` samples, and process ``rank`` takes the ``rank``-th
    near-equal slice of each.  So every world size sees the same global batches in the same
    order (a single process is ``world = 1``), which is what lets a torchrun run match a
    single-process run with the same global batch (up to per-process batch-norm statistics).
    A final global batch with fewer than 2 samples per process is dropped (batch norm).
    Unlike ``DistributedSampler`` it never pads by repeating samples.
    """

    def __init__(self, n: int, per_rank: int, world: int = 1, rank: int = 0, seed: int = 0, epoch: int = 0):
        self.n, self.per_rank, self.world, self.rank = int(n), int(per_rank), int(world), int(rank)
        self.seed, self.epoch = int(seed), int(epoch)

    def _chunks(self):
        B = self.per_rank * self.world
        for start in range(0, self.n, B):
            size = min(B, self.n - start)
            if size < 2 * self.world:
                break
            yield start, size

    def __iter__(self):
        g = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch + 1, 10 ** 6))
        perm = torch.randperm(self.n, generator=g).tolist()
        for start, size in self._chunks():
            q, r = divmod(size, self.world)
            lo = start + self.rank * q + min(self.rank, r)
            yield perm[lo:lo + q + (1 if self.rank < r else 0)]

    def __len__(self) -> int:
        return sum(1 for _ in self._chunks())


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


# ----------------------------------------------------------------------------- distributed
class _Dist:
    """Rank/world/device of this process; a no-op when not under torchrun."""

    def __init__(self, config: TrainConfig):
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        self.owns_group = False
        want = config.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        if self.enabled:
            import torch.distributed as dist

            if want.startswith("cuda"):
                torch.cuda.set_device(self.local_rank)
                self.device = torch.device("cuda", self.local_rank)
                backend = "nccl"
            else:
                self.device = torch.device("cpu")
                backend = "gloo"
            if not dist.is_initialized():
                try:
                    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(config.dist_timeout)))
                except Exception as exc:
                    raise DistributedError(f"rank {self.rank}: could not join the process group "
                                           f"({type(exc).__name__}: {exc})") from exc
                self.owns_group = True
            self.rank = dist.get_rank()
            self.world = dist.get_world_size()
        else:
            self.device = torch.device(want)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if not self.enabled:
            return t
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self, failed: bool = False) -> None:
        if failed:  # tearing down a broken group can abort in the backend: leave it to process exit
            return
        if self.owns_group:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _is_comm_error(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())) or isinstance(exc, getattr(dist, "DistBackendError", ())):
        return True
    msg = str(exc).lower()
    return any(s in msg for s in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "process group"))


# ----------------------------------------------------------------------------- model + data from a config
def build_from_config(config: TrainConfig, hierarchy=None, datasets=None):
    """Hierarchy, distances, datasets, model and loss described by a config (no training)."""
    h = hierarchy if hierarchy is not None else load_hierarchy(config.hierarchy, config.classes)
    d = _distances_for(config, h)
    if datasets is None:
        datasets = make_datasets(
            config.dataset, h, data_root=config.data_root, seed=config.seed, n_per_class=config.n_per_class,
            eval_per_class=config.eval_per_class, input_dim=config.input_dim, difficulty=config.difficulty,
            image_size=config.image_size, augment=config.augment)
    K = h.num_classes
    backbone = config.backbone or ("mlp" if datasets["kind"] == "vector" else "wrn28")
    if datasets["kind"] == "vector" and backbone != "mlp":
        raise ValueError(f"dataset {config.dataset!r} gives feature vectors: use the 'mlp' backbone, not {backbone!r}")
    if datasets["kind"] == "image" and backbone == "mlp":
        raise ValueError(f"dataset {config.dataset!r} gives images: use small-cnn, wrn28 or resnet50, not mlp")
    frame = None
    if config.method in FIXED_FRAME_METHODS:
        frame = build_frame(config.method, K, distances=d, gamma=config.gamma, s_min=config.s_min,
                            dim=config.feature_dim, seed=config.seed)
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


def _gather_rows(F: torch.Tensor, Y: torch.Tensor, dctx: _Dist):
    import torch.distributed as dist

    n = torch.tensor([F.shape[0]], device=dctx.device)
    sizes = [torch.zeros_like(n) for _ in range(dctx.world)]
    dist.all_gather(sizes, n)
    m = int(max(int(s) for s in sizes))
    Fp = torch.zeros(m, F.shape[1], dtype=F.dtype)
    Yp = torch.full((m,), -1, dtype=torch.long)
    Fp[:F.shape[0]] = F
    Yp[:Y.shape[0]] = Y
    Fg = [torch.zeros_like(Fp, device=dctx.device) for _ in range(dctx.world)]
    Yg = [torch.zeros_like(Yp, device=dctx.device) for _ in range(dctx.world)]
    dist.all_gather(Fg, Fp.to(dctx.device))
    dist.all_gather(Yg, Yp.to(dctx.device))
    Fs = torch.cat([f[:int(s)].cpu() for f, s in zip(Fg, sizes)])
    Ys = torch.cat([y[:int(s)].cpu() for y, s in zip(Yg, sizes)])
    return Fs, Ys


def _eval_loader(ds, batch_size: int, dctx: _Dist, num_workers: int = 0):
    if dctx.enabled:
        ds = torch.utils.data.Subset(ds, list(range(dctx.rank, len(ds), dctx.world)))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       pin_memory=dctx.device.type == "cuda")


def _neural_collapse(model, feats, labels):
    clf = getattr(model, "classifier", None)
    if not isinstance(clf, FixedFrameClassifier) or feats.shape[0] == 0:
        return None
    try:
        return _clean(_metrics.neural_collapse(feats, labels, clf.weight.detach().cpu(), clf.similarity.detach().cpu()))
    except Exception as exc:  # diagnostics must never lose a finished run
        return {"error": f"{type(exc).__name__}: {exc}"}


# ----------------------------------------------------------------------------- checkpoints
_CKPT_KEYS = ("format", "version", "epoch", "config", "model", "optimizer", "scheduler", "loss", "rng", "best")


def load_checkpoint(path, map_location="cpu", *, kind: str = "training") -> Dict[str, Any]:
    """Load and check a checkpoint written by :func:`train` (``torch.load(weights_only=True)``).

    Raises :class:`CheckpointError` naming the file (and the previous checkpoint, if any) when
    it is missing, truncated, corrupted or not a haframe_ext checkpoint.
    """
    path = Path(path)
    prev = path.with_name("prev.pt") if path.name == "last.pt" else None
    hint = (f"; the previous checkpoint {prev} looks intact: resume from it with resume_from="
            f"'{prev}' (CLI: --resume-from {prev})" if prev is not None and prev.exists() else "")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, CRC mismatch, unpickling error, a refused global, ...
        reason, unsafe = describe_torch_load_error(exc)  # never repeats torch's "weights_only=False" advice
        if unsafe:
            raise CheckpointError(f"checkpoint {path} is not a safe checkpoint (refused by weights_only loading: "
                                  f"{reason}; nothing in it was run){hint}") from None
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({reason}){hint}") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a haframe_ext checkpoint (no format={CHECKPOINT_FORMAT!r}){hint}")
    if "digest" not in ck or _digest({k: v for k, v in ck.items() if k != "digest"}) != ck["digest"]:
        raise CheckpointError(f"checkpoint {path} is corrupted (its content does not match the digest "
                              f"written with it){hint}")
    if ck.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint version {ck.get('version')!r}")
    need = _CKPT_KEYS if kind == "training" else ("format", "version", "config", "model")
    missing = [k for k in need if k not in ck]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}){hint}")
    if not isinstance(ck["model"], dict) or not all(isinstance(v, torch.Tensor) or k.endswith("_extra_state")
                                                    for k, v in ck["model"].items()):
        raise CheckpointError(f"checkpoint {path} has a malformed model state{hint}")
    return ck


def _check_resume_config(ck_cfg: Dict[str, Any], config: TrainConfig, path: Path) -> None:
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

                self.tb = SummaryWriter(str(out / "tb"))
            except Exception:
                self.tb = None

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
    try:
        with _determinism(config, dctx.device):
            return _train(config, dctx)
    except (KeyboardInterrupt, TrainingDivergedError, CheckpointError, DataError):
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
        dctx.close(failed)


def _train(config: TrainConfig, dctx: _Dist) -> Dict[str, Any]:
    t_start = time.perf_counter()
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is an existing file, not a folder (choose another --out / out)")
    if dctx.main:
        out.mkdir(parents=True, exist_ok=True)
    dctx.barrier()
    device = dctx.device
    _seed_everything(_derive_seed(config.seed, 0, dctx.rank))

    built = build_from_config(config)
    model, criterion, distances = built["model"], built["criterion"], built["distances"]
    sets = built["datasets"]
    K = built["hierarchy"].num_classes
    ks = _valid_ks(config.eval_ks, K)
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
            _check_resume_config(ck["config"], config, path)
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
                raise CheckpointError(f"checkpoint {path} does not match this model ({str(exc).splitlines()[0]})") from None
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
    model_ddp = model
    if dctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model_ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    logger = _Logger(out, dctx.main, config.tensorboard)
    if dctx.main:
        _atomic_write_text(json.dumps(config.to_dict(), indent=2, default=_json_default) + "\n", out / "config.json")
        if resumed_from:
            logger.log({"event": "resumed", "from": resumed_from, "epoch": start_epoch})
    val_loader = _eval_loader(sets["val"], config.eval_batch_size, dctx, config.num_workers)
    show = config.progress and dctx.main
    from tqdm.auto import tqdm

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
                    feats, logits = model_ddp(x)
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
                    correct += (logits.argmax(1) == y).sum().double()
                    seen += n
                if show and (i % 10 == 0 or i == len(loader) - 1):
                    bar.set_postfix(loss=f"{(loss_sum / seen).item():.4f}", acc=f"{(correct / seen).item():.3f}")
                bar.update(1)
            bar.close()
            stats = torch.stack([loss_sum, correct, seen])
            dctx.all_reduce(stats)
            train_loss = (stats[0] / stats[2].clamp_min(1)).item()
            train_acc = (stats[1] / stats[2].clamp_min(1)).item()
            val = _evaluate(model, val_loader, distances, ks, device, dctx, autocast=autocast)
            sel = val.get(config.select_metric)
            if sel is None:
                raise ValueError(f"select_metric {config.select_metric!r} is not a validation metric; "
                                 f"available: {', '.join(sorted(val))}")
            improved = _is_better(config.select_metric, float(sel), best["value"])
            if improved:
                best = {"metric": config.select_metric, "value": float(sel), "epoch": epoch + 1}
            record = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "lr": lr_now,
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
                if improved:
                    atomic_save(_seal({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": "best",
                                       "config": config.to_dict(), "model": model.state_dict(), "epoch": epoch + 1,
                                       "val": val}), out / "best.pt")
                ck = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": "training",
                      "epoch": epoch + 1, "config": config.to_dict(), "model": model.state_dict(),
                      "optimizer": optimizer.state_dict(), "scheduler": {"step": step, "total": total_steps},
                      "scaler": scaler.state_dict() if scaler is not None else None,
                      "loss": criterion.state_dict(), "rng": rng, "best": best, "history": history,
                      "threads": torch.get_num_threads()}
                _rotate_save(_seal(ck), out)
                logger.log(record)
                if show:
                    tqdm.write(f"[{config.method}] epoch {epoch + 1}/{config.epochs} loss {train_loss:.4f} "
                               f"acc {train_acc:.3f} | val top1 {val.get('top1', float('nan')):.4f} "
                               f"hierdist@1 {val.get('hierdist@1', float('nan')):.3f}")
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
        nc = _neural_collapse(model, feats, labels) if dctx.main else None
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


def _gather_rng(dctx: _Dist):
    state = _rng_state()
    if not dctx.enabled:
        return [state]
    import torch.distributed as dist

    states = [None] * dctx.world
    dist.all_gather_object(states, state)
    return states


# ----------------------------------------------------------------------------- checkpoint evaluation
def evaluate_checkpoint(checkpoint, *, dataset: Optional[str] = None, data_root: Optional[str] = None,
                        split: str = "test", batch_size: int = 512, device: str = "auto",
                        crm: bool = True) -> Dict[str, Any]:
    """Metrics of a saved model (``best.pt`` or ``last.pt``) on a split of its dataset (or another one)."""
    ck = load_checkpoint(checkpoint, kind="model")
    cfg = dict(ck["config"])
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
                              f"({str(exc).splitlines()[0]})") from None
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
    out["neural_collapse"] = _neural_collapse(model, feats, labels)
    return out


# ----------------------------------------------------------------------------- several seeds
def run_seeds(config: TrainConfig, seeds: Sequence[int], *, verbose: bool = True) -> Dict[str, Any]:
    """Train ``config`` once per seed (in ``<out>/seed<S>``); mean and 95% CI over seeds.

    Returns ``{"runs": [...], "summary": ..., "summary_crm": ..., "table": str}`` and writes
    ``<out>/summary.json`` and ``<out>/summary.txt`` (the table, formatted like the paper's).
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("run_seeds needs at least one seed")
    runs = []
    for s in seeds:
        cfg = dataclasses.replace(config, seed=s, out=str(Path(config.out) / f"seed{s}"))
        runs.append(train(cfg))
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


# ----------------------------------------------------------------------------- the demo
DEMO_METHODS = ("cross-entropy", "haframe", "etf")
DEMO_COLUMNS = ("top1", "mistake_severity", "hierdist@1", "hierdist@5", "hierdist@20")


def demo_config(method: str, out, epochs: int = 30, seed: int = 0, **overrides) -> TrainConfig:
    """The demo's configuration for one method: synthetic data on the CIFAR-100 hierarchy, MLP backbone."""
    base = dict(out=str(Path(out) / method), method=method, dataset="synthetic", hierarchy="cifar100",
                backbone="mlp", hidden=256, depth=2, input_dim=64, n_per_class=60, eval_per_class=30,
                difficulty=1.0, gamma=2.0, alpha=0.4, epochs=epochs, batch_size=128, eval_batch_size=1024,
                lr=0.05, weight_decay=5e-4, seed=seed, progress=False, tensorboard=False)
    base.update(overrides)
    return TrainConfig.from_dict(base)


def _demo_table(results: Dict[str, Dict[str, Any]]) -> str:
    head = "method".ljust(16) + "".join(c.rjust(18) for c in DEMO_COLUMNS) + "seconds".rjust(10)
    lines = [head, "-" * len(head)]
    for m, r in results.items():
        lines.append(m.ljust(16) + "".join(f"{float(r.get(c, float('nan'))):18.4f}" for c in DEMO_COLUMNS)
                     + f"{r.get('seconds', 0.0):10.1f}")
    return "\n".join(lines)


def demo(out="haframe-demo", epochs: int = 30, seed: int = 0, methods: Sequence[str] = DEMO_METHODS, *,
         plot: bool = True, verbose: bool = True, progress: bool = False, threads: Optional[int] = 1,
         **overrides) -> Dict[str, Dict[str, Any]]:
    """Train the demo's methods on the synthetic CIFAR-100-hierarchy task; print a table, write
    ``<out>/results.json`` (method -> test metrics plus ``seconds``; CRM variants under
    ``"<method>+crm"`` in ``results_crm.json``) and ``<out>/demo.png``. ``overrides`` go to
    :func:`demo_config` (e.g. ``n_per_class``, ``difficulty``, ``hidden``).

    ``threads``: torch intra-op threads during the demo (restored afterwards). One thread is as
    fast as two for these small MLPs and far more robust when other processes share the CPUs.
    """
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _demo(out, epochs, seed, methods, plot, verbose, progress, **overrides)
    finally:
        torch.set_num_threads(prev_threads)


def _demo(out, epochs, seed, methods, plot, verbose, progress, **overrides):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for m in methods:
        check_method(m)
    results: Dict[str, Dict[str, Any]] = {}
    crm: Dict[str, Dict[str, Any]] = {}
    frame_S = None
    for m in methods:
        cfg = demo_config(m, out, epochs, seed, progress=progress, **overrides)
        t0 = time.perf_counter()
        r = train(cfg)
        secs = time.perf_counter() - t0
        results[m] = dict(r["test"], seconds=secs)
        if r.get("test_crm"):
            crm[m] = r["test_crm"]
        if m == "haframe" and frame_S is None:
            frame_S = _frame_similarity(cfg)
        if verbose:
            print(f"[demo] {m}: top-1 {results[m].get('top1', float('nan')):.4f}, "
                  f"hierdist@5 {results[m].get('hierdist@5', float('nan')):.3f}, {secs:.1f} s", flush=True)
    (out / "results.json").write_text(json.dumps(_clean(results), indent=2, default=_json_default) + "\n")
    if crm:
        (out / "results_crm.json").write_text(json.dumps(_clean(crm), indent=2, default=_json_default) + "\n")
    table = _demo_table(results)
    if verbose:
        print()
        print(table)
        if crm:
            print("\nafter CRM re-ranking:")
            print(_demo_table({m: dict(v, seconds=results[m]["seconds"]) for m, v in crm.items()}))
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            plot = False
            if verbose:
                print("\nmatplotlib is not installed: skipping demo.png (pip install matplotlib)")
    if plot:
        if frame_S is None:
            frame_S = _frame_similarity(demo_config("haframe", out, epochs, seed, **overrides))
        _demo_plot(results, frame_S, out / "demo.png")
    if verbose:
        print(f"\nwrote {out / 'results.json'}" + (f" and {out / 'demo.png'}" if plot else ""))
    return results


def _frame_similarity(cfg: TrainConfig) -> np.ndarray:
    from .frame import HAFrame

    h = load_hierarchy(cfg.hierarchy, cfg.classes)
    fr = HAFrame.from_distances(_distances_for(cfg, h), cfg.gamma, s_min=cfg.s_min)
    return fr.similarity.double().cpu().numpy()


def tree_order(distances) -> np.ndarray:
    """A class order that puts classes close in the hierarchy next to each other (for heatmaps)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    d = np.asarray(distances, dtype=np.float64)
    if d.shape[0] < 3:
        return np.arange(d.shape[0])
    return leaves_list(linkage(squareform(d, checks=False), method="average"))


def _demo_plot(results: Dict[str, Dict[str, Any]], S: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    methods = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1, 2.2, 1.5]})
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    ax = axes[0]
    bars = ax.bar(range(len(methods)), [results[m]["top1"] for m in methods],
                  color=[colors[i % len(colors)] for i in range(len(methods))])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("top-1 (higher is better)")
    ax = axes[1]
    cols = [c for c in DEMO_COLUMNS if c != "top1"]
    w = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        bars = ax.bar(np.arange(len(cols)) + (i - (len(methods) - 1) / 2) * w,
                      [results[m].get(c, np.nan) for c in cols], w, label=m, color=colors[i % len(colors)])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("hierarchical distance")
    ax.set_title("mistake severity and HierDist@k (lower is better)")
    ax.legend()
    ax = axes[2]
    order = tree_order(1.0 - S)
    im = ax.imshow(S[np.ix_(order, order)], cmap="viridis", interpolation="nearest")
    ax.set_title("HAFrame similarity S (CIFAR-100 tree)")
    ax.set_xlabel("class (tree order)")
    ax.set_ylabel("class (tree order)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
