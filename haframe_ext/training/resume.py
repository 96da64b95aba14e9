"""Resuming a run: which checkpoint it continues from, whether that checkpoint belongs to this run (config, class
list, distances, thread count, finite weights), and restoring its state."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import CheckpointError, load_checkpoint, set_rng_state, state_mismatch
from .config import (TrainConfig, checkpoint_convention, checkpoint_cosine_scale, checkpoint_frame_directions,
                     checkpoint_frame_profile, checkpoint_profile_weight)

__all__ = ["check_inputs", "find_resume_checkpoint", "inputs_digest", "restore_state"]


# fields that must agree between a checkpoint and the run resuming from it
# (the hierarchy, classes and distances files are compared by content, see inputs_digest, not by path)
_RESUME_KEYS = ("method", "dataset", "backbone", "hidden", "depth", "widen_factor",
                "feature_dim", "num_blocks", "gamma", "s_min", "alpha", "alpha_schedule", "alpha_period",
                "cosine_scale", "frame_directions", "frame_profile", "frame_profile_weight", "hxe_alpha",
                "hxe_normalize", "soft_beta",
                "batch_size", "lr", "backbone_lr_scale", "min_lr", "warmup_epochs", "momentum", "weight_decay",
                "nesterov", "grad_clip", "seed", "n_per_class", "eval_per_class", "eval_samples", "input_dim",
                "difficulty", "distance_convention",
                "image_size", "augment", "select_metric",
                "data_root",                    # what the data are read from
                "deterministic", "num_workers")  # what a bit-exact resume depends on


# compared by path only for a checkpoint written before the content digests
_RESUME_PATH_KEYS = ("hierarchy", "distances")


def inputs_digest(hierarchy, distances) -> Dict[str, Any]:
    """What the labels mean, by content: the class count, digests of the class names in label order and as a
    set, and of the distance matrix (so a moved copy of a file resumes, and an edited or reordered one does not)."""
    def digest(*parts: bytes) -> str:
        h = hashlib.blake2b(digest_size=16)
        for part in parts:
            h.update(part)
        return h.hexdigest()

    names = [str(c) for c in hierarchy.classes]
    out = {"num_classes": len(names), "classes": digest("\n".join(names).encode()),
           "class_set": digest("\n".join(sorted(names)).encode()), "distances": None,
           # the tree itself, which also generates the synthetic data when --distances gives the distances
           "tree": hierarchy.distance_digest() if hasattr(hierarchy, "distance_digest") else None}
    if isinstance(distances, np.ndarray):
        d = np.ascontiguousarray(distances, dtype=np.float64)
        out["distances"] = "matrix:" + digest(str(d.shape).encode(), d.tobytes())
    elif hasattr(hierarchy, "distance_digest"):  # no K x K matrix (large K): the tree's own content digest
        out["distances"] = "tree:" + hierarchy.distance_digest()
    return out


def check_inputs(then: Optional[Dict[str, Any]], now: Dict[str, Any], config: TrainConfig, path: Path,
                 what: str = "resume from") -> None:
    """Refuse a checkpoint whose class list, tree or distances (:func:`inputs_digest`) differ in content from this
    run's (``what`` names the use: "resume from", "evaluate"); a checkpoint without digests is not compared."""
    if isinstance(then, dict):
        _check_resume_inputs(then, now, {}, config, path, what)


def _check_resume_inputs(then: Optional[Dict[str, Any]], now: Dict[str, Any], ck_cfg: Dict[str, Any],
                         config: TrainConfig, path: Path, what: str = "resume from") -> None:
    """Refuse a resume whose class list or distances differ in content from the checkpoint's."""
    fix = "use a new --out folder, or the hierarchy, classes and distances files the run started with"
    if what != "resume from":
        fix = "use the hierarchy, classes and distances files the checkpoint was trained with"
    if not isinstance(then, dict):  # a checkpoint from before the digests: compare the paths
        cur = config.to_dict()
        diff = [k for k in _RESUME_PATH_KEYS if k in ck_cfg and ck_cfg[k] != cur.get(k)]
        if diff:
            details = ", ".join(f"{k}: checkpoint {ck_cfg[k]!r} vs now {cur.get(k)!r}" for k in diff)
            raise CheckpointError(f"cannot resume from {path}: it was written with a different configuration "
                                  f"({details}); {fix}")
        return
    if then.get("num_classes") != now["num_classes"]:
        raise CheckpointError(f"cannot {what} {path}: it was trained on {then.get('num_classes')} classes and "
                              f"this run's hierarchy ({config.hierarchy}) has {now['num_classes']}; {fix}")
    if then.get("classes") != now["classes"]:
        how = ("the same class names in another label order" if then.get("class_set") == now["class_set"]
               else "other class names")
        source = config.classes or config.hierarchy
        raise CheckpointError(f"cannot {what} {path}: this run's class list ({source}) "
                              f"has {how} than the checkpoint's, so its labels would change meaning; {fix}")
    kind = lambda v: str(v).split(":", 1)[0]  # noqa: E731 - "matrix" (--distances) or "tree"
    if now["distances"] is not None and then.get("distances") is not None:
        if kind(then["distances"]) != kind(now["distances"]):
            given = "with" if kind(then["distances"]) == "matrix" else "without"
            raise CheckpointError(f"cannot {what} {path}: it was trained {given} a --distances matrix and this run "
                                  f"is not, so its class distances differ; {fix}")
        if then["distances"] != now["distances"]:
            raise CheckpointError(f"cannot {what} {path}: this run's class distances (from "
                                  f"{config.distances or config.hierarchy}) differ from the checkpoint's; {fix}")
    if (config.dataset == "synthetic" and now.get("tree") is not None and then.get("tree") is not None
            and then["tree"] != now["tree"]):
        raise CheckpointError(f"cannot {what} {path}: this run's tree ({config.hierarchy}) differs from the "
                              f"checkpoint's, and the tree places the classes of the synthetic data; {fix}")


def _check_resume_config(ck_cfg: Dict[str, Any], config: TrainConfig, path: Path, hierarchy=None) -> None:
    then = checkpoint_convention(ck_cfg)
    if then != config.distance_convention and not (hierarchy is not None and hierarchy.is_balanced):
        raise CheckpointError(
            f"cannot resume from {path}: it was trained with {then!r} distances and this run asks for "
            f"{config.distance_convention!r}; pass --distance-convention {then} to continue it as it was")
    cur = config.to_dict()
    if hierarchy is not None:  # the rules compare by the multiplier they give ("auto" and "sum" agree at d >= K)
        K = hierarchy.num_classes
        ck_cfg = {**ck_cfg, "cosine_scale": checkpoint_cosine_scale(ck_cfg, K),
                  "frame_directions": checkpoint_frame_directions(ck_cfg, K),
                  "frame_profile": checkpoint_frame_profile(ck_cfg, K),
                  "frame_profile_weight": checkpoint_profile_weight(ck_cfg, K)}
        cur["cosine_scale"] = checkpoint_cosine_scale(cur, K)
        cur["frame_directions"] = checkpoint_frame_directions(cur, K)
        cur["frame_profile"] = checkpoint_frame_profile(cur, K)
        cur["frame_profile_weight"] = checkpoint_profile_weight(cur, K)
    diff = [k for k in _RESUME_KEYS if k in ck_cfg and ck_cfg[k] != cur.get(k)]
    if diff:
        details = ", ".join(f"{k}: checkpoint {ck_cfg[k]!r} vs now {cur.get(k)!r}" for k in diff[:4])
        raise CheckpointError(f"cannot resume from {path}: it was written with a different configuration ({details}); "
                              "use a new --out folder or the same settings")
    if ck_cfg.get("epochs") != config.epochs:
        warnings.warn(f"resuming {path} with epochs={config.epochs} (was {ck_cfg.get('epochs')}): "
                      "the learning-rate schedule changes, so the run is not identical to an uninterrupted one")


def _resume_path(config: TrainConfig, out: Path) -> Optional[Path]:
    if config.resume_from:
        p = Path(config.resume_from)
        if not p.is_file():
            raise CheckpointError(f"checkpoint not found: {p}")
        return p
    last, prev = out / "last.pt", out / "prev.pt"
    if last.exists():
        return last
    if prev.exists():  # a crash between the two renames of rotate_save
        warnings.warn(f"{last} is missing; resuming from {prev}")
        return prev
    return None


def _check_resume_threads(ck: Dict[str, Any], path: Path, device: torch.device) -> None:
    """Warn when a CPU run resumes with another intra-op thread count than the one that wrote ``ck``:
    CPU reductions split work by thread, so the result is then no longer bit-for-bit identical to an
    uninterrupted run (it differs in the last bits; ~4e-7 after 3 epochs of the tests' toy run)."""
    then, now = ck.get("threads"), torch.get_num_threads()
    if device.type == "cpu" and isinstance(then, int) and then != now:
        warnings.warn(f"{path} was written with {then} torch thread(s), this process uses {now}: the resumed run "
                      f"is not bit-for-bit identical to an uninterrupted one (set OMP_NUM_THREADS={then} or "
                      f"torch.set_num_threads({then}) for an exact resume)")


def find_resume_checkpoint(config: TrainConfig, out: Path, hierarchy, inputs: Dict[str, Any],
                           device: torch.device) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The checkpoint a resume continues from and its contents, checked against this run (None: nothing to resume).

    ``inputs`` is this run's :func:`inputs_digest`; a mismatch raises :class:`CheckpointError` naming the fix.
    """
    path = _resume_path(config, out)
    if path is None:
        return None
    ck = load_checkpoint(path, map_location="cpu")
    _check_resume_config(ck["config"], config, path, hierarchy)
    _check_resume_inputs(ck.get("inputs"), inputs, ck["config"], config, path)
    bad = next((k for k, v in ck["model"].items()
                if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} holds non-finite weights ({bad} has NaN or Inf): it cannot "
                              "be resumed; use an earlier checkpoint (--resume-from)")
    _check_resume_threads(ck, path, device)
    return Path(path), ck


def restore_state(ck: Dict[str, Any], path: Path, rank: int, model: nn.Module, optimizer, criterion: nn.Module,
                  scaler=None) -> None:
    """Load a training checkpoint's model, optimizer, loss and scaler states and this rank's RNG states."""
    try:
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        criterion.load_state_dict(ck["loss"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} does not match this model "
                              f"({state_mismatch(model, ck['model'], exc)})") from None
    if scaler is not None and ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    rng = ck["rng"]
    if isinstance(rng, list) and rank < len(rng):
        set_rng_state(rng[rank])
    elif isinstance(rng, dict):
        set_rng_state(rng)
