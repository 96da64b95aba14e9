"""HAFrame's file format: the saved dict sealed with its digest, reading and checking a file, and the hierarchy as
plain tensors (everything loadable with ``torch.load(weights_only=True)``)."""

from __future__ import annotations

import os

import torch

from ..files import atomic_write, content_digest
from ..hierarchy.edges import HierarchyError
from ..hierarchy.hierarchy import Hierarchy

__all__ = ["FRAME_FORMAT", "FRAME_VERSIONS", "write_state", "read_state", "hierarchy_state", "hierarchy_from_state"]

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


def hierarchy_state(h: Hierarchy) -> dict:
    """A hierarchy as plain tensors and strings (weights_only-loadable)."""
    return {"nodes": h.nodes, "parent": torch.from_numpy(h.tree.parent.copy()), "classes": h.classes,
            "convention": h.convention}


def hierarchy_from_state(state: dict) -> Hierarchy:
    """The inverse of hierarchy_state."""
    nodes, parent = state["nodes"], state["parent"].tolist()
    h = Hierarchy.from_parents({nodes[i]: nodes[p] for i, p in enumerate(parent) if p >= 0}, state["classes"])
    return h.with_convention(state["convention"])
