"""Helpers shared by the test files: loss inputs, the float64 reference, the CLI runner, hostile pickles.

Test files import from here (and from ``_torchrun``), never from one another.
"""

import math
import os
import pickle
import subprocess
import sys

import torch
import torch.nn.functional as F

from haframe_ext import ops


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
