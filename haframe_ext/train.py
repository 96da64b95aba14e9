"""Training entry points: :func:`train` (claims the run folder, reports errors, removes a folder a user error
left empty) and the multi-seed runner :func:`run_seeds`.

The loop itself lives in :mod:`haframe_ext.training.loop`, the configuration and builders in
:mod:`haframe_ext.training.config`, evaluation in :mod:`haframe_ext.training.evaluation`, the run folder and its log
in :mod:`haframe_ext.training.runlog`, resuming in :mod:`haframe_ext.training.resume`, the step's numerics in
:mod:`haframe_ext.training.optim`, checkpoints in :mod:`haframe_ext.training.checkpoint` (their files in
:mod:`haframe_ext.files`) and process groups in :mod:`haframe_ext.training.distributed`; the names users need
(:class:`TrainConfig`, :func:`evaluate_checkpoint`, :func:`load_checkpoint`, :class:`CheckpointError`,
:func:`load_hierarchy`, ...) are importable from here too.

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
- A run that fails on a user error (a ``ValueError``: the config, the data, the hierarchy, a checkpoint that does
  not fit) before its first checkpoint removes the ``out`` folder it created (while it still holds its claim), and
  each parent folder it created only while that is empty (a sibling run's folder there is never touched); a folder
  that existed is left alone.
- A run never starts over an earlier run's files: a plain run, ``resume`` into a folder without ``last.pt`` or
  ``prev.pt``, and ``resume_from`` a checkpoint of another folder into a folder holding a run are refused unless
  ``overwrite`` (which deletes those files first).
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence

from .metrics import summary as _summary
from .files import FolderInUseError, atomic_save, atomic_write_text, claim_folder, release_folder
from .training.checkpoint import CheckpointError, load_checkpoint
from .training.config import TrainConfig, build_from_config, checkpoint_convention, load_hierarchy
from .training.data.common import DataError
from .training.distributed import DistContext, DistributedError, GlobalBatchSampler, is_comm_error
from .training.evaluation import evaluate_checkpoint
from .training.loop import TrainingDivergedError, run_training
from .training.optim import determinism
from .training.runlog import (claim_run_folder, clean_json, earlier_run, new_folders, refuse_earlier_run,
                              remove_new_folder, run_conflict, write_json)

__all__ = [
    "TrainConfig", "train", "evaluate_checkpoint", "run_seeds", "load_checkpoint", "CheckpointError",
    "TrainingDivergedError", "DistributedError", "GlobalBatchSampler", "load_hierarchy", "atomic_save",
    "build_from_config", "checkpoint_convention",
]


def train(config: TrainConfig) -> Dict[str, Any]:
    """Train, select the best epoch on validation, evaluate on test; returns the results dict
    (also written to ``<out>/results.json`` by rank 0)."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    config.validate()
    dctx = DistContext(config)
    created = new_folders(Path(config.out)) if dctx.main else None  # what this run adds, removed on a user error
    failed, user_error, claim = False, False, None
    try:
        with determinism(config, dctx.device):
            claim = claim_run_folder(config, Path(config.out), dctx)
            return run_training(config, dctx)
    except (KeyboardInterrupt, TrainingDivergedError, CheckpointError, DataError, FolderInUseError) as exc:
        user_error = isinstance(exc, (CheckpointError, DataError))
        raise
    except Exception as exc:
        if dctx.enabled and is_comm_error(exc):
            failed = True
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise DistributedError(
                f"rank {dctx.rank}/{dctx.world}: a collective operation failed ({type(exc).__name__}: {detail}); "
                f"another process probably died or hangs (collectives time out after {config.dist_timeout:g} s): "
                "check its log") from exc
        user_error = isinstance(exc, ValueError)
        raise
    finally:
        if user_error and claim is not None:  # only while this run holds the folder, before another can claim it
            remove_new_folder(created)
        release_folder(claim)
        dctx.close(failed)


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
        why = run_conflict(cfg, Path(cfg.out))
        if why is not None:
            refuse_earlier_run(Path(cfg.out), earlier_run(Path(cfg.out)), why)
    single = int(os.environ.get("WORLD_SIZE", "1") or 1) == 1
    created = new_folders(Path(config.out)) if single else None
    claim = claim_folder(Path(config.out)) if single else None  # the summary's folder (each seed claims its own)
    user_error = False
    try:
        runs = [train(cfg) for cfg in configs]
        stopped = [r for r in runs if not r.get("finished", True)]
        if stopped:  # stop_after_epochs: nothing to summarise yet; a resume finishes the runs
            return {"seeds": seeds, "runs": runs, "finished": False,
                    "stopped_after_epoch": max(r["stopped_after_epoch"] for r in stopped)}
        return _summarize_seeds(config, seeds, runs, verbose)
    except ValueError:
        user_error = True
        raise
    finally:
        if user_error and claim is not None:
            remove_new_folder(created)  # kept where an earlier seed wrote a checkpoint
        release_folder(claim)


def _summarize_seeds(config: TrainConfig, seeds: List[int], runs: List[Dict[str, Any]],
                     verbose: bool) -> Dict[str, Any]:
    """Mean and 95% CI over the seeds' test metrics; rank 0 writes summary.json and summary.txt."""
    tests = [r["test"] for r in runs if "test" in r]
    summary = _summary.summarize_seeds(tests)
    crm = [r["test_crm"] for r in runs if r.get("test_crm")]
    summary_crm = _summary.summarize_seeds(crm) if len(crm) == len(tests) and crm else None
    rows = {config.method: summary}
    if summary_crm is not None:
        rows[f"{config.method} + CRM"] = summary_crm
    table = _summary.format_report(rows)  # every metric, in tables of a few columns
    result = {"seeds": seeds, "runs": runs, "summary": clean_json(summary), "summary_crm": clean_json(summary_crm),
              "table": table}
    if int(os.environ.get("RANK", "0") or 0) == 0:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json({k: v for k, v in result.items() if k != "runs"}, out / "summary.json")
        atomic_write_text(table + "\n", out / "summary.txt")
        if verbose:
            print(table)
    return result
