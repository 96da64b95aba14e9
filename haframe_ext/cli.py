"""The ``haframe`` command line: ``frame``, ``train``, ``eval``, ``demo`` and ``bench``.

User mistakes (missing files, bad formats, unknown names, labels that do not fit the hierarchy,
invalid values) print one line ``haframe: error: ...`` on stderr and exit with code 2; a run that
diverges or loses a peer process exits with code 1; ``--help`` exits with 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .hierarchy import BUILTIN_NAMES, CONVENTIONS, Hierarchy

PROG = "haframe"


class UserError(Exception):
    """A mistake in the command line or its inputs (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: ``haframe: error: ...`` (exit 2)."""

    def error(self, message):  # noqa: D401 - argparse API
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        hint = f" (see '{PROG} {sub} --help')" if sub else f" (see '{PROG} --help')"
        raise UserError(f"{message}{hint}")


# ----------------------------------------------------------------------------- argument types
def _int_at_least(low: int):
    """An argparse type: an integer >= ``low`` (argparse names the flag in its error)."""

    def parse(v: str) -> int:
        try:
            x = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {v!r}") from None
        if x < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {x}")
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


def _check_device(device: str) -> None:
    """auto, cpu, cuda or cuda:N, and CUDA only where it is available."""
    import re

    import torch

    if device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {_quote(device)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} but CUDA is not available: use --device cpu or auto")


def _quote(v, limit: int = 100) -> str:
    """``repr`` of user input, cut to ``limit`` characters (a huge input is never echoed whole)."""
    r = repr(str(v))
    return r if len(r) <= limit else f"{r[:limit - 4]}...' ({len(str(v))} characters)"


def _available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:,.1f} GiB"


# a dense frame peaks at about 4 float64 copies of its K x K and K x dim matrices (measured: 3.6)
_DENSE_FRAME_COPIES = 4


def _check_frame_fits(K: int, dim: int, flag: str) -> None:
    """Refuse a --dim whose dense frame cannot fit in memory, saying what was asked and what fits (a K too large
    for any dim is left to the frame builder's own rule and to the out-of-memory handler of :func:`main`)."""
    avail = _available_memory()
    need = _DENSE_FRAME_COPIES * 8 * (K * K + K * dim)
    if avail is None or need <= avail:
        return
    fits = max(0, int(avail / (_DENSE_FRAME_COPIES * 8) / K - K))
    raise UserError(f"{flag} asks for a K={K:,} x dim={dim:,} frame, which needs about {_gib(need)} of memory "
                    f"(float64 matrices of K x K and K x dim), but {_gib(avail)} is available: {flag} up to about "
                    f"{fits:,} fits for K={K:,}")


def _memory_message(exc: BaseException) -> str:
    """One line for an allocation that failed: the size asked for (numpy and torch say it) and what is available."""
    avail = _available_memory()
    asked = " ".join(str(exc).split())[:300] or "an allocation failed"
    have = f"; {_gib(avail)} of memory is available" if avail is not None and "available" not in asked else ""
    return (f"out of memory: {asked}{have}. Use a smaller hierarchy or --dim / --feature-dim, or a machine with more "
            "memory")


# ----------------------------------------------------------------------------- frame
def _load_frame_inputs(args):
    """(a Hierarchy or a distance matrix, label) from --hierarchy (name, edge file, random:K or matrix file) or --distances."""
    from .hierarchy import as_distance_matrix
    from .train import load_hierarchy

    if args.distances:
        if not os.path.isfile(args.distances):
            raise UserError(f"distance matrix file not found: {args.distances}")
        return as_distance_matrix(args.distances), os.path.basename(args.distances)
    spec = args.hierarchy
    if spec.lower().endswith((".npy", ".csv")):
        if not os.path.isfile(spec):
            raise UserError(f"distance matrix file not found: {spec}")
        return as_distance_matrix(spec), os.path.basename(spec)
    if args.classes and not os.path.isfile(args.classes):
        raise UserError(f"classes file not found: {args.classes}")
    return load_hierarchy(spec, args.classes, args.distance_convention), spec


def _parse_s_min(v: str):
    if v in ("exact", "grid"):
        return v
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'exact', 'grid' or a number, got {v!r}") from None


def cmd_frame(args) -> int:
    from .frame import DENSE_MAX_K, HAFrame

    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out {_quote(args.out)} is a folder: name the file to write, e.g. "
                        f"{_quote(os.path.join(args.out, 'frame.pt'))}")
    if args.etf is not None:
        if args.etf < 2:
            raise UserError(f"--etf needs K >= 2 classes, got {args.etf}")
        if args.dim is not None:
            _check_frame_fits(args.etf, args.dim, "--dim")
        if args.plot and args.etf > DENSE_MAX_K:
            raise UserError(f"--plot draws K x K heatmaps, and K={args.etf:,} > {DENSE_MAX_K:,}: drop --plot")
        approximate = args.dim is not None and args.dim < args.etf
        frame = HAFrame.etf(args.etf, dim=args.dim, seed=args.seed, approximate=approximate)
        label = f"simplex ETF, K={args.etf}"
    else:
        d, label = _load_frame_inputs(args)
        K = d.num_classes if isinstance(d, Hierarchy) else len(d)
        if args.plot and K > DENSE_MAX_K:
            raise UserError(f"--plot draws K x K heatmaps, and K={K:,} > {DENSE_MAX_K:,}: drop --plot")
        approximate = args.dim is not None and args.dim < K  # dim < K: the Gaussian projection of the exact frame
        if isinstance(d, Hierarchy):
            frame = HAFrame.from_hierarchy(d, args.gamma, s_min=args.s_min, dim=args.dim, seed=args.seed,
                                           approximate=approximate)
        else:
            if args.dim is not None:
                _check_frame_fits(K, args.dim, "--dim")
            frame = HAFrame.from_distances(d, args.gamma, s_min=args.s_min, dim=args.dim, seed=args.seed,
                                           approximate=approximate)
    diag = frame.diagnostics()
    print(f"frame: {label}")
    for k, v in diag.items():
        for name, value in (v.items() if isinstance(v, dict) else [(k, v)]):
            print(f"  {name:24s} {value:.6g}" if isinstance(value, float) else f"  {name:24s} {value}")
    if args.out:
        out = Path(args.out)
        if out.parent and not out.parent.exists():
            raise UserError(f"output folder does not exist: {out.parent}")
        _save_frame(frame, out)
        print(f"wrote {out}")
    if args.plot:
        _plot_frame(frame, Path(args.plot), label)
        print(f"wrote {args.plot}")
    return 0


def _save_frame(frame, out: Path) -> None:
    """``frame.save`` atomically (a temp file beside ``out``, renamed); an unwritable path is a UserError."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # a file object: an OS error stays an OSError, not torch's RuntimeError
            frame.save(f)
        os.replace(tmp, out)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise UserError(f"cannot write --out {_quote(out)}: {exc.strerror or exc}") from None


def _plot_frame(frame, path: Path, label: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install matplotlib)") from None

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    if path.parent and not path.parent.exists():
        raise UserError(f"output folder does not exist: {path.parent}")
    if path.is_dir():
        raise UserError(f"--plot {_quote(path)} is a folder: name the PNG file to write")
    from .demo import tree_order

    S = frame.similarity.double().cpu().numpy()
    W = frame.weight.double().cpu().numpy()
    R = W @ W.T
    order = tree_order(1.0 - S)  # similar classes next to each other
    S, R = S[np.ix_(order, order)], R[np.ix_(order, order)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    # antialiased: with more classes than pixels, "nearest" would drop rows (the diagonal flickers in and
    # out between panels); averaging shows the same picture for S and W W^T
    vmin, vmax = min(S.min(), R.min()), 1.0
    for ax, M, title in ((axes[0], S, "target similarity S"), (axes[1], R, "realised W W^T")):
        im = ax.imshow(M, vmin=vmin, vmax=vmax, cmap="viridis", interpolation="antialiased")
        ax.set_title(title)
        ax.set_xlabel("class (tree order)")
        ax.set_ylabel("class (tree order)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    im = axes[2].imshow(np.abs(R - S), cmap="magma", interpolation="antialiased")
    axes[2].set_title(f"|W W^T - S| (max {np.abs(R - S).max():.2e})")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    fig.suptitle(f"HAFrame: {label}, K={frame.num_classes}, dim={frame.dim}, s_min={frame.s_min:.4f}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- train
_HELP = {
    "out": "output folder (checkpoints, metrics.jsonl, results.json)",
    "method": "cross-entropy | haframe | etf | haframe-ce",
    "dataset": "synthetic | cifar100 | imagefolder | features",
    "data_root": "cifar-100-python folder, ImageFolder root (train/ val/ test/) or features folder (train.pt, ...)",
    "hierarchy": f"builtin hierarchy name ({', '.join(BUILTIN_NAMES)}), an edge-list file, or random:K (a seeded "
                 "random tree of K classes)",
    "classes": "class-order file for an edge-list hierarchy (one class per line, line i = label i)",
    "distances": "distance matrix (.npy/.csv) to use instead of the tree's distances",
    "distance_convention": "tree distances: published (D - depth(LCA), the published matrices) or height (the "
                           "longest path down from the LCA)",
    "eval_samples": "synthetic data: val and test hold this many samples of uniformly drawn classes (instead of "
                    "--eval-per-class per class; for very many classes)",
    "backbone": "mlp | small-cnn | wrn28 | resnet50 (default: mlp for vectors, wrn28 for images)",
    "batch_size": "global batch size (split across processes under torchrun)",
    "backbone_lr_scale": "backbone learning rate = lr * this",
    "alpha_schedule": "constant | linear-increase | linear-decrease | cosine | cosine-linear | cosine-linear-decrease",
    "alpha_period": "period in epochs of the cosine alpha schedules",
    "resume": "continue from <out>/last.pt if it exists (on CPU bit for bit the uninterrupted run, given the same "
              "torch thread count, e.g. OMP_NUM_THREADS: the checkpoint records it and a different count is warned "
              "about)",
    "resume_from": "continue from this checkpoint (same thread-count caveat as --resume)",
    "overwrite": "start over in an --out folder that holds an earlier run: its checkpoints, logs and results are "
                 "deleted first (without it such a folder is refused, to lose nothing)",
    "eval_ks": "the k values of top-k / HierDist@k metrics, each >= 1 (values above the class count are dropped)",
    "select_metric": "validation metric that picks best.pt (top1 is maximised, others minimised)",
    "stop_after_epochs": "stop after this many epochs in this invocation (resume later)",
    "grad_clip": "clip the global gradient norm to this value",
    "amp": "mixed precision on CUDA (ignored on CPU)",
}


def _field_type(tp: str):
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
    from .train import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        typ, nargs = _field_type(str(f.type))
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = _HELP.get(f.name, "") + (f" (default: {default})" if default is not None else "")
        if typ is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(flag, dest=f.name, type=typ, nargs=nargs, default=None, help=help_,
                           metavar=f.name.upper())


def _config_from_args(args):
    from .train import TrainConfig

    base = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            base = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text (undecodable byte at offset {exc.start}); a config is a "
                            "JSON object of TrainConfig fields") from None
        except RecursionError:
            raise UserError(f"{path}: nested too deeply for Python's JSON parser; a config is a flat JSON object "
                            "of TrainConfig fields") from None
        if not isinstance(base, dict):
            raise UserError(f"{path}: expected a JSON object of TrainConfig fields")
        base.pop("out", None) if args.out is not None else None
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            base[f.name] = v
    try:
        cfg = TrainConfig.from_dict(base)
    except TypeError as exc:
        raise UserError(str(exc)) from None
    cfg.validate()
    return cfg


def cmd_train(args) -> int:
    from .train import run_seeds, train

    cfg = _config_from_args(args)
    if args.seeds:
        res = run_seeds(cfg, args.seeds, verbose=True)
        print(f"wrote {Path(cfg.out) / 'summary.json'}")
        return 0
    res = train(cfg)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return 0
    if not res.get("finished", True):
        print(f"stopped after epoch {res['stopped_after_epoch']}; resume with --resume --out {cfg.out}")
        return 0
    _print_metrics(res["method"], res["test"], res.get("test_crm"))
    if res.get("neural_collapse"):
        print("neural collapse: " + ", ".join(f"{k} {v:.4g}" for k, v in res["neural_collapse"].items()
                                              if isinstance(v, (int, float))))
    print(f"best epoch {res['best_epoch']} ({res['best_val']['metric']} {res['best_val']['value']:.4f}); "
          f"wrote {Path(cfg.out) / 'results.json'}")
    return 0


def _print_metrics(name: str, m: dict, crm: Optional[dict] = None) -> None:
    ks = sorted(int(k.split("@")[1]) for k in m if k.startswith("hierdist@"))
    cols = [c for c in ("top1", "mistake_severity") if c in m] + [f"hierdist@{k}" for k in ks]
    print("method".ljust(22) + "".join(c.rjust(18) for c in cols))
    print(name.ljust(22) + "".join(f"{m[c]:18.4f}" for c in cols))
    if crm:
        print((name + " + CRM").ljust(22) + "".join(f"{crm.get(c, float('nan')):18.4f}" for c in cols))


# ----------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from .train import evaluate_checkpoint

    if not os.path.isfile(args.checkpoint):
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    _check_device(args.device)
    if args.json and Path(args.json).is_dir():
        raise UserError(f"--json {_quote(args.json)} is a folder: name the file to write")
    res = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, data_root=args.data_root, split=args.split,
                              batch_size=args.batch_size, device=args.device, crm=not args.no_crm)
    _print_metrics(res["method"], res["metrics"], res.get("crm"))
    if res.get("neural_collapse"):
        print("neural collapse: " + ", ".join(f"{k} {v:.4g}" for k, v in res["neural_collapse"].items()
                                              if isinstance(v, (int, float))))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .demo import demo

    demo(args.out, epochs=args.epochs, seed=args.seed, methods=args.methods, plot=not args.no_plot,
         verbose=True, progress=args.progress)
    return 0


# ----------------------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    if args.full is not None:
        try:
            import importlib

            mod = importlib.import_module("bench.run_quick")
        except ImportError:
            raise UserError("--full needs the repository's bench package (bench/run_quick.py): run it from "
                            "the repository root; without --full the built-in quick timing runs") from None
        return int(mod.main(list(args.full)) or 0)
    return _bench_in_process(args)


def _bench_in_process(args) -> int:
    import torch
    import torch.utils.benchmark as benchmark

    from . import ops
    from ._native import native_available, native_error
    from .frame import HAFrame

    _check_device(args.device)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]
    frame = HAFrame.etf(args.classes, dim=args.dim, seed=0) if args.etf else None
    if frame is None:
        from .hierarchy import Hierarchy

        if args.classes == 100:
            frame = HAFrame.from_hierarchy(Hierarchy.builtin("cifar100"), 2.0, dim=args.dim)
        else:
            frame = HAFrame.etf(args.classes, dim=args.dim, seed=0)
    g = torch.Generator().manual_seed(0)
    W = frame.weight.to(device=device, dtype=dtype)
    S = frame.similarity.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    h = torch.randn(args.batch, frame.dim, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    y = torch.randint(0, frame.num_classes, (args.batch,), generator=g).to(device)

    def step(fn):
        h.grad = None
        loss = fn(h, W, y, 0.4, similarity=S)
        loss.backward()
        return loss

    threads = args.threads if args.threads else (1 if device.type == "cpu" else torch.get_num_threads())
    providers = (("reference_loss", ops.reference_loss), ("haframe_loss", ops.haframe_loss))
    medians = {name: [] for name, _ in providers}
    for name, fn in providers:
        step(fn)  # warm up
    # alternate the providers in several short blocks so that background load hits them alike;
    # report the best block median of each (the least disturbed estimate)
    for _ in range(max(1, args.repeats)):
        for name, fn in providers:
            t = benchmark.Timer(stmt="step(fn)", globals={"step": step, "fn": fn}, num_threads=threads)
            medians[name].append(t.blocked_autorange(min_run_time=args.min_run_time / max(1, args.repeats)).median)
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else False
    print(f"HAFrame loss forward+backward, B={args.batch}, K={frame.num_classes}, d={frame.dim}, {args.dtype}, "
          f"device={device}, threads={threads}, TF32={'on' if tf32 else 'off'}, "
          f"native={'yes' if native_available() else 'no (' + str(native_error()) + ')'}")
    print(f"{'provider':18s}{'best median (us)':>18s}{'worst (us)':>12s}{'speedup':>10s}")
    base = min(medians["reference_loss"])
    for name, _ in providers:
        best, worst = min(medians[name]) * 1e6, max(medians[name]) * 1e6
        print(f"{name:18s}{best:18.1f}{worst:12.1f}{base * 1e6 / best:10.2f}x")
    return 0


# ----------------------------------------------------------------------------- hierarchy
def cmd_hierarchy(args) -> int:
    from .report import format_summary, hierarchy_summary, load_for_report

    h, label = load_for_report(args.hierarchy, args.classes, args.wordnet_ids, args.wordnet)
    if args.distance_convention:
        h = h.with_convention(args.distance_convention)
    print("\n".join(format_summary(hierarchy_summary(h, args.gamma), label)))
    if args.out:
        out = Path(args.out)
        if out.parent and not out.parent.is_dir():
            raise UserError(f"output folder does not exist: {out.parent}")
        try:
            h.to_edges(out)
        except OSError as exc:  # a folder, /proc, a full disk: the path and the reason, one line
            raise UserError(f"cannot write --out {_quote(out)}: {exc.strerror or exc}") from None
        print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Hierarchy-aware classification with fixed HAFrame classifiers "
                                       "(Liang & Davis, ICCV 2023).")
    from . import __version__

    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    f = sub.add_parser("frame", help="build a HAFrame, print diagnostics, save it and plot it",
                       description="Build a hierarchy-aware frame (or a simplex ETF), print its diagnostics, "
                                   "optionally save it (--out) and plot target vs realised similarity (--plot).")
    f.add_argument("--hierarchy", default="cifar100",
                   help=f"builtin name ({', '.join(BUILTIN_NAMES)}), an edge-list file, random:K (a seeded random "
                        "tree), or a .npy/.csv distance matrix (default: cifar100)")
    f.add_argument("--classes", help="class-order file for an edge-list hierarchy")
    f.add_argument("--distances", help="a .npy/.csv distance matrix (instead of --hierarchy)")
    f.add_argument("--gamma", type=float, default=2.0, help="kernel sharpness gamma (default: 2.0)")
    f.add_argument("--s-min", dest="s_min", type=_parse_s_min, default="exact",
                   help="'exact' (default), 'grid' (the paper code's search) or a number")
    f.add_argument("--dim", type=_int_at_least(1), default=None,
                   help="frame dimension (default: K; below K the exact frame is projected, and its margin and "
                        "Gram error are printed)")
    f.add_argument("--distance-convention", choices=CONVENTIONS, default=CONVENTIONS[0],
                   help="tree distances: 'published' (D - depth(LCA), default) or 'height'")
    f.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the random rotation (default: 0)")
    f.add_argument("--etf", type=int, default=None, metavar="K", help="build a K-class simplex ETF instead")
    f.add_argument("--out", type=_path, help="save the frame here (.pt, loadable with HAFrame.load)")
    f.add_argument("--plot", type=_path, help="write a PNG of target vs realised similarity heatmaps")
    f.set_defaults(func=cmd_frame)

    t = sub.add_parser("train", help="train and evaluate a model",
                       description="Train a model (single process, or several under torchrun), select the best "
                                   "epoch on validation, evaluate on test and write results.json.")
    t.add_argument("--config", help="JSON file of TrainConfig fields (flags override it)")
    t.add_argument("--seeds", type=_int_at_least(0), nargs="+",
                   help="train once per seed (each seed once) and report mean and 95%% CI")
    _add_config_args(t)
    t.set_defaults(func=cmd_train)

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
    e.add_argument("--json", type=_path, help="also write the metrics to this JSON file")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="train cross-entropy, haframe and etf on synthetic data (no download)",
                       description="Synthetic hierarchical data on the CIFAR-100 hierarchy, MLP backbone: trains "
                                   "each method, prints a table, writes results.json and demo.png.")
    d.add_argument("--out", type=_path, default="haframe-demo", help="output folder (default: ./haframe-demo)")
    d.add_argument("--epochs", type=_int_at_least(1), default=30, help="epochs per method (default: 30)")
    d.add_argument("--seed", type=_int_at_least(0), default=0, help="seed (default: 0)")
    d.add_argument("--methods", nargs="+", default=["cross-entropy", "haframe", "etf"],
                   help="methods to train (default: cross-entropy haframe etf)")
    d.add_argument("--no-plot", dest="no_plot", action="store_true", help="do not write demo.png")
    d.add_argument("--progress", action="store_true", help="show per-epoch progress bars")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="time the fused HAFrame loss against the reference",
                       description="Time forward+backward of ops.haframe_loss against ops.reference_loss "
                                   "(torch.utils.benchmark) at the CIFAR-100 shape (B=64, K=d=100); "
                                   "--full runs the repository's provider benchmark instead.")
    b.add_argument("--batch", type=_int_at_least(1), default=64, help="batch size B (default: 64)")
    b.add_argument("--classes", type=_int_at_least(2), default=100,
                   help="classes K (default: 100, the CIFAR-100 HAFrame)")
    b.add_argument("--dim", type=_int_at_least(1), default=None, help="feature dimension d (default: K)")
    b.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    b.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    b.add_argument("--etf", action="store_true", help="use a simplex ETF instead of the CIFAR-100 HAFrame")
    b.add_argument("--min-run-time", dest="min_run_time", type=_positive_float, default=0.6,
                   help="seconds of timing per provider, over all blocks (default: 0.6)")
    b.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="torch threads for the timing (default: 1 on CPU, robust on a shared machine)")
    b.add_argument("--repeats", type=_int_at_least(1), default=3,
                   help="alternating timing blocks per provider (default: 3)")
    b.add_argument("--full", nargs=argparse.REMAINDER, default=None, metavar="ARGS",
                   help="run the repository's full provider benchmark (python -m bench.run_quick ARGS) instead; "
                        "needs the source tree (run from the repository root)")
    b.set_defaults(func=cmd_bench)

    hy = sub.add_parser("hierarchy", help="describe a hierarchy (size, depths, convention, s_min); build one "
                                          "from WordNet ids",
                        description="Print K, the number of nodes, the leaf depths, whether the tree is balanced, "
                                    "the distance convention and how many class pairs the other one would change, "
                                    "d_max and (with --gamma) the exact s_min; --out writes the edges.")
    hy.add_argument("hierarchy", nargs="?", metavar="FILE|NAME",
                    help=f"builtin name ({', '.join(('cifar100', 'fgvc_aircraft', 'inat19', 'tiered_imagenet_h'))}) "
                         "or an edge-list file")
    hy.add_argument("--classes", help="class-order file for an edge-list hierarchy")
    hy.add_argument("--wordnet-ids", dest="wordnet_ids", metavar="F",
                    help="build the tree of these WordNet noun ids (n########, one per line) from WordNet")
    hy.add_argument("--wordnet", metavar="DIR", help="folder holding WordNet's data.noun (default: searched)")
    hy.add_argument("--out", type=_path, metavar="EDGES", help="write the tree as a parent<TAB>child edge list")
    hy.add_argument("--gamma", type=_positive_float, default=None, help="also print the exact s_min at this gamma")
    hy.add_argument("--distance-convention", dest="distance_convention", choices=("published", "height"),
                    default=None, help="distance convention (default: the hierarchy's, 'published')")
    hy.set_defaults(func=cmd_hierarchy)
    return p


_MAX_MESSAGE = 2000  # characters of one error line (a message quoting huge input is cut)


def _one_line(exc: BaseException) -> str:
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
    where = f" ({_quote(exc.filename)})" if exc.filename is not None and _quote(exc.filename) not in what else ""
    fix = _OS_FIX.get(exc.errno)
    return _one_line(type(exc)(f"{what}{where}" + (f": {fix}" if fix else "")))


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch's failed allocations are RuntimeErrors (CPU) or OutOfMemoryError (CUDA); numpy's are MemoryErrors."""
    text = str(exc)
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "not enough memory" in text or "out of memory" in text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``haframe`` console script; returns the exit code."""
    from .data import DataError
    from .checkpoint import CheckpointError
    from .distributed import DistributedError
    from .train import TrainingDivergedError

    try:
        from .hierarchy import HierarchyError
    except ImportError:  # pragma: no cover
        HierarchyError = ValueError
    argv = list(sys.argv[1:] if argv is None else argv)
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
        if not _is_out_of_memory(exc):
            raise
        print(f"{PROG}: error: {_one_line(RuntimeError(_memory_message(exc)))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
