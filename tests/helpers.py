"""Helpers shared by the test files: loss inputs, the float64 reference, the CLI runner, hostile pickles,
random trees (hypothesis), and the tiny training run with its fault hook.

Test files import from here (and from ``_torchrun``), never from one another.
"""

import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from haframe_ext import ops
from haframe_ext.hierarchy import HierarchyError


def make_inputs(B, K, d, dtype=torch.float32, device="cpu", seed=0, scale=3.0, ignore_row=True):
    """Features [B, d] of norm ~scale, unit-row weights [K, d] (a frame-like matrix), labels [B].

    With ``ignore_row`` and B > 2, row 1 carries the default ignore_index (-100).
    """
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, d, generator=g, dtype=torch.float64) * (scale / math.sqrt(max(d, 1)))
    w = F.normalize(torch.randn(K, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, K, (B,), generator=g)
    if ignore_row and B > 2:
        y[1] = -100
    return h.to(dtype).to(device), w.to(dtype).to(device), y.to(device)


def reference_loss_and_grad(h, w, y, alpha=0.4, reduction="none", ignore_index=-100, grad_out=None):
    """The float64 reference loss and feature gradient on the same (rounded) inputs, on the CPU."""
    h64 = h.detach().double().cpu().requires_grad_()
    loss = ops.reference_loss(h64, w.double().cpu(), y.cpu(), alpha, reduction, ignore_index)
    go = torch.ones_like(loss) if grad_out is None else grad_out.double().cpu()
    loss.backward(go)
    return loss.detach(), h64.grad


def run_cli(*args, timeout=120, env=None, cwd=None):
    """``python -m haframe_ext.cli ARGS`` in a fresh process: the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, "-m", "haframe_ext.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


class HostileGlobal:
    """An object whose unpickling would call ``os.system(command)``: loaders must refuse it, never run it."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_hostile_pickle(path, command: str, wrap=lambda x: x) -> None:
    """Pickle ``wrap(HostileGlobal(command))`` to path (protocol 2, as torch and numpy files use)."""
    with open(path, "wb") as fh:
        pickle.dump(wrap(HostileGlobal(command)), fh, protocol=2)


# ----------------------------------------------------------------------------- random trees (hypothesis)
FAST = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])


def node_name(i: int, style: str) -> str:
    """Node name for integer id i in one of several styles (plain, with spaces, non-ASCII, long)."""
    if style == "plain":
        return f"n{i}"
    if style == "spaces":
        return f"node {i} of the tree"
    if style == "unicode":
        return f"ñœ-{i}-日本"
    return f"long{i}-" + "x" * 300


def tree_parents(kind: str, K: int, rng: np.random.Generator) -> dict[int, int]:
    """child -> parent over integer ids (root 0) of a tree with exactly K leaves."""
    parent: dict[int, int] = {}
    if kind == "balanced":
        b = int(rng.integers(2, 6))
        levels = max(1, int(math.floor(math.log(max(K, 2), b))))
        frontier, nxt = [0], 1
        for _ in range(levels):
            new = []
            for p in frontier:
                for _ in range(b):
                    parent[nxt] = p
                    new.append(nxt)
                    nxt += 1
            frontier = new
        return parent
    if kind == "star":
        return {i: 0 for i in range(1, K + 1)}
    if kind == "caterpillar":  # deepest possible: a spine with one leaf per spine node
        spine = list(range(K - 1))  # node 0 is the root
        nxt = K - 1
        for s in spine[1:]:
            parent[s] = s - 1
        for s in spine:
            parent[nxt] = s
            nxt += 1
        parent[nxt] = spine[-1]
        return parent
    # "random": agglomerate K leaves into random groups of 2-4, sometimes through a unary chain
    roots = list(range(1, K + 1))
    nxt = K + 1
    while len(roots) > 1:
        g = int(min(len(roots), rng.integers(2, 5)))
        pick = rng.choice(len(roots), size=g, replace=False)
        group = [roots[i] for i in pick]
        roots = [r for i, r in enumerate(roots) if i not in set(pick.tolist())]
        p = nxt
        nxt += 1
        for c in group:
            parent[c] = p
        while rng.random() < 0.2:  # unary node above p: heights count the longest path
            parent[p] = nxt
            p = nxt
            nxt += 1
        roots.append(p)
    # relabel so the root is 0
    root = roots[0]
    swap = {root: 0, 0: root}
    return {swap.get(c, c): swap.get(p, p) for c, p in parent.items()}


@st.composite
def trees(draw, max_k: int = 2000, styles=("plain", "spaces", "unicode", "long")):
    """(parent_of by name, classes in a random label order) for a random tree with 2..max_k leaves."""
    kind = draw(st.sampled_from(["balanced", "star", "caterpillar", "random"]))
    cap = min(max_k, 300) if kind == "caterpillar" else max_k  # depth K-1: keep the example cheap
    K = draw(st.integers(2, cap))
    seed = draw(st.integers(0, 2**32 - 1))
    style = draw(st.sampled_from(styles))
    rng = np.random.default_rng(seed)
    ids = tree_parents(kind, K, rng)
    parent_of = {node_name(c, style): node_name(p, style) for c, p in ids.items()}
    kids = set(parent_of.values())
    leaves = [c for c in parent_of if c not in kids]
    order = rng.permutation(len(leaves))
    return parent_of, [leaves[i] for i in order]


def edge_text(parent_of) -> str:
    return "".join(f"{p}\t{c}\n" for c, p in parent_of.items())


def raises_hierarchy_error(fn, *keywords):
    """Assert fn raises exactly HierarchyError with a non-empty message containing every keyword."""
    with pytest.raises(HierarchyError) as info:
        fn()
    assert type(info.value) is HierarchyError and isinstance(info.value, ValueError)
    msg = str(info.value)
    assert msg.strip(), "empty error message"
    for k in keywords:
        assert k in msg, f"{k!r} not in {msg!r}"
    return msg
