"""HAFrame's file format: the saved dict sealed with its digest, reading and checking a file, and the hierarchy as
plain tensors (everything loadable with ``torch.load(weights_only=True)``)."""

from __future__ import annotations

import os
from typing import Callable, Optional, Union

import numpy as np
import torch

from .construct import check_s_min_value
from ..files import atomic_write, content_digest
from ..hierarchy.edges import HierarchyError
from ..hierarchy.hierarchy import Hierarchy
from .profile import Profile
from .similarity import check_gamma, similarity_matrix

__all__ = ["FRAME_FORMAT", "FRAME_VERSIONS", "write_state", "read_state", "check_consistent", "hierarchy_state",
           "hierarchy_from_state"]

FRAME_FORMAT = "haframe_ext.HAFrame"
FRAME_VERSIONS = (1, 2, 3, 4)  # 4: a frame with a profile; the digest is checked from 3 on


def write_state(state: dict, path) -> None:
    """Seal a frame's dict with its content digest and write it to a path (temp file, then rename) or a file."""
    state = dict(state, digest=content_digest(state))  # read_state checks the content against it
    if isinstance(path, (str, os.PathLike)):  # a full disk keeps the earlier file (temp file, then rename)
        atomic_write(path, lambda f: torch.save(state, f))
    else:
        torch.save(state, path)


def read_state(path, map_location) -> dict:
    """The dict of a saved frame: a readable torch file (weights only), with the format, a known version and (from
    version 3) the digest checked; a HierarchyError naming the file otherwise, FileNotFoundError if it is missing."""
    from ..safe_load import describe_torch_load_error

    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
        raise FileNotFoundError(2, "HAFrame file not found", str(path))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:  # text (KeyError), garbage, truncated zip, a refused global, ...
        reason, unsafe = describe_torch_load_error(exc)  # without torch's "weights_only=False" advice
        what = ("is not a safe torch file (refused by weights_only loading" if unsafe
                else "is not a readable HAFrame file (corrupted, truncated or not a torch file")
        raise HierarchyError(f"{str(path)!r} {what}: {reason})") from None
    if not isinstance(state, dict) or state.get("format") != FRAME_FORMAT:
        raise HierarchyError(
            f"{str(path)!r} is not a saved HAFrame (no format={FRAME_FORMAT!r} entry); write it with HAFrame.save")
    if state.get("version") not in FRAME_VERSIONS:
        raise HierarchyError(f"{str(path)!r}: unsupported HAFrame file version {state.get('version')!r}; "
                             "upgrade haframe_ext to read it")
    if state.get("version", 0) >= 3 and content_digest({k: v for k, v in state.items() if k != "digest"}) != \
            state.get("digest"):
        raise HierarchyError(f"{str(path)!r} is corrupted: its content does not match the digest written with it")
    return state


def check_consistent(weight: torch.Tensor, gamma: Optional[float], s_min: float, distances: Optional[np.ndarray],
                     similarity64: Optional[np.ndarray], kernel: Union[float, Profile, None],
                     source: Callable[[], Optional[np.ndarray]], gram_error: Optional[Callable[[], float]]) -> None:
    """Raise ValueError unless the parts of a loaded frame agree: gamma and s_min in range, finite unit rows,
    distances [K, K], the similarity equal to the one its hierarchy or distances give (``source()``: those
    distances, or None), and (exact frames: ``gram_error`` given) the Gram matrix of the rows equal to it."""
    K = weight.shape[0]
    if not weight.is_floating_point() or not bool(torch.isfinite(weight).all()):
        raise ValueError("the weight is not a finite floating-point matrix")
    if gamma is not None:
        check_gamma(gamma)
    check_s_min_value(s_min)
    if s_min < -1.0:
        raise ValueError(f"s_min={s_min} is below -1")
    if distances is not None and distances.shape != (K, K):
        raise ValueError(f"the distances are {distances.shape} for K={K} classes")
    eps = float(torch.finfo(weight.dtype).eps)
    norms = weight.detach().double().norm(dim=1)
    if float((norms - 1).abs().max()) > max(1e-6, 100 * eps):
        raise ValueError("the class vectors are not unit vectors")
    d = source()
    if similarity64 is not None and d is not None and gamma is not None:
        if float(np.abs(similarity_matrix(d, kernel, s_min) - similarity64).max()) > 1e-9:
            raise ValueError("the similarity is not the one its hierarchy (or distances), gamma and s_min give: "
                             "a reordered class list, or an edited matrix")
    if gram_error is not None and gram_error() > max(1e-6, 1000 * eps):
        raise ValueError("the Gram matrix of the class vectors is not the frame's similarity")


def hierarchy_state(h: Hierarchy) -> dict:
    """A hierarchy as plain tensors and strings (weights_only-loadable)."""
    return {"nodes": h.nodes, "parent": torch.from_numpy(h.tree.parent.copy()), "classes": h.classes,
            "convention": h.convention}


def hierarchy_from_state(state: dict) -> Hierarchy:
    """The inverse of hierarchy_state."""
    nodes, parent = state["nodes"], state["parent"].tolist()
    h = Hierarchy.from_parents({nodes[i]: nodes[p] for i, p in enumerate(parent) if p >= 0}, state["classes"])
    return h.with_convention(state["convention"])
