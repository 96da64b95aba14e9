"""The training step's pieces: seeding, parameter groups and the LR schedule, AMP and determinism, the loss call and
the numeric checks (gradient norm, non-finite state)."""

from __future__ import annotations

import contextlib
import math
import os
import random
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .config import TrainConfig
from ..nn import HAFrameLoss

__all__ = ["FeaturesOnly", "autocast_factory", "compute_loss", "determinism", "grad_norm", "non_finite_state",
           "param_groups", "seed_everything", "set_lr", "worker_init"]


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random`` alike."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def worker_init(worker_id: int) -> None:
    """A DataLoader worker's numpy and Python seeds, from the torch seed the loader's generator gave it."""
    s = torch.initial_seed()
    np.random.seed(s % 2 ** 32)
    random.seed(s)


class FeaturesOnly(nn.Module):
    """The features ``h`` of a :class:`HAFrameModel` (backbone, then transform), without the classifier's logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.transform(self.model.backbone(x))


def compute_loss(criterion, features, logits, target):
    """The loss of one batch: HAFrameLoss and the losses marked ``reads_features`` (the baselines' head losses)
    read the features (B, d), the other losses the logits (B, K)."""
    if isinstance(criterion, HAFrameLoss) or getattr(criterion, "reads_features", False):
        return criterion(features, target)
    return criterion(logits.float(), target)


def param_groups(model: nn.Module, config: TrainConfig):
    """The optimizer's groups: the backbone (lr scaled by ``backbone_lr_scale``) and the rest (lr)."""
    bb = [p for p in model.backbone.parameters() if p.requires_grad]
    bb_ids = {id(p) for p in bb}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in bb_ids]
    groups = []
    if bb:
        groups.append({"params": bb, "lr": config.lr * config.backbone_lr_scale, "lr_scale": config.backbone_lr_scale,
                       "name": "backbone"})
    if rest:
        groups.append({"params": rest, "lr": config.lr, "lr_scale": 1.0, "name": "head"})
    return groups


def _lr_factor(step: int, total: int, warmup: int, min_frac: float) -> float:
    """Linear warmup, then cosine from 1 to ``min_frac`` over the remaining steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    t = min(max(t, 0.0), 1.0)
    return min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer, config: TrainConfig, step: int, total: int, warmup: int) -> float:
    """Set every group's lr for ``step``; returns the base lr."""
    f = _lr_factor(step, total, warmup, config.min_lr / config.lr if config.lr > 0 else 0.0)
    for g in optimizer.param_groups:
        g["lr"] = config.lr * g.get("lr_scale", 1.0) * f
    return config.lr * f


def grad_norm(model: nn.Module) -> torch.Tensor:
    """The global L2 norm of the gradients (read only: the gradients are not changed)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = getattr(torch.nn.utils, "get_total_norm", None)
    if total is not None:
        return total(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach(), 2.0) for g in grads]), 2.0)


def non_finite_state(model: nn.Module, optimizer) -> Optional[str]:
    """The name of the first model tensor (parameter or buffer) or optimizer state tensor with a NaN/Inf."""
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    for pid, st in optimizer.state_dict().get("state", {}).items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return f"optimizer state {k} of parameter {pid}"
    return None


@contextlib.contextmanager
def determinism(config: TrainConfig, device: torch.device):
    """Deterministic algorithms (and cuDNN settings) for the run, restored afterwards."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    prev_cudnn_det = torch.backends.cudnn.deterministic
    try:
        if config.deterministic:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.deterministic = True
                torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.backends.cudnn.benchmark = prev_bench
        torch.backends.cudnn.deterministic = prev_cudnn_det


def autocast_factory(config: TrainConfig, device: torch.device):
    """(autocast context factory or None, GradScaler or None): AMP on CUDA only."""
    if not (config.amp and device.type == "cuda"):
        return None, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler
