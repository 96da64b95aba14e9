"""The run folder and its log: the folder's claim and the earlier-run check, metrics.jsonl and TensorBoard
(:class:`RunLog`), the JSON files (config.json, results.json, summary.json), the epoch line and the JSON helpers."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..files import FolderInUseError, atomic_write_text, claim_folder, release_folder
from .config import TrainConfig
from .distributed import DistContext

__all__ = ["RUN_FILES", "RunLog", "claim_run_folder", "clean_json", "earlier_run", "epoch_line", "json_default",
           "new_folders", "refuse_earlier_run", "remove_new_folder", "run_conflict", "write_json"]


# ----------------------------------------------------------------------------- JSON
def json_default(o):
    """``json.dumps``'s fallback for numpy and torch values and paths."""
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


def clean_json(d):
    """Metrics dict -> plain floats/ints (JSON and weights_only friendly)."""
    if isinstance(d, dict):
        return {str(k): clean_json(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [clean_json(v) for v in d]
    if isinstance(d, torch.Tensor):
        return d.item() if d.numel() == 1 else d.tolist()
    if isinstance(d, np.generic):
        return d.item()
    if isinstance(d, np.ndarray):
        return d.tolist()
    return d


def write_json(obj: Any, path: Path) -> None:
    """``obj`` as indented JSON in ``path``, written atomically."""
    atomic_write_text(json.dumps(obj, indent=2, default=json_default) + "\n", path)


# ----------------------------------------------------------------------------- the log
class RunLog:
    """metrics.jsonl (one JSON record per line) and, where installed, TensorBoard; rank 0 only (``enabled``)."""

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
            f.write(json.dumps(clean_json(record), default=json_default) + "\n")
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


def epoch_line(config: TrainConfig, epoch: int, train_loss: float, train_top1: Optional[float],
                val: Dict[str, Any]) -> str:
    """One line per epoch: top-1 in percent for train and val alike (train only where the step forms logits)."""
    train = f" train top1 {train_top1:.2f}%" if train_top1 is not None else ""
    return (f"[{config.method}] epoch {epoch}/{config.epochs} loss {train_loss:.4f}{train} | val top1 "
            f"{val.get('top1', float('nan')):.2f}% hierdist@1 {val.get('hierdist@1', float('nan')):.3f}")


# ----------------------------------------------------------------------------- the run folder
RUN_FILES = ("last.pt", "prev.pt", "best.pt", "metrics.jsonl", "results.json", "config.json")


def earlier_run(out: Path) -> List[str]:
    """The files of an earlier run in ``out`` (none when it is not a folder)."""
    return [n for n in RUN_FILES if (out / n).exists()] if out.is_dir() else []


def refuse_earlier_run(out: Path, found: Sequence[str], why: str = "") -> None:
    """Raise the refusal of a run over an earlier run's files; ``why`` says what the flags would have done."""
    what = ", ".join(found) if found else "files of an earlier run (rank 0 found them)"
    if why:
        raise ValueError(f"output folder {out} already holds a run ({what}) {why}: pass --overwrite to delete "
                         "those files first, or choose another --out")
    raise ValueError(f"output folder {out} already holds a run ({what}): pass --resume to continue it, "
                     "--overwrite to delete those files and start over, or choose another --out")


def _same_folder(a: Path, b: Path) -> bool:
    """Whether two paths name one folder (through symlinks and '..')."""
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def run_conflict(config: TrainConfig, out: Path) -> Optional[str]:
    """Why starting this run in ``out`` would replace an earlier run's files (None: it would not).

    A plain run may not start over an earlier run; ``--resume`` continues the run in ``out`` only when ``out``
    still holds its ``last.pt`` or ``prev.pt``; ``--resume-from`` continues a checkpoint of another folder only
    into a folder that holds no run.  ``--overwrite`` deletes the files first, so nothing conflicts."""
    found = earlier_run(out)
    if not found or config.overwrite:
        return None
    if config.resume_from:
        if _same_folder(Path(config.resume_from).parent, out):
            return None
        return (f"and --resume-from {config.resume_from} continues a checkpoint of another folder, which would "
                "replace them")
    if config.resume:
        if "last.pt" in found or "prev.pt" in found:
            return None
        return "but no last.pt or prev.pt to resume from, so --resume would start a new run over it"
    return ""


def claim_run_folder(config: TrainConfig, out: Path, dctx: DistContext):
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
    said = dctx.from_main(None if busy is None else str(busy))  # every rank refuses in rank 0's words
    if said is not None and busy is None:
        busy = FolderInUseError(said)
    if busy is not None:
        release_folder(claim)
        raise busy
    try:
        # rank 0 reads the folder; every rank refuses with its files and reason, so each rank's message is complete
        found, why = dctx.from_main((earlier_run(out), run_conflict(config, out)) if dctx.main else None)
        if why is not None:
            refuse_earlier_run(out, found, why)
        keep = (config.resume and ("last.pt" in found or "prev.pt" in found)) or (
            config.resume_from and _same_folder(Path(config.resume_from).parent, out))
        if dctx.main and found and config.overwrite and not keep:
            for name in found:
                (out / name).unlink()
            for event_file in (out / "tb").glob("events.out.tfevents.*"):
                event_file.unlink()
    except BaseException:
        release_folder(claim)
        raise
    return claim



def new_folders(out: Path) -> List[Path]:
    """The folders that creating ``out`` adds, ``out`` first, then each new parent up to the outermost one."""
    out = Path(out).absolute()
    new = []
    while not out.exists():
        new.append(out)
        out = out.parent
    return new


def remove_new_folder(folders: Optional[Sequence[Path]]) -> None:
    """Remove what a failed run created: its own ``out`` folder (unless a checkpoint was written in it: that work is
    kept), then each new parent only while it is empty, so a sibling run's folder there is never touched."""
    if not folders:
        return
    out = Path(folders[0])
    if out.is_dir():
        if any(p.name in ("last.pt", "prev.pt", "best.pt") for p in out.rglob("*.pt")):
            return
        shutil.rmtree(out, ignore_errors=True)
    for parent in folders[1:]:
        try:
            os.rmdir(parent)  # fails, and so keeps it, when another run has put anything in it
        except OSError:
            return
