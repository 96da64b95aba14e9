"""How well a frame keeps its target: separation margins, Gram errors over every pair or sampled pairs, near twins."""

from __future__ import annotations

import warnings

import numpy as np

from ..sizes import DENSE_MAX_K

__all__ = ["measure", "sampled_pairs", "max_offdiag", "NEAR_TWIN"]

NEAR_TWIN = 0.99  # two class vectors with a cosine above this count as merged
SAMPLED_PAIRS = 200_000  # random class pairs behind the sampled Gram error of a large frame
NEIGHBOURS = 16  # tree neighbours per class checked for the separation margin of a large frame


def sampled_pairs(W: np.ndarray, tree, seed: int):
    """Class pairs close in the tree plus random pairs, with their cosines: (i [P], j [P], cos [P]).

    Close pairs are neighbours within NEIGHBOURS places in breadth-first leaf order (siblings and
    cousins are adjacent there); their cosines come from shifted views, with no gathered copy.
    """
    K = len(W)
    order = np.argsort(tree.class_idx, kind="stable") if tree is not None else np.arange(K)
    Wo = W[order]
    i, j, cos = [], [], []
    for o in range(1, min(NEIGHBOURS, K - 1) + 1):
        i.append(order[:-o])
        j.append(order[o:])
        cos.append(np.einsum("pd,pd->p", Wo[:-o], Wo[o:]))
    rng = np.random.default_rng(seed)
    ri, rj = rng.integers(0, K, SAMPLED_PAIRS), rng.integers(0, K, SAMPLED_PAIRS)
    keep = ri != rj
    ri, rj = ri[keep], rj[keep]
    i.append(ri)
    j.append(rj)
    cos.append(np.einsum("pd,pd->p", W[ri], W[rj]))
    return np.concatenate(i), np.concatenate(j), np.concatenate(cos)


def max_offdiag(W: np.ndarray) -> float:
    """max_{j != k} w_j . w_k over every pair, in row blocks ([block, K] at a time)."""
    K = len(W)
    best = -np.inf
    block = max(1, (1 << 24) // K)
    for a in range(0, K, block):
        G = W[a:a + block] @ W.T
        G[np.arange(G.shape[0]), np.arange(a, a + G.shape[0])] = -np.inf
        best = max(best, float(G.max()))
    return best


def measure(W: np.ndarray, targets, exact_margin: float, tree, method: str, seed: int) -> dict:  # W: [K, dim]
    """Margins, Gram error and near twins of unit rows W; targets(i, j) gives S[i, j] for index arrays (broadcast).

    Every pair up to DENSE_MAX_K classes, else tree neighbours and random pairs (``sampled_pairs``).
    Warns when some classes have a near-twin (cos > NEAR_TWIN): they cannot be told apart.
    """
    K = len(W)
    if K <= DENSE_MAX_K:
        max_cos, scope = max_offdiag(W), "all pairs"
        G = W @ W.T
        idx = np.arange(K)
        err = np.abs(G - targets(idx[:, None], idx[None, :]))[~np.eye(K, dtype=bool)]
        twins = int(((G - 2 * np.eye(K)) > NEAR_TWIN).any(axis=1).sum())
    else:
        i, j, cos = sampled_pairs(W, tree, seed)
        err = np.abs(cos - targets(i, j))
        kind = "tree-neighbour and random" if tree is not None else "sampled"
        max_cos, scope = float(cos.max()), f"{len(i)} {kind} pairs"
        twins = int(len(np.unique(np.concatenate([i[cos > NEAR_TWIN], j[cos > NEAR_TWIN]]))))
    if twins:
        warnings.warn(
            f"the {method} frame in dim={W.shape[1]} gives {twins} of {K} classes a near-twin (cos > "
            f"{NEAR_TWIN}): those classes cannot be told apart; use a larger dim"
            + (" or approximate=True (projection)" if method == "truncate" else ""), RuntimeWarning, stacklevel=4)
    return {"method": method, "margin": 1.0 - max_cos, "exact_margin": exact_margin,
            "gram_error_mean": float(err.mean()), "gram_error_max": float(err.max()), "near_twins": twins,
            "pairs": scope}
