"""Modules of a HAFrame model: the fixed-frame classifier, the HAFrame loss and the model that joins them.

A HAFrame model is ``backbone -> transformation layer -> features h -> logits = h @ weight.T``
where ``weight`` (K x d, unit rows, ``weight @ weight.T == S``) is a fixed frame
(:class:`haframe_ext.frame.HAFrame`) kept as a buffer, never trained.  The loss mixes
cross entropy and the squared cosine-similarity term, ``(1 - a) CE + a sum_k (cos(w_k, h) - S[y, k])^2``,
with ``a`` optionally following a schedule over epochs (:class:`HAFrameLoss`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import TransformationLayerI, TransformationLayerII
from .ops import fused as ops
from .ops.fused_args import as_alpha, cosine_scale_for
from .schedules import SCHEDULES, alpha_at
from .sizes import DENSE_MAX_K

if TYPE_CHECKING:
    from .frame.frame import HAFrame

# the transformation layers: haframe_ext.layers; the alpha schedules: haframe_ext.schedules
__all__ = [
    "FixedFrameClassifier",
    "TransformationLayerI",
    "TransformationLayerII",
    "HAFrameLoss",
    "HAFrameModel",
    "SCHEDULES",
    "alpha_at",
    "frame_tensors",
]


def frame_tensors(frame: Union["HAFrame", nn.Module, torch.Tensor, np.ndarray, Any],
                  similarity: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Return ``(weight [K, d], similarity [K, K] or None)`` as float32 tensors from a frame-like object.

    Without a similarity, ``weight @ weight.T`` is used (exact for a frame, whose rows are unit vectors), except
    above DENSE_MAX_K (4096) classes, where it stays None.

    Args:
        frame: an :class:`~haframe_ext.frame.HAFrame`, a :class:`FixedFrameClassifier`, a :class:`HAFrameLoss`,
            anything with ``weight`` (and optionally ``similarity``) attributes, or a plain ``[K, d]`` tensor / array.
        similarity: S [K, K] in place of the frame's own, or None.

    Returns:
        (weight [K, d], similarity [K, K] or None): detached float32 copies, contiguous, usable in training even
        when made under inference mode.

    Raises:
        TypeError: a frame that is none of these; ValueError: a weight not 2-D, a similarity not [K, K].
    """
    if isinstance(frame, torch.Tensor):
        weight = frame
    elif hasattr(frame, "weight"):
        weight = frame.weight
        if similarity is None:
            similarity = getattr(frame, "similarity", None)
    else:
        try:
            weight = torch.as_tensor(frame)
        except Exception:
            raise TypeError(
                f"expected a frame (HAFrame), a module with a 'weight', or a [K, d] tensor; "
                f"got {type(frame).__name__}") from None
    weight = torch.as_tensor(weight).detach()
    if weight.dim() != 2:
        raise ValueError(f"a frame's weight must be 2-D (K, d), got shape {tuple(weight.shape)}")
    with torch.inference_mode(False):  # copies made under inference mode would be unusable in training
        weight = weight.to(torch.float32).clone()
        if similarity is None:
            # a K x K matrix for a large low-dimensional frame would dwarf the model: the d x d gram
            # (FixedFrameClassifier.gram) serves the loss instead
            similarity = weight @ weight.T if weight.shape[0] <= DENSE_MAX_K else None
        else:
            similarity = torch.as_tensor(similarity).detach().to(device=weight.device, dtype=torch.float32).clone()
            K = weight.shape[0]
            if similarity.shape != (K, K):
                raise ValueError(f"similarity must be (K, K) = ({K}, {K}), got {tuple(similarity.shape)}")
    return weight.contiguous(), (None if similarity is None else similarity.contiguous())


def _gram_or_similarity(weight: torch.Tensor, similarity: Optional[torch.Tensor]):
    """(similarity, gram) for the loss: the given similarity, else what ops derives (gram for a large unit-row
    frame)."""
    if similarity is not None:
        return similarity, None
    with torch.inference_mode(False):
        return ops.derive_similarity_or_gram(weight, weight.dtype)


class FixedFrameClassifier(nn.Module):
    """Linear classifier with a frozen weight: ``logits = h @ weight.T`` (no bias).

    ``weight`` [K, d] and ``similarity`` [K, K] are registered buffers: they move with
    ``.to(device)``, are saved in ``state_dict`` and are never returned by ``parameters()``,
    so no optimizer ever changes them.  Above DENSE_MAX_K (4096) classes a unit-row frame keeps no similarity;
    ``gram`` [d, d] = ``weight.T @ weight`` (a buffer left out of ``state_dict``, derived again
    whenever a state is loaded) serves the loss instead.  Change the frame through ``load_state_dict``
    or a new module: a write into ``weight.data`` leaves ``similarity`` and ``gram`` as they were.
    """

    def __init__(self, frame: Union["HAFrame", nn.Module, torch.Tensor, np.ndarray, Any],
                 similarity: Optional[torch.Tensor] = None) -> None:
        """Hold a frame's weight and its similarity (or, above DENSE_MAX_K classes, its gram) as buffers.

        Args:
            frame: anything :func:`frame_tensors` takes (an HAFrame, a module with a weight, a [K, d] tensor).
            similarity: S [K, K] in place of the frame's own, or None.
        """
        super().__init__()
        weight, sim = frame_tensors(frame, similarity)
        sim, gram = _gram_or_similarity(weight, sim)
        self.register_buffer("weight", weight)
        self.register_buffer("similarity", sim)
        self.register_buffer("gram", gram, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.gram is not None:  # derived from the weight just loaded
            with torch.no_grad():
                self.gram = _gram_or_similarity(self.weight, None)[1].to(self.gram)

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        """d, the feature dimension."""
        return self.weight.shape[1]

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h: [B, d] -> [B, K]
        """The logits of features h.

        Args:
            h: features [B, d].

        Returns:
            ``h @ weight.T`` [B, K] in h's dtype.

        Raises:
            ValueError: h not [B, d].
        """
        if h.dim() != 2 or h.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"FixedFrameClassifier expects features of shape (B, {self.weight.shape[1]}), "
                f"got {tuple(h.shape)}")
        return F.linear(h, self.weight.to(h.dtype))  # under autocast F.linear casts both anyway

    def extra_repr(self) -> str:
        """The module's line in print(model).

        Returns:
            K, d and that the weight is fixed.
        """
        return f"num_classes={self.weight.shape[0]}, dim={self.weight.shape[1]}, fixed=True"


class HAFrameLoss(nn.Module):
    """``(1 - a) * CE(h @ W.T, y) + a * c * sum_k (cos(w_k, h) - S[y, k])^2``, mean over the batch.

    ``c`` comes from ``cosine_scale``: ``"auto"`` (default) is ``min(d, K) / K`` for a [K, d] frame, 1 in the
    paper's setting (d >= K) and ``d / K`` below it, where the summed cosine term would outweigh the cross
    entropy K/d times (:func:`haframe_ext.ops.cosine_scale_for`); ``"sum"`` is the paper's plain sum at every
    d; a number is used as given.

    ``frame``: a :class:`FixedFrameClassifier`, whose buffers the loss reads at every call (the frame is
    held once: the loss's ``state_dict`` is only its epoch, and ``.to`` on the model moves it), or an
    HAFrame / [K, d] tensor, for which the loss builds its own classifier (submodule ``frame``).
    ``a`` is ``alpha`` at the current epoch (see :func:`alpha_at` for the schedules; call
    :meth:`set_epoch` at the start of each epoch).  The loss is computed by
    :func:`haframe_ext.ops.haframe_loss` (the fused native op when built); ``backend`` is passed to it
    (``"auto"``, ``"native"`` or ``"reference"``).
    """

    def __init__(self, frame: Union["HAFrame", nn.Module, torch.Tensor, np.ndarray, Any], alpha: float = 0.4,
                 schedule: str = "constant", period: Optional[float] = None, total_epochs: Optional[int] = None,
                 reduction: str = "mean", ignore_index: int = -100, similarity: Optional[torch.Tensor] = None,
                 backend: str = "auto", cosine_scale: Union[str, float] = "auto") -> None:
        """Share a FixedFrameClassifier's frame, or hold a classifier of its own; the schedule is checked now.

        Args:
            frame: a FixedFrameClassifier (shared, unless a similarity is given), or an HAFrame / [K, d] tensor.
            alpha: the base mixing weight, in [0, 1].
            schedule: one of SCHEDULES (:func:`alpha_at`).
            period: the cosine schedules' period in epochs.
            total_epochs: the run's epochs (every schedule but "constant" and "cosine" needs it).
            reduction: "mean", "sum" or "none", as for haframe_loss.
            ignore_index: the label of rows that contribute 0.
            similarity: S [K, K] in place of the frame's own (the loss then holds its own classifier).
            backend: "auto", "native" or "reference", passed to haframe_loss.
            cosine_scale: "auto", "sum" or a number > 0 (the class docstring).
        """
        super().__init__()
        alpha = as_alpha(alpha)
        if isinstance(frame, FixedFrameClassifier) and similarity is None:
            # a plain attribute, not a submodule: the frame's buffers stay in the model's state_dict only
            object.__setattr__(self, "_shared", frame)
        else:
            object.__setattr__(self, "_shared", None)
            self.frame = FixedFrameClassifier(frame, similarity)
        self.base_alpha = alpha
        self.schedule = schedule
        self.period = period
        self.total_epochs = total_epochs
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend
        self.cosine_scale = cosine_scale
        self.epoch = 0
        cosine_scale_for(cosine_scale, *self.weight.shape)  # validate the rule now
        alpha_at(schedule, alpha, 0, total_epochs, period)  # validate the schedule's arguments now

    def set_epoch(self, epoch: int) -> None:
        """Set the current (0-based) epoch; ``alpha`` follows the schedule.

        Args:
            epoch: the epoch about to run, from 0 (saved in the loss's state_dict).
        """
        self.epoch = int(epoch)

    @property
    def alpha(self) -> float:
        """The mixing weight at the current epoch."""
        return alpha_at(self.schedule, self.base_alpha, self.epoch, self.total_epochs, self.period)

    @property
    def cosine_factor(self) -> float:
        """The multiplier ``c`` of the cosine term for this frame (see the class docstring)."""
        return cosine_scale_for(self.cosine_scale, *self.weight.shape)

    @property
    def classifier(self) -> FixedFrameClassifier:
        """The classifier whose frame this loss uses (the shared one, or its own)."""
        return self._shared if self._shared is not None else self.frame

    @property
    def weight(self) -> torch.Tensor:  # [K, d]
        """The frame's weight [K, d]."""
        return self.classifier.weight

    @property
    def similarity(self) -> Optional[torch.Tensor]:  # [K, K] or None
        """The frame's S [K, K], or None above DENSE_MAX_K classes."""
        return self.classifier.similarity

    def get_extra_state(self) -> Dict[str, int]:
        """The loss's own state in its state_dict.

        Returns:
            {"epoch": the current epoch}.
        """
        return {"epoch": self.epoch}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # states written when the loss held a clone of the frame: the shared frame is loaded with the model,
        # an own frame takes the old keys
        for name in ("weight", "similarity"):
            old = state_dict.pop(prefix + name, None)
            if old is not None and self._shared is None:
                state_dict.setdefault(prefix + "frame." + name, old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_extra_state(self, state: Any) -> None:
        """Restore the epoch from a state_dict's extra state.

        Args:
            state: what get_extra_state returned (anything else is ignored).
        """
        if isinstance(state, dict) and "epoch" in state:
            self.epoch = int(state["epoch"])

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The HAFrame loss of a batch at the current alpha (haframe_loss with the frame's S or gram).

        Args:
            features: [B, d], any floating dtype (autocast's bf16/fp16 included).
            target: [B] integer labels in [0, K), or ignore_index.

        Returns:
            The loss, float32 (float64 for float64 features), reduced as constructed.
        """
        # bf16/fp16 features (autocast) stay as they are: the op accumulates in float32, returns a
        # float32 loss and a gradient in the features' dtype
        clf = self.classifier
        return ops.haframe_loss(features, clf.weight, target, self.alpha, self.reduction, self.ignore_index,
                                similarity=clf.similarity, gram=clf.gram, backend=self.backend,
                                cosine_scale=self.cosine_factor)

    def extra_repr(self) -> str:
        """The module's line in print(model).

        Returns:
            K, d, alpha, the cosine scale and its c, the schedule and its period and epochs.
        """
        return (f"num_classes={self.weight.shape[0]}, dim={self.weight.shape[1]}, alpha={self.base_alpha}, "
                f"cosine_scale={self.cosine_scale!r} (c={self.cosine_factor:.4g}), "
                f"schedule={self.schedule!r}, period={self.period}, total_epochs={self.total_epochs}")


class HAFrameModel(nn.Module):
    """``backbone -> transform -> classifier``; ``forward(x)`` returns ``(features, logits)``.

    ``features`` is the transformation layer's output (the penultimate features ``h``) and
    ``logits = classifier(features)``.
    """

    def __init__(self, backbone: nn.Module, transform: nn.Module, classifier: nn.Module) -> None:
        """Join the three parts as submodules.

        Args:
            backbone: inputs -> a feature map (N, C, H, W) or vectors (N, C).
            transform: the backbone's output -> the features h [N, d] (a transformation layer).
            classifier: h -> logits [N, K] (a FixedFrameClassifier, or a learned nn.Linear).
        """
        super().__init__()
        self.backbone = backbone
        self.transform = transform
        self.classifier = classifier

    @property
    def fixed_frame(self) -> bool:
        """True when the classifier is a frozen frame."""
        return isinstance(self.classifier, FixedFrameClassifier)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The features and logits of a batch.

        Args:
            x: the backbone's inputs [N, ...].

        Returns:
            (features [N, d], logits [N, K]).
        """
        features = self.transform(self.backbone(x))
        return features, self.classifier(features)
