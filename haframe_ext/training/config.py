"""The run's configuration: :class:`TrainConfig` and its field checks, and the builders that turn a config into a
hierarchy, distances, datasets, model and loss (:func:`build_from_config`)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

from .data.factory import make_datasets
from ..frame.align import FRAME_DIRECTIONS
from ..frame.profile import FRAME_PROFILES, PROFILE_WEIGHT
from ..hierarchy.hierarchy import BUILTIN_NAMES, CONVENTIONS, Hierarchy, as_distance_matrix
from .models import BACKBONES, FIXED_FRAME_METHODS, build_frame, build_loss, build_model, check_method
from ..ops.fused_args import COSINE_SCALES, cosine_scale_for
from ..sizes import check_memory

__all__ = ["TrainConfig", "build_from_config", "checkpoint_convention", "checkpoint_cosine_scale",
           "checkpoint_frame_directions", "checkpoint_frame_profile", "checkpoint_profile_weight", "distances_for",
           "load_hierarchy"]


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in every checkpoint and in results.json)."""

    out: str = "runs/haframe"               # output folder (checkpoints, metrics.jsonl, results.json)
    method: str = "haframe"                 # cross-entropy | haframe | etf | haframe-ce | hxe | soft-labels |
                                            # multi-level
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
    cosine_scale: Union[str, float] = "auto"  # haframe/etf: cosine term's multiplier: auto (min(d, K)/K), sum or c > 0
    frame_directions: str = "features"      # haframe, dim < K: node directions from class-mean features or gaussian
    frame_profile: str = "features"         # haframe, dim < K: S's kernel follows the class means, or exp (paper)
    frame_profile_weight: float = PROFILE_WEIGHT  # the fitted table's share of that kernel, in [0, 1]
    hxe_alpha: float = 0.1                  # hxe: weight exp(-hxe_alpha * depth) of each level's term
    hxe_normalize: bool = False             # hxe: divide the weights by their sum over all nodes (published code)
    soft_beta: float = 10.0                 # soft-labels: target softmax(-soft_beta * d / d_max)
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
        if self.frame_directions not in FRAME_DIRECTIONS:
            raise ValueError(f"frame_directions must be one of {', '.join(FRAME_DIRECTIONS)}, got "
                             f"{_shown(self.frame_directions)} (--frame-directions)")
        if self.frame_profile not in FRAME_PROFILES:
            raise ValueError(f"frame_profile must be one of {', '.join(FRAME_PROFILES)}, got "
                             f"{_shown(self.frame_profile)} (--frame-profile)")
        if self.distance_convention not in CONVENTIONS:
            raise ValueError(f"distance_convention must be one of {', '.join(CONVENTIONS)}, got "
                             f"{_shown(self.distance_convention)} (--distance-convention)")
        if self.dataset == "synthetic" and self.data_root is not None:  # it would be ignored
            raise ValueError("data_root is not read by the synthetic dataset, which is generated: drop --data-root, "
                             "or choose the dataset it holds (--dataset cifar100 | imagefolder | features)")
        workers = 4 * (os.cpu_count() or 1)
        if self.num_workers > workers:  # each is a process: more than this only fills the machine
            raise ValueError(f"num_workers must be <= {workers} (4 per CPU of this machine), got {self.num_workers} "
                             "(--num-workers)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# the range of each numeric TrainConfig field: (test, how the message states it); types come from the annotations
_RANGES = {
    "hidden": (lambda v: v >= 1, ">= 1"), "depth": (lambda v: v >= 1, ">= 1"),
    "widen_factor": (lambda v: v >= 1, ">= 1"), "feature_dim": (lambda v: v >= 1, ">= 1"),
    "num_blocks": (lambda v: v >= 0, ">= 0"), "gamma": (lambda v: v > 0, "> 0"),
    "alpha": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"), "alpha_period": (lambda v: v > 0, "> 0 (epochs)"),
    "hxe_alpha": (lambda v: v >= 0, ">= 0"), "soft_beta": (lambda v: v >= 0, ">= 0"),
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
    "frame_profile_weight": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "image_size": (lambda v: v >= 1, ">= 1"), "dist_timeout": (lambda v: v > 0, "> 0 (seconds)"),
    "stop_after_epochs": (lambda v: v >= 1, ">= 1"),
    "eval_ks": (lambda v: v >= 1, ">= 1 (the k of top-k and HierDist@k)"),
}


_DEVICE = re.compile(r"cpu|cuda(:\d+)?", re.ASCII)
_MAX_INT = 2 ** 31 - 1  # the largest integer field (a size, a count) but the seed
_MAX_FLOAT32 = 3.4028234663852886e38
_FLOAT32_FIELDS = ("lr", "min_lr", "weight_decay", "backbone_lr_scale", "momentum", "grad_clip")


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

    rng = _RANGES.get(name)
    if name == "cosine_scale":
        if v in COSINE_SCALES:
            return v
        if isinstance(v, (str, bool)) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
            raise bad(f"{' or '.join(repr(r) for r in COSINE_SCALES)} or a finite number > 0")
        return float(v)
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
        return _check_ints(name, v, rng, bad)
    if tp in ("int", "float"):
        x = _number(v, tp == "int", bad)
        if rng is not None and not rng[0](x):
            raise ValueError(f"{name} must be {rng[1]}, got {x!r} ({_flag(name)})")
        if tp == "int" and name != "seed" and x > _MAX_INT:  # a size beyond it overflows torch's index types
            raise ValueError(f"{name} must be <= {_MAX_INT} (2**31 - 1), got {x} ({_flag(name)})")
        if name in _FLOAT32_FIELDS and x > _MAX_FLOAT32:  # the optimizer holds it in float32
            raise ValueError(f"{name} must be <= {_MAX_FLOAT32:.3g} (the largest float32), got {x:g} ({_flag(name)})")
        return x
    raise AssertionError(f"TrainConfig field {name}: no check for type {annotation}")


def _number(x: Any, integer: bool, bad: Callable[[str], ValueError]) -> Any:
    """x as an int (integer) or a finite float; ``bad(what)``: the error naming the field, raised otherwise."""
    allowed = numbers.Integral if integer else numbers.Real  # numpy scalars too
    if isinstance(x, bool) or not isinstance(x, allowed):
        if integer and not isinstance(x, bool) and isinstance(x, numbers.Real) and float(x).is_integer():
            raise bad("an integer (written without a decimal point)")
        raise bad("an integer" if integer else "a number")
    if not integer and not math.isfinite(x):
        raise bad("a finite number")
    return int(x) if integer else float(x)


def _check_ints(name: str, v: Any, rng: Tuple[Callable[[int], bool], str], bad: Callable[[str], ValueError]) -> tuple:
    """A non-empty list of integers as a tuple, each in the field's range ``rng`` (test, wording)."""
    integers = isinstance(v, (list, tuple)) and all(isinstance(k, numbers.Integral) and not isinstance(k, bool)
                                                      for k in v)
    if not integers or not v:
        raise bad("a non-empty list of integers")
    ks = tuple(int(k) for k in v)
    bad_k = next((k for k in ks if not rng[0](k)), None)
    if bad_k is not None:
        raise ValueError(f"{name} must be {rng[1]}, got {bad_k} ({_flag(name)})")
    return ks


# ----------------------------------------------------------------------------- model + data from a config
def load_hierarchy(spec: str, classes: Optional[str] = None, convention: str = "published"):
    """A builtin hierarchy by name, an edge-list or nested-JSON (.json) file (with an optional class-order file), or
    random:K."""
    builtin_or_random = spec in BUILTIN_NAMES or re.fullmatch(r"random:\d+", spec, re.ASCII)
    if classes is not None and builtin_or_random:  # it would be ignored: the tree has its own class order
        raise ValueError(f"--classes orders the classes of a hierarchy file, and {spec!r} has its own order: "
                         "drop --classes, or give the tree as an edge-list file")
    if spec in BUILTIN_NAMES:
        h = Hierarchy.builtin(spec)
    elif os.path.isfile(spec) and spec.lower().endswith(".json"):
        h = Hierarchy.from_nested(spec, classes=classes)
    elif os.path.isfile(spec):
        h = Hierarchy.from_edges(spec, classes=classes)
    elif re.fullmatch(r"random:\d+", spec, re.ASCII):
        h = Hierarchy.random(int(spec.split(":")[1]))
    else:
        raise ValueError(f"unknown hierarchy {spec!r}: not a builtin name ({', '.join(BUILTIN_NAMES)}), an "
                         "existing file, nor random:K (a seeded random tree of K classes)")
    return h.with_convention(convention)


def distances_for(config: TrainConfig, hierarchy):
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


def _check_sizes(config: TrainConfig, K: int, datasets) -> None:
    """Refuse data or a model that the memory cannot hold, naming the flags (before either is built)."""
    if datasets is None and config.dataset == "synthetic":
        n_eval = config.eval_samples if config.eval_samples is not None else K * (config.eval_per_class or
                                                                                 config.n_per_class)
        n = K * config.n_per_class + 2 * n_eval
        # float64 while generated: the latent, the hidden layer (2 x input_dim) and the inputs, about 5 copies
        check_memory(40 * n * config.input_dim, f"the synthetic data ({n:,} samples of {config.input_dim:,} numbers)",
                     "lower --n-per-class, --eval-per-class / --eval-samples or --input-dim")
    if (config.backbone or "mlp") == "mlp":
        in_dim = config.input_dim if datasets is None else int(datasets.get("in_dim") or config.input_dim)
        width = config.feature_dim or K
        params = (in_dim * config.hidden + (config.depth - 1) * config.hidden ** 2 + config.hidden * width
                  + config.num_blocks * width ** 2 + K * width)
        # float32 weights, gradients, momentum and a copy in the checkpoint
        check_memory(16 * params, f"the model ({params:,} parameters)",
                     "lower --hidden, --depth, --num-blocks or --feature-dim")


def build_from_config(config: TrainConfig, hierarchy=None, datasets=None):
    """Hierarchy, distances, datasets, model and loss described by a config (no training)."""
    h = (hierarchy if hierarchy is not None else load_hierarchy(config.hierarchy, config.classes)).with_convention(
        config.distance_convention)
    d = distances_for(config, h)
    _check_sizes(config, h.num_classes, datasets)
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
    model = build_model(config.method, backbone, K, frame, hierarchy=h, feature_dim=config.feature_dim,
                        num_blocks=config.num_blocks, seed=config.seed, **bkw)
    criterion = build_loss(config.method, model, alpha=config.alpha, cosine_scale=config.cosine_scale,
                           schedule=config.alpha_schedule,
                           period=config.alpha_period, total_epochs=config.epochs,
                           hierarchy=h if config.method == "hxe" else d, hxe_alpha=config.hxe_alpha,
                           hxe_normalize=config.hxe_normalize, soft_beta=config.soft_beta)
    return dict(hierarchy=h, distances=d, datasets=datasets, model=model, criterion=criterion, frame=frame)


def checkpoint_cosine_scale(ck_cfg: Dict[str, Any], num_classes: int) -> Optional[float]:
    """The cosine term's multiplier a run's config gives for K classes, or None for a method without the term
    (a checkpoint written before the rule was a field summed the term: "sum")."""
    if ck_cfg.get("method") not in ("haframe", "etf"):
        return None
    d = ck_cfg.get("feature_dim") or num_classes
    return cosine_scale_for(ck_cfg.get("cosine_scale", "sum"), num_classes, d)


def _projected_tree_frame(ck_cfg: Dict[str, Any], num_classes: int) -> bool:
    """Whether a run's config builds a HAFrame from a tree below K dimensions (the one that can follow the data)."""
    d = ck_cfg.get("feature_dim") or num_classes
    return ck_cfg.get("method") in ("haframe", "haframe-ce") and not ck_cfg.get("distances") and d < num_classes


def checkpoint_frame_directions(ck_cfg: Dict[str, Any], num_classes: int) -> Optional[str]:
    """The node directions of a run's frame for K classes, or None where there are none (no tree-built HAFrame
    below K); a checkpoint written before the field had Gaussian ones."""
    return ck_cfg.get("frame_directions", "gaussian") if _projected_tree_frame(ck_cfg, num_classes) else None


def checkpoint_frame_profile(ck_cfg: Dict[str, Any], num_classes: int) -> Optional[str]:
    """The kernel of a run's frame for K classes ("features" or "exp"), or None where it is always exp (no
    tree-built HAFrame below K); a checkpoint written before the field had exp."""
    return ck_cfg.get("frame_profile", "exp") if _projected_tree_frame(ck_cfg, num_classes) else None


def checkpoint_profile_weight(ck_cfg: Dict[str, Any], num_classes: int) -> Optional[float]:
    """The fitted share of a run's frame kernel, or None where the kernel is not fitted; a checkpoint written
    before the field had PROFILE_WEIGHT."""
    if checkpoint_frame_profile(ck_cfg, num_classes) != "features":
        return None
    return float(ck_cfg.get("frame_profile_weight", PROFILE_WEIGHT))


def checkpoint_convention(ck_cfg: Dict[str, Any]) -> str:
    """The distance convention a checkpoint was trained with.

    Checkpoints written before conventions were named used the height convention, except for the
    tiered_imagenet_h builtin, whose distances were then the published matrix.
    """
    if "distance_convention" in ck_cfg:
        return ck_cfg["distance_convention"]
    return "published" if ck_cfg.get("hierarchy") == "tiered_imagenet_h" else "height"
