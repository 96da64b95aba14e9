"""Tree operators: class distances, E, S and their products on a tree, with no K x K matrix (docs/design.md section 3).

Every node v carries a level ``h(v)``: 0 at the leaves, and for an inner node the distance it
gives as a lowest common ancestor, so that ``d[i, j] = h(LCA(i, j))``.  For any function f with
``f(0) = value on the diagonal``, the matrix ``f(d)`` is a sum over the nodes,

    f(d) = A diag(c) A^T,    c_v = f(h(v)) - f(h(parent v)),    c_root = f(h(root)),

with A the [K, nodes] indicator of "node v is an ancestor of (or is) class k".  The sum telescopes
along the root -> LCA path, so ``A diag(c) A^T [i, j] = f(h(LCA(i, j)))``.  With
``f = exp(-gamma h / d_max)`` that is E, with ``f = h`` it is d itself.  Wherever a method takes
``gamma``, a callable kernel ``k(d, d_max)`` nonincreasing in d (``frame.profile.Profile``) may stand
in for the exponential (its c_v are then >= 0 too).  Products with them cost
O(nnz(A)) = O(sum of the leaf depths), and so do the exact s_min (Sherman-Morrison up the tree)
and an exact frame (a sparse factor plus a rank-one term).

Nodes are in breadth-first order (a parent before its children, depths non-decreasing), so each
depth is one contiguous slice: the recursions below run one numpy pass per depth.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse

__all__ = ["TreeOperator"]


class TreeOperator:
    """Products with E, S and d, pair distances and the exact frame of a tree, in O(nodes) memory."""

    def __init__(self, parent: np.ndarray, depth: np.ndarray, level: np.ndarray, class_idx: np.ndarray):
        """parent [n] (breadth-first order, -1 at the root), depth [n], level [n] (0 at leaves), class_idx [K]."""
        self.parent = np.asarray(parent, dtype=np.int64)  # [n]
        self.depth = np.asarray(depth, dtype=np.int64)  # [n]
        self.level = np.asarray(level, dtype=np.float64)  # [n]
        self.class_idx = np.asarray(class_idx, dtype=np.int64)  # [K]
        n = len(self.parent)
        self.num_nodes, self.num_classes = n, len(self.class_idx)
        self._bounds = np.searchsorted(self.depth, np.arange(int(self.depth.max()) + 2))  # depth L: [b[L], b[L+1])
        nchild = np.bincount(self.parent[1:], minlength=n)
        self.branching = nchild >= 2  # [n] nodes that are the LCA of some pair of classes
        self._up = None  # binary-lifting table, built on first pair query
        self._A = None

    # ------------------------------------------------------------------ structure
    @property
    def d_max(self) -> float:
        """The largest distance between two classes (the highest level of a branching node)."""
        return float(self.level[self.branching].max())

    @property
    def d_min(self) -> float:
        """The smallest distance between two distinct classes."""
        return float(self.level[self.branching].min())

    @property
    def ancestry(self) -> scipy.sparse.csr_matrix:
        """A, float64 [K, n] sparse: A[k, v] = 1 where node v is class k's leaf or one of its ancestors."""
        if self._A is None:
            K = self.num_classes
            rows, cols = [], []
            cur, lab = self.class_idx.copy(), np.arange(K)
            while len(cur):
                rows.append(lab)
                cols.append(cur)
                up = self.parent[cur]
                keep = up >= 0
                cur, lab = up[keep], lab[keep]
            rows, cols = np.concatenate(rows), np.concatenate(cols)
            self._A = scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(K, self.num_nodes))
        return self._A

    def coefficients(self, values: np.ndarray) -> np.ndarray:
        """c [n] with A diag(c) A^T = f(d), from values [n] = f(level) at every node."""
        c = values.astype(np.float64).copy()
        c[1:] -= values[self.parent[1:]]
        return c

    def product(self, c: np.ndarray, x: np.ndarray) -> np.ndarray:
        """A diag(c) A^T x for x [K] or [K, m]: a product with f(d) in O(nnz(A) m)."""
        A = self.ancestry
        up = A.T @ x  # [n] or [n, m]: sums of x over the classes under each node
        return A @ (c[:, None] * up if up.ndim == 2 else c * up)

    # ------------------------------------------------------------------ the kernel E and the similarity S
    def kernel(self, gamma, d) -> np.ndarray:
        """The kernel at distances d (any shape), float64: exp(-gamma d / d_max) for a number gamma; a callable
        gamma(d, d_max) (``frame.profile.Profile``) is called instead."""
        if callable(gamma):
            return np.asarray(gamma(np.asarray(d, np.float64), self.d_max), dtype=np.float64)
        return np.exp(-float(gamma) * np.asarray(d, np.float64) / self.d_max)

    def kernel_values(self, gamma) -> np.ndarray:
        """The kernel at every node's level, float64 [n]."""
        return self.kernel(gamma, self.level)

    def kernel_coefficients(self, gamma: float) -> np.ndarray:
        """c [n] >= 0 with E = exp(-gamma d / d_max) = A diag(c) A^T."""
        return self.coefficients(self.kernel_values(gamma))

    def kernel_product(self, gamma: float, x: np.ndarray) -> np.ndarray:
        """E x for x [K] or [K, m]."""
        return self.product(self.kernel_coefficients(gamma), np.asarray(x, dtype=np.float64))

    def similarity_product(self, gamma: float, s_min: float, x: np.ndarray) -> np.ndarray:
        """S x = (1 - s_min) E x + s_min 1 (1^T x) for x [K] or [K, m]."""
        x = np.asarray(x, dtype=np.float64)
        return (1.0 - s_min) * self.kernel_product(gamma, x) + s_min * x.sum(axis=0, keepdims=x.ndim == 2)

    def similarity_rows(self, gamma: float, s_min: float, rows) -> np.ndarray:
        """S[rows, :], float64 [len(rows), K], computed in blocks from the tree."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        K = self.num_classes
        out = np.empty((len(rows), K))
        block = max(1, (1 << 22) // max(K, 1))
        for a in range(0, len(rows), block):
            r = rows[a:a + block]
            out[a:a + block] = self.similarity_from_distances(gamma, s_min, self.pair_distances(
                np.repeat(r, K), np.tile(np.arange(K), len(r)))).reshape(len(r), K)
        return out

    def similarity_from_distances(self, gamma: float, s_min: float, d: np.ndarray) -> np.ndarray:
        """S entries for distances d (any shape): (1 - s_min) exp(-gamma d / d_max) + s_min, 1 where d = 0."""
        s = (1.0 - s_min) * self.kernel(gamma, d) + s_min
        return np.where(np.asarray(d) == 0, 1.0, s)

    def expected_distances(self, probs: np.ndarray) -> np.ndarray:
        """CRM's expected cost sum_j d[k, j] p_j for all k, [N, K] from probs [N, K], in O(N nnz(A))."""
        c = self.coefficients(self.level)
        probs = np.asarray(probs, dtype=np.float64)
        return self.product(c, probs.T).T

    # ------------------------------------------------------------------ pair distances (LCA)
    def _lifting(self) -> np.ndarray:
        """up[j, v] = the 2^j-th ancestor of v (the root's ancestor is the root), int64 [levels, n]."""
        if self._up is None:
            p = np.where(self.parent >= 0, self.parent, 0)
            table = [p]
            for _ in range(max(1, int(self.depth.max()).bit_length() - 1)):
                table.append(table[-1][table[-1]])
            self._up = np.stack(table)
        return self._up

    def lca(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Lowest common ancestors of node pairs, int64 [P] from node indices a [P], b [P]."""
        up = self._lifting()
        a, b = np.asarray(a, np.int64).copy(), np.asarray(b, np.int64).copy()
        swap = self.depth[a] < self.depth[b]
        a[swap], b[swap] = b[swap], a[swap]  # a is the deeper one
        diff = self.depth[a] - self.depth[b]
        for j in range(len(up)):
            move = (diff >> j) & 1 == 1
            a[move] = up[j][a[move]]
        for j in range(len(up) - 1, -1, -1):
            differ = up[j][a] != up[j][b]
            a[differ], b[differ] = up[j][a[differ]], up[j][b[differ]]
        return np.where(a == b, a, self.parent[a])

    def pair_distances(self, i, j) -> np.ndarray:
        """d[i, j] for class-label arrays i and j of one shape, float64, through LCA queries."""
        i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
        shape = np.broadcast_shapes(i.shape, j.shape)
        i, j = np.broadcast_to(i, shape).reshape(-1), np.broadcast_to(j, shape).reshape(-1)
        return self.level[self.lca(self.class_idx[i], self.class_idx[j])].reshape(shape)

    def dense_distances(self) -> np.ndarray:
        """d as a dense float64 [K, K] (for tests and small K)."""
        K = self.num_classes
        return self.pair_distances(np.arange(K)[:, None], np.arange(K)[None, :])

    # ------------------------------------------------------------------ s_min and the exact frame
    def _levels_bottom_up(self):
        """(start, end, parent start) of each depth slice, deepest first."""
        b = self._bounds
        for L in range(len(b) - 2, -1, -1):
            yield int(b[L]), int(b[L + 1]), (int(b[L - 1]) if L else 0)

    def _sherman_morrison(self, c: np.ndarray):
        """(q [n], r [n]): q_v = 1^T E_v^-1 1 of node v's subtree sum, r_v = 1 / (1 + c_v Q_v) (1 / c_v at leaves)."""
        n = self.num_nodes
        q = np.zeros(n)
        r = np.zeros(n)
        Q = np.zeros(n)  # sum of the children's q
        leaf = ~np.isin(np.arange(n), self.parent)
        for s, e, ps in self._levels_bottom_up():
            sl = slice(s, e)
            lf = leaf[sl]
            r[sl] = np.where(lf, 1.0 / np.where(lf, c[sl], 1.0), 1.0 / (1.0 + c[sl] * Q[sl]))
            q[sl] = np.where(lf, r[sl], Q[sl] * r[sl])
            if s > 0:
                Q[ps:s] += np.bincount(self.parent[sl] - ps, weights=q[sl], minlength=s - ps)
        return q, r, leaf

    def ones_quadratic(self, gamma: float) -> float:
        """1^T E^-1 1 by Sherman-Morrison up the tree, O(nodes)."""
        c = self.kernel_coefficients(gamma)
        return float(self._sherman_morrison(c)[0][0])

    def exact_s_min(self, gamma: float) -> float:
        """The most negative s keeping S positive semi-definite: -1 / (1^T E^-1 1 - 1), clipped to >= -1."""
        q = self.ones_quadratic(gamma)
        return -1.0 if q <= 1.0 else max(-1.0 / (q - 1.0), -1.0)

    def frame_factor(self, gamma: float, s_min: float):
        """(F, t): the exact frame in node space is W = F + 1 t^T ([K, n], unit rows, W W^T = S).

        F = sqrt(1 - s) A diag(sqrt(c)) is [K, n] sparse, u = 1 [K] and t [n] dense: with
        z = F0^T E^-1 1 (F0 = A diag(sqrt c), F0 z = 1, |z|^2 = q = 1^T E^-1 1),
        S = F0 ((1 - s) I + s z z^T) F0^T, whose middle factor has the square root
        sqrt(1 - s) (I + b z z^T / q), b = sqrt(1 + s q / (1 - s)) - 1.
        """
        c = self.kernel_coefficients(gamma)
        q, r, leaf = self._sherman_morrison(c)
        P = np.ones(self.num_nodes)  # product of r over the strict ancestors
        for L in range(1, len(self._bounds) - 1):
            s, e = int(self._bounds[L]), int(self._bounds[L + 1])
            P[s:e] = P[self.parent[s:e]] * r[self.parent[s:e]]
        sc = np.sqrt(c)
        z = sc * P * q  # [n]
        Q = q[0]
        s = float(s_min)
        b = math.sqrt(max(0.0, 1.0 + s * Q / (1.0 - s))) - 1.0  # 0 under rounding at s = s_min
        scale = math.sqrt(1.0 - s)
        F = (self.ancestry @ scipy.sparse.diags(scale * sc)).tocsr()  # [K, n]
        return F, scale * b / Q * z

    def dense_frame(self, gamma: float, s_min: float) -> np.ndarray:
        """The exact frame in node space as a dense [K, n] array (small K only)."""
        F, t = self.frame_factor(gamma, s_min)
        return F.toarray() + t[None, :]

    def projected_frame(self, gamma: float, s_min: float, dim: int, seed: int, dtype=np.float64,
                        directions=None) -> np.ndarray:
        """The exact frame times [n, dim] node directions, rows renormalised: [K, dim].

        directions: None draws a seeded Gaussian (Johnson-Lindenstrauss), block by block; or an [n, dim] array of
        unit rows, one direction per node (``frame.align.node_directions``).
        """
        F, t = self.frame_factor(gamma, s_min)
        Fc = F.tocsc()
        n = self.num_nodes
        if directions is not None and tuple(np.shape(directions)) != (n, dim):
            raise ValueError(f"directions must be [nodes, dim] = [{n}, {dim}], got {tuple(np.shape(directions))}")
        rng = np.random.default_rng(seed)
        out = np.zeros((self.num_classes, dim), dtype=dtype)
        tg = np.zeros(dim)
        block = max(1, (1 << 24) // dim)
        for a in range(0, n, block):  # Gaussian rows drawn block by block: never [n, dim] at once
            m = min(block, n - a)
            G = rng.standard_normal((m, dim)) if directions is None else np.asarray(directions[a:a + m], np.float64)
            out += (Fc[:, a:a + block] @ G).astype(dtype, copy=False)
            tg += t[a:a + block] @ G
        out += tg.astype(dtype)[None, :]
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out
