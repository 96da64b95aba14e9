"""The options' values and the TrainConfig flags of ``haframe train`` and ``haframe compare``: argparse types that
refuse bad values in one line, and one flag per TrainConfig field with its --help line."""

from __future__ import annotations

import argparse
import dataclasses
import math

from ..hierarchy.hierarchy import BUILTIN_NAMES
from ..ops.fused_args import COSINE_SCALES

__all__ = ["MAX_INT", "CONFIG_HELP", "int_at_least", "positive_float", "path_arg", "parse_cosine_scale",
           "parse_s_min", "field_type", "add_config_args"]


# ----------------------------------------------------------------------------- argument types
MAX_INT = 2 ** 31 - 1  # the largest size or count a flag takes (beyond it torch's and C's integers overflow)


def int_at_least(low: int, high: int = MAX_INT):
    """An argparse type: an integer in [``low``, ``high``] (argparse names the flag in its error)."""

    def parse(v: str) -> int:
        try:
            x = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {v!r}") from None
        if x < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {x}")
        if x > high:
            raise argparse.ArgumentTypeError(f"must be an integer <= {high}, got {x}")
        return x

    parse.__name__ = f"integer >= {low}"
    return parse


def positive_float(v: str) -> float:
    """An argparse type: a finite number > 0 (NaN and inf are refused, not left to hang or overflow later)."""
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {v!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {v!r}")
    return x


def path_arg(v: str) -> str:
    """An argparse type: a non-empty path (an empty one would silently mean the current folder, or nothing)."""
    if not v.strip():
        raise argparse.ArgumentTypeError("must be a non-empty path, got ''")
    return v


def parse_cosine_scale(v: str):
    """An argparse type for cosine_scale: 'auto', 'sum' or a number (TrainConfig.validate checks its range)."""
    if v in COSINE_SCALES:
        return v
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {' or '.join(COSINE_SCALES)} or a number > 0, got {v!r}") from None


def parse_s_min(v: str):
    """An argparse type for s_min: 'exact', 'grid' or a number."""
    if v in ("exact", "grid"):
        return v
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'exact', 'grid' or a number, got {v!r}") from None


# ----------------------------------------------------------------------------- train options
# the --help line of every TrainConfig field (its default is appended); a test checks that none is missing
CONFIG_HELP = {
    "out": "output folder (checkpoints, metrics.jsonl, results.json)",
    "method": "cross-entropy | haframe | etf | haframe-ce | hxe | soft-labels | multi-level",
    "dataset": "synthetic | cifar100 | imagefolder | features",
    "data_root": "cifar-100-python folder, ImageFolder root (train/ val/ test/) or features folder (train.pt, ...)",
    "hierarchy": f"builtin hierarchy name ({', '.join(BUILTIN_NAMES)}), an edge-list file, or random:K (a seeded "
                 "random tree of K classes)",
    "classes": "class-order file for an edge-list hierarchy (one class per line, line i = label i)",
    "distances": "distance matrix (.npy/.csv) to use instead of the tree's distances",
    "distance_convention": "tree distances: published (D - depth(LCA), the published matrices) or height (the "
                           "longest path down from the LCA)",
    "backbone": "mlp | small-cnn | wrn28 | resnet50 (default: mlp for vectors, wrn28 for images)",
    "hidden": "width of the mlp backbone's hidden layers",
    "depth": "number of layers of the mlp backbone",
    "widen_factor": "k of the WRN-28-k backbone",
    "pretrained": "resnet50: start from ImageNet weights (torchvision must have them)",
    "feature_dim": "feature dimension: the frame's dimension for fixed frames (default K), the type-I layer's "
                   "width otherwise (default 512)",
    "num_blocks": "residual blocks of the type-II transformation layer",
    "gamma": "HAFrame kernel sharpness: similarity falls off as exp(-gamma * distance)",
    "s_min": "the frame's smallest similarity: 'exact', 'grid' (the paper code's search) or a number",
    "alpha": "weight of the cosine-similarity term of the HAFrame loss (1 - alpha goes to cross-entropy), in [0, 1]",
    "alpha_schedule": "constant | linear-increase | linear-decrease | cosine | cosine-linear | cosine-linear-decrease",
    "alpha_period": "period in epochs of the cosine alpha schedules",
    "cosine_scale": "haframe/etf: multiplier of the cosine term: 'auto' (min(d, K) / K: 1 at the paper's d >= K, d/K "
                    "below it, where the summed term would outweigh the cross entropy K/d times), 'sum' (1 at every "
                    "d, the paper's formula) or a number > 0",
    "frame_directions": "haframe with --feature-dim below K: the projected frame's node directions: 'features' (each "
                        "node's offset in the whitened class means of the untrained model's features, so the frame "
                        "starts where the network puts each class) or 'gaussian' (random); ignored at dim >= K",
    "frame_profile": "haframe with --feature-dim below K: the frame's cosine by tree distance: 'features' (a share "
                     "--frame-profile-weight of it follows the untrained model's class means level by level, the "
                     "rest is exp(-gamma d / d_max), so the frame separates the levels the features separate) or "
                     "'exp' (the paper's); ignored at dim >= K",
    "frame_profile_weight": "haframe with --frame-profile features: the share of the frame's kernel fitted to the "
                            "class means (the rest is exp(-gamma d / d_max)), in [0, 1]; 1 follows the features "
                            "alone (lower HierDist@5 in bench/RESULTS.md, no floor where they show no hierarchy)",
    "hxe_alpha": "hxe: the term of the node at depth l weighs exp(-hxe_alpha * l) (0 with unnormalised weights is "
                 "cross-entropy), >= 0",
    "hxe_normalize": "hxe: divide the weights by their sum over all nodes, as the published code (trained with Adam) "
                     "does; under SGD that divides the learning rate by the sum (about 86 on CIFAR-100)",
    "soft_beta": "soft-labels: the target is softmax(-soft_beta * d[y, :] / d_max) (large: cross-entropy), >= 0",
    "epochs": "training epochs",
    "batch_size": "global batch size (split across processes under torchrun)",
    "eval_batch_size": "batch size of validation and test",
    "lr": "peak learning rate of SGD (cosine schedule after the warm-up)",
    "backbone_lr_scale": "backbone learning rate = lr * this",
    "min_lr": "floor of the cosine learning-rate schedule",
    "warmup_epochs": "epochs of linear learning-rate warm-up (fractions allowed)",
    "momentum": "SGD momentum, in [0, 1]",
    "weight_decay": "SGD weight decay",
    "nesterov": "Nesterov momentum",
    "grad_clip": "clip the global gradient norm to this value",
    "amp": "mixed precision on CUDA (ignored on CPU)",
    "seed": "seed of the data, the initialisation and the data order",
    "deterministic": "deterministic kernels and data order (a run can be repeated and resumed bit for bit)",
    "num_workers": "DataLoader worker processes (0: load in the training process)",
    "device": "auto | cpu | cuda | cuda:N",
    "resume": "continue from <out>/last.pt if it exists (on CPU bit for bit the uninterrupted run, given the same "
              "torch thread count, e.g. OMP_NUM_THREADS: the checkpoint records it and a different count is warned "
              "about)",
    "resume_from": "continue from this checkpoint (same thread-count caveat as --resume)",
    "overwrite": "start over in an --out folder that holds an earlier run: its checkpoints, logs and results are "
                 "deleted first (without it such a folder is refused, to lose nothing)",
    "n_per_class": "synthetic data: training samples per class",
    "eval_per_class": "synthetic data: val and test samples per class (default: --n-per-class)",
    "eval_samples": "synthetic data: val and test hold this many samples of uniformly drawn classes (instead of "
                    "--eval-per-class per class; for very many classes)",
    "input_dim": "synthetic data: input vector size",
    "difficulty": "synthetic data: noise level (0 separable; about 1 makes sibling classes hard)",
    "image_size": "imagefolder: side of the square crop in pixels",
    "augment": "random crops and flips on training images",
    "select_metric": "validation metric that picks best.pt (top1 is maximised, others minimised)",
    "eval_ks": "the k values of top-k / HierDist@k metrics, each >= 1 (values above the class count are dropped)",
    "progress": "per-epoch progress bars",
    "tensorboard": "TensorBoard event files in --out (needs the tensorboard package)",
    "dist_timeout": "seconds before a stuck collective operation under torchrun fails",
    "stop_after_epochs": "stop after this many epochs in this invocation (resume later)",
}


def field_type(tp: str):
    """(argparse type, nargs) of a TrainConfig field's annotation."""
    tp = tp.replace("typing.", "")
    if tp in ("int", "Optional[int]"):
        return int, None
    if tp in ("float", "Optional[float]"):
        return float, None
    if tp in ("str", "Optional[str]"):
        return str, None
    if tp == "bool":
        return bool, None
    if tp == "Union[str, float]":
        return parse_s_min, None
    if tp.startswith("Tuple[int"):
        return int, "+"
    raise AssertionError(f"unhandled TrainConfig field type {tp}")


def add_config_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, each defaulting to None (unset: the config file's or the field's default)."""
    from ..training.config import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        typ, nargs = (parse_cosine_scale, None) if f.name == "cosine_scale" else field_type(str(f.type))
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = CONFIG_HELP[f.name] + (f" (default: {default})" if default is not None else "")
        if typ is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(flag, dest=f.name, type=typ, nargs=nargs, default=None, help=help_,
                           metavar=f.name.upper())
