"""Backbones and the model/loss factory for the paper's methods.

Every backbone has two attributes the factory reads: ``out_features`` (channels of its output)
and ``conv_output`` (True when it returns an (N, C, H, W) feature map rather than (N, C) vectors).

Methods (:data:`METHODS`):

- ``cross-entropy``: type-I transformation layer + a learnable linear classifier, cross entropy.
- ``haframe``: type-II transformation layer + the fixed HAFrame classifier, the mixed HAFrame loss.
- ``etf``: type-II transformation layer + a fixed simplex ETF classifier, the same mixed loss.
- ``haframe-ce``: fixed HAFrame classifier trained with cross entropy only (alpha = 0), the ablation.
- ``hxe`` / ``soft-labels``: the cross-entropy model (type-I layer, trainable linear classifier) trained with
  hierarchical cross-entropy / soft labels (Bertinetto et al., CVPR 2020) by the fused linear loss.
- ``multi-level``: type-I layer + one linear head per depth level of the tree, the sum of their cross-entropies;
  the finest head predicts.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..sizes import DENSE_MAX_K
from .baselines import HEAD_LOSS_KINDS, HeadLoss, MultiLevelHead, MultiLevelLoss
from ..layers import TransformationLayerI, TransformationLayerII
from ..nn import FixedFrameClassifier, HAFrameLoss, HAFrameModel

__all__ = [
    "METHODS", "BACKBONES", "mlp", "small_cnn", "wide_resnet28", "resnet50", "WideResNet",
    "build_backbone", "build_model", "build_loss", "build_frame", "FIXED_FRAME_METHODS",
]

METHODS = ("cross-entropy", "haframe", "etf", "haframe-ce", "hxe", "soft-labels", "multi-level")
FIXED_FRAME_METHODS = ("haframe", "etf", "haframe-ce")
BACKBONES = ("mlp", "small-cnn", "wrn28", "resnet50")
_BACKBONE_ALIASES = {
    "mlp": "mlp", "small-cnn": "small-cnn", "small_cnn": "small-cnn", "cnn": "small-cnn",
    "wrn28": "wrn28", "wrn-28": "wrn28", "wide-resnet28": "wrn28", "wide_resnet28": "wrn28",
    "wideresnet28": "wrn28", "wide-resnet": "wrn28", "resnet50": "resnet50", "resnet-50": "resnet50",
}


def check_method(method: str) -> str:
    """Return ``method`` if it is a known method name, else raise ValueError listing the valid ones."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    return method


# ----------------------------------------------------------------------------- backbones
class _MLP(nn.Module):
    """Linear -> BN -> ReLU, repeated; (N, in_dim) -> (N, hidden)."""

    conv_output = False

    def __init__(self, in_dim: int, hidden: Union[int, Sequence[int]] = 512, depth: int = 2):
        super().__init__()
        widths = [int(hidden)] * int(depth) if isinstance(hidden, int) else [int(h) for h in hidden]
        if in_dim <= 0 or not widths or min(widths) <= 0:
            raise ValueError(f"mlp needs in_dim > 0 and positive hidden widths, got in_dim={in_dim}, hidden={hidden}")
        layers = []
        prev = int(in_dim)
        for w in widths:
            layers += [nn.Linear(prev, w), nn.BatchNorm1d(w), nn.ReLU(inplace=True)]
            prev = w
        self.net = nn.Sequential(*layers)
        self.in_features = int(in_dim)
        self.out_features = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def mlp(in_dim: int, hidden: Union[int, Sequence[int]] = 512, depth: int = 2) -> nn.Module:
    """A small MLP backbone for vector inputs (synthetic data, precomputed features)."""
    return _MLP(in_dim, hidden, depth)


class _SmallCNN(nn.Module):
    """Five 3x3 conv layers with two max-pools: (N, C, 32, 32) -> (N, 4 * width, 8, 8)."""

    conv_output = True

    def __init__(self, in_channels: int = 3, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = int(width)
        self.net = nn.Sequential(
            *block(in_channels, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
        )
        self.out_features = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def small_cnn(in_channels: int = 3, width: int = 32) -> nn.Module:
    """A small CNN backbone for quick runs on 32x32 images; returns a feature map."""
    return _SmallCNN(in_channels, width)


class _WideBasic(nn.Module):
    """Pre-activation wide basic block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.dropout = float(dropout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.relu(self.bn2(y))
        if self.dropout > 0:
            y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv2(y)
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """Wide-ResNet-depth-k (Zagoruyko & Komodakis) for 32x32 inputs, without the classifier.

    Returns the final feature map after BN + ReLU: (N, 64 k, 8, 8) for 32x32 inputs.
    """

    conv_output = True

    def __init__(self, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"Wide-ResNet depth must be 6n + 4 (n >= 1), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        layers = []
        cin = widths[0]
        for i, (cout, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            for j in range(n):
                layers.append(_WideBasic(cin, cout, stride if j == 0 else 1, dropout))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.out_features = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.blocks(self.conv1(x))))


def wide_resnet28(k: int = 10, dropout: float = 0.0, in_channels: int = 3) -> nn.Module:
    """Wide-ResNet-28-k backbone for 32x32 images (the paper's CIFAR-100 backbone with k = 10)."""
    return WideResNet(28, k, dropout, in_channels)


class _TorchvisionResNet50(nn.Module):
    """torchvision ResNet-50 without its pooling and fc: (N, 3, H, W) -> (N, 2048, H/32, W/32)."""

    conv_output = True

    def __init__(self, pretrained: bool = False):
        super().__init__()
        try:
            import torchvision
        except ImportError as exc:
            raise ImportError(
                "the resnet50 backbone needs torchvision, which is not installed "
                "(pip install torchvision matching your torch version); "
                "use the 'wrn28', 'small-cnn' or 'mlp' backbone otherwise") from exc
        weights = "IMAGENET1K_V1" if pretrained else None
        net = torchvision.models.resnet50(weights=weights)
        self.body = nn.Sequential(*list(net.children())[:-2])
        self.out_features = 2048

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def resnet50(pretrained: bool = False) -> nn.Module:
    """torchvision's ResNet-50 as a feature-map backbone (ImportError with a clear message without torchvision)."""
    return _TorchvisionResNet50(pretrained)


def build_backbone(name: Union[str, nn.Module], *, in_dim: Optional[int] = None, in_channels: int = 3,
                   hidden: Union[int, Sequence[int]] = 512, depth: int = 2, widen_factor: int = 10,
                   width: int = 32, dropout: float = 0.0, pretrained: bool = False) -> nn.Module:
    """Backbone by name (``mlp``, ``small-cnn``, ``wrn28``, ``resnet50``), or pass a module through."""
    if isinstance(name, nn.Module):
        if not hasattr(name, "out_features"):
            raise ValueError("a custom backbone module must have an 'out_features' attribute "
                             "(and 'conv_output' = True if it returns (N, C, H, W) feature maps)")
        return name
    key = _BACKBONE_ALIASES.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")
    if key == "mlp":
        if in_dim is None:
            raise ValueError("the mlp backbone needs in_dim (the input vector size)")
        return mlp(int(in_dim), hidden, depth)
    if key == "small-cnn":
        return small_cnn(in_channels, width)
    if key == "wrn28":
        return wide_resnet28(widen_factor, dropout, in_channels)
    return resnet50(pretrained)


# ----------------------------------------------------------------------------- frames and models
def build_frame(method: str, num_classes: int, *, hierarchy=None, distances=None, gamma: float = 2.0,
                s_min="exact", dim: Optional[int] = None, seed: int = 0):
    """The fixed frame for a fixed-frame method: an HAFrame (from a hierarchy or distances) or an ETF."""
    from ..frame.frame import HAFrame

    check_method(method)
    approximate = dim is not None and int(dim) < num_classes  # dim < K: the Gaussian projection
    if method == "etf":
        return HAFrame.etf(num_classes, dim=dim, seed=seed, approximate=approximate)
    if method not in FIXED_FRAME_METHODS:
        raise ValueError(f"method {method!r} has no fixed frame")
    if hierarchy is not None:
        frame = HAFrame.from_hierarchy(hierarchy, gamma, s_min=s_min, dim=dim, seed=seed, approximate=approximate)
    elif distances is not None:
        frame = HAFrame.from_distances(distances, gamma, s_min=s_min, dim=dim, seed=seed, approximate=approximate)
    else:
        raise ValueError(f"method {method!r} needs a frame, a hierarchy or a distance matrix")
    if frame.num_classes != num_classes:
        raise ValueError(f"the hierarchy has {frame.num_classes} classes but the model has {num_classes}")
    return frame


def build_model(method: str, backbone: Union[str, nn.Module], num_classes: int, frame=None, *,
                hierarchy=None, distances=None, gamma: float = 2.0, s_min="exact",
                feature_dim: Optional[int] = None, num_blocks: int = 2, seed: int = 0,
                **backbone_kwargs) -> HAFrameModel:
    """Build the model of a method: ``HAFrameModel(backbone, transform, classifier)``.

    ``backbone``: a name (see :func:`build_backbone`; ``backbone_kwargs`` such as ``in_dim``,
    ``hidden``, ``widen_factor`` go to it) or a module with ``out_features``/``conv_output``.
    ``frame``: the fixed frame for ``haframe``/``haframe-ce``/``etf`` (an HAFrame or a [K, d]
    tensor); when None it is built from ``hierarchy`` (or ``distances``) with ``gamma`` and
    ``s_min`` (or as a simplex ETF), of dimension ``feature_dim`` (default K).
    ``feature_dim`` for ``cross-entropy``, ``hxe``, ``soft-labels`` and ``multi-level`` is the type-I layer width
    (default 512); ``multi-level`` takes its levels from ``hierarchy``.
    """
    check_method(method)
    num_classes = int(num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    bb = build_backbone(backbone, **backbone_kwargs)
    conv = bool(getattr(bb, "conv_output", False))
    if method in ("cross-entropy", "multi-level", *HEAD_LOSS_KINDS):
        width = int(feature_dim) if feature_dim is not None else 512
        transform = TransformationLayerI(bb.out_features, width)
        if method == "multi-level":
            if hierarchy is None:
                raise ValueError("method 'multi-level' needs the hierarchy (its heads are the tree's depth levels)")
            classifier = MultiLevelHead(width, hierarchy)
            if classifier.num_classes != num_classes:
                raise ValueError(f"the hierarchy has {classifier.num_classes} classes but num_classes={num_classes}")
        else:
            classifier = nn.Linear(width, num_classes)
    else:
        if frame is None:
            frame = build_frame(method, num_classes, hierarchy=hierarchy, distances=distances, gamma=gamma,
                                s_min=s_min, dim=feature_dim, seed=seed)
        classifier = FixedFrameClassifier(frame)
        if classifier.num_classes != num_classes:
            raise ValueError(f"the frame has {classifier.num_classes} classes but num_classes={num_classes}")
        if feature_dim is not None and classifier.in_features != int(feature_dim):
            raise ValueError(f"the frame has dimension {classifier.in_features} but feature_dim={feature_dim}")
        # the paper's width K, unless K x K block weights would dwarf the model: then the frame's dimension
        width = None if num_classes <= DENSE_MAX_K else classifier.in_features
        transform = TransformationLayerII(bb.out_features, num_classes, classifier.in_features,
                                          num_blocks=num_blocks, conv=conv, width=width)
    model = HAFrameModel(bb, transform, classifier)
    model.method = method
    return model


def build_loss(method: str, model: Optional[HAFrameModel] = None, *, frame=None, alpha: float = 0.4,
               cosine_scale: Union[str, float] = "auto", schedule: str = "constant", period: Optional[float] = None,
               total_epochs: Optional[int] = None, hierarchy=None, hxe_alpha: float = 0.1,
               hxe_normalize: bool = False, soft_beta: float = 10.0) -> nn.Module:
    """The training loss of a method.

    ``cross-entropy``: ``nn.CrossEntropyLoss`` on the logits.  ``haframe``/``etf``:
    :class:`HAFrameLoss` on the features with ``alpha``, its schedule and ``cosine_scale``.  ``haframe-ce``:
    :class:`HAFrameLoss` with alpha = 0 (pure cross entropy against the fixed frame).
    The frame comes from ``model.classifier`` unless given.  ``hxe`` / ``soft-labels``: :class:`HeadLoss` on
    ``model.classifier`` with ``hxe_alpha`` (and ``hxe_normalize``) / ``soft_beta`` and ``hierarchy`` (a Hierarchy;
    soft labels also take a distance matrix).  ``multi-level``: :class:`MultiLevelLoss` on the model's heads.
    """
    check_method(method)
    if method == "cross-entropy":
        return nn.CrossEntropyLoss()
    if method in HEAD_LOSS_KINDS or method == "multi-level":
        if model is None:
            raise ValueError(f"method {method!r} trains the model's own head: pass the model")
        if method == "multi-level":
            return MultiLevelLoss(model.classifier)
        if hierarchy is None:
            raise ValueError(f"method {method!r} needs the hierarchy (or, for soft-labels, a distance matrix)")
        return HeadLoss(model.classifier, HEAD_LOSS_KINDS[method], hierarchy, alpha=hxe_alpha,
                        normalize=hxe_normalize, beta=soft_beta)
    if frame is None:
        if model is None or not isinstance(getattr(model, "classifier", None), FixedFrameClassifier):
            raise ValueError(f"method {method!r} needs a model with a FixedFrameClassifier or a frame")
        frame = model.classifier
    if method == "haframe-ce":
        return HAFrameLoss(frame, alpha=0.0)
    return HAFrameLoss(frame, alpha=alpha, schedule=schedule, period=period, total_epochs=total_epochs,
                       cosine_scale=cosine_scale)
