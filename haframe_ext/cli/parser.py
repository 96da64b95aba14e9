"""The ``haframe`` command line: argument parsing and dispatch of frame, train, eval, demo, bench and hierarchy.

User mistakes (missing files, bad formats, unknown names, labels that do not fit the hierarchy,
invalid values) print one line ``haframe: error: ...`` on stderr and exit with code 2; a run that
diverges or loses a peer process exits with code 1; ``--help`` exits with 0.  A warning is one line
``haframe: warning: ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import os
import sys
import warnings
from typing import Optional, Sequence

from .commands import (UserError, cmd_compare, cmd_demo, cmd_eval, cmd_frame, cmd_hierarchy, cmd_train, memory_message,
                       quote)
from ..hierarchy.edges import HierarchyError
from ..hierarchy.hierarchy import BUILTIN_NAMES, CONVENTIONS, INTERNAL_CLASSES
from ..ops.fused import COSINE_SCALES
from ..hierarchy.wordnet import PARENT_RULES
from .quick_bench import cmd_bench
from ..startup import end_startup_guard

PROG = "haframe"


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: ``haframe: error: ...`` (exit 2)."""

    def error(self, message):  # overrides argparse's error(): raise, not print usage and exit
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        hint = f" (see '{PROG} {sub} --help')" if sub else f" (see '{PROG} --help')"
        raise UserError(f"{message}{hint}")


# ----------------------------------------------------------------------------- argument types
_MAX_INT = 2 ** 31 - 1  # the largest size or count a flag takes (beyond it torch's and C's integers overflow)


def _int_at_least(low: int, high: int = _MAX_INT):
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


def _positive_float(v: str) -> float:
    """An argparse type: a finite number > 0 (NaN and inf are refused, not left to hang or overflow later)."""
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {v!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {v!r}")
    return x


def _path(v: str) -> str:
    """An argparse type: a non-empty path (an empty one would silently mean the current folder, or nothing)."""
    if not v.strip():
        raise argparse.ArgumentTypeError("must be a non-empty path, got ''")
    return v


def _parse_cosine_scale(v: str):
    """An argparse type for cosine_scale: 'auto', 'sum' or a number (TrainConfig.validate checks its range)."""
    if v in COSINE_SCALES:
        return v
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {' or '.join(COSINE_SCALES)} or a number > 0, got {v!r}") from None


def _parse_s_min(v: str):
    """An argparse type for s_min: 'exact', 'grid' or a number."""
    if v in ("exact", "grid"):
        return v
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'exact', 'grid' or a number, got {v!r}") from None


# ----------------------------------------------------------------------------- train options
# the --help line of every TrainConfig field (its default is appended); a test checks that none is missing
_HELP = {
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
    "frame_profile": "haframe with --feature-dim below K: the frame's cosine by tree distance: 'features' (0.8 of "
                     "it follows the untrained model's class means, level by level, 0.2 is exp(-gamma d / d_max), "
                     "so the frame separates the levels the features separate) or 'exp' (the paper's); ignored at "
                     "dim >= K",
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


def _field_type(tp: str):
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
        return _parse_s_min, None
    if tp.startswith("Tuple[int"):
        return int, "+"
    raise AssertionError(f"unhandled TrainConfig field type {tp}")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, each defaulting to None (unset: the config file's or the field's default)."""
    from ..training.config import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        typ, nargs = (_parse_cosine_scale, None) if f.name == "cosine_scale" else _field_type(str(f.type))
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = _HELP[f.name] + (f" (default: {default})" if default is not None else "")
        if typ is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(flag, dest=f.name, type=typ, nargs=nargs, default=None, help=help_,
                           metavar=f.name.upper())


# ----------------------------------------------------------------------------- parser
def _add_frame(sub) -> None:
    """``haframe frame``'s options."""
    f = sub.add_parser("frame", help="build a HAFrame, print diagnostics, save it and plot it",
                       description="Build a hierarchy-aware frame (or a simplex ETF), print its diagnostics, "
                                   "optionally save it (--out) and plot target vs realised similarity (--plot).")
    f.add_argument("--hierarchy", default=None,
                   help=f"builtin name ({', '.join(BUILTIN_NAMES)}), an edge-list file, random:K (a seeded random "
                        "tree), or a .npy/.csv distance matrix (default: cifar100)")
    f.add_argument("--classes", help="class-order file for an edge-list hierarchy")
    f.add_argument("--distances", help="a .npy/.csv distance matrix (instead of --hierarchy)")
    f.add_argument("--gamma", type=float, default=None, help="kernel sharpness gamma (default: 2.0)")
    f.add_argument("--s-min", dest="s_min", type=_parse_s_min, default=None,
                   help="'exact' (default), 'grid' (the paper code's search) or a number")
    f.add_argument("--dim", type=_int_at_least(1), default=None,
                   help="frame dimension (default: K; below K the exact frame is projected, and its margin and "
                        "Gram error are printed)")
    f.add_argument("--distance-convention", choices=CONVENTIONS, default=None,
                   help="tree distances: 'published' (D - depth(LCA), default) or 'height'")
    f.add_argument("--seed", type=_int_at_least(0, 2 ** 63 - 1), default=0,
                   help="seed of the random rotation (default: 0)")
    f.add_argument("--etf", type=_int_at_least(-_MAX_INT), default=None, metavar="K",
                   help="build a K-class simplex ETF instead")
    f.add_argument("--out", type=_path, help="save the frame here (.pt, loadable with HAFrame.load)")
    f.add_argument("--plot", type=_path, help="write a PNG of target vs realised similarity heatmaps (needs "
                                              "matplotlib)")
    f.set_defaults(func=cmd_frame)


def _add_train(sub) -> None:
    """``haframe train``'s options: --config, --seeds and one flag per TrainConfig field."""
    t = sub.add_parser("train", help="train and evaluate a model",
                       description="Train a model (single process, or several under torchrun), select the best "
                                   "epoch on validation, evaluate on test and write results.json.")
    t.add_argument("--config", help="JSON file of TrainConfig fields (flags override it)")
    t.add_argument("--seeds", type=_int_at_least(0, 2 ** 63 - 1), nargs="+",
                   help="train once per seed (each seed once) and report mean and 95%% CI")
    _add_config_args(t)
    t.set_defaults(func=cmd_train)


def _add_compare(sub) -> None:
    """``haframe compare``'s options: --methods, --seeds, --metrics, --no-plot, --config and the TrainConfig flags."""
    c = sub.add_parser("compare", help="train several methods x seeds on one task and tabulate them",
                       description="Train each method of --methods once per seed of --seeds with the same settings "
                                   "(in <out>/<method>/seed<k>: a finished run is reused, a killed one resumed), "
                                   "print mean and 95%% CI per metric (rows after CRM too), write compare.json, "
                                   "compare.md and compare.png (top-1 against HierDist@5).")
    c.add_argument("--methods", default="cross-entropy,hxe,soft-labels,haframe",
                   help="comma-separated methods (default: cross-entropy,hxe,soft-labels,haframe)")
    c.add_argument("--seeds", type=_int_at_least(0), nargs="+", default=[0, 1, 2],
                   help="one run per method and seed (default: 0 1 2)")
    c.add_argument("--metrics", default=None,
                   help="comma-separated columns of the table (default: top1, mistake_severity, hierdist@1/5/20 and "
                        "the other default metrics the runs report)")
    c.add_argument("--no-plot", dest="no_plot", action="store_true", help="do not write compare.png")
    c.add_argument("--config", help="JSON file of TrainConfig fields (flags override it)")
    _add_config_args(c)
    c.set_defaults(func=cmd_compare)


def _add_eval(sub) -> None:
    """``haframe eval``'s options."""
    e = sub.add_parser("eval", help="evaluate a checkpoint",
                       description="Evaluate a saved model (best.pt / last.pt) on a split of its dataset.")
    e.add_argument("--checkpoint", required=True, help="checkpoint written by 'haframe train'")
    e.add_argument("--dataset", help="override the dataset of the checkpoint's config")
    e.add_argument("--data-root", dest="data_root", help="override the data root")
    e.add_argument("--split", default="test", choices=("train", "val", "test"), help="split (default: test)")
    e.add_argument("--batch-size", dest="batch_size", type=_int_at_least(1), default=512,
                   help="batch size (default: 512)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    e.add_argument("--no-crm", dest="no_crm", action="store_true", help="skip the CRM re-ranked metrics")
    e.add_argument("--calibrate", action="store_true",
                   help="fit one temperature on the validation split (NLL); report ECE before and after, and CRM "
                        "on the calibrated probabilities")
    e.add_argument("--plot", type=_path,
                   help="PNG of the top-1 mistakes per LCA height, the model and its CRM re-ranking side by side")
    e.add_argument("--json", type=_path, help="also write the metrics to this JSON file")
    e.set_defaults(func=cmd_eval)


def _add_demo(sub) -> None:
    """``haframe demo``'s options."""
    d = sub.add_parser("demo", help="compare cross-entropy, hxe, soft-labels and haframe on synthetic data (no "
                                    "download)",
                       description="Synthetic data generated from the CIFAR-100 class tree (no images), MLP "
                                   "backbone: trains each method once per seed (as 'haframe compare'), prints the "
                                   "mean and 95%% CI table with the CRM rows, writes compare.json, compare.md, "
                                   "results.json (the means) and demo.png.")
    d.add_argument("--out", type=_path, default="haframe-demo", help="output folder (default: ./haframe-demo)")
    d.add_argument("--epochs", type=_int_at_least(1), default=10, help="epochs per run (default: 10)")
    d.add_argument("--seeds", type=_int_at_least(0), nargs="+", default=[0, 1, 2],
                   help="one run per method and seed (default: 0 1 2)")
    d.add_argument("--methods", nargs="+", default=["cross-entropy", "hxe", "soft-labels", "haframe"],
                   help="methods to train, space- or comma-separated (default: cross-entropy hxe soft-labels "
                        "haframe)")
    d.add_argument("--no-plot", dest="no_plot", action="store_true", help="do not write demo.png")
    d.add_argument("--progress", action="store_true", help="show per-epoch progress bars")
    d.set_defaults(func=cmd_demo)


def _add_bench(sub) -> None:
    """``haframe bench``'s options."""
    b = sub.add_parser("bench", help="time the fused HAFrame loss against the reference",
                       description="Time forward+backward of ops.haframe_loss against ops.reference_loss "
                                   "(torch.utils.benchmark) at the CIFAR-100 shape (B=64, K=d=100); "
                                   "--full runs a source checkout's provider benchmark instead.")
    b.add_argument("--batch", type=_int_at_least(1), default=64, help="batch size B (default: 64)")
    b.add_argument("--classes", type=_int_at_least(2), default=100,
                   help="classes K (default: 100, the CIFAR-100 HAFrame)")
    b.add_argument("--dim", type=_int_at_least(1), default=None, help="feature dimension d (default: K)")
    b.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"),
                   help="dtype of the features and the frame (default: float32)")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    b.add_argument("--etf", action="store_true", help="use a simplex ETF instead of the CIFAR-100 HAFrame")
    b.add_argument("--min-run-time", dest="min_run_time", type=_positive_float, default=0.6,
                   help="seconds of timing per provider, over all blocks (default: 0.6)")
    b.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="torch threads for the timing (default: 1 on CPU, robust on a shared machine)")
    b.add_argument("--repeats", type=_int_at_least(1), default=3,
                   help="alternating timing blocks per provider (default: 3)")
    b.add_argument("--full", nargs=argparse.REMAINDER, default=None, metavar="ARGS",
                   help="run the repository's provider benchmark (python -m bench.run_quick ARGS) instead; "
                        "needs a source checkout (run from the repository root)")
    b.set_defaults(func=cmd_bench)


def _add_hierarchy(sub) -> None:
    """``haframe hierarchy``'s options."""
    hy = sub.add_parser("hierarchy", help="describe a hierarchy (size, depths, convention, s_min); build one "
                                          "from WordNet ids",
                        description="Print K, the number of nodes, the leaf depths, whether the tree is balanced, "
                                    "the distance convention and how many class pairs the other one would change, "
                                    "d_max and (with --gamma) the exact s_min; --out writes the edges.")
    hy.add_argument("hierarchy", nargs="?", metavar="FILE|NAME",
                    help=f"builtin name ({', '.join(BUILTIN_NAMES)}) or an edge-list file")
    hy.add_argument("--classes", help="class-order file for an edge-list hierarchy")
    hy.add_argument("--wordnet-ids", dest="wordnet_ids", metavar="F",
                    help="build the tree of these WordNet noun ids (n########, one per line) from WordNet")
    hy.add_argument("--wordnet", metavar="DIR", help="folder holding WordNet's data.noun (default: searched)")
    hy.add_argument("--wordnet-parent", dest="wordnet_parent", choices=PARENT_RULES, default=PARENT_RULES[0],
                    help="which hypernym a synset with several keeps: the first listed (default, as the published "
                         "trees) or the deepest (longest path to the top)")
    hy.add_argument("--internal-classes", dest="internal_classes", choices=INTERNAL_CLASSES,
                    default=INTERNAL_CLASSES[0],
                    help="a class at an inner node: 'leaf' (default) hangs it as a leaf below its node, renamed "
                         "'<class>:node'; 'error' refuses it")
    hy.add_argument("--out", type=_path, metavar="EDGES", help="write the tree as a parent<TAB>child edge list")
    hy.add_argument("--gamma", type=_positive_float, default=None, help="also print the exact s_min at this gamma")
    hy.add_argument("--distance-convention", dest="distance_convention", choices=CONVENTIONS,
                    default=None, help="distance convention (default: the hierarchy's, 'published')")
    hy.set_defaults(func=cmd_hierarchy)


def build_parser() -> argparse.ArgumentParser:
    """The ``haframe`` parser with its subcommands."""
    from .. import __version__

    p = _Parser(prog=PROG, description="Hierarchy-aware classification with fixed HAFrame classifiers "
                                       "(Liang & Davis, ICCV 2023).")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_frame, _add_train, _add_compare, _add_eval, _add_demo, _add_bench, _add_hierarchy):
        add(sub)
    return p


_MAX_MESSAGE = 2000  # characters of one error line (a message quoting huge input is cut)


def _one_line(exc: BaseException) -> str:
    """An exception's message as one line, cut at _MAX_MESSAGE characters."""
    msg = str(exc).strip()
    if isinstance(exc, KeyError) and exc.args:
        msg = str(exc.args[0])
    msg = " ".join(msg.split()) if msg else type(exc).__name__
    if len(msg) > _MAX_MESSAGE:
        msg = f"{msg[:_MAX_MESSAGE]}... (cut: the message has {len(msg):,} characters)"
    return msg


# what to do about an OS error, by errno
_OS_FIX = {errno.ENOSPC: "free some space or choose another --out",
           errno.EDQUOT: "free some space or choose another --out",
           errno.EROFS: "choose a writable folder",
           errno.ENAMETOOLONG: "choose a shorter path",
           errno.EACCES: "check its permissions or choose another path"}


def _os_error_line(exc: OSError) -> str:
    """One line for an OS error: what failed, on which path (cut if long), and the fix."""
    what = exc.strerror or _one_line(exc)
    where = f" ({quote(exc.filename)})" if exc.filename is not None and quote(exc.filename) not in what else ""
    fix = _OS_FIX.get(exc.errno)
    return _one_line(type(exc)(f"{what}{where}" + (f": {fix}" if fix else "")))


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch's failed allocations are RuntimeErrors (CPU) or OutOfMemoryError (CUDA); numpy's are MemoryErrors."""
    text = str(exc)
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "not enough memory" in text or "out of memory" in text)


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt (the user's Ctrl-C) is in an exception's chain of causes."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line ``haframe: warning: ...``, without the source line Python adds."""
    print(f"{PROG}: warning: {_one_line(Warning(message))}", file=sys.stderr if file is None else file)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``haframe`` console script; returns the exit code."""
    end_startup_guard()  # the imports are done: Ctrl-C is a KeyboardInterrupt again (exit 130 below)
    argv = list(sys.argv[1:] if argv is None else argv)
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return _run(argv)
    finally:
        warnings.showwarning = shown


def _run(argv: list) -> int:
    """Parse ``argv``, run its command and map each kind of failure to its exit code."""
    from ..training.checkpoint import CheckpointError
    from ..training.data.common import DataError
    from ..training.distributed import DistributedError
    from ..training.loop import TrainingDivergedError

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except (UserError, HierarchyError, DataError, CheckpointError, FileNotFoundError, FileExistsError,
            IsADirectoryError, NotADirectoryError, PermissionError, ValueError, argparse.ArgumentTypeError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except ImportError as exc:
        if _caused_by_interrupt(exc):  # Ctrl-C inside a lazy import that the importer turned into an ImportError
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (TrainingDivergedError, DistributedError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `haframe ... | head`: stop quietly (before OSError, its base class)
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except OSError as exc:  # a read-only or full disk, a path too long, /proc, ...
        print(f"{PROG}: error: {_os_error_line(exc)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if _caused_by_interrupt(exc):  # e.g. a RecursionError while an interrupted import unwinds
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        if not _is_out_of_memory(exc):
            raise
        print(f"{PROG}: error: {_one_line(RuntimeError(memory_message(exc)))}", file=sys.stderr)
        return 2

