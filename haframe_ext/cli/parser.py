"""The ``haframe`` command line: argument parsing and dispatch of frame, train, eval, demo, bench and hierarchy.

User mistakes (missing files, bad formats, unknown names, labels that do not fit the hierarchy,
invalid values) print one line ``haframe: error: ...`` on stderr and exit with code 2; a run that
diverges or loses a peer process exits with code 1; ``--help`` exits with 0.  A warning is one line
``haframe: warning: ...``.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from typing import Optional, Sequence

from .commands import (UserError, cmd_compare, cmd_demo, cmd_eval, cmd_frame, cmd_hierarchy, cmd_train, memory_message,
                       quote)
from ..hierarchy.edges import HierarchyError
from ..hierarchy.hierarchy import BUILTIN_NAMES, CONVENTIONS, INTERNAL_CLASSES
from ..hierarchy.wordnet import PARENT_RULES
from .options import MAX_INT, add_config_args, int_at_least, parse_s_min, path_arg, positive_float
from .quick_bench import cmd_bench
from ..startup import end_startup_guard

PROG = "haframe"


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: ``haframe: error: ...`` (exit 2)."""

    def error(self, message):  # overrides argparse's error(): raise, not print usage and exit
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        hint = f" (see '{PROG} {sub} --help')" if sub else f" (see '{PROG} --help')"
        raise UserError(f"{message}{hint}")


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
    f.add_argument("--s-min", dest="s_min", type=parse_s_min, default=None,
                   help="'exact' (default), 'grid' (the paper code's search) or a number")
    f.add_argument("--dim", type=int_at_least(1), default=None,
                   help="frame dimension (default: K; below K the exact frame is projected, and its margin and "
                        "Gram error are printed)")
    f.add_argument("--distance-convention", choices=CONVENTIONS, default=None,
                   help="tree distances: 'published' (D - depth(LCA), default) or 'height'")
    f.add_argument("--seed", type=int_at_least(0, 2 ** 63 - 1), default=0,
                   help="seed of the random rotation (default: 0)")
    f.add_argument("--etf", type=int_at_least(-MAX_INT), default=None, metavar="K",
                   help="build a K-class simplex ETF instead")
    f.add_argument("--out", type=path_arg, help="save the frame here (.pt, loadable with HAFrame.load)")
    f.add_argument("--plot", type=path_arg, help="write a PNG of target vs realised similarity heatmaps (needs "
                                              "matplotlib)")
    f.set_defaults(func=cmd_frame)


def _add_train(sub) -> None:
    """``haframe train``'s options: --config, --seeds and one flag per TrainConfig field."""
    t = sub.add_parser("train", help="train and evaluate a model",
                       description="Train a model (single process, or several under torchrun), select the best "
                                   "epoch on validation, evaluate on test and write results.json.")
    t.add_argument("--config", help="JSON file of TrainConfig fields (flags override it)")
    t.add_argument("--seeds", type=int_at_least(0, 2 ** 63 - 1), nargs="+",
                   help="train once per seed (each seed once) and report mean and 95%% CI")
    add_config_args(t)
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
    c.add_argument("--seeds", type=int_at_least(0), nargs="+", default=[0, 1, 2],
                   help="one run per method and seed (default: 0 1 2)")
    c.add_argument("--metrics", default=None,
                   help="comma-separated columns of the table (default: top1, mistake_severity, hierdist@1/5/20 and "
                        "the other default metrics the runs report)")
    c.add_argument("--no-plot", dest="no_plot", action="store_true", help="do not write compare.png")
    c.add_argument("--config", help="JSON file of TrainConfig fields (flags override it)")
    add_config_args(c)
    c.set_defaults(func=cmd_compare)


def _add_eval(sub) -> None:
    """``haframe eval``'s options."""
    e = sub.add_parser("eval", help="evaluate a checkpoint",
                       description="Evaluate a saved model (best.pt / last.pt) on a split of its dataset.")
    e.add_argument("--checkpoint", required=True, help="checkpoint written by 'haframe train'")
    e.add_argument("--dataset", help="override the dataset of the checkpoint's config")
    e.add_argument("--data-root", dest="data_root", help="override the data root")
    e.add_argument("--split", default="test", choices=("train", "val", "test"), help="split (default: test)")
    e.add_argument("--batch-size", dest="batch_size", type=int_at_least(1), default=512,
                   help="batch size (default: 512)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    e.add_argument("--no-crm", dest="no_crm", action="store_true", help="skip the CRM re-ranked metrics")
    e.add_argument("--calibrate", action="store_true",
                   help="fit one temperature on the validation split (NLL); report ECE before and after, and CRM "
                        "on the calibrated probabilities")
    e.add_argument("--plot", type=path_arg,
                   help="PNG of the top-1 mistakes per LCA height, the model and its CRM re-ranking side by side")
    e.add_argument("--json", type=path_arg, help="also write the metrics to this JSON file")
    e.set_defaults(func=cmd_eval)


def _add_demo(sub) -> None:
    """``haframe demo``'s options."""
    d = sub.add_parser("demo", help="compare cross-entropy, hxe, soft-labels and haframe on synthetic data (no "
                                    "download)",
                       description="Synthetic data generated from the CIFAR-100 class tree (no images), MLP "
                                   "backbone: trains each method once per seed (as 'haframe compare'), prints the "
                                   "mean and 95%% CI table with the CRM rows, writes compare.json, compare.md, "
                                   "results.json (the means) and demo.png.")
    d.add_argument("--out", type=path_arg, default="haframe-demo", help="output folder (default: ./haframe-demo)")
    d.add_argument("--epochs", type=int_at_least(1), default=10, help="epochs per run (default: 10)")
    d.add_argument("--seeds", type=int_at_least(0), nargs="+", default=[0, 1, 2],
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
    b.add_argument("--batch", type=int_at_least(1), default=64, help="batch size B (default: 64)")
    b.add_argument("--classes", type=int_at_least(2), default=100,
                   help="classes K (default: 100, the CIFAR-100 HAFrame)")
    b.add_argument("--dim", type=int_at_least(1), default=None, help="feature dimension d (default: K)")
    b.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"),
                   help="dtype of the features and the frame (default: float32)")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    b.add_argument("--etf", action="store_true", help="use a simplex ETF instead of the CIFAR-100 HAFrame")
    b.add_argument("--min-run-time", dest="min_run_time", type=positive_float, default=0.6,
                   help="seconds of timing per provider, over all blocks (default: 0.6)")
    b.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch threads for the timing (default: 1 on CPU, robust on a shared machine)")
    b.add_argument("--repeats", type=int_at_least(1), default=3,
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
    hy.add_argument("--out", type=path_arg, metavar="EDGES", help="write the tree as a parent<TAB>child edge list")
    hy.add_argument("--gamma", type=positive_float, default=None, help="also print the exact s_min at this gamma")
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

