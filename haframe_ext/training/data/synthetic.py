"""The seeded synthetic classification task whose class geometry follows a hierarchy (no files)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import SPLITS, DataError

__all__ = ["SyntheticHierarchical"]


class SyntheticHierarchical(Dataset):
    """A seeded synthetic classification task whose class geometry follows a hierarchy.

    Generation (all from ``seed``; only the per-sample noise depends on ``split``):

    1. Every tree node below the root gets a random offset ``o_v ~ N(0, s_t^2 I_L)`` in a latent
       space of dimension ``L = latent_dim``, with ``s_t = decay^(t-1)`` for a node at depth t
       (scaled so that ``sum_t s_t^2 = 1`` over the deepest path): coarse splits are large,
       fine splits small.
    2. The prototype of a class (a leaf) is the sum of the offsets on its root -> leaf path, so
       classes close in the tree are close in latent space.
    3. A sample of class c is ``z = p_c + difficulty * noise_scale * eps`` with ``eps ~ N(0, I_L)``.
    4. The input is ``x = tanh(z A1 + b1) A2 + 0.05 * difficulty * eta`` with a fixed random
       two-layer map (A1: L x 2D, A2: 2D x D, D = ``input_dim``) and ``eta ~ N(0, I_D)``.

    ``difficulty`` is the one knob: 0 gives perfectly separable prototypes, about 1 makes the
    finest splits (siblings) hard while the coarse structure stays learnable.
    ``n_per_class`` samples per class in the train split, ``eval_per_class`` (default the same)
    in ``val`` and ``test``, or, with ``eval_samples``, that many samples of uniformly drawn classes
    in each of ``val`` and ``test`` (with 10^5 classes, a per-class count would make evaluation cost
    more than training).  Splits are drawn from independent streams of the same generator.
    """

    def __init__(self, hierarchy, n_per_class: int = 50, input_dim: int = 64, difficulty: float = 1.0,
                 seed: int = 0, split: str = "train", *, latent_dim: Optional[int] = None,
                 eval_per_class: Optional[int] = None, eval_samples: Optional[int] = None, decay: float = 0.6,
                 noise_scale: float = 0.35):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        if int(n_per_class) < 1 or int(input_dim) < 1:
            raise DataError(f"n_per_class and input_dim must be >= 1, got {n_per_class}, {input_dim}")
        if difficulty < 0:
            raise DataError(f"difficulty must be >= 0, got {difficulty}")
        if eval_samples is not None and int(eval_samples) < 1:
            raise DataError(f"eval_samples must be >= 1, got {eval_samples}")
        self.hierarchy = hierarchy
        self.classes = list(hierarchy.classes)
        self.num_classes = K = len(self.classes)
        self.split = split
        self.seed = int(seed)
        self.input_dim = D = int(input_dim)
        self.latent_dim = L = int(latent_dim) if latent_dim is not None else D
        self.difficulty = float(difficulty)
        n = int(n_per_class) if split == "train" else int(eval_per_class or n_per_class)

        rng = np.random.default_rng([self.seed, 0x5EED])
        tree = hierarchy.tree  # nodes in breadth-first order: parent [n], depth [n], class_idx [K]
        height = int(tree.depth.max())
        scales = np.array([decay ** (t - 1) for t in range(1, height + 1)], dtype=np.float64)
        scales /= np.sqrt((scales ** 2).sum())
        offsets = np.zeros((tree.num_nodes, L))  # [n, L]; the root's is 0
        offsets[1:] = rng.standard_normal((tree.num_nodes - 1, L)) * scales[tree.depth[1:] - 1, None]
        for t in range(1, height + 1):  # depth by depth: a parent's prototype exists before its children's
            sl = slice(*np.searchsorted(tree.depth, [t, t + 1]))
            offsets[sl] += offsets[tree.parent[sl]]
        protos = offsets[tree.class_idx]  # [K, L]
        H = 2 * D
        A1 = rng.standard_normal((L, H)) / np.sqrt(L) * 1.5
        b1 = rng.standard_normal(H) * 0.1
        A2 = rng.standard_normal((H, D)) / np.sqrt(H)
        self.prototypes = torch.from_numpy(protos).float()

        split_rng = np.random.default_rng([self.seed, 1 + SPLITS.index(split), 0xDA7A])
        if split != "train" and eval_samples is not None:
            y = np.sort(split_rng.integers(0, K, int(eval_samples)))
        else:
            y = np.repeat(np.arange(K), n)
        N = len(y)
        z = protos[y] + self.difficulty * noise_scale * split_rng.standard_normal((N, L))
        x = np.tanh(z @ A1 + b1) @ A2 + 0.05 * self.difficulty * split_rng.standard_normal((N, D))
        perm = split_rng.permutation(N)
        self.inputs = torch.from_numpy(x[perm]).float().contiguous()
        self.targets = torch.from_numpy(y[perm]).long()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.inputs[i], self.targets[i]
