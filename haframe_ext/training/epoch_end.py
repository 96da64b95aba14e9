"""The end of an epoch and of a run, after their evaluation: the best epoch, the checkpoints (best.pt, last.pt)
and the log record, then the test results (results.json)."""

from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional

import torch

from ..files import atomic_save, rotate_save
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, seal_checkpoint
from .distributed import gather_rng
from .evaluation import crm_part, neural_collapse, plain_part
from ..nn import HAFrameLoss
from .run_state import Run, kept_message
from .runlog import clean_json, epoch_line, write_json

__all__ = ["finish_epoch", "is_better", "save_epoch", "write_results"]


# ----------------------------------------------------------------------------- end of an epoch
def finish_epoch(run: Run, epoch: int, val: Dict[str, Any], train: Dict[str, Any], t0: float) -> None:
    """Track the best epoch by the validation metrics ``val``, then write the checkpoints and the log record.

    ``train``: the epoch's train_loss, train_top1 and lr; ``t0``: when the epoch started (perf_counter).
    """
    config = run.config
    sel = val.get(config.select_metric)
    if sel is None:
        raise ValueError(f"select_metric {config.select_metric!r} is not a validation metric; "
                         f"available: {', '.join(sorted(val))}")
    improved = is_better(config.select_metric, float(sel), run.best["value"])
    if improved:
        run.best = {"metric": config.select_metric, "value": float(sel), "epoch": epoch + 1}
    record = {"epoch": epoch + 1, **train,
              "alpha": run.criterion.alpha if isinstance(run.criterion, HAFrameLoss) else 0.0,
              "val": val, "seconds": time.perf_counter() - t0, "best_epoch": run.best["epoch"]}
    run.history.append(clean_json({k: v for k, v in record.items() if k != "val"} | {"val": val}))
    save_epoch(run, epoch, val, improved, record)
    if run.show:
        from tqdm.auto import tqdm

        tqdm.write(epoch_line(config, epoch + 1, train["train_loss"], train["train_top1"], val))
    run.good = (run.out / "last.pt", epoch + 1)
    run.dctx.barrier()


def is_better(name: str, value: float, best: Optional[float]) -> bool:
    """Whether a finite value of metric ``name`` beats ``best`` (None: none yet); top* is maximised, the rest
    minimised."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if name.startswith("top") else value < best


def save_epoch(run: Run, epoch: int, val: Dict[str, Any], improved: bool, record: Dict[str, Any]) -> None:
    """Rank 0 writes best.pt (if ``improved``), last.pt (prev.pt the one before) and the epoch's log record;
    every rank's RNG state is gathered into last.pt, so a resume is exact per rank."""
    rng = gather_rng(run.dctx)
    if not run.dctx.main:
        return
    config, model = run.config, run.model
    head = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch + 1,
            "config": config.to_dict(), "model": model.state_dict()}
    try:
        if improved:
            atomic_save(seal_checkpoint(dict(head, kind="best", val=val, inputs=run.inputs)), run.out / "best.pt")
        ck = dict(head, kind="training", optimizer=run.optimizer.state_dict(),
                  scheduler={"step": run.step, "total": run.total_steps},
                  scaler=run.scaler.state_dict() if run.scaler is not None else None,
                  loss=run.criterion.state_dict(), rng=rng, best=run.best, history=run.history,
                  threads=torch.get_num_threads(), inputs=run.inputs)
        rotate_save(seal_checkpoint(ck), run.out)
        run.log.log(record)
    except OSError as exc:  # a full disk, a folder gone read-only: the earlier files are untouched
        raise type(exc)(exc.errno, f"{exc.strerror or exc} while writing the checkpoint of epoch {epoch + 1}: "
                        f"training stopped; {kept_message(run.good)}", exc.filename) from None


# ----------------------------------------------------------------------------- end of the run
def write_results(run: Run, test_all: Dict[str, Any], feats: torch.Tensor, labels: torch.Tensor,
                  t_start: float) -> Dict[str, Any]:
    """The run's results from the test metrics (plain and CRM) and the test features [N, d] with their labels [N]
    (neural collapse, on rank 0); rank 0 writes results.json. ``t_start``: when the run started (perf_counter)."""
    config, dctx, frame = run.config, run.dctx, run.built["frame"]
    results = {
        "method": config.method,
        "config": config.to_dict(),
        "best_epoch": run.best["epoch"],
        "best_val": {"metric": run.best["metric"], "value": run.best["value"]},
        "test": plain_part(test_all),
        "test_crm": crm_part(test_all),
        "neural_collapse": neural_collapse(run.model, feats, labels, frame) if dctx.main else None,
        "frame": clean_json(frame.diagnostics()) if frame is not None else None,
        "epochs": config.epochs,
        "seconds": time.perf_counter() - t_start,
        "world_size": dctx.world,
        "device": str(dctx.device),
    }
    if dctx.main:
        write_json(results, run.out / "results.json")
    dctx.barrier()
    return results
