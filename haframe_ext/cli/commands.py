"""What the ``haframe`` subcommands frame, train, eval, demo and hierarchy do, and the user errors they raise."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

from ..hierarchy.edges import no_duplicate_keys
from ..hierarchy.hierarchy import Hierarchy
from ..sizes import available_memory

__all__ = ["UserError", "quote", "check_device", "memory_message", "cmd_frame", "cmd_train", "cmd_compare", "cmd_eval",
           "cmd_demo", "cmd_hierarchy"]


class UserError(Exception):
    """A mistake in the command line or its inputs (exit code 2)."""


def quote(v, limit: int = 100) -> str:
    """``repr`` of user input, cut to ``limit`` characters (a huge input is never echoed whole)."""
    r = repr(str(v))
    return r if len(r) <= limit else f"{r[:limit - 4]}...' ({len(str(v))} characters)"


def check_device(device: str) -> None:
    """auto, cpu, cuda or cuda:N, and CUDA only where it is available."""
    import re

    import torch

    if device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", device, re.ASCII):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {quote(device)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} but CUDA is not available: use --device cpu or auto")


def _gib(n: float) -> str:
    """Bytes as GiB with one decimal."""
    return f"{n / 2 ** 30:,.1f} GiB"


# a dense frame peaks at about 4 float64 copies of its K x K and K x dim matrices (measured: 3.6)
_DENSE_FRAME_COPIES = 4


def _check_frame_fits(K: int, dim: int, flag: str) -> None:
    """Refuse a --dim whose dense frame cannot fit in memory, saying what was asked and what fits (a K too large
    for any dim is left to the frame builder's own rule and to the out-of-memory handler of :func:`main`)."""
    avail = available_memory()
    need = _DENSE_FRAME_COPIES * 8 * (K * K + K * dim)
    if avail is None or need <= avail:
        return
    fits = max(0, int(avail / (_DENSE_FRAME_COPIES * 8) / K - K))
    raise UserError(f"{flag} asks for a K={K:,} x dim={dim:,} frame, which needs about {_gib(need)} of memory "
                    f"(float64 matrices of K x K and K x dim), but {_gib(avail)} is available: {flag} up to about "
                    f"{fits:,} fits for K={K:,}")


def memory_message(exc: BaseException) -> str:
    """One line for an allocation that failed: the size asked for (numpy and torch say it) and what is available."""
    avail = available_memory()
    asked = " ".join(str(exc).split())[:300] or "an allocation failed"
    have = f"; {_gib(avail)} of memory is available" if avail is not None and "available" not in asked else ""
    return (f"out of memory: {asked}{have}. Use a smaller hierarchy or --dim / --feature-dim, or a machine with more "
            "memory")


def _load_frame_inputs(args):
    """(a Hierarchy or a distance matrix, label) from --hierarchy (name, edge file, random:K or matrix file) or
    --distances."""
    from ..hierarchy.hierarchy import as_distance_matrix
    from ..training.config import load_hierarchy

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


def _refuse_ignored_frame_inputs(args) -> None:
    """Refuse flags that the chosen source of the frame would ignore, then fill in the defaults."""
    given = lambda *names: [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]  # noqa: E731
    if args.etf is not None:
        ignored, why = given("hierarchy", "classes", "distances", "gamma", "s_min", "distance_convention"), \
            "--etf builds a simplex ETF, which has no hierarchy, gamma or s_min"
    elif args.distances is not None:
        ignored, why = given("hierarchy", "classes", "distance_convention"), \
            "--distances gives the class distances as a matrix, with no tree"
    elif args.hierarchy is not None and args.hierarchy.lower().endswith((".npy", ".csv")):
        ignored, why = given("classes", "distance_convention"), f"{quote(args.hierarchy)} is a distance matrix"
    else:
        ignored, why = [], ""
    if ignored:
        raise UserError(f"{why}: drop {', '.join(ignored)} (it would be ignored)")
    args.hierarchy = "cifar100" if args.hierarchy is None else args.hierarchy
    args.gamma = 2.0 if args.gamma is None else args.gamma
    args.s_min = "exact" if args.s_min is None else args.s_min
    args.distance_convention = args.distance_convention or "published"


def cmd_frame(args) -> int:
    """``haframe frame``: build a frame, print its diagnostics, save and plot it."""
    from ..frame.frame import HAFrame
    from ..sizes import DENSE_MAX_K

    _refuse_ignored_frame_inputs(args)
    _check_plot_path(args.plot)
    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out {quote(args.out)} is a folder: name the file to write, e.g. "
                        f"{quote(os.path.join(args.out, 'frame.pt'))}")
    if args.etf is not None:
        if args.etf < 2:
            raise UserError(f"--etf needs K >= 2 classes, got {args.etf}")
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
        from .plots import plot_frame

        plot_frame(frame, Path(args.plot), label)
        print(f"wrote {args.plot}")
    return 0


def _check_plot_path(plot: Optional[str]) -> None:
    """Refuse a --plot that cannot be drawn (no matplotlib, a folder, a missing folder) before any work."""
    from .plots import matplotlib_available

    if not plot:
        return
    if not matplotlib_available():
        raise UserError("--plot needs matplotlib, which is not installed: pip install matplotlib, or drop --plot")
    path = Path(plot)
    if path.is_dir():
        raise UserError(f"--plot {quote(path)} is a folder: name the PNG file to write")
    if path.parent and not path.parent.exists():
        raise UserError(f"output folder does not exist: {path.parent}")


def _save_frame(frame, out: Path) -> None:
    """``frame.save`` atomically (a temp file beside ``out``, renamed); an unwritable path is a UserError."""
    from ..files import atomic_write

    try:  # into a file object: an OS error stays an OSError, not torch's RuntimeError
        atomic_write(out, frame.save)
    except OSError as exc:
        raise UserError(f"cannot write --out {quote(out)}: {exc.strerror or exc}") from None


def _config_from_args(args):
    """The TrainConfig of --config (a JSON object) with the flags given on top; validated."""
    from ..training.config import TrainConfig

    base = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            # utf-8-sig: a byte-order mark is accepted, as in hierarchy files
            base = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=no_duplicate_keys)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text (undecodable byte at offset {exc.start}); a config is a "
                            "JSON object of TrainConfig fields") from None
        except ValueError as exc:  # a field given twice: json would keep the last without a word
            raise UserError(f"{path}: {exc}") from None
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
    """``haframe train``: one run, or one per seed with --seeds; prints the test metrics."""
    from ..train import run_seeds, train

    cfg = _config_from_args(args)
    if args.seeds:
        res = run_seeds(cfg, args.seeds, verbose=True)
        if not res.get("finished", True):
            print(f"stopped after epoch {res['stopped_after_epoch']}; resume with --resume --out {cfg.out} "
                  "(and the same --seeds)")
            return 0
        print(f"wrote {Path(cfg.out) / 'summary.json'}")
        return 0
    res = train(cfg)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return 0
    if not res.get("finished", True):
        print(f"stopped after epoch {res['stopped_after_epoch']}; resume with --resume --out {cfg.out}")
        return 0
    _print_metrics(res["method"], res["test"], res.get("test_crm"))
    _print_neural_collapse(res.get("neural_collapse"))
    print(f"best epoch {res['best_epoch']} ({res['best_val']['metric']} {res['best_val']['value']:.4f}); "
          f"wrote {Path(cfg.out) / 'results.json'}")
    return 0


def cmd_compare(args) -> int:
    """``haframe compare``: the methods of --methods x the seeds of --seeds, trained (or reused), tabulated."""
    from .compare import compare, parse_methods

    for flag, dest, use in (("--method", "method", "--methods"), ("--seed", "seed", "--seeds"),
                            ("--resume-from", "resume_from", "the same command again (it resumes every killed run)")):
        if getattr(args, dest) is not None:
            raise UserError(f"compare does not take {flag}: use {use}")
    methods = parse_methods(args.methods)
    if args.out is None and not args.config:
        args.out = "runs/compare"
    args.method = methods[0]  # the config is checked as the first method's; each run sets its own
    cfg = _config_from_args(args)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics is not None else None
    if metrics is not None and not metrics:
        raise UserError("--metrics is empty: name at least one column, e.g. --metrics top1,hierdist@5")
    res = compare(cfg, methods, args.seeds, metrics=metrics, plot=not args.no_plot, verbose=True)
    if not res["finished"]:
        print(f"resume with the same command (the runs are in {cfg.out})")
    return 0


def _print_neural_collapse(nc: Optional[dict]) -> None:
    """The neural-collapse measures of a run on one line, where it has them."""
    if nc:
        print("neural collapse: " + ", ".join(f"{k} {v:.4g}" for k, v in nc.items() if isinstance(v, (int, float))))


def _print_metrics(name: str, m: dict, crm: Optional[dict] = None) -> None:
    """Every test metric as tables with a row per method (and one after CRM re-ranking), then severity by level."""
    from ..metrics.summary import format_report

    rows = {name: m, **({name + " + CRM": crm} if crm else {})}
    print(format_report(rows))


def cmd_eval(args) -> int:
    """``haframe eval``: a checkpoint's metrics on one split of its dataset."""
    from ..files import atomic_write_text
    from ..training.evaluation import evaluate_checkpoint

    if not os.path.isfile(args.checkpoint):
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    check_device(args.device)
    if args.json and Path(args.json).is_dir():
        raise UserError(f"--json {quote(args.json)} is a folder: name the file to write")
    _check_plot_path(args.plot)
    if args.calibrate and args.split == "val":
        raise UserError("--calibrate fits the temperature on the validation split, so it cannot also be the split "
                        "evaluated; evaluate another one (--split test)")
    res = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, data_root=args.data_root, split=args.split,
                              batch_size=args.batch_size, device=args.device, crm=not args.no_crm,
                              calibrate=args.calibrate)
    _print_metrics(res["method"], res["metrics"], res.get("crm"))
    _print_neural_collapse(res.get("neural_collapse"))
    if res.get("calibration"):
        c = res["calibration"]
        print(f"temperature {c['temperature']:.4f} (fitted on {c['val_samples']} validation samples): "
              f"ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}")
    if args.plot:
        from .plots import severity_figure

        rows = {res["method"]: res["metrics"], **({res["method"] + " + CRM": res["crm"]} if res.get("crm") else {})}
        severity_figure(rows, Path(args.plot), f"{res['split']} split")
        print(f"wrote {args.plot}")
    if args.json:
        atomic_write_text(json.dumps(res, indent=2) + "\n", Path(args.json))  # a full disk leaves no 0-byte file
        print(f"wrote {args.json}")
    return 0


def cmd_demo(args) -> int:
    """``haframe demo``: the methods side by side on synthetic data, a few seeds each."""
    from .compare import parse_methods
    from .demo import demo

    demo(args.out, epochs=args.epochs, methods=parse_methods(args.methods), seeds=args.seeds,
         plot=not args.no_plot, verbose=True, progress=args.progress)
    return 0


def cmd_hierarchy(args) -> int:
    """``haframe hierarchy``: describe a hierarchy, and write its edges with --out."""
    from .report import format_summary, hierarchy_summary, load_for_report

    h, label = load_for_report(args.hierarchy, args.classes, args.wordnet_ids, args.wordnet,
                               wordnet_parent=args.wordnet_parent, internal_classes=args.internal_classes)
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
            raise UserError(f"cannot write --out {quote(out)}: {exc.strerror or exc}") from None
        print(f"wrote {out}")
    return 0
