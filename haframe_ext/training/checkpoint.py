"""Training checkpoints: their format, the content seal, RNG state and :func:`load_checkpoint` (the files are
written by :mod:`haframe_ext.files`)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from ..files import content_digest
from ..safe_load import describe_torch_load_error

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "CheckpointError", "load_checkpoint", "rng_state",
           "seal_checkpoint", "set_rng_state", "state_mismatch"]

CHECKPOINT_FORMAT = "haframe_ext.checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupted or does not belong to this run."""


def seal_checkpoint(payload: Dict[str, Any]) -> Dict[str, Any]:
    """The payload plus its content digest (checked by load_checkpoint)."""
    return dict(payload, digest=content_digest(payload))


def rng_state() -> Dict[str, Any]:
    """torch / CUDA / numpy / python RNG states as tensors and numbers (weights_only-loadable)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached_gaussian": float(cached),
        "python_version": int(version), "python_state": torch.tensor(pystate, dtype=torch.int64),
        "python_gauss": None if gauss is None else float(gauss),
    }


def set_rng_state(s: Dict[str, Any]) -> None:
    """Restore the RNG states that :func:`rng_state` returned."""
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), int(s["numpy_pos"]),
                         int(s["numpy_has_gauss"]), float(s["numpy_cached_gaussian"])))
    random.setstate((int(s["python_version"]), tuple(int(v) for v in s["python_state"].tolist()),
                     s["python_gauss"]))


# ----------------------------------------------------------------------------- loading
def state_mismatch(model: torch.nn.Module, state: Dict[str, Any], exc: BaseException) -> str:
    """Why a state dict does not load: the first tensor whose shape differs (sizes named), else the error's line."""
    own = model.state_dict()
    for k, v in state.items():
        if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape):
            return (f"{k} is {list(v.shape)} in the checkpoint but {list(own[k].shape)} in this model: a different "
                    "number of classes, feature dimension or layer size")
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


_CKPT_KEYS = ("format", "version", "epoch", "config", "model", "optimizer", "scheduler", "loss", "rng", "best")


def load_checkpoint(path, map_location="cpu", *, kind: str = "training") -> Dict[str, Any]:
    """Load and check a checkpoint written by :func:`train` (``torch.load(weights_only=True)``).

    Raises :class:`CheckpointError` naming the file (and the previous checkpoint, if any) when
    it is missing, truncated, corrupted or not a haframe_ext checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")

    def hint() -> str:
        """What to fall back to when ``last.pt`` is bad: ``prev.pt`` only once it has been loaded and checked."""
        prev = path.with_name("prev.pt")
        if path.name != "last.pt" or not prev.exists():
            return ""
        try:
            load_checkpoint(prev, map_location="cpu", kind=kind)
        except CheckpointError as exc:
            return (f"; the previous checkpoint {prev} is damaged too ({exc}), so no checkpoint of this run can be "
                    "resumed: start over with --overwrite or choose another --out")
        return f"; the previous checkpoint {prev} is intact: resume from it with resume_from='{prev}' " \
               f"(CLI: --resume-from {prev})"

    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, CRC mismatch, unpickling error, a refused global, ...
        reason, unsafe = describe_torch_load_error(exc)  # never repeats torch's "weights_only=False" advice
        if unsafe:
            raise CheckpointError(f"checkpoint {path} is not a safe checkpoint (refused by weights_only loading: "
                                  f"{reason}; nothing in it was run){hint()}") from None
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({reason}){hint()}") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a haframe_ext checkpoint (no format={CHECKPOINT_FORMAT!r}){hint()}")
    if "digest" not in ck or content_digest({k: v for k, v in ck.items() if k != "digest"}) != ck["digest"]:
        raise CheckpointError(f"checkpoint {path} is corrupted (its content does not match the digest "
                              f"written with it){hint()}")
    if ck.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint version {ck.get('version')!r}")
    need = _CKPT_KEYS if kind == "training" else ("format", "version", "config", "model")
    missing = [k for k in need if k not in ck]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}){hint()}")
    if not isinstance(ck["model"], dict) or not all(isinstance(v, torch.Tensor) or k.endswith("_extra_state")
                                                    for k, v in ck["model"].items()):
        raise CheckpointError(f"checkpoint {path} has a malformed model state{hint()}")
    return ck
