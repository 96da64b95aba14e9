"""The baseline methods' heads and training criteria: HXE and soft labels on the trainable linear classifier (the
fused :func:`~haframe_ext.ops.hier_losses.linear_hierarchical_loss`, no B x K logits beyond a chunk), and multi-level
heads (one linear head per depth level, "flamingo" in the HAFrame code) with their summed cross-entropy.

The criteria read the features ``h`` [B, d] and the model's head, so the training step forms only the features
(``reads_features``); evaluation calls the model, whose classifier gives the K logits of the finest level.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch
import torch.nn as nn

from ..ops.hier_losses import linear_hierarchical_loss
from ..hierarchy.hierarchy import Hierarchy
from ..sizes import available_memory

__all__ = ["HEAD_LOSS_KINDS", "HeadLoss", "MultiLevelHead", "MultiLevelLoss", "level_targets"]

# method name -> the ``kind`` of linear_hierarchical_loss that trains it
HEAD_LOSS_KINDS = {"hxe": "hxe", "soft-labels": "soft-labels"}


def level_targets(hierarchy: Hierarchy) -> List[np.ndarray]:
    """Per depth level l = 1..D (entry l - 1), int64 [K]: the index of each class's depth-l ancestor among that
    level's nodes. A class shallower than l stands for itself at level l (the published padding); the last level
    is the classes themselves in label order, so the finest head's outputs are the K class logits."""
    if not isinstance(hierarchy, Hierarchy):
        raise ValueError("multi-level heads need a tree (a Hierarchy), not a distance matrix: each level is a "
                         "depth of the tree")
    t = hierarchy.tree
    node = t.class_idx.copy()  # [K] each class's ancestor at the current level (itself at D)
    D = int(t.depth[node].max())
    levels = [np.arange(len(node), dtype=np.int64)]
    for level in range(D - 1, 0, -1):
        deeper = t.depth[node] > level  # one step up: the node at level + 1 is at most one below `level`
        node[deeper] = t.parent[node[deeper]]
        levels.append(np.unique(node, return_inverse=True)[1].astype(np.int64).reshape(-1))
    return levels[::-1]


class MultiLevelHead(nn.Module):
    """One ``nn.Linear(in_features, n_l)`` per depth level l (n_l the nodes at that depth, padded); ``forward``
    gives the finest head's K class logits, the prediction of the method."""

    def __init__(self, in_features: int, hierarchy: Hierarchy):
        super().__init__()
        levels = level_targets(hierarchy)
        _check_heads_fit([int(t.max()) + 1 for t in levels], int(in_features))
        self.in_features = int(in_features)
        self.num_classes = len(levels[-1])
        self.heads = nn.ModuleList(nn.Linear(self.in_features, int(t.max()) + 1) for t in levels)
        # [D, K] the label's node index at every level; derived from the tree, so not saved in checkpoints
        self.register_buffer("targets", torch.from_numpy(np.stack(levels)), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h: [B, d] -> [B, K]
        return self.heads[-1](h)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, level_sizes={[m.out_features for m in self.heads]}"


def _check_heads_fit(sizes: List[int], width: int) -> None:
    """Refuse heads whose float32 weights, gradients and SGD momentum would not fit in the memory available (a deep
    unbalanced tree pads nearly every class down to every level below its depth)."""
    need = 3 * 4 * sum(sizes) * (width + 1)
    avail = available_memory()
    if avail is not None and need > avail:
        raise ValueError(f"multi-level heads over {sum(sizes):,} nodes ({len(sizes)} levels, padded) at width {width} "
                         f"need about {need / 2 ** 30:,.1f} GiB for weights, gradients and momentum, but "
                         f"{avail / 2 ** 30:,.1f} GiB is available: use a smaller --feature-dim")


class MultiLevelLoss(nn.Module):
    """Sum over the levels of the cross-entropy of the label's node at that level. Holds the model's
    :class:`MultiLevelHead` as a plain attribute: its weights stay in the model's state_dict only."""

    reads_features = True

    def __init__(self, head: MultiLevelHead):
        super().__init__()
        if not isinstance(head, MultiLevelHead):
            raise ValueError(f"MultiLevelLoss needs the model's MultiLevelHead, got {type(head).__name__}")
        object.__setattr__(self, "_head", head)

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # [B, d], [B] -> []
        head = self._head
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= head.num_classes):
            raise ValueError(f"labels must be in [0, {head.num_classes}), got values in [{int(target.min())}, "
                             f"{int(target.max())}]")
        targets = head.targets.to(target.device)
        loss = features.new_zeros((), dtype=torch.float32)
        for level, lin in enumerate(head.heads):
            loss = loss + _linear_ce(features, lin, targets[level][target])
        return loss


def _linear_ce(features: torch.Tensor, lin: nn.Linear, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``lin(features)`` [B, n] against ``target`` [B], by the fused linear loss (no B x n
    logits beyond a chunk); a one-output head gives 0."""
    if lin.out_features == 1:
        return (lin.weight.sum() + lin.bias.sum()) * 0.0  # a level of one node: nothing to learn, grads stay defined
    return linear_hierarchical_loss(features.to(lin.weight.dtype), lin.weight, target, None, kind="cross-entropy",
                                    bias=lin.bias)


class HeadLoss(nn.Module):
    """HXE or soft labels on the logits ``head(h)`` of the model's trainable linear classifier, by the fused
    :func:`~haframe_ext.ops.hier_losses.linear_hierarchical_loss`. ``hierarchy``: a Hierarchy (HXE needs one), or
    for soft labels a distance matrix while K is small. ``normalize`` defaults to False here (the function's default
    is the published True): the published code trains with Adam, which ignores the loss's scale, whereas under SGD
    the normalisation divides the learning rate by the sum of the weights over all nodes (about 86 on CIFAR-100).
    The head is a plain attribute (saved with the model)."""

    reads_features = True

    def __init__(self, head: nn.Linear, kind: str, hierarchy, *, alpha: float = 0.1, normalize: bool = False,
                 beta: float = 10.0):
        super().__init__()
        if kind not in HEAD_LOSS_KINDS.values():
            raise ValueError(f"unknown head loss kind {kind!r}; choose one of {', '.join(HEAD_LOSS_KINDS.values())}")
        if not isinstance(head, nn.Linear):
            raise ValueError(f"{kind} trains a linear classifier (nn.Linear), got {type(head).__name__}")
        object.__setattr__(self, "_head", head)
        self.kind = kind
        self.hierarchy = hierarchy
        self.alpha = float(alpha)
        self.normalize = bool(normalize)
        self.beta = float(beta)

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # [B, d], [B] -> []
        head = self._head
        return linear_hierarchical_loss(features.to(head.weight.dtype), head.weight, target, self.hierarchy,
                                        kind=self.kind, alpha=self.alpha, normalize=self.normalize, beta=self.beta,
                                        bias=head.bias)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, alpha={self.alpha}, normalize={self.normalize}, beta={self.beta}"
