"""The paper's transformation layers between a backbone and the classifier: type I (before a learned classifier) and
type II (before a fixed frame)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TransformationLayerI", "TransformationLayerII"]


def _pool_flatten(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C) by global average pooling; (N, C) passes through."""
    if x.dim() == 4:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)
    if x.dim() == 2:
        return x
    raise ValueError(f"expected (N, C) features or an (N, C, H, W) feature map, got shape {tuple(x.shape)}")


class TransformationLayerI(nn.Module):
    """Type-I transformation layer of the paper: BN1d -> Linear -> BN1d -> ELU.

    Feature maps (N, C, H, W) are globally average-pooled first. Followed in a type-I model by a
    learnable linear classifier.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        """The layer's modules: BatchNorm1d(in_features), Linear(in_features, out_features), BatchNorm1d, ELU.

        Args:
            in_features: C, the backbone's channels (or vector size).
            out_features: d, the feature dimension.
        """
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bn_in = nn.BatchNorm1d(in_features)
        self.linear = nn.Linear(in_features, out_features)
        self.bn_out = nn.BatchNorm1d(out_features)
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The features of a batch.

        Args:
            x: a feature map (N, C, H, W) (average-pooled first) or vectors (N, C).

        Returns:
            The features [N, out_features].
        """
        x = _pool_flatten(x)
        return self.act(self.bn_out(self.linear(self.bn_in(x))))


class _ResidualBlock(nn.Module):
    """x + PReLU(BN1d(Linear(x, bias=False)))."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)
        self.bn = nn.BatchNorm1d(width)
        self.act = nn.PReLU(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.bn(self.linear(x)))


class TransformationLayerII(nn.Module):
    """Type-II transformation layer of the paper, feeding a fixed frame.

    - ``conv=True`` (input (N, C, H, W) with C = ``in_features``): 1x1 conv to ``width``
      channels, global average pooling, flatten, BN1d.
    - ``conv=False`` (input (N, in_features)): the same with the 1x1 conv replaced by the
      equivalent bias-free linear map to ``width`` (omitted when ``in_features == width``), BN1d.

    Then ``num_blocks`` residual blocks ``x + PReLU(BN1d(Linear(x, bias=False)))`` of width
    ``width`` (PReLU lets features go negative, which a frame with negative similarities
    needs), and a final bias-free linear map to ``out_dim`` when ``out_dim != width``.
    ``width`` is ``num_classes`` as in the paper; with many classes pass a smaller one (the
    frame's dimension, say), since the blocks hold width x width weights.
    """

    def __init__(self, in_features: int, num_classes: int, out_dim: Optional[int] = None,
                 num_blocks: int = 2, conv: bool = False, width: Optional[int] = None) -> None:
        """The projection to width, the residual blocks and the map to out_dim (the class docstring).

        Args:
            in_features: C, the backbone's channels (or vector size).
            num_classes: K; the default width and out_dim.
            out_dim: d, the frame's dimension; default num_classes.
            num_blocks: residual blocks, >= 0.
            conv: a 1x1 convolution on a feature map (N, C, H, W) instead of a linear map on vectors.
            width: the blocks' width; default num_classes.

        Raises:
            ValueError: num_blocks < 0.
        """
        super().__init__()
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.width = width = num_classes if width is None else int(width)
        self.out_features = out_dim = num_classes if out_dim is None else int(out_dim)
        self.conv_input = conv
        if conv:
            self.proj = nn.Conv2d(in_features, width, kernel_size=1, bias=False)
        elif in_features != width:
            self.proj = nn.Linear(in_features, width, bias=False)
        else:
            self.proj = nn.Identity()
        self.bn = nn.BatchNorm1d(width)
        self.blocks = nn.Sequential(*[_ResidualBlock(width) for _ in range(num_blocks)])
        self.out = nn.Linear(width, out_dim, bias=False) if out_dim != width else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The features of a batch.

        Args:
            x: a feature map (N, C, H, W) with conv=True; vectors (N, C) or a map (average-pooled first) otherwise.

        Returns:
            The features [N, out_dim].
        """
        if self.conv_input:
            if x.dim() != 4:
                raise ValueError(
                    f"TransformationLayerII(conv=True) expects an (N, C, H, W) feature map, got {tuple(x.shape)}")
            x = self.proj(x)
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        else:
            x = self.proj(_pool_flatten(x))
        x = self.bn(x)
        x = self.blocks(x)
        return self.out(x)
