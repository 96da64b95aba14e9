"""Evaluation: streaming metrics over a loader (:func:`evaluate`, reduced across ranks), the evaluation loader, the
neural-collapse diagnostics, temperature calibration on the validation split and :func:`evaluate_checkpoint`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..metrics import collapse as _collapse
from ..metrics import metrics as _metrics
from .checkpoint import CheckpointError, load_checkpoint, state_mismatch
from .config import TrainConfig, build_from_config, checkpoint_convention
from .distributed import DistContext, gather_rows
from ..metrics.hierarchical import fit_temperature
from ..nn import FixedFrameClassifier
from .resume import check_inputs, inputs_digest
from .runlog import clean_json

__all__ = ["crm_part", "eval_loader", "evaluate", "evaluate_checkpoint", "neural_collapse", "plain_part", "valid_ks",
           "split_logits"]


def valid_ks(ks: Iterable[int], K: int) -> Tuple[int, ...]:
    """The k of top-k and HierDist@k that ``K`` classes allow, sorted (at least k = 1)."""
    return tuple(sorted({int(k) for k in ks if 1 <= int(k) <= K})) or (1,)


@torch.no_grad()
def evaluate(model: nn.Module, loader, distances: np.ndarray, ks, device, dctx: Optional[DistContext] = None,
             crm: bool = False, collect: bool = False, autocast=None, temperature: float = 1.0):
    """Streaming metrics over a loader (reduced over ranks); optionally the features and labels.

    temperature: T of the calibrated metrics and of CRM's probabilities (1: uncalibrated)."""
    was_training = model.training
    model.eval()
    ev = _metrics.StreamingEvaluator(distances, ks, crm=crm, temperature=temperature)
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
    out = clean_json(ev.compute())
    if collect:
        F = torch.cat(feats) if feats else torch.zeros(0, 1)
        Y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
        if dctx is not None and dctx.enabled:
            F, Y = gather_rows(F, Y, dctx)
        return out, F, Y
    return out


@torch.no_grad()
def split_logits(model: nn.Module, loader, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, K] float32, labels [N]) of a whole loader on the CPU (N x K x 4 bytes: for calibration)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for x, y in loader:
            logits.append(model(x.to(device))[1].float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def eval_loader(ds, batch_size: int, dctx: DistContext, num_workers: int = 0):
    if dctx.enabled:
        ds = torch.utils.data.Subset(ds, list(range(dctx.rank, len(ds), dctx.world)))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       pin_memory=dctx.device.type == "cuda")


def neural_collapse(model: nn.Module, feats: torch.Tensor, labels: torch.Tensor, frame=None):
    """Neural-collapse diagnostics of a fixed-frame model (None for another); S from the classifier, or from the
    frame's tree where the classifier keeps no K x K matrix. feats: (N, d), labels: (N,)."""
    clf = getattr(model, "classifier", None)
    if not isinstance(clf, FixedFrameClassifier) or feats.shape[0] == 0:
        return None
    similarity = clf.similarity.detach().cpu() if clf.similarity is not None else frame
    if similarity is None:
        return None
    try:
        return clean_json(_collapse.neural_collapse(feats, labels, clf.weight.detach().cpu(), similarity))
    except Exception as exc:  # diagnostics must never lose a finished run
        return {"error": f"{type(exc).__name__}: {exc}"}


def crm_part(d: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The CRM-reranked metrics of a StreamingEvaluator(crm=True) result, without their ``crm_`` prefix."""
    return {k[4:]: v for k, v in d.items() if k.startswith("crm_")} or None


def plain_part(d: Dict[str, Any]) -> Dict[str, Any]:
    """The metrics of a StreamingEvaluator result without the CRM-reranked ones."""
    return {k: v for k, v in d.items() if not k.startswith("crm")}


def evaluate_checkpoint(checkpoint, *, dataset: Optional[str] = None, data_root: Optional[str] = None,
                        split: str = "test", batch_size: int = 512, device: str = "auto",
                        crm: bool = True, calibrate: bool = False) -> Dict[str, Any]:
    """Metrics of a saved model (``best.pt`` or ``last.pt``) on a split of its dataset (or another one).

    calibrate: fit one temperature on the validation split by NLL first; the metrics then carry ECE and MCE
    before (``ece``) and after (``calibrated_ece``), and CRM re-ranks the calibrated probabilities."""
    ck = load_checkpoint(checkpoint, kind="model")
    cfg = dict(ck["config"])
    cfg["distance_convention"] = checkpoint_convention(cfg)  # what it was trained with, for an older checkpoint too
    if dataset is not None:
        cfg["dataset"] = dataset
    if data_root is not None:
        cfg["data_root"] = data_root
    cfg["resume"] = False
    cfg["resume_from"] = None
    config = TrainConfig.from_dict(cfg)
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; valid: train, val, test")
    if calibrate and split == "val":
        raise ValueError("--calibrate fits the temperature on the validation split, so it cannot also be the split "
                         "evaluated; evaluate another one (--split test)")
    built = build_from_config(config)
    # the hierarchy is rebuilt from the paths in the config: its content must still be what the model learnt
    check_inputs(ck.get("inputs"), inputs_digest(built["hierarchy"], built["distances"]), config, Path(checkpoint),
                 "evaluate")
    model = built["model"]
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {checkpoint} does not match the model its config describes "
                              f"({state_mismatch(model, ck['model'], exc)})") from None
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model.to(dev)
    ds = built["datasets"][split]
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    K = built["hierarchy"].num_classes
    temperature, calibration = 1.0, None
    if calibrate:
        val = built["datasets"].get("val")
        if val is None or len(val) == 0:
            raise ValueError("--calibrate needs a validation split to fit the temperature on, and this dataset has "
                             "none; give a dataset with one, or drop --calibrate")
        val_logits, val_labels = split_logits(model, torch.utils.data.DataLoader(val, batch_size=batch_size), dev)
        temperature = fit_temperature(val_logits, val_labels)
        calibration = {"temperature": temperature, "fitted_on": "val", "val_samples": len(val)}
    res, feats, labels = evaluate(model, loader, built["distances"], valid_ks(config.eval_ks, K), dev,
                                  crm=crm, collect=True, temperature=temperature)
    out = {"method": config.method, "split": split, "checkpoint": str(checkpoint),
           "metrics": plain_part(res)}
    if calibration is not None:
        out["calibration"] = dict(calibration, ece_before=res["ece"], ece_after=res["calibrated_ece"])
    if crm:
        out["crm"] = crm_part(res)
    out["neural_collapse"] = neural_collapse(model, feats, labels, built["frame"])
    return out
