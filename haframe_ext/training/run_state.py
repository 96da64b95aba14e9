"""What the pieces of one training run share: the Run record (config, what it built, optimizer, progress) and what
a stopped run says about its last good checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .config import TrainConfig
from .distributed import DistContext
from ..nn import HAFrameLoss
from .runlog import RunLog

__all__ = ["Run", "kept_message"]


@dataclass
class Run:
    """What the pieces of the loop share: the config, what it built, the optimizer, and the progress so far."""

    config: TrainConfig
    dctx: DistContext
    built: Dict[str, Any]                   # build_from_config: hierarchy, distances, datasets, model, loss, frame
    optimizer: torch.optim.Optimizer
    autocast: Optional[Callable[[], Any]]   # an autocast context factory (AMP on CUDA) or None
    scaler: Any                             # a GradScaler (fp16 AMP) or None
    ks: Tuple[int, ...]                     # the k of top-k and HierDist@k
    inputs: Dict[str, Any]                  # inputs_digest: what the labels and distances mean
    per_rank: int                           # batch size of this process
    total_steps: int
    warmup_steps: int
    net: Optional[nn.Module] = None         # what the step calls: the model, its features only, or DDP around them
    log: Optional[RunLog] = None
    start_epoch: int = 0
    step: int = 0
    best: Dict[str, Any] = field(default_factory=dict)
    history: List[Dict[str, Any]] = field(default_factory=list)
    resumed_from: Optional[str] = None
    good: Optional[Tuple[Path, int]] = None  # the checkpoint this run resumed from or last wrote, and its epoch

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def model(self) -> nn.Module:
        return self.built["model"]

    @property
    def criterion(self) -> nn.Module:
        return self.built["criterion"]

    @property
    def features_only(self) -> bool:
        """A frozen frame with the fused loss, or a loss that reads the features and the model's head (HXE, soft
        labels, multi-level): the step forms only the features, and the loss forms the logits, in chunks, inside
        (so there is no training accuracy for these methods: it would need them again)."""
        fused_frame = bool(getattr(self.model, "fixed_frame", False)) and isinstance(self.criterion, HAFrameLoss)
        return fused_frame or bool(getattr(self.criterion, "reads_features", False))

    @property
    def show(self) -> bool:
        return self.config.progress and self.dctx.main


def kept_message(good: Optional[Tuple[Path, int]]) -> str:
    """What a stopped run says about its checkpoints: the last good one it keeps, or that none was written."""
    if good is None:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint {good[0]} (epoch {good[1]}) is kept"
